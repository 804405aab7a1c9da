//! `machine-config` (config file), `PUT /machine-config` and `PATCH /machine-config`.

use serde::{Deserialize, Serialize};

use super::cpu_template::StaticCpuTemplate;

/// Firecracker's limit: microVMs are for small workloads.
pub const MAX_VCPUS: u8 = 32;
/// Firecracker's defaults when `machine-config` is absent.
pub const DEFAULT_VCPU_COUNT: u8 = 1;
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;

/// Firecracker's `MachineConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    /// Simultaneous multithreading. Only `false` is accepted.
    #[serde(default)]
    pub smt: bool,
    /// A static CPU template (see `vm::cpu_template`). An explicit "None" is kept apart
    /// from an absent field until the configuration is updated with it: "None" clears a
    /// template, absence keeps the one set before. Reported only when a template is set,
    /// as Firecracker reports it.
    #[serde(default, skip_serializing_if = "no_template")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Accepted and passed on to guest memory creation (KVM dirty logging).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// What backs guest RAM. Always reported, "None" when unset, as Firecracker reports it.
    #[serde(default, deserialize_with = "none_when_null")]
    pub huge_pages: HugePages,
}

fn no_template(t: &Option<StaticCpuTemplate>) -> bool {
    matches!(t, None | Some(StaticCpuTemplate::None))
}

/// Firecracker's `huge_pages`: the page size behind guest RAM. `None` and `2M` are
/// Firecracker v1.16's; `Transparent` comes from its development branch (after v1.16).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages from an anonymous mapping.
    #[default]
    None,
    /// 2 MiB pages from the host's hugetlbfs pool (`MAP_HUGETLB`), reserved when the VM is
    /// built: a pool too small is an error then, never a SIGBUS later.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
    /// An anonymous mapping with `madvise(MADV_HUGEPAGE)`: the kernel uses 2 MiB pages
    /// where it can, 4 KiB pages where it cannot. Needs no set-up beyond THP being
    /// `madvise` or `always` in /sys/kernel/mm/transparent_hugepage/enabled.
    Transparent,
}

impl HugePages {
    /// Guest RAM must be a whole number of these MiB (Firecracker's rule).
    pub fn mem_size_unit_mib(self) -> usize {
        match self {
            HugePages::None => 1,
            HugePages::Hugetlbfs2M | HugePages::Transparent => 2,
        }
    }

    /// The host page size behind guest RAM, as told to a userfaultfd handler.
    pub fn page_size(self) -> usize {
        match self {
            HugePages::None | HugePages::Transparent => 4096,
            HugePages::Hugetlbfs2M => 2 << 20,
        }
    }
}

impl std::fmt::Display for HugePages {
    /// The spelling of the API and the config file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HugePages::None => "None",
            HugePages::Hugetlbfs2M => "2M",
            HugePages::Transparent => "Transparent",
        })
    }
}

