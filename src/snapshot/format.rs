//! The snapshot state file: a small fixed header, then a JSON body.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "EMBERSNP"
//! 8       4     format version (u32 LE), FORMAT_VERSION
//! 12      2     length N of the ember version string (u16 LE), at most 64
//! 14      N     the ember version that wrote the file (UTF-8)
//! 14+N    8     body length L (u64 LE), at most MAX_BODY_LEN
//! 22+N    4     CRC-32 (zlib's) of every byte before this field and of the body
//! 26+N    L     body: the state as JSON
//! ```
//!
//! The file is hostile input: every field is checked before the next is trusted, the
//! checksum before the body is parsed, and the body's parser refuses unknown fields. JSON
//! makes the body self-describing (a person can read what a snapshot holds), and the
//! header names the version that wrote it so a mismatch is reported as such, not as a
//! parse error deep in the body.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// Bumped whenever the body's meaning changes.
pub const FORMAT_VERSION: u32 = 1;
/// The ember version written into, and required of, every state file.
pub const EMBER_VERSION: &str = env!("CARGO_PKG_VERSION");
const MAX_VERSION_LEN: usize = 64;
/// Far above any real state (a vCPU is about 20 KiB of JSON): a bound on what a crafted
/// header can make ember allocate.
pub const MAX_BODY_LEN: u64 = 64 << 20;
/// The largest state file: the longest header (26 bytes and the version string), then the
/// largest body.
pub const MAX_FILE_LEN: u64 = 26 + MAX_VERSION_LEN as u64 + MAX_BODY_LEN;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "the state file is truncated: {what} needs {need} bytes at offset {at}, the file has {len}"
    )]
    Truncated {
        what: &'static str,
        need: usize,
        at: usize,
        len: usize,
    },
    #[error("not an ember snapshot state file (bad magic {found:02x?}, expected \"EMBERSNP\")")]
    BadMagic { found: Vec<u8> },
    #[error(
        "the state file has format version {found}; this ember ({EMBER_VERSION}) reads version {FORMAT_VERSION} only"
    )]
    FormatVersion { found: u32 },
    #[error("the ember version field is {len} bytes long (at most {MAX_VERSION_LEN}) or not UTF-8")]
    BadVersionField { len: usize },
    #[error(
        "the snapshot was made by ember {found}; this is ember {EMBER_VERSION}: restore it with the ember that made it"
    )]
    EmberVersion { found: String },
    #[error(
        "the state body claims {len} bytes, more than the {MAX_BODY_LEN} a state file may hold"
    )]
    BodyTooLarge { len: u64 },
    #[error(
        "the state file is corrupted: checksum {computed:#010x} does not match the stored {stored:#010x}"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("the state file has {extra} bytes after its body")]
    TrailingBytes { extra: usize },
    #[error("the state body is not valid: {0}")]
    Body(serde_json::Error),
    #[error("cannot encode the state: {0}")]
    Encode(serde_json::Error),
}

/// zlib's CRC-32 (reflected, polynomial 0xedb88320), table-driven.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// Continues a CRC-32 over more bytes (`crc` is a previous result, 0 to start).
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for b in data {
        c = CRC_TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Encodes `state` as a complete state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let body = serde_json::to_vec(state).map_err(FormatError::Encode)?;
    let version = EMBER_VERSION.as_bytes();
    let mut out = Vec::with_capacity(body.len() + 32 + version.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(version.len() as u16).to_le_bytes());
    out.extend_from_slice(version);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let crc = crc32_update(crc32(&out), &body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// A cursor that names what it could not read.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, what: &'static str, need: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(need);
        let Some(bytes) = end.and_then(|e| self.data.get(self.at..e)) else {
            return Err(FormatError::Truncated {
                what,
                need,
                at: self.at,
                len: self.data.len(),
            });
        };
        self.at += need;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(what, N)?);
        Ok(a)
    }
}

/// What `ember --describe-snapshot` reports of a state file.
#[derive(Debug, PartialEq, Eq)]
pub struct Description {
    /// The format version in the header.
    pub format: u32,
    /// The ember version that wrote the file; `None` for a format this ember does not
    /// know, whose layout after the format field it cannot interpret.
    pub ember_version: Option<String>,
}

impl Description {
    /// Whether this ember can restore the file (as far as the header tells).
    pub fn loadable(&self) -> bool {
        self.format == FORMAT_VERSION && self.ember_version.as_deref() == Some(EMBER_VERSION)
    }
}

