//! `PUT/PATCH/GET /balloon`, `PATCH/GET /balloon/statistics` and the config file's
//! `balloon`, in Firecracker's shapes.

use serde::{Deserialize, Serialize};

/// Firecracker's `BalloonDeviceConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target size of the balloon: guest memory the guest should give back.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back under memory
    /// pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables the statistics queue.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting (Firecracker's hinting runs); not implemented by ember.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Offer VIRTIO_BALLOON_F_PAGE_REPORTING: the guest reports free pages, which ember
    /// returns to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    /// Firecracker's message for a target larger than guest memory.
    #[error("amount_mib: Requested memory should be less than {0}MiB")]
    TooLarge(u64),
    #[error(
        "free_page_hinting is not supported by ember; use free_page_reporting or leave it false"
    )]
    Hinting,
}

impl BalloonConfig {
    /// Checks the settings against the guest's memory size.
    pub fn validate(&self, mem_size_mib: u64) -> Result<(), BalloonError> {
        check_amount(self.amount_mib, mem_size_mib)?;
        if self.free_page_hinting {
            return Err(BalloonError::Hinting);
        }
        Ok(())
    }
}

/// A balloon can hold at most all of guest memory.
pub fn check_amount(amount_mib: u32, mem_size_mib: u64) -> Result<(), BalloonError> {
    if u64::from(amount_mib) > mem_size_mib {
        return Err(BalloonError::TooLarge(mem_size_mib));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_bodies() {
        let c: BalloonConfig =
            serde_json::from_str(r#"{"amount_mib": 64, "deflate_on_oom": true}"#).unwrap();
        assert_eq!(c.stats_polling_interval_s, 0);
        c.validate(128).unwrap();
        assert_eq!(
            c.validate(32).unwrap_err().to_string(),
            "amount_mib: Requested memory should be less than 32MiB"
        );
        // Both fields are required, as in Firecracker.
        assert!(serde_json::from_str::<BalloonConfig>(r#"{"amount_mib": 1}"#).is_err());
        let h: BalloonConfig = serde_json::from_str(
            r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#,
        )
        .unwrap();
        assert_eq!(h.validate(128), Err(BalloonError::Hinting));
        assert!(serde_json::from_str::<BalloonUpdate>(r#"{"amount_mib": 1, "x": 2}"#).is_err());
    }
}
