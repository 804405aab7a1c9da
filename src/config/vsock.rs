//! `vsock` (config file) and `PUT /vsock`: the virtio-vsock device and the Unix socket its
//! host side listens on (Firecracker's hybrid vsock).

use std::os::unix::fs::FileTypeExt;

use serde::{Deserialize, Serialize};

/// CIDs 0, 1 and 2 are the hypervisor, local loopback and the host: a guest should have 3
/// or more. Firecracker accepts any CID, and firecracker-containerd sends 0 (its vsock
/// device has no CID set): with hybrid vsock the CID only labels packets between the
/// guest and this device, so ember accepts it too and warns (`reserved_cid_warning`).
pub const MIN_GUEST_CID: u32 = 3;
/// `sun_path` holds 108 bytes, NUL included.
pub const MAX_UDS_PATH_LEN: usize = 107;

/// Firecracker's `VsockDeviceConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Deprecated in Firecracker (there is one vsock device per VM); accepted and kept so
    /// old clients and configs still work, never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context ID.
    pub guest_cid: u32,
    /// Where ember listens for host-initiated connections; guest-initiated connections to
    /// port P go to `<uds_path>_<P>`.
    pub uds_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VsockConfigError {
    #[error("uds_path {0}")]
    UdsPath(&'static str),
    #[error("uds_path is {0} bytes long: a Unix socket path holds at most {MAX_UDS_PATH_LEN}")]
    UdsPathTooLong(usize),
    #[error("uds_path {path} exists and is not a socket; remove it or choose another path")]
    NotASocket { path: String },
    #[error("uds_path {path} is a socket another process listens on")]
    InUse { path: String },
    #[error("uds_path {path}: {reason}")]
    Unusable { path: String, reason: String },
}

impl VsockConfig {
    /// What can be checked without touching the host.
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        if let Some(p) = super::path_problem(&self.uds_path) {
            return Err(VsockConfigError::UdsPath(p));
        }
        if self.uds_path.len() > MAX_UDS_PATH_LEN {
            return Err(VsockConfigError::UdsPathTooLong(self.uds_path.len()));
        }
        Ok(())
    }

    /// The warning for a CID below 3 (see [`MIN_GUEST_CID`]), if this one is.
    pub fn reserved_cid_warning(&self) -> Option<String> {
        (self.guest_cid < MIN_GUEST_CID).then(|| {
            format!(
                "vsock: guest_cid {} is a reserved CID (0-2: hypervisor, loopback, host); accepted as Firecracker does, but a guest should get 3 or more",
                self.guest_cid
            )
        })
    }

    /// The host side of the check: nothing at `uds_path`, or a stale socket ember may
    /// replace. A regular file or a socket someone listens on is refused.
    pub fn check_host_path(&self) -> Result<(), VsockConfigError> {
        check_uds_path(&self.uds_path)
    }
}

/// See [`VsockConfig::check_host_path`].
pub fn check_uds_path(path: &str) -> Result<(), VsockConfigError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(VsockConfigError::Unusable {
                path: path.into(),
                reason: e.to_string(),
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(VsockConfigError::NotASocket { path: path.into() });
    }
    // A socket file whose listener is gone refuses connections: stale, ours to replace.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(VsockConfigError::InUse { path: path.into() }),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VsockConfig, String> {
        let c: VsockConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn valid_refused_round_trip() {
        let c = parse(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).unwrap();
        assert_eq!((c.guest_cid, c.vsock_id.as_deref()), (3, None));
        assert_eq!(parse(&serde_json::to_string(&c).unwrap()).unwrap(), c);
        let c = parse(r#"{"vsock_id": "vsock0", "guest_cid": 52, "uds_path": "/v"}"#).unwrap();
        assert_eq!(c.vsock_id.as_deref(), Some("vsock0"));
        let long = format!(r#"{{"guest_cid": 3, "uds_path": "/{}"}}"#, "a".repeat(107));
        // Reserved CIDs are accepted, with a warning, as Firecracker accepts them
        // (firecracker-containerd sends 0).
        for cid in [0, 2] {
            let c = parse(&format!(r#"{{"guest_cid": {cid}, "uds_path": "/v"}}"#)).unwrap();
            assert!(c.reserved_cid_warning().unwrap().contains("reserved"));
        }
        assert!(
            parse(r#"{"guest_cid": 3, "uds_path": "/v"}"#)
                .unwrap()
                .reserved_cid_warning()
                .is_none()
        );
        for (json, want) in [
            (r#"{"guest_cid": -1, "uds_path": "/v"}"#, "invalid value"),
            (
                r#"{"guest_cid": 3, "uds_path": ""}"#,
                "uds_path must not be empty",
            ),
            (r#"{"uds_path": "/v"}"#, "missing field `guest_cid`"),
            (
                r#"{"guest_cid": 3, "uds_path": "/v", "x": 1}"#,
                "unknown field `x`",
            ),
            (long.as_str(), "108 bytes long"),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn host_path_states() {
        let dir = std::env::temp_dir().join(format!("ember-vsock-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
        assert!(check_uds_path(&p("absent")).is_ok());
        std::fs::write(p("file"), b"x").unwrap();
        let e = check_uds_path(&p("file")).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        let live = std::os::unix::net::UnixListener::bind(p("live")).unwrap();
        let e = check_uds_path(&p("live")).unwrap_err().to_string();
        assert!(e.contains("listens on"), "{e}");
        drop(live);
        // The file stays after the listener is gone: stale.
        assert!(check_uds_path(&p("live")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
