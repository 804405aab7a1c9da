//! One vCPU thread: KVM_RUN, exits dispatched to the buses, a Running/Paused/Stopped
//! state machine driven by the VMM thread.

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::Bus;
use crate::metrics::{METRICS, timeline_mark_once};

/// Why the VM stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 0xFE, or a KVM reset event): a normal end.
    GuestReset,
    /// The guest powered off (KVM system event).
    GuestShutdown,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8, rip: u64 },
    /// KVM could not emulate something, or refused to enter the guest, or an exit ember
    /// does not know.
    VcpuError {
        vcpu: u8,
        exit: String,
        rip: Option<u64>,
    },
    /// A signal asked ember to stop.
    Signal(i32),
    /// Something in the VMM failed.
    VmmError(String),
}

impl VmExit {
    /// The process exit code (see the README's table).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::GuestShutdown => crate::exit_code::OK,
            VmExit::TripleFault { .. } | VmExit::VcpuError { .. } => {
                crate::exit_code::GENERIC_ERROR
            }
            VmExit::Signal(libc::SIGHUP) => crate::exit_code::SIGHUP,
            VmExit::Signal(sig) => crate::exit_code::SIGNAL_BASE + sig,
            VmExit::VmmError(_) => crate::exit_code::UNEXPECTED_ERROR,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "guest reset"),
            VmExit::GuestShutdown => write!(f, "guest shut down"),
            VmExit::TripleFault { vcpu, rip } => write!(
                f,
                "vCPU {vcpu}: guest triple fault (KVM_EXIT_SHUTDOWN) at guest RIP {rip:#x}"
            ),
            VmExit::VcpuError { vcpu, exit, rip } => match rip {
                Some(rip) => write!(f, "vCPU {vcpu}: {exit} at guest RIP {rip:#x}"),
                None => write!(f, "vCPU {vcpu}: {exit}"),
            },
            VmExit::Signal(sig) => write!(f, "stopped by signal {sig}"),
            VmExit::VmmError(e) => write!(f, "VMM error: {e}"),
        }
    }
}

/// The first stop reason wins; the VMM thread is woken through `evt`.
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    pub evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
        })
    }
    pub fn stop(&self, why: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(why);
        }
        let _ = self.evt.write(1);
    }
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What one exit means for the run loop.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    /// KVM_RUN was interrupted (a kick): look at the control state.
    Interrupted,
    Stop(VmExit),
}

/// Handles one exit. A pure function of the exit and the buses, so it can be tested one
/// exit at a time.
pub fn handle_exit(exit: VcpuExit, index: u8, pio: &Bus, mmio: &Bus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            METRICS.vcpu.exits_io.fetch_add(1, Ordering::Relaxed);
            if !pio.read(u64::from(port), data) {
                METRICS
                    .vcpu
                    .pio_unmapped_reads
                    .fetch_add(1, Ordering::Relaxed);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            METRICS.vcpu.exits_io.fetch_add(1, Ordering::Relaxed);
            if !pio.write(u64::from(port), data) {
                METRICS
                    .vcpu
                    .pio_unmapped_writes
                    .fetch_add(1, Ordering::Relaxed);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            METRICS.vcpu.exits_mmio.fetch_add(1, Ordering::Relaxed);
            if !mmio.read(addr, data) {
                METRICS
                    .vcpu
                    .mmio_unmapped_reads
                    .fetch_add(1, Ordering::Relaxed);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            METRICS.vcpu.exits_mmio.fetch_add(1, Ordering::Relaxed);
            if !mmio.write(addr, data) {
                METRICS
                    .vcpu
                    .mmio_unmapped_writes
                    .fetch_add(1, Ordering::Relaxed);
            }
            ExitAction::Continue
        }
        // Level-triggered EOIs need no action: ember's IOAPIC routes are edge-triggered.
        VcpuExit::IoapicEoi(_) => ExitAction::Continue,
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Interrupted,
        VcpuExit::Hlt => ExitAction::Continue,
        VcpuExit::SystemEvent(kind, _) => {
            METRICS.vcpu.exits_other.fetch_add(1, Ordering::Relaxed);
            match kind {
                KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(VmExit::GuestReset),
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(VmExit::GuestShutdown),
                other => ExitAction::Stop(VmExit::VcpuError {
                    vcpu: index,
                    exit: format!("unknown KVM system event {other}"),
                    rip: None,
                }),
            }
        }
        VcpuExit::Shutdown => ExitAction::Stop(VmExit::TripleFault {
            vcpu: index,
            rip: 0,
        }),
        VcpuExit::InternalError => ExitAction::Stop(VmExit::VcpuError {
            vcpu: index,
            exit: "KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into(),
            rip: None,
        }),
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(VmExit::VcpuError {
            vcpu: index,
            exit: format!("KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})"),
            rip: None,
        }),
        other => ExitAction::Stop(VmExit::VcpuError {
            vcpu: index,
            exit: format!("unexpected vCPU exit {other:?}"),
            rip: None,
        }),
    }
}

/// Run state the VMM thread sets and the vCPU thread follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// Work the VMM thread hands a paused vCPU thread (a snapshot's state save): it runs on
/// the vCPU's own thread, which owns the vCPU fd.
pub type VcpuTask = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// Shared between a vCPU thread and the VMM thread.
pub struct VcpuControl {
    /// (requested state, the thread is parked in the paused state, a task to run there)
    state: Mutex<(RunState, bool, Option<VcpuTask>)>,
    cv: Condvar,
    /// The vCPU's kvm_run page, so a kick can set immediate_exit.
    run_page: AtomicPtr<kvm_run>,
    thread: Mutex<Option<libc::pthread_t>>,
    pub started: AtomicBool,
    /// The boot profiler's sampler, on the boot vCPU when `--profile-boot` is given.
    sampler: OnceLock<Arc<crate::profile::Sampler>>,
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs a no-op handler for the kick signal (without SA_RESTART, so KVM_RUN returns EINTR).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler function and an empty mask is a valid
    // argument to sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: Mutex::new((RunState::Running, false, None)),
            cv: Condvar::new(),
            run_page: AtomicPtr::new(std::ptr::null_mut()),
            thread: Mutex::new(None),
            started: AtomicBool::new(false),
            sampler: OnceLock::new(),
        }
    }
}

