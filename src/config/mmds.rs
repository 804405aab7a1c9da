//! `mmds-config` (config file) and `PUT /mmds/config`: which interfaces answer for the
//! metadata service, at which address, and in which version.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::NetworkInterfaceConfig;
pub use crate::mmds::MmdsVersion;
use crate::mmds::stack::DEFAULT_IPV4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    pub network_interfaces: Vec<String>,
    /// Absent: 169.254.169.254.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    #[serde(default)]
    pub imds_compat: bool,
}

/// Firecracker's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsConfigError {
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    EmptyNetworkIfaceList,
    #[error("The MMDS IPv4 address is not link local.")]
    InvalidIpv4Addr,
    #[error(
        "The list of network interface IDs provided contains at least one ID that does not \
         correspond to any existing network interface."
    )]
    InvalidNetworkInterfaceId,
}

impl MmdsConfig {
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_IPV4)
    }

    /// Checks the address and that every named interface is configured.
    pub fn validate(&self, ifaces: &[NetworkInterfaceConfig]) -> Result<(), MmdsConfigError> {
        // 169.254.0.0/16, without its first and last /24 (RFC 3927 reserves them).
        let [a, b, c, _] = self.ipv4().octets();
        if a != 169 || b != 254 || c == 0 || c == 255 {
            return Err(MmdsConfigError::InvalidIpv4Addr);
        }
        if self.network_interfaces.is_empty() {
            return Err(MmdsConfigError::EmptyNetworkIfaceList);
        }
        let known = |id: &String| ifaces.iter().any(|i| &i.iface_id == id);
        if !self.network_interfaces.iter().all(known) {
            return Err(MmdsConfigError::InvalidNetworkInterfaceId);
        }
        Ok(())
    }
}
