//! The configuration types shared by `--config-file` and the HTTP API, in Firecracker's
//! schema: one file per resource, each with its validation and error enum.
//!
//! Validation here is what can be checked without touching the host (ranges, names,
//! unsupported features); opening files and TAP devices is the builder's job.

pub mod balloon;
pub mod boot_source;
pub mod cpu_template;
pub mod drive;
pub mod entropy;
pub mod logger;
pub mod machine_config;
pub mod metrics;
pub mod mmds;
pub mod net;
pub mod rate_limiter;
pub mod serial;
pub mod snapshot;
pub mod unsupported;
pub mod vsock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

pub use balloon::{BalloonConfig, BalloonError, BalloonStatsUpdate, BalloonUpdate};
pub use boot_source::{BootSourceConfig, BootSourceError};
pub use cpu_template::{CpuConfigSource, CustomCpuTemplate, StaticCpuTemplate};
pub use drive::{CacheType, DriveConfig, DriveError, DriveUpdate, IoEngine};
pub use entropy::{EntropyDeviceConfig, EntropyError};
pub use logger::{LogLevel, LoggerConfig, LoggerConfigError};
pub use machine_config::{HugePages, MachineConfig, MachineConfigError, MachineConfigUpdate};
pub use metrics::{MetricsConfig, MetricsConfigError};
pub use mmds::{MmdsConfig, MmdsConfigError, MmdsVersion};
pub use net::{MacAddr, NetError, NetworkInterfaceConfig, NetworkInterfaceUpdate};
pub use rate_limiter::{RateLimiterConfig, TokenBucketConfig};
pub use serial::{SerialConfig, SerialConfigError};
pub use unsupported::{UnsupportedError, UnsupportedValue};
pub use vsock::{VsockConfig, VsockConfigError};

use crate::vm::layout::VIRTIO_MMIO_MAX_DEVICES;

/// A whole VM: Firecracker's config-file schema (`--config-file`, `GET /vm/config`).
///
/// `Default` is the state of an API-configured VM before any PUT; it does not validate
/// (no kernel), which is what InstanceStart reports until `PUT /boot-source`.
///
/// Serialized, every section Firecracker's `GET /vm/config` lists is present: `null` (or
/// `[]`) when unset, so clients that index the answer by section find each one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSourceConfig,
    /// Absent or null: Firecracker's defaults (1 vCPU, 128 MiB).
    #[serde(
        rename = "machine-config",
        default,
        deserialize_with = "null_as_default"
    )]
    pub machine_config: MachineConfig,
    #[serde(default, deserialize_with = "null_as_default")]
    pub drives: Vec<DriveConfig>,
    #[serde(
        rename = "network-interfaces",
        default,
        deserialize_with = "null_as_default"
    )]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    #[serde(default)]
    pub entropy: Option<EntropyDeviceConfig>,
    /// Firecracker leaves `serial` out of `GET /vm/config` when it is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,

    // Firecracker resources ember does not implement: see unsupported.rs.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<MmdsConfig>,
    /// A custom CPU template (`PUT /cpu-config`); in the config file also the path of a
    /// file holding one, read when the file is loaded.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<CpuConfigSource>,
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: UnsupportedValue,
    #[serde(default, serialize_with = "empty_list_when_unset")]
    pub pmem: UnsupportedValue,
}

/// Firecracker lists `pmem` as `[]` when no pmem device is configured.
fn empty_list_when_unset<S: serde::Serializer>(
    v: &UnsupportedValue,
    s: S,
) -> Result<S::Ok, S::Error> {
    match &v.0 {
        Some(value) if !v.is_unset() => value.serialize(s),
        _ => Vec::<()>::new().serialize(s),
    }
}

/// Top-level keys of the config file ember knows (see `VmConfig`).
const SECTIONS: &[&str] = &[
    "boot-source",
    "machine-config",
    "drives",
    "network-interfaces",
    "logger",
    "metrics",
    "vsock",
    "mmds-config",
    "balloon",
    "entropy",
    "serial",
    "cpu-config",
];

