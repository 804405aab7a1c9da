//! `PUT /serial` and the config file's `serial`: where the serial console's output goes.

use serde::{Deserialize, Serialize};

use super::unsupported::{UnsupportedError, UnsupportedValue};

/// Firecracker's `SerialConfig`. Without `serial_out_path` the console writes to ember's
/// standard output, as before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file (created if missing, appended to) or a named pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Firecracker's output bandwidth limit; refused when set, like other rate limiters.
    #[serde(default, skip_serializing_if = "UnsupportedValue::is_unset")]
    pub rate_limiter: UnsupportedValue,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialConfigError {
    #[error("serial_out_path {0}")]
    Path(&'static str),
    #[error("rate_limiter: {0}")]
    RateLimiter(UnsupportedError),
}

impl SerialConfig {
    pub fn validate(&self) -> Result<(), SerialConfigError> {
        if let Some(problem) = self
            .serial_out_path
            .as_deref()
            .and_then(super::path_problem)
        {
            return Err(SerialConfigError::Path(problem));
        }
        self.rate_limiter
            .check("rate_limiter")
            .map_err(SerialConfigError::RateLimiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        let ok: SerialConfig = serde_json::from_str(r#"{"serial_out_path": "/tmp/s"}"#).unwrap();
        ok.validate().unwrap();
        let empty: SerialConfig = serde_json::from_str(r#"{"serial_out_path": ""}"#).unwrap();
        assert_eq!(
            empty.validate().unwrap_err().to_string(),
            "serial_out_path must not be empty"
        );
        assert!(serde_json::from_str::<SerialConfig>(r#"{"path": "/x"}"#).is_err());
    }
}
