//! The route table: (method, path, body) -> `Action`, with Firecracker's paths, status
//! codes and fault messages. Parsing only; validation of values is the VMM's, shared with
//! the config file.
//!
//! `ROUTES` is data so that `tests/api_spec.rs` can hold `resources/openapi.yaml` to it.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::action::{Action, ActionError};
use crate::config::{
    BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig, CustomCpuTemplate,
    DriveConfig, DriveUpdate, EntropyDeviceConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, MmdsConfig, NetworkInterfaceConfig, NetworkInterfaceUpdate,
    SerialConfig, VsockConfig,
};

/// Path segments captured by `{name}` in a template, in order.
type Params<'a> = [&'a str];
type Handler = fn(&Params, &[u8]) -> Result<Action, ActionError>;

pub struct Route {
    pub method: &'static str,
    /// `/`-separated; a `{name}` segment matches one path segment.
    pub path: &'static str,
    handler: Handler,
}

pub const ROUTES: &[Route] = &[
    r("GET", "/", |_, _| Ok(Action::GetInstanceInfo)),
    r("GET", "/version", |_, _| Ok(Action::GetVersion)),
    r("GET", "/vm/config", |_, _| Ok(Action::GetVmConfig)),
    r("GET", "/machine-config", |_, _| {
        Ok(Action::GetMachineConfig)
    }),
    r("PUT", "/machine-config", put_machine_config),
    r("PATCH", "/machine-config", patch_machine_config),
    r("PUT", "/cpu-config", |_, b| {
        parse::<CustomCpuTemplate>(b).map(Action::PutCpuConfig)
    }),
    r("PUT", "/boot-source", put_boot_source),
    r("PUT", "/drives/{drive_id}", put_drive),
    r("PATCH", "/drives/{drive_id}", patch_drive),
    r("PUT", "/network-interfaces/{iface_id}", put_net),
    r("PATCH", "/network-interfaces/{iface_id}", patch_net),
    r("PUT", "/logger", put_logger),
    r("PUT", "/metrics", put_metrics),
    r("PUT", "/vsock", put_vsock),
    // Firecracker routes PUT by the first path segment only: clients that name the
    // (deprecated) device id in the path, `/vsock/vsock0`, reach the same handler.
    r("PUT", "/vsock/{vsock_id}", put_vsock),
    r("PUT", "/actions", put_actions),
    r("PATCH", "/vm", patch_vm),
    r("GET", "/mmds", |_, _| Ok(Action::GetMmds)),
    r("PUT", "/mmds", put_mmds),
    r("PATCH", "/mmds", patch_mmds),
    r("PUT", "/mmds/config", put_mmds_config),
    r("GET", "/balloon", |_, _| Ok(Action::GetBalloon)),
    r("PUT", "/balloon", |_, b| {
        parse::<BalloonConfig>(b).map(Action::PutBalloon)
    }),
    r("PATCH", "/balloon", |_, b| {
        parse::<BalloonUpdate>(b).map(Action::PatchBalloon)
    }),
    r("GET", "/balloon/statistics", |_, _| {
        Ok(Action::GetBalloonStats)
    }),
    r("PATCH", "/balloon/statistics", |_, b| {
        parse::<BalloonStatsUpdate>(b).map(Action::PatchBalloonStats)
    }),
    r("PUT", "/entropy", |_, b| {
        parse::<EntropyDeviceConfig>(b).map(Action::PutEntropy)
    }),
    r("PUT", "/serial", |_, b| {
        parse::<SerialConfig>(b).map(Action::PutSerial)
    }),
    r("PUT", "/snapshot/create", |_, body| {
        parse(body).map(Action::CreateSnapshot)
    }),
    r("PUT", "/snapshot/load", |_, body| {
        parse(body).map(Action::LoadSnapshot)
    }),
];

const fn r(method: &'static str, path: &'static str, handler: Handler) -> Route {
    Route {
        method,
        path,
        handler,
    }
}

/// Firecracker endpoints (by first path segment) for what ember does not implement, and
/// the feature to name in the refusal. Not routes: they are absent from the OpenAPI spec.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    ("hotplug", "memory hotplug"),
    ("pmem", "the pmem device"),
    ("vfio", "device passthrough"),
];

