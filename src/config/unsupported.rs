//! Firecracker settings ember does not implement.
//!
//! They are parsed, not ignored: a value that says nothing (absent, `null`, `{}`, `[]`, or
//! an object whose members all say nothing) is accepted, so configs written for Firecracker
//! that spell out defaults still load; anything else is refused, because a guest that
//! silently lacks a device it was promised fails later and far from the cause.

use serde::{Deserialize, Serialize};

/// Top-level config-file keys (and API resources) of Firecracker that ember refuses.
pub const UNSUPPORTED_RESOURCES: &[&str] = &["memory-hotplug", "pmem"];

/// A Firecracker resource ember does not support, given a value that asks for something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not supported by ember; leave it out or set it to null")]
pub struct UnsupportedError(pub &'static str);

/// Raw JSON for a setting ember does not implement; see the module comment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnsupportedValue(pub Option<serde_json::Value>);

impl UnsupportedValue {
    /// True when the value asks for nothing, so accepting it changes nothing.
    pub fn is_unset(&self) -> bool {
        self.0.as_ref().is_none_or(value_is_unset)
    }

    /// Refuses a value that asks for something, naming the resource.
    pub fn check(&self, name: &'static str) -> Result<(), UnsupportedError> {
        if self.is_unset() {
            Ok(())
        } else {
            Err(UnsupportedError(name))
        }
    }
}

/// Two unset values are equal however they were spelled (absent, `null`, `{}`), so a
/// config equals itself after a `to_json` / `from_json` round trip, which drops them.
impl PartialEq for UnsupportedValue {
    fn eq(&self, other: &Self) -> bool {
        (self.is_unset() && other.is_unset()) || self.0 == other.0
    }
}

fn value_is_unset(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(value_is_unset),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> UnsupportedValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn unset_values_are_accepted() {
        for s in ["null", "{}", "[]", r#"{"bandwidth": null, "ops": {}}"#] {
            assert!(v(s).check("balloon").is_ok(), "{s}");
        }
        assert!(UnsupportedValue::default().check("balloon").is_ok());
    }

    #[test]
    fn anything_else_is_refused() {
        for s in [
            r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
            r#"[{"id": "p"}]"#,
            r#""/path""#,
            "0",
            "false",
        ] {
            let e = v(s).check("balloon").unwrap_err();
            assert_eq!(
                e.to_string(),
                "`balloon` is not supported by ember; leave it out or set it to null"
            );
        }
    }

    #[test]
    fn unset_spellings_compare_equal() {
        assert_eq!(v("null"), v("{}"));
        assert_eq!(UnsupportedValue::default(), v("[]"));
        assert_ne!(v("1"), v("null"));
        assert_eq!(v("1"), v("1"));
    }
}
