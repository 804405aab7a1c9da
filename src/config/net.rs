//! `network-interfaces` (config file), `PUT /network-interfaces/{id}` and
//! `PATCH /network-interfaces/{id}`: virtio-net devices backed by host TAP devices.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::id_problem;
use super::rate_limiter::{RateLimiterConfig, RateLimiterError};
use super::unsupported::UnsupportedValue;

/// Linux's IFNAMSIZ counts the terminating NUL.
pub const MAX_HOST_DEV_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// A MAC address, written as six colon-separated hex pairs ("06:00:ac:10:00:02").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Multicast addresses (bit 0 of the first byte) cannot be a NIC's own address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid MAC address `{0}`: expected six pairs of hex digits separated by ':', \
     like 06:00:ac:10:00:02"
)]
pub struct MacAddrParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacAddrParseError;

    /// Same rule as Firecracker: exactly six parts of exactly two hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrParseError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Firecracker's `NetworkInterfaceConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    /// Name of an existing host TAP device.
    pub host_dev_name: String,
    /// Absent: ember generates a locally administered MAC for the device (Firecracker
    /// offers none and leaves the guest to pick a random one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Newer Firecracker (VIRTIO_NET_F_MTU); refused until the device offers it.
    #[serde(default, skip_serializing_if = "UnsupportedValue::is_unset")]
    pub mtu: UnsupportedValue,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("iface_id `{id}` is invalid: it {problem}")]
    IfaceId { id: String, problem: &'static str },
    #[error(
        "host_dev_name `{name}` is invalid: a Linux interface name is up to \
         {MAX_HOST_DEV_NAME_LEN} bytes (empty: the kernel names a new TAP), not \".\" or \"..\", without '/', ':' or whitespace"
    )]
    HostDevName { name: String },
    #[error("guest_mac {0} is a multicast address; the lowest bit of the first byte must be 0")]
    MulticastMac(MacAddr),
    #[error("guest_mac must not be 00:00:00:00:00:00")]
    ZeroMac,
    #[error("{0} is not supported by ember; leave it out or set it to null")]
    Unsupported(&'static str),
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    #[error("iface_id `{0}` is used by more than one network interface")]
    DuplicateId(String),
    #[error("host_dev_name `{name}` is already used by network interface `{other}`")]
    HostDevNameInUse { name: String, other: String },
    #[error("guest_mac {mac} is already used by network interface `{other}`")]
    GuestMacInUse { mac: MacAddr, other: String },
    #[error("iface_id `{0}` does not match any configured network interface")]
    NotFound(String),
}

