//! The threads that run the shadow data path: one thread serves all of a device's shadowed rings
//! (or, with `--worker-cpus`, one thread per listed CPU serves every ring given to that CPU), each
//! ring a [`Relay`], in one epoll loop.
//!
//! One thread, not one per ring: the rings of a device work in lockstep (a network device's
//! receive and transmit rings, a loopback's both directions), and two threads on one CPU take
//! turns by the scheduler's slice, each leaving its ring unserved while the other runs and each
//! finding the other as competition for the CPU (DESIGN.md, "The shadow data path").
//!
//! Built for rate: a wake starts a *work phase* in which guest kicks and backend calls are
//! suppressed (the engine's `suppress_notifications`) and every ring is drained in whole
//! batches, again and again while work keeps coming and for up to `poll` after the last work
//! (the poll phase). Only then are notifications re-armed, with the engine's fence and re-check
//! (`arm_notifications`): work that slipped in meanwhile starts another round instead of being
//! stranded, and the thread sleeps in `epoll_wait`. Under load a wake moves rings, not bursts,
//! and no syscall is made per descriptor. Between phases of flowing traffic and after the last
//! one, [`Pacer`] decides whether the thread sleeps the batch wait or goes on, and how long it
//! polls: it sleeps where busy peers want the CPU, and keeps going where the CPU is its own.
//! Counters are added once per batch; the thread's CPU time is read by the control plane from the
//! thread's CPU clock, not by the worker.
//!
//! A thread exists only while it serves a ring: the last [`Worker`] handle of a thread tells it
//! to end, and it ends by itself (a switch back does not wait for its exit), so passthrough runs
//! no thread at all.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::ProxyConfig;
use crate::pacing::Pacer;
use crate::relay::Relay;
pub use crate::relay::{Engine, WorkerExit, WorkerSetup};
use crate::sigbus;
use crate::stats::QueueStats;

/// Epoll token of the command eventfd; a ring's tokens are `id << 1 | kind`.
const TOKEN_CMD: u64 = u64::MAX;
const KIND_GUEST_KICK: u64 = 0;
const KIND_BACKEND_CALL: u64 = 1;

/// A work phase that moved at least this many chains counts as flowing traffic: the thread
/// may sleep for the batch wait with notifications off instead of re-arming them.
const DEFER_MIN_CHAINS: u32 = 32;

/// Requests to a worker thread; all but `Exit` name the ring by its attach id.
enum Cmd {
    /// Serve a ring.
    Attach(u64, Box<WorkerSetup>),
    /// The VMM replaced the guest kick eventfd.
    GuestKick(u64, Arc<EventFd>),
    /// The VMM replaced (or removed) the guest call eventfd.
    GuestCall(u64, Option<Arc<EventFd>>),
    /// The VMM enabled or disabled the ring: forward new guest buffers or not.
    Forwarding(u64, bool),
    /// Forward nothing new from now on (whatever the VMM's enable says), keep relaying
    /// completions and poll the shadow used ring (the backend may complete without calling);
    /// answer once applied.
    Hold(u64, Sender<()>),
    /// Detach the ring and send it back; with `true`, relay what the backend completed first.
    Stop(u64, bool, Sender<WorkerExit>),
    /// No ring is left: end the thread.
    Exit,
}

/// The worker threads of one device, started as rings are shadowed.
pub struct WorkerThreads {
    /// One thread per CPU, pinned to it; empty: one thread, unpinned.
    cpus: Vec<usize>,
    poll: Duration,
    batch_wait: Duration,
    threads: Vec<Weak<Thread>>,
    next_id: u64,
}

impl WorkerThreads {
    /// Worker threads as `cfg` says (`--worker-cpus`, `--poll-us`, `--batch-wait-us`).
    pub fn new(cfg: &ProxyConfig) -> Self {
        WorkerThreads {
            cpus: cfg.worker_cpus.clone(),
            poll: cfg.poll,
            batch_wait: cfg.batch_wait,
            threads: (0..cfg.worker_cpus.len().max(1))
                .map(|_| Weak::new())
                .collect(),
            next_id: 0,
        }
    }

