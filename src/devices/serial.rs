//! The 8250 UART at 0x3f8 (vm-superio), its console output and input, and the terminal.
//!
//! Output never stalls a vCPU: when nobody reads stdout (a full pipe, a stopped
//! terminal), bytes are dropped and counted instead of blocking the vCPU thread. Input
//! comes from stdin through the VMM thread's event loop ([`ConsoleInput`]); a terminal
//! stdin is put in raw mode while the guest runs and restored on every exit path.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::Serial;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use super::bus::BusDevice;
use super::ioapic::IrqLine;
use crate::metrics::METRICS;

/// Counters and wake-ups the UART reports.
pub struct ConsoleEvents {
    /// Written when the guest empties the receive FIFO, so the event loop reads stdin again.
    pub input_space: EventFd,
}

impl SerialEvents for ConsoleEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        METRICS.uart.out_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        METRICS
            .uart
            .dropped_out_bytes
            .fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {
        let _ = self.input_space.write(1);
    }
}

/// Where guest console output goes.
pub enum ConsoleOut {
    /// A file description of our own in non-blocking mode (pipes, terminals).
    NonBlocking(File),
    /// A socket: sent with MSG_DONTWAIT, leaving the shared description alone.
    Socket(std::os::fd::RawFd),
    /// A regular file or anything else that cannot block for long: plain writes.
    Plain(File),
    Sink,
}

impl ConsoleOut {
    /// Console output on this process's stdout. For a pipe or terminal, stdout is reopened
    /// through /proc so that O_NONBLOCK applies to our own file description only, not to
    /// the one shared with the parent (which would surprise the shell that started us).
    pub fn stdout() -> ConsoleOut {
        let fd = libc::STDOUT_FILENO;
        // SAFETY: fstat on a valid descriptor number with a properly sized out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the result is checked.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return ConsoleOut::Sink;
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO | libc::S_IFCHR => {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags_nonblock()
                    .open("/proc/self/fd/1")
                {
                    Ok(f) => ConsoleOut::NonBlocking(f),
                    Err(_) => dup_stdout(),
                }
            }
            libc::S_IFSOCK => ConsoleOut::Socket(fd),
            _ => dup_stdout(),
        }
    }
}

impl ConsoleOut {
    /// Console output to a file or named pipe (PUT /serial's serial_out_path), opened as
    /// Firecracker opens it: created if missing, read-write (so opening a pipe without a
    /// reader does not block) and non-blocking (a full pipe drops output, never the guest).
    pub fn open_path(path: &str) -> io::Result<ConsoleOut> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags_nonblock()
            .open(path)
            .map(ConsoleOut::NonBlocking)
    }
}

trait NonBlockOpen {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}
impl NonBlockOpen for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
    }
}

fn dup_stdout() -> ConsoleOut {
    // SAFETY: dup of stdout; the new descriptor is owned by the returned File.
    let fd = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return ConsoleOut::Sink;
    }
    // SAFETY: fd is a fresh descriptor we own.
    ConsoleOut::Plain(unsafe { File::from_raw_fd(fd) })
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::NonBlocking(f) | ConsoleOut::Plain(f) => f.write(buf),
            ConsoleOut::Socket(fd) => {
                // SAFETY: send on a descriptor we hold, from a valid buffer of buf.len() bytes.
                let n = unsafe {
                    libc::send(
                        *fd,
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
            ConsoleOut::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for ConsoleOut {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            ConsoleOut::NonBlocking(f) | ConsoleOut::Plain(f) => f.as_raw_fd(),
            ConsoleOut::Socket(fd) => *fd,
            ConsoleOut::Sink => -1,
        }
    }
}

/// Output wrapper recording the first byte's time (the boot timeline's "first serial
/// output") and feeding the boot profiler's marker watch.
pub struct TimedOut(pub ConsoleOut);

impl Write for TimedOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::metrics::timeline_mark_once(&METRICS.boot_timeline_us.first_serial_output);
        crate::profile::serial_output(buf);
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub type Uart = Serial<IrqLine, ConsoleEvents, TimedOut>;

/// The UART on the port bus.
pub struct SerialDevice {
    pub uart: Uart,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: ConsoleOut, input_space: EventFd) -> SerialDevice {
        SerialDevice {
            uart: Serial::with_events(irq, ConsoleEvents { input_space }, TimedOut(out)),
        }
    }

    /// A UART in a saved state (snapshot restore).
    pub fn from_state(
        state: &crate::snapshot::devices::SerialState,
        irq: IrqLine,
        out: ConsoleOut,
        input_space: EventFd,
    ) -> Result<SerialDevice, String> {
        let uart = Serial::from_state(
            &state.into(),
            irq,
            ConsoleEvents { input_space },
            TimedOut(out),
        )
        .map_err(|e| format!("serial: {e:?}"))?;
        Ok(SerialDevice { uart })
    }

    /// Puts saved registers and input on this UART (snapshot restore); its output stays
    /// where the configuration sent it (stdout, or `serial_out_path`).
    pub fn restore(
        &mut self,
        state: &crate::snapshot::devices::SerialState,
        irq: IrqLine,
        input_space: EventFd,
    ) -> Result<(), String> {
        let out = std::mem::replace(&mut self.uart.writer_mut().0, ConsoleOut::Sink);
        match SerialDevice::from_state(state, irq, out, input_space) {
            Ok(restored) => {
                *self = restored;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub fn save_state(&self) -> crate::snapshot::devices::SerialState {
        self.uart.state().into()
    }

    /// Queues console input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input: {e:?}");
                0
            }
        }
    }

    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Ok(off) = u8::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), Some(value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        // Output errors are counted through ConsoleEvents::tx_lost_byte; the guest never
        // waits on them.
        let _ = self.uart.write(off, *value);
    }
}