/// Linux's `dev_valid_name`, so a bad name fails here rather than in TUNSETIFF. An empty
/// name is Firecracker's too: TUNSETIFF then creates a TAP the kernel names (`tapN`).
fn host_dev_name_ok(name: &str) -> bool {
    name.is_empty()
        || name.len() <= MAX_HOST_DEV_NAME_LEN
            && name != "."
            && name != ".."
            && !name
                .chars()
                .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

impl NetworkInterfaceConfig {
    pub fn validate(&self) -> Result<(), NetError> {
        if let Some(problem) = id_problem(&self.iface_id) {
            return Err(NetError::IfaceId {
                id: self.iface_id.clone(),
                problem,
            });
        }
        if !host_dev_name_ok(&self.host_dev_name) {
            return Err(NetError::HostDevName {
                name: self.host_dev_name.clone(),
            });
        }
        if let Some(mac) = self.guest_mac {
            if mac.is_multicast() {
                return Err(NetError::MulticastMac(mac));
            }
            if mac.0 == [0; 6] {
                return Err(NetError::ZeroMac);
            }
        }
        if !self.mtu.is_unset() {
            return Err(NetError::Unsupported("mtu"));
        }
        check_limiters(&self.rx_rate_limiter, &self.tx_rate_limiter)?;
        Ok(())
    }

    /// Firecracker's rule: no two interfaces share a TAP device or a guest MAC.
    fn conflict_with(&self, other: &NetworkInterfaceConfig) -> Option<NetError> {
        // Two empty names are two new TAPs, each named by the kernel.
        if other.host_dev_name == self.host_dev_name && !self.host_dev_name.is_empty() {
            return Some(NetError::HostDevNameInUse {
                name: self.host_dev_name.clone(),
                other: other.iface_id.clone(),
            });
        }
        match self.guest_mac {
            Some(mac) if other.guest_mac == Some(mac) => Some(NetError::GuestMacInUse {
                mac,
                other: other.iface_id.clone(),
            }),
            _ => None,
        }
    }
}

/// Firecracker's `PUT /network-interfaces/{id}` on a pre-boot list: validates `iface`,
/// refuses a TAP or MAC another interface uses, then replaces the interface with the same
/// id in place or appends it.
pub fn insert_network_interface(
    list: &mut Vec<NetworkInterfaceConfig>,
    iface: NetworkInterfaceConfig,
) -> Result<(), NetError> {
    iface.validate()?;
    if let Some(e) = list
        .iter()
        .filter(|o| o.iface_id != iface.iface_id)
        .find_map(|o| iface.conflict_with(o))
    {
        return Err(e);
    }
    match list.iter_mut().find(|o| o.iface_id == iface.iface_id) {
        Some(slot) => *slot = iface,
        None => list.push(iface),
    }
    Ok(())
}

/// Checks a whole list as a config file gives it. Returns the offending index with the error.
pub fn validate_network_interfaces(
    list: &[NetworkInterfaceConfig],
) -> Result<(), (usize, NetError)> {
    for (i, n) in list.iter().enumerate() {
        n.validate().map_err(|e| (i, e))?;
        let earlier = list.get(..i).unwrap_or_default();
        if earlier.iter().any(|o| o.iface_id == n.iface_id) {
            return Err((i, NetError::DuplicateId(n.iface_id.clone())));
        }
        if let Some(e) = earlier.iter().find_map(|o| n.conflict_with(o)) {
            return Err((i, e));
        }
    }
    Ok(())
}

fn check_limiters(
    rx: &Option<RateLimiterConfig>,
    tx: &Option<RateLimiterConfig>,
) -> Result<(), NetError> {
    if let Some(rl) = rx {
        rl.validate("rx_rate_limiter")?;
    }
    if let Some(rl) = tx {
        rl.validate("tx_rate_limiter")?;
    }
    Ok(())
}

/// Body of `PATCH /network-interfaces/{id}` (after start, as in Firecracker): new
/// rate-limiter buckets; a bucket left out stays as it is, one with size 0 is removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterfaceUpdate {
    pub fn validate(&self) -> Result<(), NetError> {
        if let Some(problem) = id_problem(&self.iface_id) {
            return Err(NetError::IfaceId {
                id: self.iface_id.clone(),
                problem,
            });
        }
        check_limiters(&self.rx_rate_limiter, &self.tx_rate_limiter)
    }

    /// Applies the update to the interface with the same id in `ifaces`.
    pub fn apply(&self, ifaces: &mut [NetworkInterfaceConfig]) -> Result<(), NetError> {
        self.validate()?;
        let iface = ifaces
            .iter_mut()
            .find(|i| i.iface_id == self.iface_id)
            .ok_or_else(|| NetError::NotFound(self.iface_id.clone()))?;
        for (update, slot) in [
            (&self.rx_rate_limiter, &mut iface.rx_rate_limiter),
            (&self.tx_rate_limiter, &mut iface.tx_rate_limiter),
        ] {
            if let Some(u) = update {
                let new = slot.unwrap_or_default().updated(u);
                *slot = new.is_active().then_some(new);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkInterfaceConfig, String> {
        let c: NetworkInterfaceConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterfaceConfig {
        let mac = mac
            .map(|m| format!(r#", "guest_mac": "{m}""#))
            .unwrap_or_default();
        parse(&format!(
            r#"{{"iface_id": "{id}", "host_dev_name": "{tap}"{mac}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn mac_parsing() {
        let m: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(m.0, [6, 0, 0xac, 0x10, 0, 2]);
        assert_eq!(m.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "06:00:ac:10:00:0g",
            "06-00-ac-10-00-02",
            "+6:00:ac:10:00:02",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert!(e.to_string().contains("invalid MAC address"), "{bad}");
        }
        assert_eq!(serde_json::to_string(&m).unwrap(), r#""06:00:ac:10:00:02""#);
    }

    #[test]
    fn minimal_and_full() {
        let n = iface("eth0", "tap0", None);
        assert_eq!(n.guest_mac, None);
        let n = parse(
            r#"{"iface_id": "eth0", "host_dev_name": "tap-ember_0123", "guest_mac": "AA:FC:00:00:00:01",
                "rx_rate_limiter": null, "tx_rate_limiter": {}, "mtu": null}"#,
        )
        .unwrap();
        assert_eq!(n.guest_mac, Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                r#"{"iface_id": "", "host_dev_name": "tap0"}"#,
                "iface_id `` is invalid",
            ),
            (
                r#"{"iface_id": "eth.0", "host_dev_name": "tap0"}"#,
                "iface_id `eth.0` is invalid",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0123456789abc"}"#,
                "host_dev_name `tap0123456789abc`",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap/0"}"#,
                "host_dev_name",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap 0"}"#,
                "host_dev_name",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": ".."}"#,
                "host_dev_name",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01"}"#,
                "guest_mac 01:00:5e:00:00:01 is a multicast",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0", "guest_mac": "00:00:00:00:00:00"}"#,
                "guest_mac must not be",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0", "guest_mac": "xx"}"#,
                "invalid MAC address `xx`",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0", "rx_rate_limiter": {"bandwidth": {"size": 1}}}"#,
                "missing field `refill_time`",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0", "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615}}}"#,
                "tx_rate_limiter.ops.refill_time",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0", "mtu": 9000}"#,
                "mtu is not supported",
            ),
            (
                r#"{"iface_id": "e", "host_dev_name": "tap0", "allow_mmds_requests": true}"#,
                "unknown field `allow_mmds_requests`",
            ),
            (r#"{"iface_id": "e"}"#, "missing field `host_dev_name`"),
        ];
        for (json, want) in cases {
            let e = parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn list_rules() {
        let a = iface("a", "tap0", Some("06:00:00:00:00:01"));
        let b = iface("b", "tap1", Some("06:00:00:00:00:02"));
        assert!(validate_network_interfaces(&[a.clone(), b.clone()]).is_ok());
        let (i, e) = validate_network_interfaces(&[a.clone(), a.clone()]).unwrap_err();
        assert_eq!((i, e), (1, NetError::DuplicateId("a".into())));
        let (_, e) =
            validate_network_interfaces(&[a.clone(), iface("c", "tap0", None)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("host_dev_name `tap0` is already used by network interface `a`"),
            "{e}"
        );
        let (_, e) = validate_network_interfaces(&[
            a.clone(),
            iface("c", "tap2", Some("06:00:00:00:00:01")),
        ])
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("guest_mac 06:00:00:00:00:01 is already used"),
            "{e}"
        );

        let mut list = vec![];
        insert_network_interface(&mut list, a.clone()).unwrap();
        insert_network_interface(&mut list, b.clone()).unwrap();
        assert!(matches!(
            insert_network_interface(&mut list, iface("c", "tap1", None)),
            Err(NetError::HostDevNameInUse { .. })
        ));
        // Same id replaces, and may keep its own TAP and MAC.
        let a2 = iface("a", "tap0", Some("06:00:00:00:00:09"));
        insert_network_interface(&mut list, a2.clone()).unwrap();
        assert_eq!(list, vec![a2, b]);
    }

    #[test]
    fn update() {
        let mut list = vec![iface("a", "tap0", None)];
        let u: NetworkInterfaceUpdate =
            serde_json::from_str(r#"{"iface_id": "a", "rx_rate_limiter": null}"#).unwrap();
        u.apply(&mut list).unwrap();
        assert_eq!(list[0].rx_rate_limiter, None);
        let u: NetworkInterfaceUpdate = serde_json::from_str(
            r#"{"iface_id": "a", "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
        )
        .unwrap();
        u.apply(&mut list).unwrap();
        assert_eq!(
            list[0].tx_rate_limiter.and_then(|r| r.ops).map(|b| b.size),
            Some(1)
        );
        let u: NetworkInterfaceUpdate = serde_json::from_str(
            r#"{"iface_id": "a", "tx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#,
        )
        .unwrap();
        u.apply(&mut list).unwrap();
        assert_eq!(list[0].tx_rate_limiter, None);
        let u: NetworkInterfaceUpdate =
            serde_json::from_str(r#"{"iface_id": "zz", "rx_rate_limiter": {}}"#).unwrap();
        assert_eq!(u.apply(&mut list), Err(NetError::NotFound("zz".into())));
    }

    #[test]
    fn round_trip() {
        let n = iface("eth0", "tap0", Some("06:00:ac:10:00:02"));
        let s = serde_json::to_string(&n).unwrap();
        assert_eq!(parse(&s).unwrap(), n);
    }
}
