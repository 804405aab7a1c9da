//! `metrics` (config file) and `PUT /metrics`.

use serde::{Deserialize, Serialize};

use super::path_problem;

/// Firecracker's `MetricsConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe the JSON metrics lines are appended to.
    pub metrics_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsConfigError {
    #[error("metrics_path {0}")]
    MetricsPath(&'static str),
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), MetricsConfigError> {
        match path_problem(&self.metrics_path) {
            Some(p) => Err(MetricsConfigError::MetricsPath(p)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MetricsConfig, String> {
        let c: MetricsConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn valid_refused_round_trip() {
        let c = parse(r#"{"metrics_path": "/tmp/m.fifo"}"#).unwrap();
        assert_eq!(c.metrics_path, "/tmp/m.fifo");
        assert_eq!(parse(&serde_json::to_string(&c).unwrap()).unwrap(), c);
        for (json, want) in [
            ("{}", "missing field `metrics_path`"),
            (r#"{"metrics_path": ""}"#, "metrics_path must not be empty"),
            (
                r#"{"metrics_path": "/m", "period": 1}"#,
                "unknown field `period`",
            ),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