    /// Have ring `setup.index` served by its thread (queue `q` goes to CPU `q mod n` of the
    /// list), starting the thread if it is not running.
    pub fn attach(&mut self, setup: WorkerSetup) -> std::io::Result<Worker> {
        let slot = setup.index % self.threads.len();
        let thread = match self.threads[slot].upgrade() {
            Some(t) => t,
            None => {
                let t = Arc::new(Thread::spawn(
                    slot,
                    self.cpus.get(slot).copied(),
                    self.poll,
                    self.batch_wait,
                )?);
                self.threads[slot] = Arc::downgrade(&t);
                t
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        thread.send(Cmd::Attach(id, Box::new(setup)));
        Ok(Worker {
            thread,
            id,
            detached: false,
        })
    }
}

/// A running worker thread; stopped when the last handle of a ring it serves is gone.
struct Thread {
    cmd: Sender<Cmd>,
    wake: Arc<EventFd>,
    /// Set with every command, so a polling thread notices it without a syscall.
    cmd_pending: Arc<AtomicBool>,
}

impl Thread {
    fn spawn(
        slot: usize,
        cpu: Option<usize>,
        poll: Duration,
        batch_wait: Duration,
    ) -> std::io::Result<Thread> {
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_CMD),
        )?;
        let cmd_pending = Arc::new(AtomicBool::new(false));
        let (w, p) = (wake.clone(), cmd_pending.clone());
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name(format!("svqd-shadow{slot}"))
            .spawn(move || {
                span.in_scope(|| {
                    pin_to(cpu);
                    if !batch_wait.is_zero() {
                        // The batch wait is tens of microseconds: without this, the default
                        // 50 µs timer slack would triple it.
                        crate::quiesce::precise_sleeps();
                    }
                    let thread_loop = ThreadLoop::new(epoll, w, p, Pacer::new(batch_wait, poll));
                    let run = std::panic::AssertUnwindSafe(|| thread_loop.run(rx));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!("a shadow worker thread panicked");
                    }
                })
            })?;
        Ok(Thread {
            cmd: tx,
            wake,
            cmd_pending,
        })
    }

    fn send(&self, cmd: Cmd) {
        // A send error means the thread is gone; the waiting calls notice it.
        let _ = self.cmd.send(cmd);
        self.cmd_pending.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }
}

impl Drop for Thread {
    /// The thread ends by itself, unjoined: the last ring's detach (a switch back, the VM-stop
    /// path of a migration) does not wait for its exit, which cost ~0.2 ms here (the stack's
    /// unmapping). It serves no ring by then.
    fn drop(&mut self) {
        self.send(Cmd::Exit);
    }
}

/// Handle of one ring served by a worker thread.
pub struct Worker {
    thread: Arc<Thread>,
    id: u64,
    detached: bool,
}

impl Worker {
    /// Replace the guest kick eventfd.
    pub fn set_guest_kick(&self, fd: Arc<EventFd>) {
        self.thread.send(Cmd::GuestKick(self.id, fd));
    }

    /// Replace the guest call eventfd.
    pub fn set_guest_call(&self, fd: Option<Arc<EventFd>>) {
        self.thread.send(Cmd::GuestCall(self.id, fd));
    }

    /// Forward new guest buffers (ring enabled by the VMM) or hold them.
    pub fn set_forwarding(&self, on: bool) {
        self.thread.send(Cmd::Forwarding(self.id, on));
    }

    /// Stop forwarding guest buffers for good and return once the thread applied it: from then
    /// on the shadow avail index in memory no longer moves. Completions are still relayed (and
    /// polled for every millisecond) until [`Worker::stop`].
    pub fn hold(&self) {
        let (tx, rx) = channel();
        self.thread.send(Cmd::Hold(self.id, tx));
        // The loop answers within one iteration; it only fails to if the thread is gone, and
        // then nothing is forwarded anyway.
        let _ = rx.recv_timeout(Duration::from_secs(5));
    }

    /// Detach the ring and take the engine back, after relaying what the backend completed.
    pub fn stop(self) -> WorkerExit {
        self.detach(true)
    }

    /// Detach the ring at once and take the engine back: the guest ring is being reset, nothing
    /// may be written into it any more.
    pub fn abandon(self) -> WorkerExit {
        self.detach(false)
    }