impl VcpuControl {
    /// Asks the vCPU to pause and waits until it has left KVM_RUN.
    pub fn pause(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = RunState::Paused;
        g.1 = false;
        self.kick();
        while !g.1 && self.started.load(Ordering::Acquire) {
            let (ng, timeout) = self
                .cv
                .wait_timeout(g, std::time::Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner());
            g = ng;
            if timeout.timed_out() && !g.1 {
                self.kick();
            }
        }
    }

    pub fn resume(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = RunState::Running;
        g.1 = false;
        self.cv.notify_all();
    }

    /// Runs `task` on the vCPU's thread; the vCPU must be paused (`pause` returned).
    /// Gives the task back, without running it, if the thread is not parked.
    pub fn run_task(&self, task: VcpuTask) -> Result<(), VcpuTask> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != RunState::Paused || !g.1 || g.2.is_some() {
            return Err(task);
        }
        g.2 = Some(task);
        self.cv.notify_all();
        Ok(())
    }

    /// Gives this vCPU a profile sampler (before its thread starts).
    pub fn set_sampler(&self, s: Arc<crate::profile::Sampler>) {
        let _ = self.sampler.set(s);
    }

    /// Kicks the vCPU out of KVM_RUN so that it takes the sample its sampler wants.
    pub fn kick_for_sample(&self) {
        self.kick();
    }

    fn kick(&self) {
        let page = self.run_page.load(Ordering::Acquire);
        if !page.is_null() {
            // SAFETY: the page is the vCPU's kvm_run mapping, alive as long as the vCPU fd
            // (the vCPU thread never exits before the process does). immediate_exit is a
            // byte KVM reads at entry; a racing write is benign.
            unsafe { std::ptr::addr_of_mut!((*page).immediate_exit).write_volatile(1) };
        }
        if let Some(t) = *self.thread.lock().unwrap_or_else(|p| p.into_inner()) {
            // SAFETY: t is a live thread of this process (vCPU threads never exit early).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Called by the vCPU thread after an interruption: blocks while paused, running
    /// the tasks the VMM thread hands it meanwhile.
    fn wait_if_paused(&self, fd: &mut VcpuFd) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Acknowledge every pause seen, not only the first: a resume followed at once by a
        // pause can find this thread still waiting here, and `pause` waits for the flag.
        while g.0 == RunState::Paused {
            if !g.1 {
                g.1 = true;
                self.cv.notify_all();
            }
            if let Some(task) = g.2.take() {
                drop(g);
                task(fd);
                g = self.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub control: Arc<VcpuControl>,
}

/// A vCPU thread started before its vCPU exists: it loads its seccomp filter (the kernel
/// checks and compiles the program, a few hundred microseconds) and waits for the vCPU
/// while the VMM thread builds the VM, so neither the thread's creation nor the filter is
/// on the path to the first KVM_RUN. Dropped unused (a failed build), the thread ends.
pub struct VcpuThread {
    vcpu: std::sync::mpsc::SyncSender<Vcpu>,
}

impl VcpuThread {
    pub fn spawn(index: u8) -> std::io::Result<VcpuThread> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vcpu>(1);
        std::thread::Builder::new()
            .name(format!("ember_vcpu{index}"))
            .spawn(move || {
                let filter = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu);
                let Ok(vcpu) = rx.recv() else { return };
                match filter {
                    Ok(()) => vcpu.run_filtered(),
                    Err(e) => vcpu.exit.stop(VmExit::VmmError(e.to_string())),
                }
            })?;
        Ok(VcpuThread { vcpu: tx })
    }

    /// Hands the vCPU to its thread, which runs it; gives it back if the thread is gone.
    pub fn start(self, vcpu: Vcpu) -> Result<(), Vcpu> {
        self.vcpu.send(vcpu).map_err(|e| e.0)
    }
}

impl Vcpu {
    /// The thread body. Returns only when the VM stops.
    pub fn run(self) {
        // Before the first KVM_RUN: guest-driven exits are this thread's input.
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
            self.exit.stop(VmExit::VmmError(e.to_string()));
            return;
        }
        self.run_filtered();
    }

    /// `run` once this thread's seccomp filter is in place.
    fn run_filtered(mut self) {
        // SAFETY: pthread_self is always safe to call.
        let me = unsafe { libc::pthread_self() };
        *self
            .control
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(me);
        let page: *mut kvm_run = self.fd.get_kvm_run();
        self.control.run_page.store(page, Ordering::Release);
        self.control.started.store(true, Ordering::Release);
        // A pause requested before the thread started takes effect now.
        self.control.wait_if_paused(&mut self.fd);
        if self.index == 0 {
            timeline_mark_once(&METRICS.boot_timeline_us.first_vcpu_run);
        }
        loop {
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, self.index, &self.pio, &self.mmio),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitAction::Interrupted
                }
                Err(e) => ExitAction::Stop(VmExit::VcpuError {
                    vcpu: self.index,
                    exit: format!("KVM_RUN failed: {e}"),
                    rip: None,
                }),
            };
            // A profile sample, when the VMM thread's timer asked for one: taken here, on
            // the thread that owns the vCPU fd, between two KVM_RUNs.
            if let Some(s) = self.control.sampler.get() {
                s.take_if_pending(&self.fd);
            }
            match action {
                ExitAction::Continue => {}
                ExitAction::Interrupted => {
                    self.fd.get_kvm_run().immediate_exit = 0;
                    if log::log_enabled!(log::Level::Debug)
                        && let Ok(regs) = self.fd.get_regs()
                    {
                        // Where a pause caught the guest: a cheap way to see a stuck guest.
                        log::debug!(
                            "vcpu {} interrupted at guest RIP {:#x}",
                            self.index,
                            regs.rip
                        );
                    }
                    self.control.wait_if_paused(&mut self.fd);
                }
                ExitAction::Stop(mut why) => {
                    let rip = self.fd.get_regs().ok().map(|r| r.rip);
                    match &mut why {
                        VmExit::TripleFault { rip: r, .. } => *r = rip.unwrap_or(0),
                        VmExit::VcpuError { rip: r, .. } => *r = rip,
                        _ => {}
                    }
                    self.exit.stop(why);
                    // Stay off the CPU until the process exits.
                    self.control.pause_self();
                }
            }
        }
    }
}

