//! `boot-source` (config file) and `PUT /boot-source` (API): the kernel, initrd and
//! command line.

use serde::{Deserialize, Serialize};

use super::path_problem;

/// Firecracker's `BootSourceConfig`. `boot_args` absent means ember's default command line
/// (see `vm::boot::build_cmdline`); its length is checked there, together with ember's own
/// additions, because only the whole line has a limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Host path of the kernel image (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Host path of an initrd, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line; absent means the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootSourceError {
    /// Also what an API-configured VM reports at InstanceStart without PUT /boot-source.
    #[error("kernel_image_path {0}; set it to the host path of the guest kernel")]
    KernelImagePath(&'static str),
    #[error("initrd_path {0}")]
    InitrdPath(&'static str),
    #[error("boot_args must not contain a NUL byte")]
    BootArgsNul,
}

impl BootSourceConfig {
    /// Checks what can be checked without touching the host; opening the files is the
    /// builder's job, so a config can be validated on a machine that lacks them.
    pub fn validate(&self) -> Result<(), BootSourceError> {
        if let Some(p) = path_problem(&self.kernel_image_path) {
            return Err(BootSourceError::KernelImagePath(p));
        }
        if let Some(p) = self.initrd_path.as_deref().and_then(path_problem) {
            return Err(BootSourceError::InitrdPath(p));
        }
        if self.boot_args.as_deref().is_some_and(|a| a.contains('\0')) {
            return Err(BootSourceError::BootArgsNul);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BootSourceConfig, String> {
        let c: BootSourceConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn minimal_and_full() {
        let c = parse(r#"{"kernel_image_path": "/k"}"#).unwrap();
        assert_eq!(c.kernel_image_path, "/k");
        assert_eq!(c.initrd_path, None);
        assert_eq!(c.boot_args, None);
        let c = parse(
            r#"{"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0"}"#,
        )
        .unwrap();
        assert_eq!(c.initrd_path.as_deref(), Some("/i"));
        assert_eq!(c.boot_args.as_deref(), Some("console=ttyS0"));
        // Firecracker writes absent optionals as null; both spellings mean the same.
        let c = parse(r#"{"kernel_image_path": "/k", "initrd_path": null, "boot_args": null}"#)
            .unwrap();
        assert_eq!(
            c,
            BootSourceConfig {
                kernel_image_path: "/k".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let e = parse(r#"{}"#).unwrap_err();
        assert!(e.contains("kernel_image_path"), "{e}");
        let e = parse(r#"{"kernel_image_path": ""}"#).unwrap_err();
        assert!(e.contains("kernel_image_path must not be empty"), "{e}");
        let e = parse(r#"{"kernel_image_path": "/k", "initrd_path": ""}"#).unwrap_err();
        assert!(e.contains("initrd_path"), "{e}");
        let e = parse(r#"{"kernel_image_path": "/k\u0000x"}"#).unwrap_err();
        assert!(
            e.contains("kernel_image_path must not contain a NUL"),
            "{e}"
        );
        let e = parse(r#"{"kernel_image_path": "/k", "boot_args": "a\u0000"}"#).unwrap_err();
        assert!(e.contains("boot_args"), "{e}");
        let e = parse(r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#).unwrap_err();
        assert!(e.contains("unknown field `kernel_args`"), "{e}");
        let e = parse(r#"{"kernel_image_path": 5}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn round_trip() {
        let c = BootSourceConfig {
            kernel_image_path: "/k".into(),
            initrd_path: Some("/i".into()),
            boot_args: Some("a=b".into()),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(parse(&s).unwrap(), c);
    }
}