/// `null` means what absent means (earlier ember releases accepted it).
fn none_when_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HugePages, D::Error> {
    Ok(Option::<HugePages>::deserialize(d)?.unwrap_or_default())
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPU_COUNT,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineConfigError {
    #[error("vcpu_count must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    #[error("mem_size_mib must be at least 1, got 0")]
    MemSize,
    #[error("vcpu_count must be 1 or an even number when smt is true, got {0}")]
    Smt(u8),
    #[error("mem_size_mib must be a multiple of {unit} with huge_pages \"{pages}\", got {mem}")]
    MemSizeForPages {
        mem: usize,
        unit: usize,
        pages: HugePages,
    },
}

impl MachineConfig {
    /// The static template in effect: "None" is no template.
    pub fn static_template(&self) -> Option<StaticCpuTemplate> {
        self.cpu_template.filter(|t| *t != StaticCpuTemplate::None)
    }

    pub fn validate(&self) -> Result<(), MachineConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(MachineConfigError::VcpuCount(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(MachineConfigError::MemSize);
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(MachineConfigError::Smt(self.vcpu_count));
        }
        let unit = self.huge_pages.mem_size_unit_mib();
        if !self.mem_size_mib.is_multiple_of(unit) {
            return Err(MachineConfigError::MemSizeForPages {
                mem: self.mem_size_mib,
                unit,
                pages: self.huge_pages,
            });
        }
        Ok(())
    }
}

/// Body of `PATCH /machine-config`: only the fields present change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// Firecracker refuses an empty PATCH ("Empty PATCH request."); the API checks this.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// The configuration after this update, validated as a whole: a PATCH must not leave
    /// the VM in a state a PUT could not have produced.
    pub fn apply(&self, base: &MachineConfig) -> Result<MachineConfig, MachineConfigError> {
        let updated = MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            cpu_template: self
                .cpu_template
                .or(base.cpu_template)
                .filter(|t| *t != StaticCpuTemplate::None),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            huge_pages: self.huge_pages.unwrap_or(base.huge_pages),
        };
        updated.validate()?;
        Ok(updated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MachineConfig, String> {
        let c: MachineConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn minimal_and_full() {
        let c = parse(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).unwrap();
        assert_eq!(
            (c.vcpu_count, c.mem_size_mib, c.smt, c.track_dirty_pages),
            (2, 256, false, false)
        );
        let c = parse(
            r#"{"vcpu_count": 32, "mem_size_mib": 1, "smt": false, "cpu_template": "None",
                "track_dirty_pages": true, "huge_pages": "None"}"#,
        )
        .unwrap();
        assert!(c.track_dirty_pages);
        assert!(
            parse(
                r#"{"vcpu_count": 1, "mem_size_mib": 1, "cpu_template": null, "huge_pages": null}"#
            )
            .is_ok()
        );
        assert_eq!(MachineConfig::default().vcpu_count, 1);
        assert_eq!(MachineConfig::default().mem_size_mib, 128);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                r#"{"vcpu_count": 0, "mem_size_mib": 1}"#,
                "vcpu_count must be between 1 and 32, got 0",
            ),
            (
                r#"{"vcpu_count": 33, "mem_size_mib": 1}"#,
                "vcpu_count must be between 1 and 32, got 33",
            ),
            (
                r#"{"vcpu_count": 1, "mem_size_mib": 0}"#,
                "mem_size_mib must be at least 1",
            ),
            (
                r#"{"vcpu_count": 5, "mem_size_mib": 1, "smt": true}"#,
                "vcpu_count must be 1 or an even number when smt is true, got 5",
            ),
            (
                r#"{"vcpu_count": 1, "mem_size_mib": 1, "cpu_template": "T3"}"#,
                "unknown variant `T3`, expected one of `None`, `C3`, `T2`, `T2S`, `T2CL`, `T2A`",
            ),
            (
                r#"{"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}"#,
                r#"mem_size_mib must be a multiple of 2 with huge_pages "2M", got 129"#,
            ),
            (
                r#"{"vcpu_count": 1, "mem_size_mib": 3, "huge_pages": "Transparent"}"#,
                "mem_size_mib must be a multiple of 2",
            ),
            (
                r#"{"vcpu_count": 1, "mem_size_mib": 2, "huge_pages": "1G"}"#,
                "unknown variant `1G`, expected one of `None`, `2M`, `Transparent`",
            ),
            (r#"{"mem_size_mib": 1}"#, "missing field `vcpu_count`"),
            (r#"{"vcpu_count": 1}"#, "missing field `mem_size_mib`"),
            (
                r#"{"vcpu_count": 1, "mem_size_mib": 1, "ht_enabled": true}"#,
                "unknown field `ht_enabled`",
            ),
            (r#"{"vcpu_count": 1, "mem_size_mib": -1}"#, "invalid value"),
        ];
        for (json, want) in cases {
            let e = parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn update() {
        let base = MachineConfig::default();
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"vcpu_count": 4}"#).unwrap();
        assert!(!u.is_empty());
        let c = u.apply(&base).unwrap();
        assert_eq!((c.vcpu_count, c.mem_size_mib), (4, 128));
        let u: MachineConfigUpdate =
            serde_json::from_str(r#"{"mem_size_mib": 64, "track_dirty_pages": true}"#).unwrap();
        let c = u.apply(&c).unwrap();
        assert_eq!(
            (c.vcpu_count, c.mem_size_mib, c.track_dirty_pages),
            (4, 64, true)
        );
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"vcpu_count": 40}"#).unwrap();
        assert_eq!(u.apply(&c).unwrap_err(), MachineConfigError::VcpuCount(40));
        let u: MachineConfigUpdate =
            serde_json::from_str(r#"{"smt": true, "vcpu_count": 3}"#).unwrap();
        assert_eq!(u.apply(&c).unwrap_err(), MachineConfigError::Smt(3));
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"smt": true}"#).unwrap();
        assert!(
            u.apply(&c).unwrap().smt,
            "smt with 4 vCPUs, as Firecracker accepts it"
        );
        let u: MachineConfigUpdate = serde_json::from_str("{}").unwrap();
        assert!(u.is_empty());
        assert_eq!(u.apply(&c).unwrap(), c);
        assert!(serde_json::from_str::<MachineConfigUpdate>(r#"{"cpus": 1}"#).is_err());
        // A template stays until "None" clears it.
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"cpu_template": "T2A"}"#).unwrap();
        let c = u.apply(&c).unwrap();
        assert_eq!(c.static_template(), Some(StaticCpuTemplate::T2A));
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"vcpu_count": 2}"#).unwrap();
        let c = u.apply(&c).unwrap();
        assert_eq!(c.cpu_template, Some(StaticCpuTemplate::T2A));
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"cpu_template": "None"}"#).unwrap();
        assert_eq!(u.apply(&c).unwrap().cpu_template, None);
    }

    #[test]
    fn huge_pages_values() {
        for (v, want) in [
            ("\"None\"", HugePages::None),
            ("null", HugePages::None),
            ("\"2M\"", HugePages::Hugetlbfs2M),
            ("\"Transparent\"", HugePages::Transparent),
        ] {
            let c = parse(&format!(
                r#"{{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": {v}}}"#
            ))
            .unwrap();
            assert_eq!(c.huge_pages, want, "{v}");
            // Reported as written (null as "None") and read back equal.
            let s = serde_json::to_value(&c).unwrap();
            assert_eq!(s["huge_pages"], v.trim_matches('"').replace("null", "None"));
            assert_eq!(parse(&s.to_string()).unwrap(), c);
        }
        let base = parse(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#).unwrap();
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"huge_pages": "2M"}"#).unwrap();
        assert_eq!(u.apply(&base).unwrap().huge_pages, HugePages::Hugetlbfs2M);
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"mem_size_mib": 7}"#).unwrap();
        let c = u.apply(&base).unwrap();
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"huge_pages": "2M"}"#).unwrap();
        assert!(matches!(
            u.apply(&c),
            Err(MachineConfigError::MemSizeForPages { mem: 7, .. })
        ));
    }

    #[test]
    fn round_trip() {
        let c = MachineConfig {
            vcpu_count: 3,
            mem_size_mib: 512,
            cpu_template: Some(StaticCpuTemplate::T2A),
            track_dirty_pages: true,
            ..Default::default()
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(parse(&s).unwrap(), c);
    }
}