/// Event-loop tokens of [`ConsoleInput`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum InputToken {
    Stdin = 1,
    InputSpace = 2,
}

impl InputToken {
    fn from_u32(v: u32) -> Option<InputToken> {
        [InputToken::Stdin, InputToken::InputSpace]
            .into_iter()
            .find(|t| *t as u32 == v)
    }
}

/// Console input: moves bytes from stdin to the UART's receive FIFO on the VMM thread's
/// event loop, and stops watching stdin while the FIFO is full (the UART's `input_space`
/// eventfd says when the guest has drained it).
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    input_space: EventFd,
    stdin_open: bool,
    stdin_waiting: bool,
}

impl ConsoleInput {
    /// `input_space` is the eventfd given to [`SerialDevice::new`].
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input_space: EventFd) -> ConsoleInput {
        ConsoleInput {
            serial,
            input_space,
            stdin_open: true,
            stdin_waiting: false,
        }
    }

    fn stdin_events() -> Events {
        Events::with_data(&io::stdin(), InputToken::Stdin as u32, EventSet::IN)
    }

    /// Moves console input from stdin to the UART, as much as its FIFO takes.
    fn pump_stdin(&mut self, ops: &mut EventOps) {
        let room = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .input_room();
        if room == 0 {
            // Stop watching stdin until the guest drains the FIFO (input_space).
            let _ = ops.remove(Self::stdin_events());
            self.stdin_waiting = true;
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        let n = match io::stdin().lock().read_raw(&mut buf[..want]) {
            Ok(0) => {
                self.close_stdin(ops);
                return;
            }
            Ok(n) => n,
            Err(e) if e.errno() == libc::EAGAIN => return,
            Err(_) => {
                self.close_stdin(ops);
                return;
            }
        };
        METRICS.uart.in_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(buf.get(..n).unwrap_or_default());
    }

    /// EOF or error: stdin leaves the event loop; the VM goes on.
    fn close_stdin(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Self::stdin_events());
        self.stdin_open = false;
        log::debug!("stdin closed: console input stops");
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match InputToken::from_u32(events.data()) {
            Some(InputToken::Stdin) => {
                if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR)
                    && !events.event_set().contains(EventSet::IN)
                {
                    let _ = ops.remove(events);
                    self.stdin_open = false;
                    return;
                }
                self.pump_stdin(ops);
            }
            Some(InputToken::InputSpace) => {
                let _ = self.input_space.read();
                if self.stdin_open && self.stdin_waiting {
                    self.stdin_waiting = false;
                    let _ = ops.add(Self::stdin_events());
                }
            }
            None => log::warn!("unexpected console event token {}", events.data()),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let space = Events::with_data(
            &self.input_space,
            InputToken::InputSpace as u32,
            EventSet::IN,
        );
        if let Err(err) = ops.add(space) {
            log::error!("cannot watch the console's input space: {err}");
        }
        // Regular files and /dev/null cannot be polled (EPERM): no console input then.
        if self.stdin_open && ops.add(Self::stdin_events()).is_err() {
            self.stdin_open = false;
        }
    }
}

/// Whether stdin is a terminal that [`stdin_raw_mode`] made raw (and so must be restored).
static TERMINAL_RAW: AtomicBool = AtomicBool::new(false);

/// Puts a terminal stdin in raw mode (so Ctrl-C etc. reach the guest's console). Does
/// nothing when stdin is not a terminal.
pub fn stdin_raw_mode() {
    let stdin = io::stdin();
    if stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok() {
        TERMINAL_RAW.store(true, Ordering::SeqCst);
    }
}

/// Gives the terminal back its canonical mode, if [`stdin_raw_mode`] changed it. Safe to
/// call on every exit path, any number of times.
pub fn restore_terminal() {
    if TERMINAL_RAW.swap(false, Ordering::SeqCst) {
        let _ = io::stdin().lock().set_canon_mode();
    }
}
