//! Bodies of `PUT /snapshot/create` and `PUT /snapshot/load` (Firecracker's schema), and
//! their validation.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Every page of guest memory.
    #[default]
    Full,
    /// Only the pages written since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// The state file (vCPUs, devices, configuration).
    pub snapshot_path: String,
    /// The guest memory file.
    pub mem_file_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// MAP_PRIVATE mapping of the memory file: clones share its page cache.
    File,
    /// Pages served by a user-space handler over userfaultfd (Firecracker's handshake).
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    /// The memory file (File) or the handler's Unix socket (Uffd).
    pub backend_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshotParams {
    pub snapshot_path: String,
    /// Deprecated in Firecracker: the same as `mem_backend` File.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated alias of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Advance the guest's kvmclock by the wall-clock time since the snapshot.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Another `uds_path` for the snapshot's vsock device (so clones of one snapshot each
    /// listen on their own socket); null or absent keeps the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// Firecracker's `VsockOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotConfigError {
    #[error("Either `mem_backend` or `mem_file_path` is required.")]
    NoMemory,
    #[error("Only one of `mem_backend` or `mem_file_path` can be specified.")]
    BothMemory,
    #[error("`{0}` cannot be empty.")]
    EmptyPath(&'static str),
    #[error("`vsock_override`: {0}")]
    Vsock(super::vsock::VsockConfigError),
    #[error("`network_overrides` names interface `{0}` twice")]
    DuplicateOverride(String),
}

impl LoadSnapshotParams {
    /// The memory backend, from `mem_backend` or the deprecated `mem_file_path`.
    pub fn backend(&self) -> Result<MemBackend, SnapshotConfigError> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(SnapshotConfigError::BothMemory),
            (None, None) => Err(SnapshotConfigError::NoMemory),
            (Some(b), None) => Ok(b.clone()),
            (None, Some(p)) => Ok(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: p.clone(),
            }),
        }
    }

    pub fn track_dirty(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }

    pub fn validate(&self) -> Result<(), SnapshotConfigError> {
        if self.snapshot_path.is_empty() {
            return Err(SnapshotConfigError::EmptyPath("snapshot_path"));
        }
        if self.backend()?.backend_path.is_empty() {
            return Err(SnapshotConfigError::EmptyPath("backend_path"));
        }
        if let Some(o) = &self.vsock_override {
            // Only the path is new: the CID is the snapshot's, checked there.
            super::vsock::VsockConfig {
                vsock_id: None,
                guest_cid: super::vsock::MIN_GUEST_CID,
                uds_path: o.uds_path.clone(),
            }
            .validate()
            .map_err(SnapshotConfigError::Vsock)?;
        }
        for (i, o) in self.network_overrides.iter().enumerate() {
            if self.network_overrides[..i]
                .iter()
                .any(|p| p.iface_id == o.iface_id)
            {
                return Err(SnapshotConfigError::DuplicateOverride(o.iface_id.clone()));
            }
        }
        Ok(())
    }
}

impl CreateSnapshotParams {
    pub fn validate(&self) -> Result<(), SnapshotConfigError> {
        if self.snapshot_path.is_empty() {
            return Err(SnapshotConfigError::EmptyPath("snapshot_path"));
        }
        if self.mem_file_path.is_empty() {
            return Err(SnapshotConfigError::EmptyPath("mem_file_path"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(j: &str) -> LoadSnapshotParams {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn memory_backend_forms() {
        let p = load(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#);
        assert_eq!(p.backend().unwrap().backend_type, MemBackendType::File);
        let p = load(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
        );
        assert_eq!(p.backend().unwrap().backend_type, MemBackendType::Uffd);
        let p = load(r#"{"snapshot_path": "s"}"#);
        assert_eq!(p.validate(), Err(SnapshotConfigError::NoMemory));
        let p = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
        );
        assert_eq!(p.validate(), Err(SnapshotConfigError::BothMemory));
        assert!(
            serde_json::from_str::<LoadSnapshotParams>(r#"{"snapshot_path": "s", "x": 1}"#)
                .is_err()
        );
    }

    #[test]
    fn diff_alias_and_overrides() {
        let p =
            load(r#"{"snapshot_path": "s", "mem_file_path": "m", "enable_diff_snapshots": true}"#);
        assert!(p.track_dirty());
        let p = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "network_overrides": [
                {"iface_id": "eth0", "host_dev_name": "a"}, {"iface_id": "eth0", "host_dev_name": "b"}]}"#,
        );
        assert!(matches!(
            p.validate(),
            Err(SnapshotConfigError::DuplicateOverride(_))
        ));
        let p = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "vsock_override": {"uds_path": "/v.sock"}}"#,
        );
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(p.vsock_override.unwrap().uds_path, "/v.sock");
        let p = load(r#"{"snapshot_path": "s", "mem_file_path": "m", "vsock_override": null}"#);
        assert_eq!(p.validate(), Ok(()));
        let p = load(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "vsock_override": {"uds_path": ""}}"#,
        );
        assert!(matches!(p.validate(), Err(SnapshotConfigError::Vsock(_))));
        let long = format!(
            r#"{{"snapshot_path": "s", "mem_file_path": "m", "vsock_override": {{"uds_path": "/{}"}}}}"#,
            "x".repeat(200)
        );
        assert!(p.validate().is_err() && load(&long).validate().is_err());
        assert!(
            serde_json::from_str::<LoadSnapshotParams>(
                r#"{"snapshot_path": "s", "mem_file_path": "m", "vsock_override": {"uds_path": "/v", "cid": 3}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn create_defaults_to_full() {
        let c: CreateSnapshotParams =
            serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Full);
        assert!(
            serde_json::from_str::<CreateSnapshotParams>(
                r#"{"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Half"}"#
            )
            .is_err()
        );
    }
}
