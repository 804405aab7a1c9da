//! The VMM thread: owns the VM's devices, runs the event loop (event-manager over epoll)
//! and decides when and how the process ends.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::block_signal;

use crate::builder::BuiltVm;
use crate::devices::serial::SerialDevice;
use crate::vcpu::{ExitSignal, VcpuControl, VmExit};

/// Event-loop tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Token {
    Exit = 1,
    Reset = 2,
    Signal = 3,
    Stdin = 4,
    InputSpace = 5,
}

impl Token {
    fn from_u32(v: u32) -> Option<Token> {
        [
            Token::Exit,
            Token::Reset,
            Token::Signal,
            Token::Stdin,
            Token::InputSpace,
        ]
        .into_iter()
        .find(|t| *t as u32 == v)
    }
}

/// Blocks SIGTERM and SIGINT in this thread and every thread it starts later; they are
/// read from a signalfd on the event loop instead, so a stop is always clean.
pub fn block_stop_signals() -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        block_signal(sig).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    }
    Ok(())
}

fn stop_signalfd() -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: sigset operations on a local, zero-initialised set.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The VM's own control events: guest reset through the i8042, console input.
struct Control {
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    serial: Arc<Mutex<SerialDevice>>,
    input_space: EventFd,
    stdin_open: bool,
    stdin_waiting: bool,
}

impl Control {
    /// Moves console input from stdin to the UART, as much as its FIFO takes. Returns
    /// false when stdin has nothing more to give (EOF or error).
    fn pump_stdin(&mut self, ops: &mut EventOps) {
        let room = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .input_room();
        if room == 0 {
            // Stop watching stdin until the guest drains the FIFO (input_space).
            let _ = ops.remove(Events::with_data(
                &std::io::stdin(),
                Token::Stdin as u32,
                EventSet::IN,
            ));
            self.stdin_waiting = true;
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: reading at most `want` bytes into a local buffer of at least that size.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), want) };
        if n <= 0 {
            if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                // EOF: stdin leaves the event loop; the VM goes on.
                let _ = ops.remove(Events::with_data(
                    &std::io::stdin(),
                    Token::Stdin as u32,
                    EventSet::IN,
                ));
                self.stdin_open = false;
                log::debug!("stdin closed: console input stops");
            }
            return;
        }
        let n = n as usize;
        crate::metrics::METRICS
            .serial_in_bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(&buf[..n]);
    }
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match Token::from_u32(events.data()) {
            Some(Token::Reset) => {
                let _ = self.reset_evt.read();
                self.exit.stop(VmExit::GuestReset);
            }
            Some(Token::Stdin) => {
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
            Some(Token::InputSpace) => {
                let _ = self.input_space.read();
                if self.stdin_open && self.stdin_waiting {
                    self.stdin_waiting = false;
                    let _ = ops.add(Events::with_data(
                        &std::io::stdin(),
                        Token::Stdin as u32,
                        EventSet::IN,
                    ));
                }
            }
            _ => log::warn!("unexpected event token {}", events.data()),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let adds = [
            Events::with_data(&self.reset_evt, Token::Reset as u32, EventSet::IN),
            Events::with_data(&self.input_space, Token::InputSpace as u32, EventSet::IN),
        ];
        for e in adds {
            if let Err(err) = ops.add(e) {
                log::error!("cannot watch a control event: {err}");
            }
        }
        if self.stdin_open {
            // Regular files and /dev/null cannot be polled (EPERM): no console input then.
            if ops
                .add(Events::with_data(
                    &std::io::stdin(),
                    Token::Stdin as u32,
                    EventSet::IN,
                ))
                .is_err()
            {
                self.stdin_open = false;
            }
        }
    }
}

/// The terminal state to restore on every exit path, if stdin is a terminal we made raw.
static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts a terminal stdin in raw mode (so Ctrl-C etc. reach the guest's console).
pub fn stdin_raw_mode() {
    // SAFETY: isatty/tcgetattr/tcsetattr on stdin with a valid termios out-parameter.
    unsafe {
        if libc::isatty(libc::STDIN_FILENO) != 1 {
            return;
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
            return;
        }
        *SAVED_TERMIOS.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        let mut raw = t;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw);
    }
}

