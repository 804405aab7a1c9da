//! CPU templates as the user writes them: `machine-config.cpu_template` (a static template
//! by name) and `PUT /cpu-config` / the config file's `cpu-config` (a custom template in
//! Firecracker's JSON format). Parsing and what can be checked without the host; what the
//! templates change and whether this host can take them is `vm::cpu_template`'s.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Firecracker's static x86 templates, by the name `machine-config.cpu_template` takes.
/// `None` is a value of its own because an explicit "None" clears a template where an
/// absent field keeps it (Firecracker's PUT/PATCH /machine-config semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StaticCpuTemplate {
    None,
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
}

impl StaticCpuTemplate {
    pub fn name(self) -> &'static str {
        match self {
            StaticCpuTemplate::None => "None",
            StaticCpuTemplate::C3 => "C3",
            StaticCpuTemplate::T2 => "T2",
            StaticCpuTemplate::T2S => "T2S",
            StaticCpuTemplate::T2CL => "T2CL",
            StaticCpuTemplate::T2A => "T2A",
        }
    }
}

/// A custom CPU template: Firecracker's x86 `CustomCpuTemplate`. `{}` is the empty
/// template, which changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCpuTemplate {
    /// KVM capabilities the host must have (`"N"`) or that need not be checked (`"!N"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<KvmCapability>,
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifier>,
}

/// The changes to one CPUID leaf and subleaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    #[serde(with = "prefixed_u32")]
    pub leaf: u32,
    #[serde(with = "prefixed_u32")]
    pub subleaf: u32,
    /// KVM's `kvm_cpuid_entry2.flags` for the entry (1: the subleaf is significant).
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    pub register: CpuidRegister,
    pub bitmap: Bitmap<32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl CpuidRegister {
    pub fn name(self) -> &'static str {
        match self {
            CpuidRegister::Eax => "eax",
            CpuidRegister::Ebx => "ebx",
            CpuidRegister::Ecx => "ecx",
            CpuidRegister::Edx => "edx",
        }
    }
}

impl Serialize for CpuidRegister {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for CpuidRegister {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        [
            CpuidRegister::Eax,
            CpuidRegister::Ebx,
            CpuidRegister::Ecx,
            CpuidRegister::Edx,
        ]
        .into_iter()
        .find(|r| r.name() == s)
        .ok_or_else(|| {
            D::Error::custom(format!(
                "unknown CPUID register `{s}`: use eax, ebx, ecx or edx"
            ))
        })
    }
}

/// The change to one MSR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    #[serde(with = "prefixed_u32")]
    pub addr: u32,
    pub bitmap: Bitmap<64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmCapability {
    /// The template needs this capability: the host must have it.
    Require(u32),
    /// Firecracker drops the capability from its own list of required ones; ember checks
    /// none of its own through templates, so this asks nothing.
    Waive(u32),
}

impl Serialize for KvmCapability {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            KvmCapability::Require(c) => s.serialize_str(&c.to_string()),
            KvmCapability::Waive(c) => s.serialize_str(&format!("!{c}")),
        }
    }
}

impl<'de> Deserialize<'de> for KvmCapability {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (waive, digits) = match s.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        let n: u32 = digits.parse().map_err(|_| {
            D::Error::custom(format!(
                "kvm_capabilities: `{s}` is not a KVM capability number (\"N\" or \"!N\")"
            ))
        })?;
        Ok(if waive {
            KvmCapability::Waive(n)
        } else {
            KvmCapability::Require(n)
        })
    }
}

/// A register bitmap, `"0b..."` most significant bit first: `0` and `1` set a bit, `x`
/// keeps the register's bit, `_` separates groups. Bits the string does not reach (it may
/// be shorter than the register) are kept. `mask` has the bits set, `value` their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bitmap<const BITS: u32> {
    pub mask: u64,
    pub value: u64,
}

impl<const BITS: u32> Bitmap<BITS> {
    /// The register after the change.
    pub fn apply(&self, reg: u64) -> u64 {
        (reg & !self.mask) | self.value
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let digits = text.strip_prefix("0b").unwrap_or(text);
        let (mut mask, mut value, mut bit) = (0u64, 0u64, 0u32);
        for c in digits.chars().rev() {
            if c == '_' {
                continue;
            }
            if bit == BITS {
                return Err(format!(
                    "bitmap `{text}` has more than {BITS} bits for a {BITS}-bit register"
                ));
            }
            match c {
                'x' => {}
                '0' => mask |= 1 << bit,
                '1' => {
                    mask |= 1 << bit;
                    value |= 1 << bit;
                }
                other => {
                    return Err(format!(
                        "bitmap `{text}`: `{other}` is not 0, 1, x or _ (write \"0b\" then one \
                         character per bit, most significant first)"
                    ));
                }
            }
            bit += 1;
        }
        Ok(Bitmap { mask, value })
    }
}

