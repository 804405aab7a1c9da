//! `logger` (config file) and `PUT /logger`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::path_problem;

/// Firecracker's log levels. Parsing ignores case and also takes `Warn` (Firecracker passes
/// unknown spellings to the `log` crate, which knows "warn"); output uses these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Off => "Off",
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
        }
    }

    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }

    pub fn to_level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LogLevel::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format_args!(
                "unknown log level `{s}`, expected one of Error, Warning, Info, Debug, Trace, Off \
                 (any case)"
            ))
        })
    }
}

/// Firecracker's `LoggerConfig`. Every field is optional: an absent one leaves that part of
/// the logger as it is (set by the command line or an earlier PUT), as in Firecracker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or named pipe to append log lines to; absent keeps the current output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log records whose module path starts with this; empty means every module
    /// (Firecracker accepts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoggerConfigError {
    #[error("log_path {0}")]
    LogPath(&'static str),
}

impl LoggerConfig {
    pub fn validate(&self) -> Result<(), LoggerConfigError> {
        if let Some(p) = self.log_path.as_deref().and_then(path_problem) {
            return Err(LoggerConfigError::LogPath(p));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LoggerConfig, String> {
        let c: LoggerConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn minimal_and_full() {
        assert_eq!(parse("{}").unwrap(), LoggerConfig::default());
        let c = parse(
            r#"{"log_path": "/tmp/log.fifo", "level": "Debug", "show_level": true,
                "show_log_origin": false, "module": "ember::devices"}"#,
        )
        .unwrap();
        assert_eq!(c.level, Some(LogLevel::Debug));
        assert_eq!(c.show_level, Some(true));
        assert_eq!(c.module.as_deref(), Some("ember::devices"));
        // Firecracker accepts an empty module: every module is logged.
        assert!(parse(r#"{"module": ""}"#).is_ok());
    }

    #[test]
    fn levels_ignore_case() {
        for (s, l) in [
            ("Error", LogLevel::Error),
            ("ERROR", LogLevel::Error),
            ("warning", LogLevel::Warning),
            ("WaRnInG", LogLevel::Warning),
            ("warn", LogLevel::Warning),
            ("info", LogLevel::Info),
            ("DEBUG", LogLevel::Debug),
            ("trace", LogLevel::Trace),
            ("Off", LogLevel::Off),
        ] {
            let c = parse(&format!(r#"{{"level": "{s}"}}"#)).unwrap();
            assert_eq!(c.level, Some(l), "{s}");
        }
        assert_eq!(LogLevel::Warning.to_level_filter(), log::LevelFilter::Warn);
        assert_eq!(
            serde_json::to_string(&LogLevel::Warning).unwrap(),
            r#""Warning""#
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (r#"{"level": "loud"}"#, "unknown log level `loud`"),
            (r#"{"log_path": ""}"#, "log_path must not be empty"),
            (r#"{"show_level": "yes"}"#, "invalid type"),
            (r#"{"options": []}"#, "unknown field `options`"),
        ];
        for (json, want) in cases {
            let e = parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn round_trip() {
        let c = LoggerConfig {
            log_path: Some("/l".into()),
            level: Some(LogLevel::Trace),
            show_level: Some(false),
            show_log_origin: Some(true),
            module: Some("ember".into()),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(parse(&s).unwrap(), c);
    }
}
