//! Process exit codes, as Firecracker's (FcExitCode) where they overlap. The README has
//! the table.

/// The guest reset or powered off; or --help / --version.
pub const OK: i32 = 0;
/// The VM stopped on an error: a triple fault, a KVM internal error, an unknown exit, or a
/// failure to build or start the VM.
pub const GENERIC_ERROR: i32 = 1;
/// An internal error ember did not expect.
pub const UNEXPECTED_ERROR: i32 = 2;
/// A thread made a system call its seccomp filter does not allow.
pub const BAD_SYSCALL: i32 = 148;
/// The configuration (file or API) is invalid: bad JSON, unknown field, bad value,
/// missing or unusable file.
pub const BAD_CONFIGURATION: i32 = 152;
/// The command line is invalid.
pub const ARG_PARSING: i32 = 153;
/// SIGINT and SIGTERM stop the VM cleanly and exit with 128 + the signal number (130 and
/// 143), as a shell reports a process that signal ended.
pub const SIGNAL_BASE: i32 = 128;
/// SIGHUP stops the VM cleanly too (flushed, cleaned up), with Firecracker's code for it.
pub const SIGHUP: i32 = 156;