impl<const BITS: u32> std::fmt::Display for Bitmap<BITS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("0b")?;
        for bit in (0..BITS).rev() {
            let c = match (self.mask >> bit & 1, self.value >> bit & 1) {
                (0, _) => 'x',
                (_, 0) => '0',
                _ => '1',
            };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl<const BITS: u32> Serialize for Bitmap<BITS> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, const BITS: u32> Deserialize<'de> for Bitmap<BITS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Bitmap::parse(&s).map_err(D::Error::custom)
    }
}

/// Leaves, subleaves and MSR addresses are strings with a `0x` or `0b` prefix, as in
/// Firecracker's templates; they are written back in hex.
mod prefixed_u32 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:#x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(D::Error::custom)
    }

    pub fn parse(s: &str) -> Result<u32, String> {
        let parsed = if let Some(hex) = s.strip_prefix("0x") {
            u32::from_str_radix(hex, 16)
        } else if let Some(bin) = s.strip_prefix("0b") {
            u32::from_str_radix(bin, 2)
        } else {
            return Err(format!(
                "`{s}` needs a 0x (hexadecimal) or 0b (binary) prefix"
            ));
        };
        parsed.map_err(|e| format!("`{s}` is not a 32-bit number: {e}"))
    }
}

/// The config file's `cpu-config`: a custom template inline, or the path of a file
/// holding one (as Firecracker's config file takes either). A path is read when the
/// config file is loaded (`resolve`), so the configuration always holds the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuConfigSource {
    Path(String),
    Template(CustomCpuTemplate),
}

impl Serialize for CpuConfigSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CpuConfigSource::Path(p) => s.serialize_str(p),
            CpuConfigSource::Template(t) => t.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for CpuConfigSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a Value so that a template's own errors (a bad bitmap, an unknown
        // field) reach the user rather than "did not match any variant".
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(p) => Ok(CpuConfigSource::Path(p)),
            v @ serde_json::Value::Object(_) => serde_json::from_value(v)
                .map(CpuConfigSource::Template)
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "cpu-config must be a template object or the path of a template file, not {other}"
            ))),
        }
    }
}

/// Far above any real template (Firecracker's largest static one is about 10 KiB): a
/// config file naming /dev/zero must not fill memory.
const MAX_TEMPLATE_FILE: u64 = 1 << 20;

/// Reads a template file: a regular file (opened without blocking, so a FIFO with no
/// writer is refused rather than waited on) of at most `MAX_TEMPLATE_FILE` bytes.
fn read_template_file(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_TEMPLATE_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_TEMPLATE_FILE} bytes"
        )));
    }
    let mut text = String::new();
    file.take(MAX_TEMPLATE_FILE).read_to_string(&mut text)?;
    Ok(text)
}

