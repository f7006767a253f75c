//! The shadow-mode data path of one queue: an epoll loop on its own thread.
//!
//! guest kick → `forward_avail` → kick the backend; backend call → `forward_used` (guest used ring +
//! dirty log) → interrupt the guest. The worker owns the engine while it runs; stopping the worker
//! hands the engine back, so the switch code never shares the engine with a running data path.
//!
//! Built for rate: a wake starts a *work phase* in which guest kicks and backend calls are
//! suppressed (the engine's `suppress_notifications`) and both rings are drained in whole
//! batches, again and again while work keeps coming and for up to `poll` after the last work
//! (the poll phase). Only then are notifications re-armed, with the engine's fence and re-check
//! (`arm_notifications`): work that slipped in meanwhile starts another round instead of being
//! stranded, and the worker sleeps in `epoll_wait`. Under load a wake moves rings, not bursts,
//! and no syscall is made per descriptor. Between phases of flowing traffic and after the last
//! one, [`Pacer`] decides whether the worker sleeps the batch wait or goes on, and how long it
//! polls: it sleeps where busy peers want the CPU, and keeps going where the CPU is its own.
//! Counters are added once per batch; the thread's CPU time is read by the control plane from the
//! thread's CPU clock, not by the worker.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use svq::{IdentityTranslation, QueueError, ShadowVirtqueue, SharedLog};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::SharedMemory;
use crate::pacing::Pacer;
use crate::sigbus;
use crate::stats::QueueStats;

/// The engine type svqd runs: vhost-user descriptors carry guest-physical addresses unchanged.
pub type Engine = ShadowVirtqueue<IdentityTranslation>;

const TOKEN_GUEST_KICK: u64 = 0;
const TOKEN_BACKEND_CALL: u64 = 1;
const TOKEN_CMD: u64 = 2;

/// A work phase that moved at least this many chains counts as flowing traffic: the worker
/// may sleep for the batch wait with notifications off instead of re-arming them.
const DEFER_MIN_CHAINS: u32 = 32;

/// Requests to a running worker.
enum Cmd {
    /// The VMM replaced the guest kick eventfd.
    GuestKick(Arc<EventFd>),
    /// The VMM replaced (or removed) the guest call eventfd.
    GuestCall(Option<Arc<EventFd>>),
    /// The VMM enabled or disabled the ring: forward new guest buffers or not.
    Forwarding(bool),
    /// Forward nothing new from now on (whatever the VMM's enable says), keep relaying
    /// completions and poll the shadow used ring (the backend may complete without calling);
    /// answer once applied.
    Hold(Sender<()>),
    /// Stop; with `true`, relay what the backend completed first.
    Stop(bool),
}

/// What a stopped worker hands back.
pub struct WorkerExit {
    /// The engine, with its state.
    pub engine: Engine,
    /// The guest kick eventfd as last set (the VMM may have replaced it).
    pub guest_kick: Arc<EventFd>,
    /// The guest call eventfd as last set.
    pub guest_call: Option<Arc<EventFd>>,
}

/// Everything the worker thread needs.
pub struct WorkerSetup {
    /// Queue index (for logs).
    pub index: usize,
    /// The engine, built on the shadow ring.
    pub engine: Engine,
    /// Guest memory.
    pub mem: Arc<SharedMemory>,
    /// The active dirty log (empty when the VMM is not logging).
    pub log: Arc<SharedLog>,
    /// Guest kick (the VMM's eventfd).
    pub guest_kick: Arc<EventFd>,
    /// Guest call (the VMM's eventfd).
    pub guest_call: Option<Arc<EventFd>>,
    /// svqd's kick towards the backend.
    pub backend_kick: Arc<EventFd>,
    /// svqd's call from the backend.
    pub backend_call: Arc<EventFd>,
    /// Counters.
    pub stats: Arc<QueueStats>,
    /// How long to poll after the last work before sleeping (zero: never poll).
    pub poll: Duration,
    /// While traffic flows: how long to sleep with notifications off between work phases
    /// (zero: always re-arm and sleep on notifications).
    pub batch_wait: Duration,
    /// CPUs to run on (empty: no pinning).
    pub cpus: Vec<usize>,
}

