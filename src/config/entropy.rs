//! `PUT /entropy` and the config file's `entropy`: one virtio-rng device per VM.

use serde::{Deserialize, Serialize};

use super::rate_limiter::{RateLimiterConfig, RateLimiterError};

/// Firecracker's `EntropyDeviceConfig`. The device takes no settings besides its rate
/// limiter; an empty body (`{}`) asks for the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDeviceConfig {
    /// Token buckets for the bytes handed out and the requests served (one op each), as
    /// for drives; the device takes them through `devices::virtio::rng::EntropyBudget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
}

impl EntropyDeviceConfig {
    pub fn validate(&self) -> Result<(), EntropyError> {
        if let Some(rl) = &self.rate_limiter {
            rl.validate("rate_limiter")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiters_are_accepted_and_checked() {
        for s in ["{}", r#"{"rate_limiter": null}"#, r#"{"rate_limiter": {}}"#] {
            let c: EntropyDeviceConfig = serde_json::from_str(s).unwrap();
            c.validate().unwrap();
        }
        let c: EntropyDeviceConfig = serde_json::from_str(
            r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
        )
        .unwrap();
        c.validate().unwrap();
        let c: EntropyDeviceConfig = serde_json::from_str(
            r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615}}}"#,
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("rate_limiter.ops.refill_time"), "{e}");
        assert!(serde_json::from_str::<EntropyDeviceConfig>(r#"{"x": 1}"#).is_err());
    }
}
