//! The microVM metadata service (MMDS), as Firecracker has it: a JSON store the host
//! fills through the API (`PUT`/`PATCH /mmds`, `--metadata`), which the guest reads over
//! HTTP from a link-local address on the interfaces named in `/mmds/config`.
//!
//! - this file: the store, its size limit, and its two output formats (JSON, and the
//!   IMDS-style key listing);
//! - `token.rs`: the session tokens of version 2;
//! - `http.rs`: the guest's HTTP requests and their answers;
//! - `stack.rs`: the minimal ARP/IPv4/TCP endpoint the virtio-net device hands frames
//!   for the MMDS address to, inside the VMM thread.

pub mod http;
pub mod stack;
pub mod token;

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use token::TokenAuthority;

/// The store is shared between the API side (VMM thread, controller) and each
/// MMDS-enabled interface's stack (same thread): the lock is never contended.
pub type SharedMmds = Arc<Mutex<Mmds>>;

/// Locks the store; a poisoned lock (a panic while holding it) still holds valid JSON.
pub fn lock(m: &SharedMmds) -> MutexGuard<'_, Mmds> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// How a value is written to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    Imds,
}

/// Firecracker's messages, which SDKs and guests may match on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmdsError {
    #[error("The MMDS patch request doesn't fit.")]
    DataStoreLimitExceeded,
    #[error("The MMDS resource does not exist.")]
    NotFound,
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

#[derive(Debug)]
pub struct Mmds {
    version: MmdsVersion,
    imds_compat: bool,
    data: Value,
    initialized: bool,
    /// Largest serialized store, in bytes (`--mmds-size-limit`).
    limit: usize,
    tokens: TokenAuthority,
}

impl Default for Mmds {
    /// Firecracker's default limit, the API's default body limit.
    fn default() -> Mmds {
        Mmds::new(51200)
    }
}

impl Mmds {
    pub fn new(limit: usize) -> Mmds {
        Mmds {
            version: MmdsVersion::V1,
            imds_compat: false,
            data: Value::Null,
            initialized: false,
            limit,
            tokens: TokenAuthority::new(),
        }
    }

    pub fn shared(limit: usize) -> SharedMmds {
        Arc::new(Mutex::new(Mmds::new(limit)))
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    pub fn configure(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    pub fn tokens(&mut self) -> &mut TokenAuthority {
        &mut self.tokens
    }

    pub fn is_valid_token(&self, token: &str) -> bool {
        self.tokens.is_valid(token)
    }

    pub fn data(&self) -> &Value {
        &self.data
    }

    fn fits(&self, v: &Value) -> bool {
        serde_json::to_vec(v).is_ok_and(|b| b.len() <= self.limit)
    }

    /// Replaces the whole store (`PUT /mmds`, `--metadata`).
    pub fn put(&mut self, data: Value) -> Result<(), MmdsError> {
        if !self.fits(&data) {
            return Err(MmdsError::DataStoreLimitExceeded);
        }
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// Applies a JSON merge patch (RFC 7396) (`PATCH /mmds`); the store is unchanged if
    /// the result would not fit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        if !self.initialized {
            return Err(MmdsError::NotInitialized);
        }
        let mut next = self.data.clone();
        merge_patch(&mut next, patch);
        if !self.fits(&next) {
            return Err(MmdsError::DataStoreLimitExceeded);
        }
        self.data = next;
        Ok(())
    }

    /// The value at `path` (a JSON pointer; a trailing `/` is ignored) in `format`.
    /// With `imds_compat` the IMDS format is used whatever the guest asks.
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, MmdsError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(MmdsError::NotFound)?;
        if format == OutputFormat::Json && !self.imds_compat {
            return Ok(value.to_string());
        }
        imds(value)
    }
}

/// IMDS style: an object lists its keys one a line, objects with a trailing `/`; a string
/// is itself; anything else has no IMDS form.
fn imds(v: &Value) -> Result<String, MmdsError> {
    match v {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(k, v)| {
                if v.is_object() {
                    format!("{k}/")
                } else {
                    k.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(s) => Ok(s.clone()),
        _ => Err(MmdsError::UnsupportedValueType),
    }
}

/// RFC 7396: objects merge key by key, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_patch_and_limit() {
        let mut m = Mmds::new(60);
        assert_eq!(m.patch(&json!({"a": 1})), Err(MmdsError::NotInitialized));
        m.put(json!({"a": {"b": "c"}, "d": "e"})).unwrap();
        m.patch(&json!({"a": {"x": "y"}, "d": null})).unwrap();
        assert_eq!(m.data(), &json!({"a": {"b": "c", "x": "y"}}));
        let big = "z".repeat(60);
        assert_eq!(
            m.patch(&json!({ "big": big })),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        assert_eq!(m.data(), &json!({"a": {"b": "c", "x": "y"}}));
        assert_eq!(
            m.put(json!({ "big": big })),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        m.patch(&json!("scalar")).unwrap();
        assert_eq!(m.data(), &json!("scalar"));
    }

    #[test]
    fn formats() {
        let mut m = Mmds::new(1 << 20);
        m.put(json!({"latest": {"meta-data": {"id": "i-1", "n": 3, "net": {}}}}))
            .unwrap();
        let i = OutputFormat::Imds;
        assert_eq!(m.get("/latest/", i).unwrap(), "meta-data/");
        assert_eq!(m.get("/latest/meta-data", i).unwrap(), "id\nn\nnet/");
        assert_eq!(m.get("/latest/meta-data/id", i).unwrap(), "i-1");
        assert_eq!(
            m.get("/latest/meta-data/n", i),
            Err(MmdsError::UnsupportedValueType)
        );
        assert_eq!(m.get("/nope", i), Err(MmdsError::NotFound));
        let j = OutputFormat::Json;
        assert_eq!(m.get("/latest/meta-data/id", j).unwrap(), "\"i-1\"");
        assert_eq!(m.get("/latest/meta-data/n", j).unwrap(), "3");
        m.configure(MmdsVersion::V1, true);
        assert_eq!(m.get("/latest/meta-data/id", j).unwrap(), "i-1");
    }
}