/// Every message names the offending field by its path in the config file
/// ("machine-config.vcpu_count ...", "drives[1].drive_id ..."): the resource errors all
/// start with their field name, and these variants prefix the section.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// serde_json's message (which names unknown and missing fields and gives line and
    /// column), prefixed with the section it was found in when that can be told.
    #[error("{}{source}", context_prefix(.context))]
    Json {
        context: Option<String>,
        source: serde_json::Error,
    },
    #[error("boot-source.{0}")]
    BootSource(#[from] BootSourceError),
    #[error("machine-config.{0}")]
    MachineConfig(#[from] MachineConfigError),
    #[error("drives[{index}].{source}")]
    Drive { index: usize, source: DriveError },
    #[error("network-interfaces[{index}].{source}")]
    NetworkInterface { index: usize, source: NetError },
    #[error(
        "drives, network-interfaces, vsock, balloon and entropy: {count} devices configured, at most \
         {VIRTIO_MMIO_MAX_DEVICES} are supported"
    )]
    TooManyDevices { count: usize },
    #[error("logger.{0}")]
    Logger(#[from] LoggerConfigError),
    #[error("metrics.{0}")]
    Metrics(#[from] MetricsConfigError),
    #[error("vsock.{0}")]
    Vsock(#[from] VsockConfigError),
    #[error("mmds-config: {0}")]
    Mmds(#[from] MmdsConfigError),
    #[error("balloon.{0}")]
    Balloon(#[from] BalloonError),
    #[error("entropy.{0}")]
    Entropy(#[from] EntropyError),
    #[error("serial.{0}")]
    Serial(#[from] SerialConfigError),
    #[error("cpu-config: {0}")]
    CpuConfig(#[from] cpu_template::CpuConfigError),
    #[error(transparent)]
    Unsupported(#[from] UnsupportedError),
}

fn context_prefix(context: &Option<String>) -> String {
    context
        .as_ref()
        .map(|c| format!("{c}: "))
        .unwrap_or_default()
}

impl VmConfig {
    /// Parses and validates a config file (or any text in its schema); warnings go to
    /// the log at once (see `from_json_with_warnings`).
    pub fn from_json(text: &str) -> Result<VmConfig, ConfigError> {
        let (config, warnings) = VmConfig::from_json_with_warnings(text)?;
        for w in warnings {
            log::warn!("{w}");
        }
        Ok(config)
    }

    /// Parses and validates a config file, and returns the warnings it deserves for the
    /// caller to log once the file's own `logger` section is in effect.
    ///
    /// Top-level keys ember does not know are dropped with a warning each, as Firecracker
    /// ignores them (engines write some: flintlock's `MmdsConfig`); inside a section an
    /// unknown field is an error, as in Firecracker.
    pub fn from_json_with_warnings(text: &str) -> Result<(VmConfig, Vec<String>), ConfigError> {
        let json_error = |text: &str, source: serde_json::Error| ConfigError::Json {
            context: locate_json_error(text, &source),
            source,
        };
        let mut top: serde_json::Value =
            serde_json::from_str(text).map_err(|e| json_error(text, e))?;
        let mut warnings = Vec::new();
        let mut stripped = None;
        if let Some(obj) = top.as_object_mut() {
            let unknown: Vec<String> = obj
                .keys()
                .filter(|k| {
                    !SECTIONS.contains(&k.as_str())
                        && !unsupported::UNSUPPORTED_RESOURCES.contains(&k.as_str())
                })
                .cloned()
                .collect();
            for k in &unknown {
                warnings.push(format!(
                    "config file: unknown section `{k}` ignored (as Firecracker does)"
                ));
                obj.remove(k);
            }
            if !unknown.is_empty() {
                stripped = Some(top.to_string());
            }
        }
        let text = stripped.as_deref().unwrap_or(text);
        let mut config: VmConfig = serde_json::from_str(text).map_err(|e| json_error(text, e))?;
        if let Some(source) = &config.cpu_config {
            config.cpu_config = Some(CpuConfigSource::Template(source.resolve()?));
            // Firecracker applies `cpu-config` after `machine-config`: the custom
            // template replaces a static one.
            if let Some(t) = config.machine_config.static_template() {
                warnings.push(format!(
                    "config file: cpu-config replaces machine-config.cpu_template `{}` (as in Firecracker)",
                    t.name()
                ));
            }
        }
        if config.cpu_config.is_some() || config.machine_config.static_template().is_none() {
            config.machine_config.cpu_template = None;
        }
        config.validate()?;
        Ok((config, warnings))
    }

    /// Checks everything a VM needs before it is built. The API runs this at InstanceStart.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.boot_source.validate()?;
        self.machine_config.validate()?;
        drive::validate_drives(&self.drives)
            .map_err(|(index, source)| ConfigError::Drive { index, source })?;
        net::validate_network_interfaces(&self.network_interfaces)
            .map_err(|(index, source)| ConfigError::NetworkInterface { index, source })?;
        let count = self.drives.len()
            + self.network_interfaces.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.entropy.is_some());
        if u64::try_from(count).map_or(true, |c| c > VIRTIO_MMIO_MAX_DEVICES) {
            return Err(ConfigError::TooManyDevices { count });
        }
        if let Some(l) = &self.logger {
            l.validate()?;
        }
        if let Some(m) = &self.metrics {
            m.validate()?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if let Some(m) = &self.mmds_config {
            m.validate(&self.network_interfaces)?;
        }
        if let Some(b) = &self.balloon {
            b.validate(self.machine_config.mem_size_mib as u64)?;
        }
        if let Some(e) = &self.entropy {
            e.validate()?;
        }
        if let Some(s) = &self.serial {
            s.validate()?;
        }
        for (name, value) in [
            ("memory-hotplug", &self.memory_hotplug),
            ("pmem", &self.pmem),
        ] {
            value.check(name)?;
        }
        Ok(())
    }

    /// The custom template in effect (`PUT /cpu-config`, the config file's `cpu-config`).
    pub fn custom_cpu_template(&self) -> Option<&CustomCpuTemplate> {
        match &self.cpu_config {
            Some(CpuConfigSource::Template(t)) => Some(t),
            Some(CpuConfigSource::Path(_)) | None => None,
        }
    }

    /// The same schema, for `GET /vm/config`; `from_json` reads it back to an equal value.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail (string keys, no floats, no maps with
        // non-string keys); should it ever, an empty object is a valid, loud answer.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            log::error!("cannot serialize the VM configuration: {e}");
            String::from("{}")
        })
    }
}

/// Firecracker writes an absent section as `null`; treat it as absent.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Why a path is unusable, if it is; the message follows the field name.
fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("must not be empty")
    } else if path.contains('\0') {
        Some("must not contain a NUL byte")
    } else {
        None
    }
}

/// Firecracker's rule for API resource ids (drive_id, iface_id), which also appear in
/// URL paths: letters, digits and '_'. ASCII only, so an id is safe in any log or path.
fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("must not be empty")
    } else if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Some("may contain only ASCII letters, digits and '_'")
    } else {
        None
    }
}

