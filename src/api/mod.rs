//! The Firecracker-compatible API: HTTP/1.1 over a Unix socket, served by one thread.
//!
//! The thread only parses requests, maps them to an `Action`, sends it to the VMM thread
//! and writes the answer back; it never touches the VM. The seams, one file each:
//! - `socket`: the socket file's life (bind, replace a stale one, remove at exit);
//! - `server`: the poll loop, accepting, connection limits and timeouts, shutdown;
//! - `conn`: one connection's buffers and request/response state machine;
//! - `http`: request framing and response writing (no I/O);
//! - `dispatch` and `routes`: a request to an `Action`, its result to a response.
//!
//! Why a hand-written server: Firecracker's `micro_http` is not on crates.io, and the
//! servers that are (hyper and the like) need an async runtime: more threads, more
//! system calls to allow in the API thread's seccomp filter, more start-up time and
//! binary size, for a socket that serves one local client at a time. Parsing is
//! `httparse`'s; what stays ours is the small loop whose limits (connections, buffers,
//! timeouts) are the point of this module.

mod conn;
mod dispatch;
pub mod http;
pub mod routes;
mod server;
mod socket;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::action::{ActionReceiver, ActionSender};
pub use socket::remove_socket;

/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;

/// Open connections beyond which the oldest idle or stalled one is closed for each new
/// client (Firecracker answers 503 past 10 instead). Bounds the API's memory: each
/// connection holds at most one request and 64 KiB of unread responses.
const MAX_CONNECTIONS: usize = 128;
/// A keep-alive connection with nothing under way is closed after this long; longer than
/// the 90 s idle timeout of Go's HTTP client, so such clients close first and never race
/// a request against our close.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A request must arrive whole, and its response be read, within this long of the
/// previous one; a client sending a byte at a time, or reading nothing, is closed then.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits one API server enforces.
#[derive(Debug, Clone)]
struct Limits {
    max_payload: usize,
    max_connections: usize,
    idle_timeout: Duration,
    request_timeout: Duration,
}

impl Limits {
    /// Test hook (tests only, not a user interface): `EMBER_TEST_API_TIMEOUT_MS` caps both
    /// timeouts, so tests can watch them act.
    fn new(max_payload: usize) -> Limits {
        let mut limits = Limits {
            max_payload,
            max_connections: MAX_CONNECTIONS,
            idle_timeout: IDLE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        };
        if let Some(ms) = std::env::var("EMBER_TEST_API_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            let cap = Duration::from_millis(ms);
            limits.idle_timeout = limits.idle_timeout.min(cap);
            limits.request_timeout = limits.request_timeout.min(cap);
        }
        limits
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "another process is serving the API socket {0}; stop it or choose another --api-sock path"
    )]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another --api-sock path")]
    NotASocket(PathBuf),
    #[error("cannot check the existing API socket {0}: {1}")]
    Probe(PathBuf, #[source] std::io::Error),
    #[error("cannot remove the stale API socket {0}: {1}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    #[error("cannot bind the API socket {0}: {1}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("cannot start the API thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A running API server: its thread and socket, until `stop`.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

/// Binds the API socket at `path` and starts the `ember_api` thread serving it. Requests
/// with a body over `max_payload` bytes get 413.
///
/// A socket file left by a dead process is replaced; one that a live process answers is an
/// error, as is any other kind of file at `path`.
pub fn start(path: &Path, sender: ActionSender, max_payload: usize) -> Result<ApiServer, ApiError> {
    let listener = socket::bind(path)?;
    crate::metrics::timeline_mark(&crate::metrics::METRICS.boot_timeline_us.api_ready);
    log::info!("API server listening on {}", path.display());
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ApiError::Spawn)?);
    let server = server::Server {
        listener,
        stop: stop.clone(),
        sender,
        limits: Limits::new(max_payload),
        conns: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name("ember_api".into())
        .spawn(move || server.run())
        .map_err(ApiError::Spawn)?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        stop,
        thread,
    })
}

impl ApiServer {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server: the VMM's end of the action channel goes first (a request still
    /// waiting for it is answered with an error instead of waiting forever), then the
    /// thread sends the responses it owes (briefly), closes every connection and is
    /// joined, and the socket file is removed.
    pub fn stop(self, receiver: ActionReceiver) {
        drop(receiver);
        match self.stop.write(1) {
            Ok(()) => {
                if self.thread.join().is_err() {
                    log::error!("the API thread panicked");
                }
            }
            // Without the signal the thread would never end; leave it to process exit.
            Err(e) => log::error!("cannot stop the API thread: {e}"),
        }
        remove_socket(&self.path);
    }
}
