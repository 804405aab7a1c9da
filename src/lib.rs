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
pub mod seccomp;
pub mod vcpu;
pub mod vm;
pub mod vmm;