impl VcpuControl {
    fn pause_self(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = RunState::Paused;
        g.1 = true;
        self.cv.notify_all();
        while g.0 == RunState::Paused {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_port_read_is_all_ones_and_counted() {
        let pio = Bus::new();
        let mmio = Bus::new();
        let mut data = [0u8; 2];
        let before = METRICS.vcpu.pio_unmapped_reads.load(Ordering::Relaxed);
        let a = handle_exit(VcpuExit::IoIn(0x80, &mut data), 0, &pio, &mmio);
        assert_eq!(a, ExitAction::Continue);
        assert_eq!(data, [0xff, 0xff]);
        assert!(METRICS.vcpu.pio_unmapped_reads.load(Ordering::Relaxed) > before);
    }

    #[test]
    fn shutdown_is_a_triple_fault_and_reset_is_ok() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let a = handle_exit(VcpuExit::Shutdown, 2, &pio, &mmio);
        assert!(matches!(
            a,
            ExitAction::Stop(VmExit::TripleFault { vcpu: 2, .. })
        ));
        let a = handle_exit(
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
            0,
            &pio,
            &mmio,
        );
        assert_eq!(a, ExitAction::Stop(VmExit::GuestReset));
        assert_eq!(VmExit::GuestReset.exit_code(), 0);
        assert_ne!(VmExit::TripleFault { vcpu: 0, rip: 0 }.exit_code(), 0);
    }
}