pub fn restore_terminal() {
    let saved = SAVED_TERMIOS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(t) = saved {
        // SAFETY: restoring a termios previously read from the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
pub type EventLoop = EventManager<Subscriber>;

/// Watches the process-wide control events: vCPU exit notifications and stop signals.
/// Exists from process start, before any VM.
pub struct ProcessControl {
    exit: Arc<ExitSignal>,
    signals: std::fs::File,
}

impl ProcessControl {
    pub fn new(exit: Arc<ExitSignal>) -> std::io::Result<ProcessControl> {
        Ok(ProcessControl {
            exit,
            signals: stop_signalfd()?,
        })
    }

    fn read_signal(&mut self) -> Option<i32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reading into a buffer of exactly one siginfo from our signalfd.
        let n = unsafe {
            libc::read(
                self.signals.as_raw_fd(),
                info.as_mut_ptr().cast(),
                info.len(),
            )
        };
        if n as usize != info.len() {
            return None;
        }
        // ssi_signo is the first u32 of signalfd_siginfo.
        Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32)
    }
}

impl MutEventSubscriber for ProcessControl {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match Token::from_u32(events.data()) {
            Some(Token::Exit) => {
                let _ = self.exit.evt.read();
            }
            Some(Token::Signal) => {
                if let Some(sig) = self.read_signal() {
                    log::info!("received signal {sig}, stopping");
                    self.exit.stop(VmExit::Signal(sig));
                }
            }
            _ => log::warn!("unexpected event token {}", events.data()),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for e in [
            Events::with_data(&self.exit.evt, Token::Exit as u32, EventSet::IN),
            Events::with_data(&self.signals, Token::Signal as u32, EventSet::IN),
        ] {
            if let Err(err) = ops.add(e) {
                log::error!("cannot watch a control event: {err}");
            }
        }
    }
}

/// A running VM: what must stay alive while it runs, and the handles the controller
/// uses on it.
pub struct Vmm {
    pub cmdline: String,
    pub controls: Vec<Arc<VcpuControl>>,
    pub i8042: Arc<Mutex<crate::devices::i8042::I8042>>,
    _vm: Arc<kvm_ioctls::VmFd>,
    _mem: crate::vm::memory::GuestMemory,
    _pio: Arc<crate::devices::bus::Bus>,
    _mmio: Arc<crate::devices::bus::Bus>,
    _ioapic: Arc<Mutex<crate::vm::irq::Ioapic>>,
    virtio: Vec<Arc<Mutex<crate::devices::virtio::MmioTransport>>>,
    drives: Vec<(String, Arc<Mutex<crate::devices::virtio::MmioTransport>>)>,
}

impl Vmm {
    /// Adds the VM's event sources to the event loop and starts its vCPU threads.
    pub fn start(built: BuiltVm, event_loop: &mut EventLoop) -> std::io::Result<Vmm> {
        let console = Control {
            exit: built.exit.clone(),
            reset_evt: built.reset_evt,
            serial: built.serial.clone(),
            input_space: built.serial_input_space,
            stdin_open: true,
            stdin_waiting: false,
        };
        let console: Subscriber = Arc::new(Mutex::new(console));
        event_loop.add_subscriber(console);
        for dev in &built.virtio {
            event_loop.add_subscriber(dev.clone() as Subscriber);
        }

        crate::vcpu::install_kick_handler()?;
        for vcpu in built.vcpus {
            let name = format!("ember_vcpu{}", vcpu.index);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run())?;
        }
        Ok(Vmm {
            cmdline: built.cmdline,
            controls: built.controls,
            i8042: built.i8042,
            _vm: built.vm,
            _mem: built.mem,
            _pio: built.pio,
            _mmio: built.mmio,
            _ioapic: built.ioapic,
            virtio: built.virtio,
            drives: built.drives,
        })
    }

    pub fn pause(&self) {
        for c in &self.controls {
            c.pause();
        }
    }

    pub fn resume(&self) {
        for c in &self.controls {
            c.resume();
        }
    }

    /// Points drive `id` at another backing file and tells the guest about its new size.
    pub fn update_drive(&self, id: &str, path: &str) -> Result<(), String> {
        let (_, dev) = self
            .drives
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| format!("no drive `{id}`"))?;
        dev.lock()
            .unwrap_or_else(|p| p.into_inner())
            .update_backing(path)
    }

    /// Makes every device's data durable (called on every exit path).
    pub fn flush(&self) {
        crate::devices::virtio::flush_all(&self.virtio);
    }
}