    fn detach(mut self, relay: bool) -> WorkerExit {
        let (tx, rx) = channel();
        self.thread.send(Cmd::Stop(self.id, relay, tx));
        self.detached = true;
        match rx.recv() {
            Ok(exit) => exit,
            // The loop does not panic by design; if it did, there is no engine to recover.
            Err(_) => panic!("shadow worker thread died holding queue engines"),
        }
    }
}

impl Drop for Worker {
    /// A handle dropped without a stop (an error path) still detaches its ring, so the thread
    /// ends once it serves nothing, and waits for it: the ring's engine comes back here rather
    /// than being dropped on the thread while its owner unmaps the shadow ring (the thread is
    /// not joined).
    fn drop(&mut self) {
        if !self.detached {
            let (tx, rx) = channel();
            self.thread.send(Cmd::Stop(self.id, false, tx));
            // An error means the thread is gone, and the engine with it.
            let _ = rx.recv();
        }
    }
}

/// A ring attached to the thread.
struct Attached {
    id: u64,
    relay: Relay,
}

/// The ring attached as `id`, if it still is.
fn find(rings: &mut [Attached], id: u64) -> Option<&mut Relay> {
    rings.iter_mut().find(|a| a.id == id).map(|a| &mut a.relay)
}

/// Watch `fd` for ring `id`'s notification of `kind`.
fn watch(epoll: &Epoll, id: u64, kind: u64, fd: &EventFd) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, id << 1 | kind),
    )
}

fn unwatch(epoll: &Epoll, fd: &EventFd) {
    let _ = epoll.ctl(
        ControlOperation::Delete,
        fd.as_raw_fd(),
        EpollEvent::default(),
    );
}

struct ThreadLoop {
    rings: Vec<Attached>,
    epoll: Epoll,
    wake: Arc<EventFd>,
    cmd_pending: Arc<AtomicBool>,
    /// Sleep or go on between work phases, and how long to poll after them.
    pacer: Pacer,
    /// [`sigbus::faults_on_this_thread`] as last seen: a later fault happened in the engine call
    /// just made (see [`Relay`]).
    faults: u64,
    /// This thread's CPU clock, published to the rings' counters.
    clock: libc::clockid_t,
}

