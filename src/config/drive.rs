//! `drives` (config file), `PUT /drives/{id}` and `PATCH /drives/{id}`: virtio-blk devices.

use serde::{Deserialize, Serialize};

use super::rate_limiter::{RateLimiterConfig, RateLimiterError};
use super::unsupported::UnsupportedValue;
use super::{id_problem, path_problem};

/// How the device treats the guest's flush requests (Firecracker's `cache_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are acknowledged without reaching the disk; VIRTIO_BLK_F_FLUSH is not offered.
    #[default]
    Unsafe,
    /// VIRTIO_BLK_F_FLUSH is offered and a flush fsyncs the backing file.
    Writeback,
}

/// Firecracker's `io_engine`: how the drive's requests reach its file. The guest sees the
/// same device either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// pread/pwrite/fdatasync on the VMM thread, one request at a time.
    #[default]
    Sync,
    /// An io_uring per drive: requests run concurrently and complete in any order
    /// (`src/devices/virtio/block/uring.rs`).
    Async,
}

/// Firecracker's `BlockDeviceConfig` (virtio-block flavour; vhost-user `socket` is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    /// Used in `root=PARTUUID=...` when this is the root device; else unused, as in
    /// Firecracker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub is_read_only: bool,
    /// Required for virtio-block. Defaulted to "" only so that a missing path gets a
    /// message of ours that mentions `socket`, rather than serde's.
    #[serde(default)]
    pub path_on_host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Always reported (`GET /vm/config`), `Sync` when not given, as Firecracker does;
    /// null reads as not given.
    #[serde(default, deserialize_with = "super::null_as_default")]
    pub io_engine: IoEngine,
    #[serde(default, skip_serializing_if = "UnsupportedValue::is_unset")]
    pub socket: UnsupportedValue,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriveError {
    #[error("drive_id `{id}` is invalid: it {problem}")]
    DriveId { id: String, problem: &'static str },
    #[error("path_on_host {0}")]
    PathOnHost(&'static str),
    #[error("path_on_host is required (vhost-user drives, given by `socket`, are not supported)")]
    MissingPathOnHost,
    #[error(
        "partuuid `{0}` is invalid: it goes on the kernel command line, so it must be \
         non-empty printable ASCII without spaces"
    )]
    Partuuid(String),
    #[error("{0} is not supported by ember; leave it out or set it to null")]
    Unsupported(&'static str),
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    #[error("drive_id `{0}` is used by more than one drive")]
    DuplicateId(String),
    #[error("is_root_device: drive `{existing}` is already the root device; only one drive can be")]
    SecondRootDevice { existing: String },
    #[error("drive_id `{0}` does not match any configured drive")]
    NotFound(String),
}

impl DriveConfig {
    pub fn validate(&self) -> Result<(), DriveError> {
        if let Some(problem) = id_problem(&self.drive_id) {
            return Err(DriveError::DriveId {
                id: self.drive_id.clone(),
                problem,
            });
        }
        // A socket means vhost-user, and says more about what the user wanted than the
        // missing path it comes with.
        if !self.socket.is_unset() {
            return Err(DriveError::Unsupported("socket (vhost-user-block)"));
        }
        if self.path_on_host.is_empty() {
            return Err(DriveError::MissingPathOnHost);
        }
        if let Some(p) = path_problem(&self.path_on_host) {
            return Err(DriveError::PathOnHost(p));
        }
        if let Some(u) = &self.partuuid
            && (u.is_empty() || !u.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(DriveError::Partuuid(u.clone()));
        }
        if let Some(rl) = &self.rate_limiter {
            rl.validate("rate_limiter")?;
        }
        Ok(())
    }
}

/// Firecracker's `PUT /drives/{id}` on a pre-boot list: validates `drive`, replaces the
/// drive with the same id in place or appends it, and refuses a second root device.
pub fn insert_drive(drives: &mut Vec<DriveConfig>, drive: DriveConfig) -> Result<(), DriveError> {
    drive.validate()?;
    if drive.is_root_device
        && let Some(root) = drives
            .iter()
            .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
    {
        return Err(DriveError::SecondRootDevice {
            existing: root.drive_id.clone(),
        });
    }
    match drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
        Some(slot) => *slot = drive,
        None => drives.push(drive),
    }
    Ok(())
}

