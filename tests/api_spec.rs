//! Holds resources/openapi.yaml to the code: every path and method in the spec has a route
//! and every route is in the spec; every body definition lists exactly the fields the
//! config type accepts; the endpoints ember refuses are not in the spec.
//!
//! The YAML is read line by line (no YAML crate): paths are the two-space-indented keys
//! under `paths:`, methods the four-space-indented keys below them, and definitions and
//! their properties likewise under `definitions:`.

use std::collections::{BTreeMap, BTreeSet};

use ember::api::routes::{ROUTES, UNSUPPORTED};
use serde::de::DeserializeOwned;

const SPEC: &str = include_str!("../resources/openapi.yaml");

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines of the top-level section `name:`.
fn section(name: &str) -> Vec<&'static str> {
    let header = format!("{name}:");
    let mut lines = SPEC.lines().skip_while(|l| *l != header);
    assert!(
        lines.next().is_some(),
        "no `{header}` section in openapi.yaml"
    );
    lines
        .take_while(|l| l.trim().is_empty() || indent(l) > 0)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}

fn key(line: &str) -> Option<&str> {
    let t = line.trim();
    t.strip_suffix(':')
        .filter(|k| !k.contains(' ') || k.starts_with('"'))
}

/// (METHOD, path) pairs under `paths:`.
fn spec_operations() -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    let mut path: Option<&str> = None;
    for l in section("paths") {
        match indent(l) {
            2 => {
                let k = key(l).unwrap_or_else(|| panic!("not a path key: {l:?}"));
                assert!(k.starts_with('/'), "path keys start with /: {l:?}");
                path = Some(k);
            }
            4 => {
                let m = key(l).unwrap_or_else(|| panic!("not a method key: {l:?}"));
                assert!(
                    ["get", "put", "patch"].contains(&m),
                    "unexpected method {m:?}"
                );
                let p = path.unwrap_or_else(|| panic!("method before any path: {l:?}"));
                assert!(
                    ops.insert((m.to_uppercase(), p.to_string())),
                    "{m} {p} listed twice"
                );
            }
            _ => {}
        }
    }
    ops
}

/// Definition name -> its property names.
fn spec_definitions() -> BTreeMap<String, BTreeSet<String>> {
    let mut defs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_properties = false;
    for l in section("definitions") {
        match indent(l) {
            2 => {
                let k = key(l).unwrap_or_else(|| panic!("not a definition key: {l:?}"));
                assert!(
                    defs.insert(k.to_string(), BTreeSet::new()).is_none(),
                    "{k} twice"
                );
                current = Some(k.to_string());
                in_properties = false;
            }
            4 => in_properties = l.trim() == "properties:",
            6 if in_properties => {
                let p = key(l).unwrap_or_else(|| panic!("not a property key: {l:?}"));
                if let Some(set) = current.as_ref().and_then(|c| defs.get_mut(c)) {
                    set.insert(p.to_string());
                }
            }
            _ => {}
        }
    }
    defs
}

#[test]
fn spec_and_routes_agree() {
    let spec = spec_operations();
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(routes.len(), ROUTES.len(), "duplicate routes");
    let missing_routes: Vec<_> = spec.difference(&routes).collect();
    let missing_spec: Vec<_> = routes.difference(&spec).collect();
    assert!(
        missing_routes.is_empty(),
        "in openapi.yaml but not routed: {missing_routes:?}"
    );
    assert!(
        missing_spec.is_empty(),
        "routed but not in openapi.yaml: {missing_spec:?}"
    );
}

#[test]
fn unsupported_endpoints_are_not_in_the_spec() {
    for (_, path) in spec_operations() {
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        assert!(
            !UNSUPPORTED.iter().any(|(p, _)| *p == first),
            "{path} is refused by ember but described in openapi.yaml"
        );
    }
}

#[test]
fn every_reference_resolves() {
    let defs = spec_definitions();
    let mut refs = 0;
    for l in SPEC.lines() {
        if let Some(r) = l.trim().strip_prefix("$ref: \"#/definitions/") {
            let name = r.trim_end_matches('"');
            assert!(defs.contains_key(name), "$ref to missing definition {name}");
            refs += 1;
        }
    }
    assert!(refs > 10);
}