/// serde_json reports type errors without the field's path ("invalid type: string, expected
/// u8 at line 3 column 20"). This finds which section of the file failed by parsing each
/// one alone and keeping the one whose error is the same. Only runs on the error path.
fn locate_json_error(text: &str, err: &serde_json::Error) -> Option<String> {
    if !err.is_data() {
        // Syntax errors: the line and column are the whole story.
        return None;
    }
    let serde_json::Value::Object(top) = serde_json::from_str(text).ok()? else {
        return None;
    };
    let full = err.to_string();
    let mut found = Vec::new();
    let mut consider = |path: String, e: Option<serde_json::Error>| {
        if e.is_some_and(|e| full.starts_with(&e.to_string())) {
            found.push(path);
        }
    };
    for (key, value) in &top {
        match key.as_str() {
            "boot-source" => consider(key.clone(), fails_as::<BootSourceConfig>(value)),
            "machine-config" => consider(key.clone(), fails_as::<Option<MachineConfig>>(value)),
            "logger" => consider(key.clone(), fails_as::<Option<LoggerConfig>>(value)),
            "balloon" => consider(key.clone(), fails_as::<Option<BalloonConfig>>(value)),
            "entropy" => consider(key.clone(), fails_as::<Option<EntropyDeviceConfig>>(value)),
            "serial" => consider(key.clone(), fails_as::<Option<SerialConfig>>(value)),
            "metrics" => consider(key.clone(), fails_as::<Option<MetricsConfig>>(value)),
            "vsock" => consider(key.clone(), fails_as::<Option<VsockConfig>>(value)),
            "mmds-config" => consider(key.clone(), fails_as::<Option<MmdsConfig>>(value)),
            "cpu-config" => consider(key.clone(), fails_as::<Option<CpuConfigSource>>(value)),
            "drives" | "network-interfaces" => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let e = if key == "drives" {
                            fails_as::<DriveConfig>(item)
                        } else {
                            fails_as::<NetworkInterfaceConfig>(item)
                        };
                        consider(format!("{key}[{i}]"), e);
                    }
                }
                None => consider(key.clone(), fails_as::<Option<Vec<()>>>(value)),
            },
            _ => {}
        }
    }
    // Two sections failing with the same message: better no context than a wrong one.
    match found.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

