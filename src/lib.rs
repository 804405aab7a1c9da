//! ember: a minimal KVM microVM monitor.

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