/// Checks a whole list as a config file gives it: each drive valid, ids unique, at most
/// one root. Returns the index of the offending drive with the error.
pub fn validate_drives(drives: &[DriveConfig]) -> Result<(), (usize, DriveError)> {
    for (i, d) in drives.iter().enumerate() {
        d.validate().map_err(|e| (i, e))?;
        let earlier = drives.get(..i).unwrap_or_default();
        if earlier.iter().any(|e| e.drive_id == d.drive_id) {
            return Err((i, DriveError::DuplicateId(d.drive_id.clone())));
        }
        if d.is_root_device
            && let Some(root) = earlier.iter().find(|e| e.is_root_device)
        {
            let existing = root.drive_id.clone();
            return Err((i, DriveError::SecondRootDevice { existing }));
        }
    }
    Ok(())
}

/// Body of `PATCH /drives/{id}`: a new backing file for an existing drive, and/or new
/// rate-limiter buckets (a bucket left out stays as it is; one with size 0 is removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DriveUpdate {
    pub fn validate(&self) -> Result<(), DriveError> {
        if let Some(problem) = id_problem(&self.drive_id) {
            return Err(DriveError::DriveId {
                id: self.drive_id.clone(),
                problem,
            });
        }
        if let Some(p) = self.path_on_host.as_deref().and_then(path_problem) {
            return Err(DriveError::PathOnHost(p));
        }
        if let Some(rl) = &self.rate_limiter {
            rl.validate("rate_limiter")?;
        }
        Ok(())
    }

    /// Applies the update to the drive with the same id in `drives`.
    pub fn apply(&self, drives: &mut [DriveConfig]) -> Result<(), DriveError> {
        self.validate()?;
        let drive = drives
            .iter_mut()
            .find(|d| d.drive_id == self.drive_id)
            .ok_or_else(|| DriveError::NotFound(self.drive_id.clone()))?;
        if let Some(p) = &self.path_on_host {
            drive.path_on_host.clone_from(p);
        }
        if let Some(u) = &self.rate_limiter {
            let new = drive.rate_limiter.unwrap_or_default().updated(u);
            drive.rate_limiter = new.is_active().then_some(new);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<DriveConfig, String> {
        let c: DriveConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    fn drive(id: &str, root: bool) -> DriveConfig {
        parse(&format!(
            r#"{{"drive_id": "{id}", "path_on_host": "/{id}.img", "is_root_device": {root}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn minimal_and_full() {
        let d = drive("rootfs", true);
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert!(!d.is_read_only);
        assert_eq!(d.io_engine, IoEngine::Sync);
        let d = parse(
            r#"{"drive_id": "data_1", "partuuid": "0eaa91a0-01", "is_root_device": true,
                "cache_type": "Writeback", "is_read_only": true, "path_on_host": "/d.img",
                "rate_limiter": null, "io_engine": "Sync", "socket": null}"#,
        )
        .unwrap();
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert!(d.is_read_only);
        assert_eq!(d.partuuid.as_deref(), Some("0eaa91a0-01"));
        assert_eq!(d.io_engine, IoEngine::Sync);
        let d = parse(r#"{"drive_id": "a", "path_on_host": "/a", "is_root_device": false, "io_engine": null}"#)
            .unwrap();
        assert_eq!(d.io_engine, IoEngine::Sync);
        let d = parse(r#"{"drive_id": "a", "path_on_host": "/a", "is_root_device": false, "io_engine": "Async"}"#)
            .unwrap();
        assert_eq!(d.io_engine, IoEngine::Async);
        assert!(
            serde_json::to_string(&d)
                .unwrap()
                .contains(r#""io_engine":"Async""#)
        );
        assert!(
            serde_json::to_string(&drive("b", false))
                .unwrap()
                .contains(r#""io_engine":"Sync""#)
        );
        // An empty rate limiter limits nothing, as in Firecracker.
        assert!(
            parse(
                r#"{"drive_id": "a", "path_on_host": "/a", "is_root_device": false,
                          "rate_limiter": {"bandwidth": null, "ops": null}}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let base = r#""path_on_host": "/a", "is_root_device": false"#;
        let cases = [
            (
                format!(r#"{{"drive_id": "", {base}}}"#),
                "drive_id `` is invalid: it must not be empty",
            ),
            (
                format!(r#"{{"drive_id": "a-b", {base}}}"#),
                "drive_id `a-b` is invalid",
            ),
            (
                format!(r#"{{"drive_id": "a", {base}, "io_engine": "Fast"}}"#),
                "unknown variant `Fast`",
            ),
            (
                format!(r#"{{"drive_id": "a", {base}, "cache_type": "WriteBack"}}"#),
                "unknown variant `WriteBack`",
            ),
            (
                format!(
                    r#"{{"drive_id": "a", {base}, "rate_limiter": {{"ops": {{"size": 1, "refill_time": 1e30}}}}}}"#
                ),
                "invalid type: floating point",
            ),
            (
                format!(r#"{{"drive_id": "a", {base}, "socket": "/s"}}"#),
                "socket (vhost-user-block) is not supported",
            ),
            (
                r#"{"drive_id": "a", "is_root_device": false, "socket": "/s"}"#.into(),
                "socket (vhost-user-block)",
            ),
            (
                r#"{"drive_id": "a", "is_root_device": false}"#.into(),
                "path_on_host is required",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "/a"}"#.into(),
                "missing field `is_root_device`",
            ),
            (
                format!(r#"{{"drive_id": "a", {base}, "partuuid": "x y"}}"#),
                "partuuid `x y` is invalid",
            ),
            (
                format!(r#"{{"drive_id": "a", {base}, "readonly": true}}"#),
                "unknown field `readonly`",
            ),
        ];
        for (json, want) in cases {
            let e = parse(&json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn list_rules() {
        assert!(validate_drives(&[drive("a", true), drive("b", false)]).is_ok());
        let (i, e) = validate_drives(&[drive("a", false), drive("a", false)]).unwrap_err();
        assert_eq!((i, e), (1, DriveError::DuplicateId("a".into())));
        let (i, e) = validate_drives(&[drive("a", true), drive("b", true)]).unwrap_err();
        assert_eq!(i, 1);
        assert!(
            e.to_string().starts_with("is_root_device: drive `a`"),
            "{e}"
        );

        let mut list = vec![];
        insert_drive(&mut list, drive("a", true)).unwrap();
        insert_drive(&mut list, drive("b", false)).unwrap();
        assert!(matches!(
            insert_drive(&mut list, drive("b", true)),
            Err(DriveError::SecondRootDevice { .. })
        ));
        // Same id replaces, including the root itself.
        let mut a = drive("a", true);
        a.is_read_only = true;
        insert_drive(&mut list, a.clone()).unwrap();
        assert_eq!(list, vec![a, drive("b", false)]);
    }

    #[test]
    fn update() {
        let mut list = vec![drive("a", true)];
        let u: DriveUpdate =
            serde_json::from_str(r#"{"drive_id": "a", "path_on_host": "/new"}"#).unwrap();
        u.apply(&mut list).unwrap();
        assert_eq!(list.first().map(|d| d.path_on_host.as_str()), Some("/new"));
        let u: DriveUpdate =
            serde_json::from_str(r#"{"drive_id": "zz", "path_on_host": "/x"}"#).unwrap();
        assert_eq!(u.apply(&mut list), Err(DriveError::NotFound("zz".into())));
        let u: DriveUpdate =
            serde_json::from_str(r#"{"drive_id": "a", "path_on_host": ""}"#).unwrap();
        assert!(
            u.apply(&mut list)
                .unwrap_err()
                .to_string()
                .contains("path_on_host")
        );
        assert!(
            serde_json::from_str::<DriveUpdate>(r#"{"drive_id": "a", "is_read_only": true}"#)
                .is_err()
        );
    }

    #[test]
    fn round_trip() {
        let d = parse(
            r#"{"drive_id": "d", "partuuid": "p", "is_root_device": true, "cache_type": "Writeback",
                "is_read_only": true, "path_on_host": "/d", "io_engine": "Sync"}"#,
        )
        .unwrap();
        let s = serde_json::to_string(&d).unwrap();
        assert_eq!(parse(&s).unwrap(), d);
    }
}
