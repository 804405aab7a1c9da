//! `PUT /entropy` and the config file's `entropy`: one virtio-rng device per VM.

use serde::{Deserialize, Serialize};

use super::unsupported::{UnsupportedError, UnsupportedValue};

/// Firecracker's `EntropyDeviceConfig`. The device takes no settings besides its rate
/// limiter; an empty body (`{}`) asks for the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDeviceConfig {
    /// Parsed in Firecracker's shape and refused when it asks for a limit, until token
    /// buckets exist: the device's seam for them is `devices::virtio::rng::EntropyBudget`.
    #[serde(default, skip_serializing_if = "UnsupportedValue::is_unset")]
    pub rate_limiter: UnsupportedValue,
}

#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    #[error("rate_limiter: {0}")]
    RateLimiter(UnsupportedError),
}

impl EntropyDeviceConfig {
    pub fn validate(&self) -> Result<(), EntropyError> {
        self.rate_limiter
            .check("rate_limiter")
            .map_err(EntropyError::RateLimiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_null_limiters_are_accepted() {
        for s in ["{}", r#"{"rate_limiter": null}"#, r#"{"rate_limiter": {}}"#] {
            let c: EntropyDeviceConfig = serde_json::from_str(s).unwrap();
            c.validate().unwrap();
        }
        let c: EntropyDeviceConfig = serde_json::from_str(
            r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
        )
        .unwrap();
        assert!(c.validate().is_err());
        assert!(serde_json::from_str::<EntropyDeviceConfig>(r#"{"x": 1}"#).is_err());
    }
}