#[derive(Debug, thiserror::Error)]
pub enum CpuConfigError {
    #[error("cannot read the CPU template file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("CPU template file {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

impl CpuConfigSource {
    /// The template, reading it from its file if the source is a path.
    pub fn resolve(&self) -> Result<CustomCpuTemplate, CpuConfigError> {
        match self {
            CpuConfigSource::Template(t) => Ok(t.clone()),
            CpuConfigSource::Path(path) => {
                let text = read_template_file(path).map_err(|source| CpuConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                serde_json::from_str(&text).map_err(|source| CpuConfigError::Parse {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_parses_bits_keeps_and_separators() {
        let b = Bitmap::<32>::parse("0b1x0_1").unwrap();
        assert_eq!((b.mask, b.value), (0b1011, 0b1001));
        assert_eq!(b.apply(0b0110), 0b1101);
        // Without the prefix, as Firecracker accepts.
        assert_eq!(Bitmap::<32>::parse("10").unwrap().mask, 0b11);
        // Empty: changes nothing.
        let e = Bitmap::<32>::parse("0b").unwrap();
        assert_eq!((e.mask, e.value), (0, 0));
        assert_eq!(e.apply(0xdead_beef), 0xdead_beef);
        // Exactly 32 and 64 bits, with separators that do not count.
        let full = format!("0b{}", "1".repeat(32));
        assert_eq!(Bitmap::<32>::parse(&full).unwrap().value, 0xffff_ffff);
        let full = format!("0b1{}", "_0".repeat(63));
        let b = Bitmap::<64>::parse(&full).unwrap();
        assert_eq!((b.mask, b.value), (u64::MAX, 1 << 63));
        assert_eq!(b.apply(0x1234), 1 << 63);
    }

    #[test]
    fn bitmap_errors_name_the_problem() {
        let e = Bitmap::<32>::parse(&format!("0b{}", "x".repeat(33))).unwrap_err();
        assert!(e.contains("more than 32 bits"), "{e}");
        let e = Bitmap::<32>::parse("0b102").unwrap_err();
        assert!(e.contains("`2` is not 0, 1, x or _"), "{e}");
        let e = Bitmap::<32>::parse("0x1f").unwrap_err();
        assert!(e.contains("`x` is not") || e.contains("`f` is not"), "{e}");
        // Multibyte characters are refused, not sliced.
        let e = Bitmap::<32>::parse("0b1é").unwrap_err();
        assert!(e.contains("`é` is not"), "{e}");
    }

    #[test]
    fn bitmap_writes_back_what_it_read() {
        let b = Bitmap::<32>::parse("0b1x0").unwrap();
        let s = b.to_string();
        assert_eq!(s.len(), 34);
        assert!(s.ends_with("xxx1x0"), "{s}");
        assert_eq!(Bitmap::<32>::parse(&s).unwrap(), b);
    }

    const TEMPLATE: &str = r#"{
        "kvm_capabilities": ["171", "!172"],
        "cpuid_modifiers": [
            {"leaf": "0x7", "subleaf": "0b0", "flags": 1, "modifiers": [
                {"register": "ebx", "bitmap": "0bxxxx_1x0"},
                {"register": "edx", "bitmap": "0b0"}
            ]}
        ],
        "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1"}]
    }"#;

    #[test]
    fn template_parses_and_round_trips() {
        let t: CustomCpuTemplate = serde_json::from_str(TEMPLATE).unwrap();
        assert_eq!(
            t.kvm_capabilities,
            [KvmCapability::Require(171), KvmCapability::Waive(172)]
        );
        let leaf = &t.cpuid_modifiers[0];
        assert_eq!((leaf.leaf, leaf.subleaf, leaf.flags), (7, 0, 1));
        assert_eq!(leaf.modifiers[0].register, CpuidRegister::Ebx);
        assert_eq!(leaf.modifiers[0].bitmap.mask, 0b101);
        assert_eq!(t.msr_modifiers[0].addr, 0x10a);
        let back: CustomCpuTemplate =
            serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let empty: CustomCpuTemplate = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, CustomCpuTemplate::default());
    }

    #[test]
    fn template_errors_are_clear() {
        let cases = [
            (
                r#"{"cpuid_modifiers": [{"leaf": "7", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
                "`7` needs a 0x (hexadecimal) or 0b (binary) prefix",
            ),
            (
                r#"{"cpuid_modifiers": [{"leaf": "0x1ffffffff", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
                "`0x1ffffffff` is not a 32-bit number",
            ),
            (
                r#"{"cpuid_modifiers": [{"leaf": 7, "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
                "invalid type: integer `7`, expected a string",
            ),
            (
                r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                    "modifiers": [{"register": "rax", "bitmap": "0b1"}]}]}"#,
                "unknown CPUID register `rax`",
            ),
            (
                r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                    "modifiers": [{"register": "eax", "bitmap": "0b12"}]}]}"#,
                "`2` is not 0, 1, x or _",
            ),
            (
                r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": 5}]}"#,
                "invalid type: integer `5`, expected a string",
            ),
            (
                r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "modifiers": []}]}"#,
                "missing field `flags`",
            ),
            (
                r#"{"kvm_capabilities": ["x1"]}"#,
                "`x1` is not a KVM capability",
            ),
            (r#"{"reg_modifiers": []}"#, "unknown field `reg_modifiers`"),
        ];
        for (json, want) in cases {
            let e = serde_json::from_str::<CustomCpuTemplate>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{json}\n got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn source_is_a_path_or_a_template() {
        let s: CpuConfigSource = serde_json::from_str(r#""/t.json""#).unwrap();
        assert_eq!(s, CpuConfigSource::Path("/t.json".into()));
        let s: CpuConfigSource = serde_json::from_str("{}").unwrap();
        assert_eq!(s, CpuConfigSource::Template(CustomCpuTemplate::default()));
        let e = serde_json::from_str::<CpuConfigSource>("[1]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a template object or the path"), "{e}");
        let e = CpuConfigSource::Path("/nonexistent/t.json".into())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read the CPU template file /nonexistent/t.json"),
            "{e}"
        );
        let e = CpuConfigSource::Path("/dev/zero".into())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("/dev/zero: not a regular file"), "{e}");
    }

    #[test]
    fn static_names() {
        for t in ["None", "C3", "T2", "T2S", "T2CL", "T2A"] {
            let s: StaticCpuTemplate = serde_json::from_str(&format!("\"{t}\"")).unwrap();
            assert_eq!(s.name(), t);
        }
        assert!(serde_json::from_str::<StaticCpuTemplate>("\"V1N1\"").is_err());
    }
}