/// Reads the magic and the format version, the part of the header every format shares.
fn read_format(r: &mut Reader<'_>) -> Result<u32, FormatError> {
    let magic = r.array::<8>("the magic")?;
    if magic != MAGIC {
        return Err(FormatError::BadMagic {
            found: magic.to_vec(),
        });
    }
    Ok(u32::from_le_bytes(r.array("the format version")?))
}

/// Reads the ember version string (format 1).
fn read_ember_version<'a>(r: &mut Reader<'a>) -> Result<&'a str, FormatError> {
    let vlen = usize::from(u16::from_le_bytes(r.array("the version length")?));
    if vlen > MAX_VERSION_LEN {
        return Err(FormatError::BadVersionField { len: vlen });
    }
    std::str::from_utf8(r.take("the ember version", vlen)?)
        .map_err(|_| FormatError::BadVersionField { len: vlen })
}

/// Reads the body length, checksum and body (format 1), and checks that the file ends
/// there and that the checksum covers it.
fn read_body<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], FormatError> {
    let body_len = u64::from_le_bytes(r.array("the body length")?);
    if body_len > MAX_BODY_LEN {
        return Err(FormatError::BodyTooLarge { len: body_len });
    }
    let covered = r.at;
    let stored = u32::from_le_bytes(r.array("the checksum")?);
    let body = r.take("the body", body_len as usize)?;
    if r.at != r.data.len() {
        return Err(FormatError::TrailingBytes {
            extra: r.data.len() - r.at,
        });
    }
    let computed = crc32_update(crc32(r.data.get(..covered).unwrap_or_default()), body);
    if computed != stored {
        return Err(FormatError::Checksum { stored, computed });
    }
    Ok(body)
}

/// Checks a state file's header and checksum and parses its body.
pub fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, FormatError> {
    let mut r = Reader { data, at: 0 };
    let format = read_format(&mut r)?;
    if format != FORMAT_VERSION {
        return Err(FormatError::FormatVersion { found: format });
    }
    let version = read_ember_version(&mut r)?;
    if version != EMBER_VERSION {
        return Err(FormatError::EmberVersion {
            found: version.escape_default().to_string(),
        });
    }
    let body = read_body(&mut r)?;
    serde_json::from_slice(body).map_err(FormatError::Body)
}

/// Names the versions a state file was written with, whichever ember wrote it: the
/// header and checksum must hold (a damaged or foreign file is an error, as Firecracker
/// checks its snapshot's CRC before describing it), but the ember version need not be
/// this one and the body is not parsed. A format this ember does not know is described by
/// its number alone.
pub fn describe(data: &[u8]) -> Result<Description, FormatError> {
    let mut r = Reader { data, at: 0 };
    let format = read_format(&mut r)?;
    if format != FORMAT_VERSION {
        return Ok(Description {
            format,
            ember_version: None,
        });
    }
    let version = read_ember_version(&mut r)?.escape_default().to_string();
    read_body(&mut r)?;
    Ok(Description {
        format,
        ember_version: Some(version),
    })
}

/// Serde for plain-old-data KVM structures: the exact bytes as lowercase hex, so a field
/// of the wrong size is refused rather than padded or cut.
pub mod pod {
    use serde::{Deserialize, Deserializer, Serializer};

    /// A type every byte pattern of whose size is a valid value, and with no padding.
    ///
    /// # Safety
    /// Implement only for `repr(C)` structures of integers and arrays of integers without
    /// implicit padding (bindgen's KVM structures spell their padding out as fields).
    pub unsafe trait Pod: Sized + 'static {}

    // SAFETY: bindgen-generated repr(C) KVM ABI structures of integers with explicit
    // padding fields; the kernel reads and writes them as raw bytes, so does this.
    unsafe impl Pod for kvm_bindings::kvm_regs {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_sregs {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_xsave {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_xcrs {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_debugregs {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_lapic_state {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_vcpu_events {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_mp_state {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_clock_data {}
    // SAFETY: as above.
    unsafe impl Pod for kvm_bindings::kvm_cpuid_entry2 {}

    pub fn as_bytes<T: Pod>(v: &T) -> &[u8] {
        // SAFETY: T is Pod: size_of::<T>() initialised bytes with no padding, borrowed
        // for as long as `v`.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    pub fn from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
        if b.len() != size_of::<T>() {
            return None;
        }
        // SAFETY: exactly size_of::<T>() bytes, any pattern of which is a valid T (Pod);
        // read_unaligned copes with the byte buffer's alignment.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
    }