/// Handle of a running worker.
pub struct Worker {
    cmd: Sender<Cmd>,
    wake: Arc<EventFd>,
    /// Set with every command, so a polling worker notices it without a syscall.
    cmd_pending: Arc<AtomicBool>,
    join: Option<JoinHandle<WorkerExit>>,
}

impl Worker {
    /// Start the worker thread.
    pub fn spawn(setup: WorkerSetup) -> std::io::Result<Worker> {
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let cmd_pending = Arc::new(AtomicBool::new(false));
        let (w, p) = (wake.clone(), cmd_pending.clone());
        let span = tracing::Span::current();
        let join = std::thread::Builder::new()
            .name(format!("svqd-q{}", setup.index))
            .spawn(move || span.in_scope(|| run(setup, rx, w, p)))?;
        Ok(Worker {
            cmd: tx,
            wake,
            cmd_pending,
            join: Some(join),
        })
    }

    fn send(&self, cmd: Cmd) {
        // A send error means the thread is gone; `stop` reports it through the join.
        let _ = self.cmd.send(cmd);
        self.cmd_pending.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    /// Replace the guest kick eventfd.
    pub fn set_guest_kick(&self, fd: Arc<EventFd>) {
        self.send(Cmd::GuestKick(fd));
    }

    /// Replace the guest call eventfd.
    pub fn set_guest_call(&self, fd: Option<Arc<EventFd>>) {
        self.send(Cmd::GuestCall(fd));
    }

    /// Forward new guest buffers (ring enabled by the VMM) or hold them.
    pub fn set_forwarding(&self, on: bool) {
        self.send(Cmd::Forwarding(on));
    }

    /// Stop forwarding guest buffers for good and return once the worker applied it: from then
    /// on the shadow avail index in memory no longer moves. Completions are still relayed (and
    /// polled for every millisecond) until [`Worker::stop`].
    pub fn hold(&self) {
        let (tx, rx) = channel();
        self.send(Cmd::Hold(tx));
        // The loop answers within one iteration; it only fails to if the thread is gone, and
        // then nothing is forwarded anyway.
        let _ = rx.recv_timeout(Duration::from_secs(5));
    }

    /// Stop the worker and take the engine back, after relaying what the backend completed.
    pub fn stop(self) -> WorkerExit {
        self.finish(true)
    }

    /// Stop the worker at once and take the engine back: the guest ring is being reset, nothing
    /// may be written into it any more.
    pub fn abandon(self) -> WorkerExit {
        self.finish(false)
    }

    fn finish(mut self, relay: bool) -> WorkerExit {
        self.send(Cmd::Stop(relay));
        let join = self.join.take().expect("worker joined once");
        match join.join() {
            Ok(exit) => exit,
            // The loop does not panic by design; if it did, there is no engine to recover.
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

struct Loop {
    index: usize,
    engine: Engine,
    mem: Arc<SharedMemory>,
    log: Arc<SharedLog>,
    guest_kick: Arc<EventFd>,
    guest_call: Option<Arc<EventFd>>,
    backend_kick: Arc<EventFd>,
    backend_call: Arc<EventFd>,
    stats: Arc<QueueStats>,
    /// Sleep or go on between work phases, and how long to poll after them.
    pacer: Pacer,
    reported: bool,
    /// [`sigbus::faults_on_this_thread`] when the worker started: a later fault means the VMM
    /// truncated memory this queue touched, and what it reads or writes can no longer be trusted.
    faults_seen: u64,
    /// Stopped because memory was lost (see `faults_seen`).
    memory_lost: bool,
}

impl Loop {
    /// Whether the queue may go on: false once the VMM truncated shared memory under svqd.
    fn memory_intact(&mut self) -> bool {
        if !self.memory_lost && sigbus::faults_on_this_thread() != self.faults_seen {
            self.memory_lost = true;
            tracing::error!(
                queue = self.index,
                addr = format_args!("{:#x}", sigbus::last_fault_addr()),
                "SIGBUS on guest memory or the dirty log: the VMM truncated a shared memory file \
                 under svqd; this shadow queue stops until the device is reset"
            );
        }
        !self.memory_lost
    }

    /// Record the first engine error once; the queue stays broken (the guest must reset it).
    fn fail(&mut self, e: QueueError) {
        if !self.reported {
            tracing::error!(queue = self.index, error = %e, "shadow queue broken; it stops until the device is reset");
            self.reported = true;
        }
    }

    /// Forward the guest's new chains; returns how many.
    fn avail(&mut self, mem: &GuestMemoryMmap) -> u32 {
        if self.engine.broken().is_some() || !self.engine.forwarding() || self.memory_lost {
            return 0;
        }
        let res = self.engine.forward_avail(mem, &self.log);
        if !self.memory_intact() {
            return 0;
        }
        match res {
            Ok(b) => {
                if b.chains > 0 {
                    QueueStats::add(&self.stats.chains, b.chains.into());
                    QueueStats::add(&self.stats.descriptors, b.descriptors.into());
                    QueueStats::add(&self.stats.bytes, b.bytes);
                }
                if b.kick_device {
                    QueueStats::add(&self.stats.backend_kicks, 1);
                    if let Err(e) = self.backend_kick.write(1) {
                        tracing::warn!(queue = self.index, error = %e, "kicking the backend failed");
                    }
                }
                b.chains
            }
            Err(e) => {
                self.fail(e);
                0
            }
        }
    }

    /// Relay the backend's completions; returns whether any (or descriptors were freed while
    /// the shadow ring was full).
    fn used(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.engine.broken().is_some() || self.memory_lost {
            return false;
        }
        let res = self.engine.forward_used(mem, &self.log);
        if !self.memory_intact() {
            return false;
        }
        match res {
            Ok(u) => {
                if u.completed > 0 {
                    QueueStats::add(&self.stats.completed, u.completed.into());
                    QueueStats::add(&self.stats.bytes_written, u.bytes_written);
                    QueueStats::add(&self.stats.dirty_pages, u.pages_logged);
                }
                if u.notify_guest {
                    self.notify_guest();
                }
                u.retry_avail || u.completed > 0
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// One round over both rings; returns how many chains moved (forwarded, plus one if
    /// completions were relayed).
    fn pump(&mut self) -> u32 {
        let mem = self.mem.snapshot();
        let completed = self.used(&mem);
        let forwarded = self.avail(&mem);
        forwarded + u32::from(completed)
    }

    /// Work until the rings stay empty for `poll`, with notifications suppressed; then re-arm
    /// them (fence + re-check) and return, ready to sleep. Returns early, re-armed, when a
    /// command is pending.
    ///
    /// With `may_defer`, a phase that forwarded at least [`DEFER_MIN_CHAINS`] chains returns
    /// `true` *without* re-arming: traffic flows, and the caller sleeps for the batch wait with
    /// notifications still off, then works again (a phase that moved less re-arms). So a wake
    /// moves what accumulated during the wait — a ring, not a burst — and no buffer waits
    /// longer than one batch wait plus one phase.
    fn work(&mut self, cmd_pending: &AtomicBool, may_defer: bool) -> bool {
        let mut polled = Duration::ZERO;
        let poll = self.pacer.poll_budget();
        let mut moved = 0u32;
        let mut deferred = false;
        loop {
            if self.engine.broken().is_some() || self.memory_lost {
                return false;
            }
            let mem = self.mem.snapshot();
            let res = self.engine.suppress_notifications(&*mem, &self.log);
            drop(mem);
            if !self.memory_intact() {
                return false;
            }
            if let Err(e) = res {
                self.fail(e);
                return false;
            }
            let mut idle_since: Option<Instant> = None;
            loop {
                let n = self.pump();
                if n > 0 {
                    moved = moved.saturating_add(n);
                    if let Some(t) = idle_since.take() {
                        polled += t.elapsed();
                    }
                    if cmd_pending.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                if poll.is_zero() || cmd_pending.load(Ordering::Relaxed) {
                    break;
                }
                let now = Instant::now();
                match idle_since {
                    None => idle_since = Some(now),
                    Some(t) if now.duration_since(t) >= poll => break,
                    Some(_) => std::hint::spin_loop(),
                }
            }
            if let Some(t) = idle_since {
                polled += t.elapsed();
            }
            if may_defer && moved >= DEFER_MIN_CHAINS && !cmd_pending.load(Ordering::Relaxed) {
                deferred = true;
                break;
            }
            let mem = self.mem.snapshot();
            let res = self.engine.arm_notifications(&*mem, &self.log);
            drop(mem);
            if !self.memory_intact() {
                break;
            }
            match res {
                // Work slipped in while notifications were off: its notification may never
                // come, so take it now.
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
        }
        if !polled.is_zero() {
            QueueStats::add(&self.stats.poll_ns, polled.as_nanos() as u64);
        }
        deferred
    }

    fn notify_guest(&self) {
        if let Some(call) = &self.guest_call {
            QueueStats::add(&self.stats.guest_notifies, 1);
            if let Err(e) = call.write(1) {
                tracing::warn!(queue = self.index, error = %e, "interrupting the guest failed");
            }
        }
    }
}

fn drain_eventfd(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

/// Pin the calling thread to `cpus` (best effort: a failure is logged).
fn pin_to(index: usize, cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET is given CPUs below CPU_SETSIZE
    // (checked when the list was parsed); pid 0 is the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(queue = index, ?cpus, error = %e, "cannot pin the shadow worker");
    }
}

/// Publish this thread's CPU clock in `stats` (the control plane reads it); on drop, move the
/// thread's CPU time into the exited workers' total.
struct CpuClock<'a>(&'a QueueStats);

impl<'a> CpuClock<'a> {
    fn publish(stats: &'a QueueStats) -> Self {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling thread; `clock` is a valid out pointer.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0 {
            stats
                .worker_clock
                .store(i64::from(clock), Ordering::Relaxed);
        }
        CpuClock(stats)
    }
}

impl Drop for CpuClock<'_> {
    fn drop(&mut self) {
        self.0.worker_clock.store(0, Ordering::Relaxed);
        let ns = crate::stats::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0);
        QueueStats::add(&self.0.worker_cpu_ns_exited, ns);
    }
}

fn run(
    setup: WorkerSetup,
    rx: Receiver<Cmd>,
    wake: Arc<EventFd>,
    cmd_pending: Arc<AtomicBool>,
) -> WorkerExit {
    pin_to(setup.index, &setup.cpus);
    if !setup.batch_wait.is_zero() {
        // The batch wait is tens of microseconds: without this, the default 50 µs timer slack
        // would triple it.
        crate::quiesce::precise_sleeps();
    }
    let stats = setup.stats.clone();
    let _clock = CpuClock::publish(&stats);
    let mut l = Loop {
        index: setup.index,
        engine: setup.engine,
        mem: setup.mem,
        log: setup.log,
        guest_kick: setup.guest_kick,
        guest_call: setup.guest_call,
        backend_kick: setup.backend_kick,
        backend_call: setup.backend_call,
        stats: setup.stats,
        pacer: Pacer::new(setup.batch_wait, setup.poll),
        reported: false,
        faults_seen: sigbus::faults_on_this_thread(),
        memory_lost: false,
    };
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(queue = l.index, error = %e, "epoll_create failed; queue stalls");
            return wait_stop_without_epoll(l, rx);
        }
    };
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    for (fd, token) in [
        (l.guest_kick.as_raw_fd(), TOKEN_GUEST_KICK),
        (l.backend_call.as_raw_fd(), TOKEN_BACKEND_CALL),
        (wake.as_raw_fd(), TOKEN_CMD),
    ] {
        if let Err(e) = add(fd, token) {
            tracing::error!(queue = l.index, error = %e, "epoll_ctl failed; queue stalls");
            return wait_stop_without_epoll(l, rx);
        }
    }

    let mut events = vec![EpollEvent::default(); 8];
    let mut holding = false;
    let mut stopping = None;
    // Buffers the guest posted before the switch (their kick went to the old backend ring or is
    // pending on the kick fd), and completions that raced the switch: work at once.
    let mut work = true;
    loop {
        // Flowing traffic: with notifications off, sleep the batch wait (or, on a CPU nobody
        // else wants, go straight on), then work again.
        while work && stopping.is_none() && l.work(&cmd_pending, l.pacer.defers()) {
            if l.pacer.between_phases() {
                QueueStats::add(&l.stats.worker_wakeups, 1);
            }
        }
        if stopping.is_some() {
            break;
        }
        // Holding: the backend may suppress its calls, or signal a call fd svqd replaced
        // meanwhile, so look at the shadow used ring every millisecond.
        let timeout = if holding { 1 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(queue = l.index, error = %e, "epoll_wait failed");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        QueueStats::add(&l.stats.worker_wakeups, 1);
        work = holding;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_GUEST_KICK => {
                    if drain_eventfd(&l.guest_kick) > 0 {
                        QueueStats::add(&l.stats.kicks, 1);
                    }
                    work = true;
                }
                TOKEN_BACKEND_CALL => {
                    if drain_eventfd(&l.backend_call) > 0 {
                        QueueStats::add(&l.stats.calls, 1);
                    }
                    work = true;
                }
                _ => {
                    // A kick or call seen before the command is served first (a hold must not
                    // overtake a kick that arrived before it).
                    if work && stopping.is_none() {
                        l.work(&cmd_pending, false);
                    }
                    drain_eventfd(&wake);
                    cmd_pending.store(false, Ordering::Relaxed);
                    while let Ok(cmd) = rx.try_recv() {
                        match cmd {
                            Cmd::GuestKick(fd) => {
                                let _ = epoll.ctl(
                                    ControlOperation::Delete,
                                    l.guest_kick.as_raw_fd(),
                                    EpollEvent::default(),
                                );
                                if let Err(e) = add(fd.as_raw_fd(), TOKEN_GUEST_KICK) {
                                    tracing::error!(queue = l.index, error = %e, "cannot watch the new guest kick");
                                }
                                l.guest_kick = fd;
                                work = true;
                            }
                            Cmd::GuestCall(fd) => l.guest_call = fd,
                            Cmd::Forwarding(on) => {
                                if !holding {
                                    l.engine.set_forwarding(on);
                                    work = true;
                                }
                            }
                            Cmd::Hold(done) => {
                                holding = true;
                                l.engine.set_forwarding(false);
                                let _ = done.send(());
                                work = true;
                            }
                            Cmd::Stop(relay) => stopping = Some(relay),
                        }
                    }
                }
            }
        }
    }
    if stopping == Some(true) {
        // Hand the rings over with notifications armed (a kick-driven backend must see no
        // NO_NOTIFY left behind), and relay what the backend completed.
        let mem = l.mem.snapshot();
        if l.engine.broken().is_none() && !l.memory_lost {
            let res = l.engine.arm_notifications(&*mem, &l.log);
            if l.memory_intact() {
                if let Err(e) = res {
                    l.fail(e);
                }
            }
        }
        l.used(&mem);
    }
    WorkerExit {
        engine: l.engine,
        guest_kick: l.guest_kick,
        guest_call: l.guest_call,
    }
}

/// Without epoll nothing can be relayed; wait for the stop request so the engine is handed back.
fn wait_stop_without_epoll(l: Loop, rx: Receiver<Cmd>) -> WorkerExit {
    let mut guest_kick = l.guest_kick;
    let mut guest_call = l.guest_call;
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Stop(_) => break,
            Cmd::GuestKick(fd) => guest_kick = fd,
            Cmd::GuestCall(fd) => guest_call = fd,
            Cmd::Forwarding(_) => {}
            Cmd::Hold(done) => {
                let _ = done.send(());
            }
        }
    }
    WorkerExit {
        engine: l.engine,
        guest_kick,
        guest_call,
    }
}