fn fails_as<T: DeserializeOwned>(value: &serde_json::Value) -> Option<serde_json::Error> {
    serde_json::from_value::<T>(value.clone()).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"boot-source": {"kernel_image_path": "/vmlinux"}}"#;

    /// A Firecracker config file as its documentation writes them, nulls and all.
    const FULL: &str = r#"{
      "boot-source": {
        "kernel_image_path": "/vmlinux",
        "boot_args": "console=ttyS0 reboot=k panic=1",
        "initrd_path": null
      },
      "drives": [
        {
          "drive_id": "rootfs",
          "partuuid": null,
          "is_root_device": true,
          "cache_type": "Unsafe",
          "is_read_only": false,
          "path_on_host": "/rootfs.ext4",
          "io_engine": "Sync",
          "rate_limiter": null,
          "socket": null
        },
        {"drive_id": "data", "path_on_host": "/data.img", "is_root_device": false,
         "is_read_only": true, "cache_type": "Writeback"}
      ],
      "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 1024,
        "smt": false,
        "track_dirty_pages": false,
        "huge_pages": "None"
      },
      "cpu-config": null,
      "balloon": null,
      "network-interfaces": [
        {"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}
      ],
      "vsock": null,
      "logger": {"log_path": "/tmp/fc.log", "level": "debug", "show_level": true,
                 "show_log_origin": false},
      "metrics": {"metrics_path": "/tmp/metrics.fifo"},
      "mmds-config": null,
      "entropy": null,
      "pmem": [],
      "memory-hotplug": null
    }"#;

    fn err(text: &str) -> String {
        VmConfig::from_json(text).unwrap_err().to_string()
    }

    /// Puts `extra` (a `"key": value` fragment) into a minimal valid file.
    fn with(extra: &str) -> String {
        format!(r#"{{"boot-source": {{"kernel_image_path": "/k"}}, {extra}}}"#)
    }

    #[test]
    fn minimal_file_gets_firecracker_defaults() {
        let c = VmConfig::from_json(MINIMAL).unwrap();
        assert_eq!(c.boot_source.kernel_image_path, "/vmlinux");
        assert_eq!(c.machine_config, MachineConfig::default());
        assert_eq!(
            (c.machine_config.vcpu_count, c.machine_config.mem_size_mib),
            (1, 128)
        );
        assert!(c.drives.is_empty() && c.network_interfaces.is_empty());
        assert!(c.logger.is_none() && c.metrics.is_none());
        let c = VmConfig::from_json(&with(
            r#""machine-config": null, "drives": null, "network-interfaces": null"#,
        ))
        .unwrap();
        assert_eq!(c.machine_config, MachineConfig::default());
    }

    #[test]
    fn full_file() {
        let c = VmConfig::from_json(FULL).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.machine_config.mem_size_mib, 1024);
        assert_eq!(c.drives.len(), 2);
        assert_eq!(
            c.drives.get(1).map(|d| d.cache_type),
            Some(CacheType::Writeback)
        );
        assert_eq!(
            c.network_interfaces.first().and_then(|n| n.guest_mac),
            Some(MacAddr([6, 0, 0xac, 0x10, 0, 2]))
        );
        assert_eq!(
            c.logger.as_ref().and_then(|l| l.level),
            Some(LogLevel::Debug)
        );
        assert_eq!(
            c.metrics.map(|m| m.metrics_path).as_deref(),
            Some("/tmp/metrics.fifo")
        );
    }

    #[test]
    fn round_trip() {
        for text in [MINIMAL, FULL] {
            let c = VmConfig::from_json(text).unwrap();
            let json = c.to_json();
            assert_eq!(VmConfig::from_json(&json).unwrap(), c, "{json}");
        }
        // Every section Firecracker's GET /vm/config lists is there, null or empty when
        // unset; `serial` is left out, as Firecracker does.
        let v: serde_json::Value =
            serde_json::from_str(&VmConfig::from_json(MINIMAL).unwrap().to_json()).unwrap();
        for key in [
            "balloon",
            "drives",
            "boot-source",
            "cpu-config",
            "logger",
            "machine-config",
            "metrics",
            "mmds-config",
            "network-interfaces",
            "vsock",
            "entropy",
            "pmem",
            "memory-hotplug",
        ] {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        assert_eq!(v["logger"], serde_json::Value::Null);
        assert_eq!(v["pmem"], serde_json::json!([]));
        assert_eq!(v["machine-config"]["huge_pages"], "None");
        assert!(v.get("serial").is_none(), "{v}");
    }

    /// Firecracker ignores top-level keys it does not know (flintlock writes
    /// `MmdsConfig`); ember drops them with a warning. Inside a section they are errors.
    #[test]
    fn unknown_sections_are_ignored() {
        let c = VmConfig::from_json(&with(
            r#""MmdsConfig": {"network_interfaces": []}, "vcpus": 1"#,
        ))
        .unwrap();
        assert_eq!(c.boot_source.kernel_image_path, "/k");
        let e = err(&with(
            r#""x": 1, "machine-config": {"vcpu_count": 1, "mem_size_mib": 1, "foo": 1}"#,
        ));
        assert!(e.contains("unknown field `foo`"), "{e}");
    }

    #[test]
    fn boot_source_is_required() {
        let e = err("{}");
        assert!(e.contains("missing field `boot-source`"), "{e}");
        let e = err(r#"{"boot-source": {"kernel_image_path": ""}}"#);
        assert!(
            e.starts_with("boot-source.kernel_image_path must not be empty"),
            "{e}"
        );
        // The API's starting state is not bootable until PUT /boot-source.
        assert!(matches!(
            VmConfig::default().validate(),
            Err(ConfigError::BootSource(_))
        ));
    }

    #[test]
    fn resource_errors_name_their_path() {
        let cases = [
            (
                r#""machine-config": {"vcpu_count": 33, "mem_size_mib": 128}"#,
                "machine-config.vcpu_count must be between 1 and 32, got 33",
            ),
            (
                r#""machine-config": {"vcpu_count": 3, "mem_size_mib": 128, "smt": true}"#,
                "machine-config.vcpu_count must be 1 or an even number when smt is true, got 3",
            ),
            (
                r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "C4"}"#,
                "machine-config: unknown variant `C4`",
            ),
            (
                r#""cpu-config": {"cpuid_modifiers": [{"leaf": "1", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
                "cpu-config: `1` needs a 0x (hexadecimal) or 0b (binary) prefix",
            ),
            (
                r#""cpu-config": "/nonexistent/template.json""#,
                "cpu-config: cannot read the CPU template file /nonexistent/template.json",
            ),
            (
                r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 127, "huge_pages": "2M"}"#,
                "machine-config.mem_size_mib must be a multiple of 2 with huge_pages",
            ),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": true},
                              {"drive_id": "b!", "path_on_host": "/b", "is_root_device": false}]"#,
                "drives[1].drive_id `b!` is invalid",
            ),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": true},
                              {"drive_id": "a", "path_on_host": "/b", "is_root_device": false}]"#,
                "drives[1].drive_id `a` is used by more than one drive",
            ),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": true},
                              {"drive_id": "b", "path_on_host": "/b", "is_root_device": true}]"#,
                "drives[1].is_root_device: drive `a` is already the root device",
            ),
            (
                r#""network-interfaces": [{"iface_id": "n", "host_dev_name": "averyveryverylongtap"}]"#,
                "network-interfaces[0].host_dev_name `averyveryverylongtap` is invalid",
            ),
            (
                r#""network-interfaces": [{"iface_id": "n", "host_dev_name": "t0"},
                                          {"iface_id": "n", "host_dev_name": "t1"}]"#,
                "network-interfaces[1].iface_id `n` is used by more than one",
            ),
            (
                r#""network-interfaces": [{"iface_id": "a", "host_dev_name": "t0", "guest_mac": "06:00:00:00:00:01"},
                                          {"iface_id": "b", "host_dev_name": "t1", "guest_mac": "06:00:00:00:00:01"}]"#,
                "network-interfaces[1].guest_mac 06:00:00:00:00:01 is already used",
            ),
            (
                r#""logger": {"log_path": ""}"#,
                "logger.log_path must not be empty",
            ),
            (
                r#""metrics": {"metrics_path": ""}"#,
                "metrics.metrics_path must not be empty",
            ),
        ];
        for (extra, want) in cases {
            let e = err(&with(extra));
            assert!(e.starts_with(want), "{extra}\n  got: {e}\n want: {want}");
        }
    }

    #[test]
    fn json_errors_name_the_field_or_section() {
        let cases = [
            (
                r#""machine-config": {"vcpu_count": "2", "mem_size_mib": 1}"#,
                "machine-config: invalid type: string \"2\"",
            ),
            (
                r#""machine-config": {"vcpu_count": 300, "mem_size_mib": 1}"#,
                "machine-config: invalid value: integer `300`",
            ),
            (
                r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 1, "foo": 1}"#,
                "machine-config: unknown field `foo`",
            ),
            (
                r#""drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": "yes"}]"#,
                "drives[0]: invalid type: string \"yes\", expected a boolean",
            ),
            (
                r#""network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "guest_mac": "06:00"}]"#,
                "network-interfaces[0]: invalid MAC address `06:00`",
            ),
            (
                r#""drives": {}"#,
                "drives: invalid type: map, expected a sequence",
            ),
            (
                r#""logger": {"level": "verbose"}"#,
                "logger: unknown log level `verbose`",
            ),
        ];
        for (extra, want) in cases {
            let e = err(&with(extra));
            assert!(e.starts_with(want), "{extra}\n  got: {e}\n want: {want}");
            assert!(e.contains(" at line 1 column "), "{e}");
        }
        let e = err("{\"boot-source\": ");
        assert!(e.contains("EOF while parsing"), "{e}");
    }

    #[test]
    fn unsupported_resources() {
        for (key, value) in [
            ("memory-hotplug", r#"{"total_size_mib": 1024}"#),
            ("pmem", r#"[{"id": "p", "path_on_host": "/p"}]"#),
        ] {
            let e = err(&with(&format!(r#""{key}": {value}"#)));
            assert_eq!(
                e,
                format!("`{key}` is not supported by ember; leave it out or set it to null")
            );
            for unset in ["null", "{}", "[]"] {
                assert!(
                    VmConfig::from_json(&with(&format!(r#""{key}": {unset}"#))).is_ok(),
                    "{key}: {unset}"
                );
            }
        }
        assert_eq!(unsupported::UNSUPPORTED_RESOURCES.len(), 2);
    }

    #[test]
    fn cpu_config_inline_from_a_file_or_over_a_static_template() {
        let c = VmConfig::from_json(&with(r#""cpu-config": {}"#)).unwrap();
        assert_eq!(c.custom_cpu_template(), Some(&CustomCpuTemplate::default()));
        let path =
            std::env::temp_dir().join(format!("ember-cpu-config-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b0xx"}]}]}"#,
        )
        .unwrap();
        let (c, warnings) = VmConfig::from_json_with_warnings(&with(&format!(
            r#""cpu-config": "{}",
               "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}}"#,
            path.display()
        )))
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        let t = c.custom_cpu_template().unwrap();
        assert_eq!(t.cpuid_modifiers[0].modifiers[0].bitmap.mask, 0b100);
        // The custom template wins, as in Firecracker, and says so.
        assert_eq!(c.machine_config.cpu_template, None);
        assert!(
            warnings[0].contains("replaces machine-config.cpu_template `T2`"),
            "{warnings:?}"
        );
        // GET /vm/config reports the template itself, which reads back the same.
        assert_eq!(VmConfig::from_json(&c.to_json()).unwrap(), c);
        let c = VmConfig::from_json(&with(
            r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"}"#,
        ))
        .unwrap();
        assert_eq!(c.machine_config.cpu_template, None);
        let c = VmConfig::from_json(&with(
            r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2A"}"#,
        ))
        .unwrap();
        assert_eq!(c.machine_config.cpu_template, Some(StaticCpuTemplate::T2A));
        assert_eq!(VmConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn mmds_config() {
        let net = r#""network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]"#;
        let ok = with(&format!(
            r#"{net}, "mmds-config": {{"version": "V2", "network_interfaces": ["eth0"]}}"#
        ));
        let c = VmConfig::from_json(&ok).unwrap();
        let m = c.mmds_config.clone().unwrap();
        assert_eq!(m.version, MmdsVersion::V2);
        assert_eq!(m.ipv4().to_string(), "169.254.169.254");
        assert_eq!(VmConfig::from_json(&c.to_json()).unwrap(), c);
        for (mmds, want) in [
            (r#"{"network_interfaces": []}"#, "is empty"),
            (r#"{"network_interfaces": ["eth1"]}"#, "does not correspond"),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#,
                "not link local",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.1"}"#,
                "not link local",
            ),
            (
                r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
                "unknown variant",
            ),
        ] {
            let e = err(&with(&format!(r#"{net}, "mmds-config": {mmds}"#)));
            assert!(e.contains(want), "{mmds}: {e}");
        }
    }

    #[test]
    fn balloon_entropy_and_serial_sections() {
        let c = VmConfig::from_json(&with(
            r#""balloon": {"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1},
               "entropy": {}, "serial": {"serial_out_path": "/s"}"#,
        ))
        .unwrap();
        assert_eq!(c.balloon.as_ref().map(|b| b.amount_mib), Some(64));
        assert!(c.entropy.is_some());
        assert_eq!(VmConfig::from_json(&c.to_json()).unwrap(), c);
        // Larger than the default 128 MiB of guest memory.
        let e = err(&with(
            r#""balloon": {"amount_mib": 129, "deflate_on_oom": false}"#,
        ));
        assert_eq!(
            e,
            "balloon.amount_mib: Requested memory should be less than 128MiB"
        );
        let e = err(&with(
            r#""entropy": {"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 18446744073709551615}}}"#,
        ));
        assert!(
            e.starts_with("entropy.rate_limiter.bandwidth.refill_time"),
            "{e}"
        );
        let e = err(&with(r#""serial": {"serial_out_path": ""}"#));
        assert_eq!(e, "serial.serial_out_path must not be empty");
        let e = err(&with(
            r#""balloon": {"amount_mib": "x", "deflate_on_oom": false}"#,
        ));
        assert!(e.starts_with("balloon: invalid type"), "{e}");
    }

    #[test]
    fn device_limit() {
        let drives: Vec<String> = (0..VIRTIO_MMIO_MAX_DEVICES + 1)
            .map(|i| {
                format!(r#"{{"drive_id": "d{i}", "path_on_host": "/d", "is_root_device": false}}"#)
            })
            .collect();
        let e = err(&with(&format!(r#""drives": [{}]"#, drives.join(","))));
        assert!(
            e.starts_with(
                "drives, network-interfaces, vsock, balloon and entropy: 19 devices configured"
            ),
            "{e}"
        );
    }
}
