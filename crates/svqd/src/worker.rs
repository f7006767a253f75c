//! The shadow-mode data path of one queue: an epoll loop on its own thread.
//!
//! guest kick → `forward_avail` → kick the backend; backend call → `forward_used` (guest used ring +
//! dirty log) → interrupt the guest. The worker owns the engine while it runs; stopping the worker
//! hands the engine back, so the switch code never shares the engine with a running data path.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use svq::{IdentityTranslation, QueueError, ShadowVirtqueue, SharedLog};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::SharedMemory;
use crate::sigbus;
use crate::stats::QueueStats;

/// The engine type svqd runs: vhost-user descriptors carry guest-physical addresses unchanged.
pub type Engine = ShadowVirtqueue<IdentityTranslation>;

const TOKEN_GUEST_KICK: u64 = 0;
const TOKEN_BACKEND_CALL: u64 = 1;
const TOKEN_CMD: u64 = 2;

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
    /// Poll after work for this long before sleeping (zero: never).
    pub poll: Duration,
    /// CPUs the worker thread may run on (empty: any).
    pub cpus: Vec<usize>,
}

/// Handle of a running worker.
pub struct Worker {
    cmd: Sender<Cmd>,
    wake: Arc<EventFd>,
    join: Option<JoinHandle<WorkerExit>>,
}

impl Worker {
    /// Start the worker thread.
    pub fn spawn(setup: WorkerSetup) -> std::io::Result<Worker> {
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let w = wake.clone();
        let span = tracing::Span::current();
        let join = std::thread::Builder::new()
            .name(format!("svqd-q{}", setup.index))
            .spawn(move || span.in_scope(|| run(setup, rx, w)))?;
        Ok(Worker {
            cmd: tx,
            wake,
            join: Some(join),
        })
    }

    fn send(&self, cmd: Cmd) {
        // A send error means the thread is gone; `stop` reports it through the join.
        let _ = self.cmd.send(cmd);
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
    reported: bool,
    /// [`sigbus::faults_on_this_thread`] when the worker started: a later fault means the VMM
    /// truncated memory this queue touched, and what it reads or writes can no longer be trusted.
    faults_seen: u64,
    /// Stopped because memory was lost (see `faults_seen`).
    memory_lost: bool,
    /// How long to poll after work before sleeping (zero: never).
    poll: Duration,
    /// CPU time of earlier workers of this queue (the counter spans shadow periods).
    cpu_base: u64,
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

    /// Forward what the guest posted; returns whether any chain moved.
    fn avail(&mut self) -> bool {
        if self.engine.broken().is_some() || !self.engine.forwarding() || self.memory_lost {
            return false;
        }
        let mem = self.mem.snapshot();
        let res = self.engine.forward_avail(&*mem, &self.log);
        if !self.memory_intact() {
            return false;
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
                b.chains > 0
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// After work, keep looking at both rings for `poll` before sleeping again: under load the
    /// next burst usually arrives within microseconds, and a wake-up through epoll costs a
    /// context switch each (the worker is wake-up bound otherwise). Each round that moves
    /// something extends the phase. The time spent is counted in `poll_ns`.
    fn poll_phase(&mut self, poll: Duration) {
        let start = std::time::Instant::now();
        let mut deadline = start + poll;
        loop {
            let mut moved = self.avail();
            if self.used() {
                self.avail();
                moved = true;
            }
            let now = std::time::Instant::now();
            if moved {
                deadline = now + poll;
            } else if now >= deadline || self.memory_lost || self.engine.broken().is_some() {
                break;
            }
            std::hint::spin_loop();
        }
        QueueStats::add(&self.stats.poll_ns, start.elapsed().as_nanos() as u64);
    }

    /// Publish the worker thread's CPU time (one clock read per wake-up, not per descriptor).
    fn account_cpu(&self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            self.stats
                .worker_cpu_ns
                .store(self.cpu_base + ns, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Returns whether descriptors were freed while the shadow ring was full.
    fn used(&mut self) -> bool {
        if self.engine.broken().is_some() || self.memory_lost {
            return false;
        }
        let mem = self.mem.snapshot();
        let res = self.engine.forward_used(&*mem, &self.log);
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

fn run(setup: WorkerSetup, rx: Receiver<Cmd>, wake: Arc<EventFd>) -> WorkerExit {
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
        reported: false,
        faults_seen: sigbus::faults_on_this_thread(),
        memory_lost: false,
        poll: setup.poll,
        cpu_base: 0,
    };
    l.cpu_base = l
        .stats
        .worker_cpu_ns
        .load(std::sync::atomic::Ordering::Relaxed);
    if !setup.cpus.is_empty() {
        pin_to(l.index, &setup.cpus);
    }
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
    // Buffers the guest posted before the switch (their kick went to the old backend ring or is
    // pending on the kick fd), and completions that raced the switch.
    l.avail();
    if l.used() {
        l.avail();
    }

    let mut events = vec![EpollEvent::default(); 8];
    let mut holding = false;
    let mut stopping = None;
    while stopping.is_none() {
        l.account_cpu();
        if holding {
            // The backend may suppress its calls, or signal a call fd svqd replaced meanwhile.
            l.used();
        }
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
        let mut worked = false;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_GUEST_KICK => {
                    let k = drain_eventfd(&l.guest_kick);
                    if k > 0 {
                        QueueStats::add(&l.stats.kicks, 1);
                    }
                    if stopping.is_none() {
                        worked |= l.avail();
                    }
                }
                TOKEN_BACKEND_CALL => {
                    if drain_eventfd(&l.backend_call) > 0 {
                        QueueStats::add(&l.stats.calls, 1);
                    }
                    // Stopped: `stop` relays once more below, `abandon` writes nothing.
                    if stopping.is_none() && l.used() {
                        l.avail();
                        worked = true;
                    }
                }
                _ => {
                    drain_eventfd(&wake);
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
                                l.avail();
                            }
                            Cmd::GuestCall(fd) => l.guest_call = fd,
                            Cmd::Forwarding(on) => {
                                if !holding {
                                    l.engine.set_forwarding(on);
                                    l.avail();
                                }
                            }
                            Cmd::Hold(done) => {
                                holding = true;
                                l.engine.set_forwarding(false);
                                let _ = done.send(());
                            }
                            Cmd::Stop(relay) => stopping = Some(relay),
                        }
                    }
                }
            }
        }
        if worked && !holding && stopping.is_none() && !l.poll.is_zero() {
            l.poll_phase(l.poll);
        }
    }
    l.account_cpu();
    if stopping == Some(true) {
        l.used();
    }
    WorkerExit {
        engine: l.engine,
        guest_kick: l.guest_kick,
        guest_call: l.guest_call,
    }
}

/// Restrict the calling worker thread to `cpus` (`--worker-cpus`); a failure is logged, the
/// worker runs unpinned.
fn pin_to(queue: usize, cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it for indices below
    // CPU_SETSIZE (checked); sched_setaffinity reads the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(queue, ?cpus, error = %std::io::Error::last_os_error(), "cannot pin the shadow worker");
        }
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
