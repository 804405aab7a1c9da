//! The VMM thread: owns the VM's devices, runs the event loop (event-manager over epoll)
//! and decides when and how the process ends.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{block_signal, create_sigset};

use crate::builder::BuiltVm;
use crate::devices::manager::DeviceManager;
use crate::vcpu::{ExitSignal, VcpuControl, VmExit};

/// Event-loop tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Token {
    Exit = 1,
    Reset = 2,
    Signal = 3,
}

impl Token {
    fn from_u32(v: u32) -> Option<Token> {
        [Token::Exit, Token::Reset, Token::Signal]
            .into_iter()
            .find(|t| *t as u32 == v)
    }
}

/// The signals that stop ember cleanly. SIGHUP is how flintlock stops a VM (Firecracker
/// exits on it with code 156).
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread it starts later; they are
/// read from a signalfd on the event loop instead, so a stop is always clean.
pub fn block_stop_signals() -> std::io::Result<()> {
    for sig in STOP_SIGNALS {
        block_signal(sig).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    }
    Ok(())
}

fn stop_signalfd() -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let set = create_sigset(&STOP_SIGNALS).map_err(std::io::Error::from)?;
    // SAFETY: signalfd with a valid, initialised signal set; the result is checked.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The VM's own control event: a guest reset through the i8042.
struct GuestReset {
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
}

impl MutEventSubscriber for GuestReset {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match Token::from_u32(events.data()) {
            Some(Token::Reset) => {
                let _ = self.reset_evt.read();
                self.exit.stop(VmExit::GuestReset);
            }
            _ => log::warn!("unexpected event token {}", events.data()),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let reset = Events::with_data(&self.reset_evt, Token::Reset as u32, EventSet::IN);
        if let Err(err) = ops.add(reset) {
            log::error!("cannot watch a control event: {err}");
        }
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
    pub devices: DeviceManager,
    pub vm: Arc<kvm_ioctls::VmFd>,
    pub mem: crate::vm::memory::GuestMemory,
    /// The MSRs a snapshot saves for each vCPU.
    pub msr_list: Arc<Vec<u32>>,
    _keep_alive: Vec<Box<dyn std::any::Any + Send>>,
}

impl Vmm {
    /// Adds the VM's event sources to the event loop and starts its vCPU threads.
    pub fn start(built: BuiltVm, event_loop: &mut EventLoop) -> std::io::Result<Vmm> {
        Vmm::start_with(built, event_loop, false)
    }

    /// As `start`; with `paused`, every vCPU thread starts parked (a restored VM that
    /// waits for `PATCH /vm Resumed`).
    pub fn start_with(
        built: BuiltVm,
        event_loop: &mut EventLoop,
        paused: bool,
    ) -> std::io::Result<Vmm> {
        let BuiltVm {
            vm,
            mem,
            mut devices,
            exit,
            reset_evt,
            vcpus,
            controls,
            cmdline,
            msr_list,
            keep_alive,
            threads,
        } = built;
        let reset: Subscriber = Arc::new(Mutex::new(GuestReset {
            exit: exit.clone(),
            reset_evt,
        }));
        event_loop.add_subscriber(reset);
        for sub in devices.subscribers() {
            event_loop.add_subscriber(sub);
        }

        crate::vcpu::install_kick_handler()?;
        if paused {
            for c in &controls {
                c.pause();
            }
        }
        let mut threads = threads.into_iter();
        for vcpu in vcpus {
            // The thread started during the build, if it is still there.
            let vcpu = match threads.next() {
                Some(t) => match t.start(vcpu) {
                    Ok(()) => continue,
                    Err(vcpu) => vcpu,
                },
                None => vcpu,
            };
            let name = format!("ember_vcpu{}", vcpu.index);
            if let Err(e) = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run())
            {
                // vCPUs started before this one must not run on unseen.
                exit.stop(VmExit::VmmError(format!("cannot start a vCPU thread: {e}")));
                return Err(e);
            }
        }
        Ok(Vmm {
            cmdline,
            controls,
            devices,
            vm,
            mem,
            msr_list: Arc::new(msr_list),
            _keep_alive: keep_alive,
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

    /// Makes every device's data durable (called on every exit path).
    pub fn flush(&self) {
        self.devices.flush();
    }
}
