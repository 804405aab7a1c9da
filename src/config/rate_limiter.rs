//! `rate_limiter` (drives), `rx_rate_limiter` / `tx_rate_limiter` (network interfaces):
//! Firecracker's two token buckets, one for bytes and one for operations.

use serde::{Deserialize, Serialize};

/// Milliseconds are turned into nanoseconds inside the bucket; a refill time whose
/// nanoseconds overflow a u64 (about 584 years) is refused rather than silently ignored.
pub const MAX_REFILL_TIME_MS: u64 = u64::MAX / 1_000_000;

/// One token bucket: `size` tokens refilled over `refill_time` milliseconds, plus an
/// initial `one_time_burst` that does not refill. A `size` or `refill_time` of 0 means
/// no limit (Firecracker's rule, which PATCH uses to switch a bucket off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// Whether this bucket limits anything.
    pub fn is_active(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }
}

/// Firecracker's `RateLimiterConfig`: an absent bucket limits nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterError {
    #[error(
        "{field}.{bucket}.refill_time {value} is too large: at most {MAX_REFILL_TIME_MS} \
         milliseconds"
    )]
    RefillTime {
        field: &'static str,
        bucket: &'static str,
        value: u64,
    },
}

impl RateLimiterConfig {
    /// `field` names the setting in messages (`rate_limiter`, `rx_rate_limiter`, ...).
    pub fn validate(&self, field: &'static str) -> Result<(), RateLimiterError> {
        for (bucket, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b
                && b.refill_time > MAX_REFILL_TIME_MS
            {
                return Err(RateLimiterError::RefillTime {
                    field,
                    bucket,
                    value: b.refill_time,
                });
            }
        }
        Ok(())
    }

    /// Whether any bucket limits anything (GET /vm/config leaves inert limiters out).
    pub fn is_active(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.is_active()) || self.ops.is_some_and(|b| b.is_active())
    }

    /// The configuration after a PATCH with `update`: a bucket given replaces the old one
    /// (a zero size or refill time switches it off), a bucket left out stays.
    pub fn updated(&self, update: &RateLimiterConfig) -> RateLimiterConfig {
        let pick = |new: Option<TokenBucketConfig>, old: Option<TokenBucketConfig>| match new {
            Some(b) if b.is_active() => Some(b),
            Some(_) => None,
            None => old,
        };
        RateLimiterConfig {
            bandwidth: pick(update.bandwidth, self.bandwidth),
            ops: pick(update.ops, self.ops),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(s: &str) -> RateLimiterConfig {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn parse_validate_update() {
        let c = rl(r#"{"bandwidth": {"size": 1000, "one_time_burst": 5, "refill_time": 100}}"#);
        assert!(c.is_active());
        assert_eq!(c.bandwidth.unwrap().one_time_burst, Some(5));
        assert!(c.validate("rate_limiter").is_ok());
        assert!(!rl(r#"{"bandwidth": null, "ops": null}"#).is_active());
        assert!(!rl(r#"{"ops": {"size": 0, "refill_time": 100}}"#).is_active());
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bw": {}}"#).is_err());
        assert!(
            serde_json::from_str::<RateLimiterConfig>(r#"{"ops": {"size": 1}}"#)
                .unwrap_err()
                .to_string()
                .contains("refill_time")
        );
        let e = rl(r#"{"ops": {"size": 1, "refill_time": 18446744073709551615}}"#)
            .validate("tx_rate_limiter")
            .unwrap_err();
        assert!(
            e.to_string().starts_with("tx_rate_limiter.ops.refill_time"),
            "{e}"
        );

        // PATCH: a given bucket replaces, a zero one switches off, an absent one stays.
        let both = rl(r#"{"bandwidth": {"size": 10, "refill_time": 1},
                          "ops": {"size": 5, "refill_time": 1}}"#);
        let u = both.updated(&rl(r#"{"ops": {"size": 0, "refill_time": 0}}"#));
        assert_eq!(u.bandwidth, both.bandwidth);
        assert_eq!(u.ops, None);
        let u = u.updated(&rl(r#"{"bandwidth": {"size": 20, "refill_time": 2}}"#));
        assert_eq!(u.bandwidth.unwrap().size, 20);
    }
}
