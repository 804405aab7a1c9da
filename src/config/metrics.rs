//! `metrics` (config file) and `PUT /metrics`.

use serde::{Deserialize, Serialize};

use super::path_problem;

/// Firecracker's `MetricsConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe the JSON metrics lines are appended to.
    pub metrics_path: String,
    /// Firecracker's: write the instance id as a top-level `id` on every line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emit_id: bool,
    /// Firecracker's: fixed key-value pairs written as `properties` on every line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsConfigError {
    #[error("metrics_path {0}")]
    MetricsPath(&'static str),
}

impl MetricsConfig {
    /// Opens the output and sets what every line carries; `id` is the instance id.
    pub fn apply(&self, id: &str) -> std::io::Result<()> {
        crate::metrics::set_output(&self.metrics_path)?;
        let properties = self.properties.as_ref().map(|p| {
            p.iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
                .collect()
        });
        crate::metrics::set_extras(self.emit_id.then(|| id.to_string()), properties);
        Ok(())
    }

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
        // Firecracker's other fields.
        let c =
            parse(r#"{"metrics_path": "/m", "emit_id": true, "properties": {"a": "b"}}"#).unwrap();
        assert!(c.emit_id);
        assert_eq!(
            c.properties
                .as_ref()
                .and_then(|p| p.get("a"))
                .map(String::as_str),
            Some("b")
        );
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