/// Turns one request into the action it asks for, or the 400 Firecracker would give.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Action, ActionError> {
    if !path.starts_with('/') {
        return Err(ActionError::bad_request(format!(
            "Invalid request method and/or path: {method} {path}."
        )));
    }
    let segments = split(path);
    let mut allowed: Vec<&str> = Vec::new();
    for r in ROUTES {
        let Some(params) = match_template(r.path, &segments) else {
            continue;
        };
        if r.method != method {
            // `/vsock` matches both its routes (an empty id for the second).
            if !allowed.contains(&r.method) {
                allowed.push(r.method);
            }
            continue;
        }
        check_body_presence(method, body)?;
        return (r.handler)(&params, body);
    }
    if let Some(feature) = segments
        .first()
        .and_then(|first| UNSUPPORTED.iter().find(|(p, _)| p == first))
        .map(|(_, f)| f)
    {
        return Err(ActionError::bad_request(format!(
            "{method} {path}: ember does not support {feature}."
        )));
    }
    let mut message = format!("Invalid request method and/or path: {method} {path}.");
    if !allowed.is_empty() {
        message.push_str(&format!(" Allowed methods: {}.", allowed.join(", ")));
    }
    Err(ActionError::bad_request(message))
}

/// Firecracker's `split_terminator`: a trailing `/` is ignored.
fn split(path: &str) -> Vec<&str> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = p.strip_suffix('/').unwrap_or(p);
    if p.is_empty() {
        Vec::new()
    } else {
        p.split('/').collect()
    }
}

fn match_template<'a>(template: &str, segments: &[&'a str]) -> Option<Vec<&'a str>> {
    let t = split(template);
    // `/drives` and `/drives/` reach the drive handler with an empty id, so the user hears
    // "The ID cannot be empty." as from Firecracker rather than "invalid path".
    let params_only_missing =
        t.len() == segments.len() + 1 && t.last().is_some_and(|l| l.starts_with('{'));
    if t.len() != segments.len() && !params_only_missing {
        return None;
    }
    let mut params = Vec::new();
    for (i, ts) in t.iter().enumerate() {
        let s = segments.get(i).copied().unwrap_or("");
        if ts.starts_with('{') {
            params.push(s);
        } else if *ts != s {
            return None;
        }
    }
    Some(params)
}

/// Firecracker's `method_to_error`: a GET carries no body, a PUT or PATCH needs one.
fn check_body_presence(method: &str, body: &[u8]) -> Result<(), ActionError> {
    match (method, body.is_empty()) {
        ("GET", false) => Err(ActionError::bad_request("GET request cannot have a body.")),
        ("PUT", true) => Err(ActionError::bad_request("Empty PUT request.")),
        ("PATCH", true) => Err(ActionError::bad_request("Empty PATCH request.")),
        _ => Ok(()),
    }
}