    const HEX: &[u8; 16] = b"0123456789abcdef";

    pub fn to_hex(bytes: &[u8]) -> String {
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 0xf)] as char);
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Vec<u8>> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let raw = s.as_bytes();
        if !raw.len().is_multiple_of(2) {
            return None;
        }
        raw.chunks_exact(2)
            .map(|p| Some((digit(p[0])? << 4) | digit(p[1])?))
            .collect()
    }

    pub fn serialize<T: Pod, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(as_bytes(v)))
    }

    pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes =
            from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected lowercase hex bytes"))?;
        from_bytes(&bytes).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected {} bytes of {}, got {}",
                size_of::<T>(),
                std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("?"),
                bytes.len()
            ))
        })
    }

    /// The same for a vector of Pod values.
    pub mod vec {
        use serde::ser::SerializeSeq;
        use serde::{Deserialize, Deserializer, Serializer};

        use super::Pod;

        pub fn serialize<T: Pod, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for item in v {
                seq.serialize_element(&super::to_hex(super::as_bytes(item)))?;
            }
            seq.end()
        }

        pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
            let items = Vec::<String>::deserialize(d)?;
            items
                .iter()
                .map(|s| {
                    super::from_hex(s)
                        .and_then(|b| super::from_bytes(&b))
                        .ok_or_else(|| {
                            serde::de::Error::custom(format!(
                                "expected {} bytes as lowercase hex",
                                size_of::<T>()
                            ))
                        })
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        n: u32,
        #[serde(with = "pod")]
        regs: kvm_bindings::kvm_regs,
    }

    fn sample() -> Sample {
        Sample {
            n: 7,
            regs: kvm_bindings::kvm_regs {
                rip: 0x1234_5678,
                rax: u64::MAX,
                ..Default::default()
            },
        }
    }

    /// Offset of the body-length field (after the version string).
    fn body_len_at() -> usize {
        14 + EMBER_VERSION.len()
    }

    /// Rewrites the checksum so a crafted body passes it.
    fn reseal(file: &mut [u8]) {
        let covered = body_len_at() + 8;
        let crc = crc32_update(crc32(&file[..covered]), &file[covered + 4..]);
        file[covered..covered + 4].copy_from_slice(&crc.to_le_bytes());
    }

    fn err(file: &[u8]) -> FormatError {
        decode::<Sample>(file).unwrap_err()
    }

    #[test]
    fn describe_names_the_versions_of_any_ember() {
        let mut file = encode(&sample()).unwrap();
        let d = describe(&file).unwrap();
        assert_eq!(d.format, FORMAT_VERSION);
        assert_eq!(d.ember_version.as_deref(), Some(EMBER_VERSION));
        assert!(d.loadable());
        // Another ember's file is described (decode refuses it).
        file[14] = b'9';
        reseal(&mut file);
        let d = describe(&file).unwrap();
        assert!(d.ember_version.unwrap().starts_with('9'));
        // A format this ember does not know: its number alone.
        let mut future = b"EMBERSNP".to_vec();
        future.extend_from_slice(&7u32.to_le_bytes());
        let d = describe(&future).unwrap();
        assert_eq!((d.format, d.ember_version), (7, None));
    }

    #[test]
    fn describe_refuses_damaged_files() {
        let file = encode(&sample()).unwrap();
        for len in 0..file.len() {
            assert!(
                matches!(describe(&file[..len]), Err(FormatError::Truncated { .. })),
                "truncated to {len}"
            );
        }
        let mut bad = file.clone();
        bad[0] = b'X';
        assert!(matches!(describe(&bad), Err(FormatError::BadMagic { .. })));
        let mut bad = file.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(describe(&bad), Err(FormatError::Checksum { .. })));
        let mut bad = file;
        bad.push(0);
        assert!(matches!(
            describe(&bad),
            Err(FormatError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn round_trip() {
        let file = encode(&sample()).unwrap();
        assert_eq!(&file[..8], b"EMBERSNP");
        assert_eq!(decode::<Sample>(&file).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_named() {
        let file = encode(&sample()).unwrap();
        for len in 0..file.len() {
            match err(&file[..len]) {
                FormatError::Truncated { .. } => {}
                other => panic!("truncated to {len}: {other}"),
            }
        }
        assert!(err(&[]).to_string().contains("truncated"));
    }

    #[test]
    fn bad_magic() {
        let mut file = encode(&sample()).unwrap();
        file[0] = b'X';
        assert!(matches!(err(&file), FormatError::BadMagic { .. }));
        assert!(err(&file).to_string().contains("not an ember snapshot"));
    }

    #[test]
    fn other_format_version() {
        let mut file = encode(&sample()).unwrap();
        file[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = err(&file);
        assert!(matches!(e, FormatError::FormatVersion { found: 2 }), "{e}");
        assert!(e.to_string().contains("format version 2"));
    }

    #[test]
    fn other_ember_version() {
        let mut file = encode(&sample()).unwrap();
        // Same length, another version: "0.1.0" -> "9.1.0".
        file[14] = b'9';
        let e = err(&file);
        assert!(matches!(e, FormatError::EmberVersion { .. }), "{e}");
        assert!(e.to_string().contains("made by ember 9"), "{e}");
    }

    #[test]
    fn oversized_version_field() {
        let mut file = encode(&sample()).unwrap();
        file[12..14].copy_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(
            err(&file),
            FormatError::BadVersionField { len: 1000 }
        ));
    }

    #[test]
    fn huge_body_length_is_refused_before_allocating() {
        let mut file = encode(&sample()).unwrap();
        let at = body_len_at();
        file[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(err(&file), FormatError::BodyTooLarge { .. }));
        file[at..at + 8].copy_from_slice(&(MAX_BODY_LEN).to_le_bytes());
        assert!(matches!(err(&file), FormatError::Truncated { .. }));
    }

    #[test]
    fn corrupted_byte_fails_the_checksum() {
        let clean = encode(&sample()).unwrap();
        // Every byte of the body and of the checksum itself.
        for i in body_len_at() + 8..clean.len() {
            let mut file = clean.clone();
            file[i] ^= 0x20;
            let e = err(&file);
            assert!(matches!(e, FormatError::Checksum { .. }), "byte {i}: {e}");
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut file = encode(&sample()).unwrap();
        file.push(0);
        assert!(matches!(
            err(&file),
            FormatError::TrailingBytes { extra: 1 }
        ));
    }

    /// A body with a valid checksum that is not what ember wrote.
    fn crafted(body: &str) -> FormatError {
        let mut file = encode(&sample()).unwrap();
        let at = body_len_at();
        file.truncate(at + 12);
        file[at..at + 8].copy_from_slice(&(body.len() as u64).to_le_bytes());
        file.extend_from_slice(body.as_bytes());
        reseal(&mut file);
        err(&file)
    }

    #[test]
    fn crafted_bodies_are_refused() {
        let ok_regs = pod::to_hex(pod::as_bytes(&kvm_bindings::kvm_regs::default()));
        for (body, want) in [
            ("", "EOF"),
            ("{", "EOF"),
            ("[]", "expected struct"),
            (r#"{"n": 1}"#, "missing field `regs`"),
            (r#"{"n": -1, "regs": ""}"#, "invalid value"),
            (r#"{"n": 1, "regs": "00"}"#, "expected 144 bytes"),
            (r#"{"n": 1, "regs": "zz"}"#, "lowercase hex"),
            (r#"{"n": 1, "regs": "0"}"#, "lowercase hex"),
        ] {
            let e = crafted(body).to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        let extra = format!(r#"{{"n": 1, "regs": "{ok_regs}", "x": 1}}"#);
        assert!(crafted(&extra).to_string().contains("unknown field `x`"));
        let good = format!(r#"{{"n": 1, "regs": "{ok_regs}"}}"#);
        assert!(matches!(
            decode::<Sample>(&{
                let mut file = encode(&sample()).unwrap();
                let at = body_len_at();
                file.truncate(at + 12);
                file[at..at + 8].copy_from_slice(&(good.len() as u64).to_le_bytes());
                file.extend_from_slice(good.as_bytes());
                reseal(&mut file);
                file
            }),
            Ok(Sample { n: 1, .. })
        ));
    }

    #[test]
    fn random_garbage_never_panics() {
        // A cheap xorshift: deterministic, no dependency.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let clean = encode(&sample()).unwrap();
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut file = clean.clone();
            let i = (x as usize) % file.len();
            file[i] = (x >> 32) as u8;
            let cut = ((x >> 40) as usize) % (file.len() + 1);
            let _ = decode::<Sample>(&file[..cut]);
        }
    }
}
