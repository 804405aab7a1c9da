//! ember: a minimal KVM microVM monitor.
// Outside tests, a failure is an error value with a message, never a panic (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod action;
pub mod api;
pub mod builder;
pub mod cli;
pub mod config;
pub mod controller;
pub mod devices;
pub mod exit_code;
pub mod jail;
pub mod logger;
pub mod metrics;
pub mod mmds;
pub mod profile;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vmm;

/// The Firecracker release whose API, config schema, command line and exit codes ember
/// follows: reported where Firecracker reports its own version (`--version`'s first line,
/// `GET /version`, `GET /`), so engines' version gates compare against it. ember's own
/// version is `CARGO_PKG_VERSION`, reported next to it.
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

/// ember's own version.
pub const EMBER_VERSION: &str = env!("CARGO_PKG_VERSION");