/// serde's message names the field and the position; Firecracker wraps it like this.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ActionError> {
    serde_json::from_slice(body).map_err(|e| {
        ActionError::bad_request(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Firecracker's `checked_id`: resource ids in paths are non-empty `[A-Za-z0-9_]+`.
fn checked_id<'a>(params: &Params<'a>) -> Result<&'a str, ActionError> {
    let id = params.first().copied().unwrap_or("");
    if id.is_empty() {
        return Err(ActionError::bad_request("The ID cannot be empty."));
    }
    if !id.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
        return Err(ActionError::bad_request(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(id)
}

fn id_mismatch(path_id: &str, body_id: &str) -> ActionError {
    ActionError::bad_request(format!(
        "The id from the path [{path_id}] does not match the id from the body [{body_id}]!"
    ))
}

fn put_machine_config(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<MachineConfig>(body).map(Action::PutMachineConfig)
}

fn patch_machine_config(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    let update: MachineConfigUpdate = parse(body)?;
    if update.is_empty() {
        return Err(ActionError::bad_request("Empty PATCH request."));
    }
    Ok(Action::PatchMachineConfig(update))
}

fn put_boot_source(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<BootSourceConfig>(body).map(Action::PutBootSource)
}

fn put_drive(params: &Params, body: &[u8]) -> Result<Action, ActionError> {
    let id = checked_id(params)?;
    let drive: DriveConfig = parse(body)?;
    if drive.drive_id != id {
        return Err(id_mismatch(id, &drive.drive_id));
    }
    Ok(Action::PutDrive(drive))
}

fn patch_drive(params: &Params, body: &[u8]) -> Result<Action, ActionError> {
    let id = checked_id(params)?;
    let update: DriveUpdate = parse(body)?;
    if update.drive_id != id {
        return Err(id_mismatch(id, &update.drive_id));
    }
    Ok(Action::PatchDrive(update))
}

fn put_net(params: &Params, body: &[u8]) -> Result<Action, ActionError> {
    let id = checked_id(params)?;
    let iface: NetworkInterfaceConfig = parse(body)?;
    if iface.iface_id != id {
        return Err(id_mismatch(id, &iface.iface_id));
    }
    Ok(Action::PutNetworkInterface(iface))
}

fn patch_net(params: &Params, body: &[u8]) -> Result<Action, ActionError> {
    let id = checked_id(params)?;
    let update: NetworkInterfaceUpdate = parse(body)?;
    if update.iface_id != id {
        return Err(id_mismatch(id, &update.iface_id));
    }
    Ok(Action::PatchNetworkInterface(update))
}

fn put_logger(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<LoggerConfig>(body).map(Action::PutLogger)
}

fn put_metrics(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<MetricsConfig>(body).map(Action::PutMetrics)
}

fn put_vsock(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<VsockConfig>(body).map(Action::PutVsock)
}

fn put_mmds(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<serde_json::Value>(body).map(Action::PutMmds)
}

fn patch_mmds(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<serde_json::Value>(body).map(Action::PatchMmds)
}

fn put_mmds_config(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    parse::<MmdsConfig>(body).map(Action::PutMmdsConfig)
}

/// The variant names are the accepted `action_type` strings.
#[derive(Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

fn put_actions(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    Ok(match parse::<ActionBody>(body)?.action_type {
        ActionType::InstanceStart => Action::InstanceStart,
        ActionType::SendCtrlAltDel => Action::SendCtrlAltDel,
        ActionType::FlushMetrics => Action::FlushMetrics,
    })
}

#[derive(Deserialize)]
enum VmState {
    Paused,
    Resumed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: VmState,
}

fn patch_vm(_: &Params, body: &[u8]) -> Result<Action, ActionError> {
    Ok(match parse::<VmBody>(body)?.state {
        VmState::Paused => Action::Pause,
        VmState::Resumed => Action::Resume,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str, body: &str) -> Action {
        match route(method, path, body.as_bytes()) {
            Ok(a) => a,
            Err(e) => panic!("{method} {path} {body}: {}", e.message),
        }
    }

    fn err(method: &str, path: &str, body: &str) -> String {
        match route(method, path, body.as_bytes()) {
            Ok(a) => panic!("{method} {path} {body}: accepted as {a:?}"),
            Err(e) => {
                assert_eq!(e.status, 400, "{}", e.message);
                e.message
            }
        }
    }

    #[test]
    fn gets() {
        assert_eq!(ok("GET", "/", ""), Action::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), Action::GetVersion);
        assert_eq!(ok("GET", "/vm/config", ""), Action::GetVmConfig);
        assert_eq!(ok("GET", "/machine-config/", ""), Action::GetMachineConfig);
        assert_eq!(
            err("GET", "/version", "{}"),
            "GET request cannot have a body."
        );
    }

    #[test]
    fn actions_and_vm_state() {
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            Action::InstanceStart
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
            Action::SendCtrlAltDel
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
            Action::FlushMetrics
        );
        let e = err("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
        assert!(e.contains("unknown variant `Reboot`"), "{e}");
        let e = err(
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart", "payload": 1}"#,
        );
        assert!(e.contains("unknown field `payload`"), "{e}");
        assert_eq!(ok("PATCH", "/vm", r#"{"state": "Paused"}"#), Action::Pause);
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state": "Resumed"}"#),
            Action::Resume
        );
        let e = err("PATCH", "/vm", r#"{"state": 1}"#);
        assert!(
            e.starts_with("An error occurred when deserializing the json body"),
            "{e}"
        );
        assert_eq!(err("PUT", "/actions", ""), "Empty PUT request.");
        assert_eq!(err("PATCH", "/vm", ""), "Empty PATCH request.");
    }

    #[test]
    fn machine_config() {
        let a = ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        );
        assert!(
            matches!(a, Action::PutMachineConfig(c) if c.vcpu_count == 2 && c.mem_size_mib == 256)
        );
        let a = ok("PATCH", "/machine-config", r#"{"mem_size_mib": 64}"#);
        assert!(matches!(a, Action::PatchMachineConfig(u) if u.mem_size_mib == Some(64)));
        assert_eq!(
            err("PATCH", "/machine-config", "{}"),
            "Empty PATCH request."
        );
        let e = err("PUT", "/machine-config", r#"{"vcpu_count": 2}"#);
        assert!(e.contains("missing field `mem_size_mib`"), "{e}");
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "2", "mem_size_mib": 1}"#,
        );
        assert!(e.contains("invalid type"), "{e}");
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1"#,
        );
        assert!(e.contains("EOF"), "{e}");
    }

    #[test]
    fn drives() {
        let body = r#"{"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": true}"#;
        assert!(
            matches!(ok("PUT", "/drives/rootfs", body), Action::PutDrive(d) if d.drive_id == "rootfs")
        );
        assert_eq!(
            err("PUT", "/drives/other", body),
            "The id from the path [other] does not match the id from the body [rootfs]!"
        );
        assert_eq!(err("PUT", "/drives", body), "The ID cannot be empty.");
        assert_eq!(err("PUT", "/drives/", body), "The ID cannot be empty.");
        assert!(err("PUT", "/drives/a-b", body).contains("alphanumeric"));
        assert!(err("PUT", "/drives/a/b", body).starts_with("Invalid request method and/or path"));
        let upd = r#"{"drive_id": "rootfs", "path_on_host": "/new.img"}"#;
        assert!(
            matches!(ok("PATCH", "/drives/rootfs", upd), Action::PatchDrive(u) if u.drive_id == "rootfs")
        );
        assert!(err("PATCH", "/drives/x", upd).contains("does not match"));
        let e = err(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "is_root_device": true, "bogus": 1}"#,
        );
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn network_interfaces() {
        let body = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
        assert!(matches!(ok("PUT", "/network-interfaces/eth0", body),
                         Action::PutNetworkInterface(n) if n.iface_id == "eth0"));
        assert!(err("PUT", "/network-interfaces/eth1", body).contains("[eth1]"));
        // PATCH takes rate limiters only; the TAP is not among them.
        assert!(err("PATCH", "/network-interfaces/eth0", body).contains("unknown field"));
        let upd =
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#;
        assert!(matches!(ok("PATCH", "/network-interfaces/eth0", upd),
                         Action::PatchNetworkInterface(u) if u.rx_rate_limiter.is_some()));
        assert!(err("PATCH", "/network-interfaces/eth1", upd).contains("[eth1]"));
    }

    #[test]
    fn other_puts() {
        let a = ok(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        );
        assert!(matches!(a, Action::PutBootSource(b) if b.kernel_image_path == "/k"));
        let e = err("PUT", "/boot-source", r#"{"kernel_image_path": 5}"#);
        assert!(e.contains("invalid type: integer `5`"), "{e}");
        assert!(matches!(
            ok("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
            Action::PutMetrics(_)
        ));
        assert!(err("PUT", "/metrics", "not json").contains("expected"));
        assert!(matches!(
            ok("PUT", "/logger", r#"{"log_path": "/l"}"#),
            Action::PutLogger(_)
        ));
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(
            err("GET", "/nope", ""),
            "Invalid request method and/or path: GET /nope."
        );
        assert_eq!(
            err("DELETE", "/machine-config", ""),
            "Invalid request method and/or path: DELETE /machine-config. Allowed methods: GET, PUT, PATCH."
        );
        assert!(err("GET", "/boot-source", "").ends_with("Allowed methods: PUT."));
        assert!(err("POST", "/actions", "{}").starts_with("Invalid request method and/or path"));
        assert!(err("GET", "/vm", "").ends_with("Allowed methods: PATCH."));
        assert!(err("GET", "/version/extra", "").starts_with("Invalid request method"));
        assert!(err("GET", "", "").starts_with("Invalid request method"));
    }

    #[test]
    fn vsock() {
        let body = r#"{"vsock_id": "v", "guest_cid": 3, "uds_path": "/v.sock"}"#;
        assert!(matches!(ok("PUT", "/vsock", body), Action::PutVsock(v) if v.guest_cid == 3));
        assert!(err("PUT", "/vsock", r#"{"guest_cid": 3}"#).contains("uds_path"));
        assert!(err("GET", "/vsock", "").ends_with("Allowed methods: PUT."));
        // The id form older clients use (bandsox): the path id is ignored, as in Firecracker.
        assert!(
            matches!(ok("PUT", "/vsock/vsock0", body), Action::PutVsock(v) if v.uds_path == "/v.sock")
        );
    }

    #[test]
    fn snapshot_routes() {
        let a = ok(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        );
        assert!(matches!(a, Action::CreateSnapshot(p) if p.snapshot_path == "/s"));
        let a = ok(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#,
        );
        assert!(matches!(a, Action::LoadSnapshot(p) if p.resume_vm));
        let e = err("PUT", "/snapshot/create", "{}");
        assert!(e.contains("missing field `snapshot_path`"), "{e}");
        let e = err("GET", "/snapshot/load", "");
        assert!(e.contains("Allowed methods: PUT"), "{e}");
    }

    #[test]
    fn unsupported_devices() {
        for (m, p) in [("PUT", "/hotplug/memory"), ("PUT", "/pmem/p0")] {
            let e = err(m, p, "{}");
            assert!(e.contains("ember does not support"), "{m} {p}: {e}");
        }
    }

    #[test]
    fn cpu_config() {
        assert_eq!(
            ok("PUT", "/cpu-config", "{}"),
            Action::PutCpuConfig(CustomCpuTemplate::default())
        );
        let e = err(
            "PUT",
            "/cpu-config",
            r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b2"}]}"#,
        );
        assert!(e.contains("`2` is not 0, 1, x or _"), "{e}");
        let e = err("GET", "/cpu-config", "");
        assert!(e.contains("Allowed methods: PUT"), "{e}");
    }

    #[test]
    fn balloon_entropy_serial() {
        assert_eq!(
            ok(
                "PUT",
                "/balloon",
                r#"{"amount_mib": 8, "deflate_on_oom": false}"#
            ),
            Action::PutBalloon(BalloonConfig {
                amount_mib: 8,
                ..Default::default()
            })
        );
        assert_eq!(
            ok("PATCH", "/balloon", r#"{"amount_mib": 2}"#),
            Action::PatchBalloon(BalloonUpdate { amount_mib: 2 })
        );
        assert_eq!(ok("GET", "/balloon", ""), Action::GetBalloon);
        assert_eq!(
            ok("GET", "/balloon/statistics", ""),
            Action::GetBalloonStats
        );
        assert_eq!(
            ok(
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 3}"#
            ),
            Action::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: 3
            })
        );
        assert!(err("PATCH", "/balloon", r#"{"amount_mib": -1}"#).contains("invalid value"));
        assert_eq!(
            ok("PUT", "/entropy", "{}"),
            Action::PutEntropy(EntropyDeviceConfig::default())
        );
        assert!(matches!(
            ok("PUT", "/serial", r#"{"serial_out_path": "/tmp/s"}"#),
            Action::PutSerial(_)
        ));
        assert!(err("PUT", "/serial", r#"{"path": "/tmp/s"}"#).contains("unknown field"));
    }

    #[test]
    fn route_table_is_consistent() {
        for (i, a) in ROUTES.iter().enumerate() {
            assert!(a.path.starts_with('/'), "{}", a.path);
            assert!(["GET", "PUT", "PATCH"].contains(&a.method));
            for b in ROUTES.iter().skip(i + 1) {
                assert!(
                    a.method != b.method || a.path != b.path,
                    "duplicate {} {}",
                    a.method,
                    a.path
                );
            }
            let first = split(a.path).first().copied().unwrap_or("");
            assert!(!UNSUPPORTED.iter().any(|(p, _)| *p == first), "{}", a.path);
        }
    }
}