impl ThreadLoop {
    fn new(epoll: Epoll, wake: Arc<EventFd>, cmd_pending: Arc<AtomicBool>, pacer: Pacer) -> Self {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling thread; `clock` is a valid out pointer.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } != 0 {
            clock = 0;
        }
        ThreadLoop {
            rings: Vec::new(),
            epoll,
            wake,
            cmd_pending,
            pacer,
            faults: sigbus::faults_on_this_thread(),
            clock,
        }
    }

    fn for_each_stats(&self, f: impl Fn(&QueueStats)) {
        for a in &self.rings {
            f(&a.relay.stats);
        }
    }

    fn run(mut self, rx: Receiver<Cmd>) {
        let mut events = vec![EpollEvent::default(); 32];
        let mut work = false;
        loop {
            // Flowing traffic: with notifications off, sleep the batch wait (or, on a CPU
            // nobody else wants, go straight on), then work again.
            while work && self.work(self.pacer.defers()) {
                if self.pacer.between_phases() {
                    self.for_each_stats(|s| QueueStats::add(&s.worker_wakeups, 1));
                }
            }
            let holding = self.rings.iter().any(|a| a.relay.holding);
            // Holding: the backend may suppress its calls, or signal a call fd svqd replaced
            // meanwhile, so look at the shadow used ring every millisecond.
            let timeout = if holding { 1 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            };
            self.for_each_stats(|s| QueueStats::add(&s.worker_wakeups, 1));
            work = holding;
            for ev in &events[..n] {
                if ev.data() != TOKEN_CMD {
                    self.notified(ev.data());
                    work = true;
                    continue;
                }
                // A kick or call seen before the command is served first (a hold must not
                // overtake a kick that arrived before it).
                if work {
                    self.work(false);
                }
                let _ = self.wake.read();
                self.cmd_pending.store(false, Ordering::Relaxed);
                while let Ok(cmd) = rx.try_recv() {
                    match self.command(cmd) {
                        Some(more) => work |= more,
                        None => return,
                    }
                }
            }
        }
    }

    /// A ring's kick or call fired: consume it and count it.
    fn notified(&mut self, token: u64) {
        let Some(r) = find(&mut self.rings, token >> 1) else {
            return; // an event of a ring detached in this same batch
        };
        let (fd, counter) = if token & 1 == KIND_GUEST_KICK {
            (&r.guest_kick, &r.stats.kicks)
        } else {
            (&r.backend_call, &r.stats.calls)
        };
        if fd.read().unwrap_or(0) > 0 {
            QueueStats::add(counter, 1);
        }
    }

    /// Apply a command; returns whether the rings should be worked on, or `None` to end the
    /// thread.
    fn command(&mut self, cmd: Cmd) -> Option<bool> {
        match cmd {
            Cmd::Attach(id, setup) => {
                let relay = Relay::attach(*setup, self.clock);
                for (kind, fd) in [
                    (KIND_GUEST_KICK, &relay.guest_kick),
                    (KIND_BACKEND_CALL, &relay.backend_call),
                ] {
                    if let Err(e) = watch(&self.epoll, id, kind, fd) {
                        tracing::error!(queue = relay.index, error = %e, "epoll_ctl failed; queue stalls");
                    }
                }
                self.rings.push(Attached { id, relay });
                // Buffers the guest posted before the switch (their kick went to the old
                // backend ring or is pending on the kick fd), and completions that raced the
                // switch: work at once.
                Some(true)
            }
            Cmd::GuestKick(id, fd) => {
                let Some(r) = find(&mut self.rings, id) else {
                    return Some(false);
                };
                unwatch(&self.epoll, &r.guest_kick);
                if let Err(e) = watch(&self.epoll, id, KIND_GUEST_KICK, &fd) {
                    tracing::error!(queue = r.index, error = %e, "cannot watch the new guest kick");
                }
                r.guest_kick = fd;
                Some(true)
            }
            Cmd::GuestCall(id, fd) => {
                if let Some(r) = find(&mut self.rings, id) {
                    r.guest_call = fd;
                }
                Some(false)
            }
            Cmd::Forwarding(id, on) => {
                if let Some(r) = find(&mut self.rings, id) {
                    r.set_forwarding(on);
                }
                Some(true)
            }
            Cmd::Hold(id, done) => {
                if let Some(r) = find(&mut self.rings, id) {
                    r.hold();
                }
                let _ = done.send(());
                Some(true)
            }
            Cmd::Stop(id, relay, reply) => {
                if let Some(i) = self.rings.iter().position(|a| a.id == id) {
                    let a = self.rings.swap_remove(i);
                    unwatch(&self.epoll, &a.relay.guest_kick);
                    unwatch(&self.epoll, &a.relay.backend_call);
                    let _ = reply.send(a.relay.detach(relay, &mut self.faults));
                }
                Some(false)
            }
            Cmd::Exit => {
                // Only sent once no handle is left, so every ring was detached already.
                None
            }
        }
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
    fn work(&mut self, may_defer: bool) -> bool {
        let mut polled = Duration::ZERO;
        let poll = self.pacer.poll_budget();
        let mut moved = 0u32;
        let mut deferred = false;
        let faults = &mut self.faults;
        let cmd_pending = &*self.cmd_pending;
        loop {
            if !self.rings.iter().any(|a| a.relay.live()) {
                return false;
            }
            for a in &mut self.rings {
                a.relay.suppress_notifications(faults);
            }
            let mut idle_since: Option<Instant> = None;
            loop {
                let n: u32 = self
                    .rings
                    .iter_mut()
                    .map(|a| a.relay.pump(faults))
                    .fold(0, u32::saturating_add);
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
            // Work that slipped in while notifications were off: its notification may never
            // come, so take it now.
            let mut again = false;
            for a in &mut self.rings {
                again |= a.relay.arm_notifications(faults);
            }
            if !again {
                break;
            }
        }
        if !polled.is_zero() {
            let ns = polled.as_nanos() as u64;
            self.for_each_stats(|s| QueueStats::add(&s.poll_ns, ns));
        }
        deferred
    }
}

/// Pin the calling thread to `cpu` (best effort: a failure is logged).
fn pin_to(cpu: Option<usize>) {
    let Some(cpu) = cpu.filter(|&c| c < libc::CPU_SETSIZE as usize) else {
        return;
    };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET is given a CPU below
    // CPU_SETSIZE (filtered above); pid 0 is the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(cpu, error = %e, "cannot pin the shadow worker thread");
    }
}