/// The field names `T` accepts, from serde's own refusal of an unknown field, which
/// lists them ("expected one of `a`, `b`", "expected `a` or `b`", "expected `a`").
fn accepted_fields<T: DeserializeOwned>() -> BTreeSet<String> {
    let e = match serde_json::from_str::<T>(r#"{"__not_a_field__": null}"#) {
        Ok(_) => panic!("a type with deny_unknown_fields accepted an unknown field"),
        Err(e) => e.to_string(),
    };
    let (_, expected) = e
        .split_once("expected")
        .unwrap_or_else(|| panic!("unexpected serde message: {e}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn check_definition<T: DeserializeOwned>(defs: &BTreeMap<String, BTreeSet<String>>, name: &str) {
    let spec = defs
        .get(name)
        .unwrap_or_else(|| panic!("no definition {name} in openapi.yaml"));
    let code = accepted_fields::<T>();
    assert_eq!(
        spec,
        &code,
        "definition {name} in openapi.yaml lists other fields than {} accepts",
        std::any::type_name::<T>()
    );
}

#[test]
fn body_definitions_match_the_config_types() {
    use ember::config::*;
    let defs = spec_definitions();
    check_definition::<BootSourceConfig>(&defs, "BootSource");
    check_definition::<MachineConfig>(&defs, "MachineConfiguration");
    check_definition::<MachineConfigUpdate>(&defs, "MachineConfigurationUpdate");
    check_definition::<DriveConfig>(&defs, "Drive");
    check_definition::<DriveUpdate>(&defs, "PartialDrive");
    check_definition::<NetworkInterfaceConfig>(&defs, "NetworkInterface");
    check_definition::<NetworkInterfaceUpdate>(&defs, "PartialNetworkInterface");
    check_definition::<RateLimiterConfig>(&defs, "RateLimiter");
    check_definition::<TokenBucketConfig>(&defs, "TokenBucket");
    check_definition::<LoggerConfig>(&defs, "Logger");
    check_definition::<MetricsConfig>(&defs, "Metrics");
    check_definition::<VsockConfig>(&defs, "Vsock");
    check_definition::<MmdsConfig>(&defs, "MmdsConfig");
    check_definition::<BalloonConfig>(&defs, "Balloon");
    check_definition::<BalloonUpdate>(&defs, "BalloonUpdate");
    check_definition::<BalloonStatsUpdate>(&defs, "BalloonStatsUpdate");
    check_definition::<EntropyDeviceConfig>(&defs, "EntropyDevice");
    check_definition::<SerialConfig>(&defs, "SerialDevice");
    check_definition::<CustomCpuTemplate>(&defs, "CpuConfig");
    check_definition::<cpu_template::CpuidLeafModifier>(&defs, "CpuidLeafModifier");
    check_definition::<cpu_template::CpuidRegisterModifier>(&defs, "CpuidRegisterModifier");
    check_definition::<cpu_template::MsrModifier>(&defs, "MsrModifier");
    check_definition::<snapshot::CreateSnapshotParams>(&defs, "SnapshotCreateParams");
    check_definition::<snapshot::LoadSnapshotParams>(&defs, "SnapshotLoadParams");
    check_definition::<snapshot::MemBackend>(&defs, "MemoryBackend");
    check_definition::<snapshot::NetworkOverride>(&defs, "NetworkOverride");
    check_definition::<snapshot::VsockOverride>(&defs, "VsockOverride");
}

#[test]
fn the_parser_sees_the_whole_spec() {
    // Guards the crude parser itself: a known shape must come out of it.
    let ops = spec_operations();
    assert!(ops.contains(&("GET".into(), "/".into())));
    assert!(ops.contains(&("PATCH".into(), "/drives/{drive_id}".into())));
    assert!(ops.contains(&("GET".into(), "/vm/config".into())));
    let defs = spec_definitions();
    assert!(defs["Vm"].contains("state"));
    assert!(defs["Error"].contains("fault_message"));
}

/// GET /balloon/statistics answers with every field the spec lists (once the guest has
/// reported every tag).
#[test]
fn balloon_statistics_match_the_spec() {
    use ember::devices::virtio::balloon::{BalloonStatsReport, GuestStats};
    let mut guest = GuestStats::default();
    for tag in 0..16 {
        guest.update(tag, 1);
    }
    let report = BalloonStatsReport {
        guest,
        ..Default::default()
    };
    let fields: BTreeSet<String> = serde_json::to_value(&report)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(spec_definitions()["BalloonStats"], fields);
}
