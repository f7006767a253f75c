//! One shadowed ring's data path: guest kick → `forward_avail` → kick the backend; backend call →
//! `forward_used` (guest used ring + dirty log) → interrupt the guest. A [`Relay`] is what a
//! worker thread ([`crate::worker`]) keeps per ring it serves; the thread decides when to pump it.
//!
//! A relay owns its engine while it is attached to a thread; detaching it hands the engine back,
//! so the switch code never shares the engine with a running data path. Errors break only this
//! ring: the first is logged, the ring stops until the guest resets it, and the other rings of
//! the thread go on.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use svq::{IdentityTranslation, QueueError, ShadowVirtqueue, SharedLog};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::SharedMemory;
use crate::sigbus;
use crate::stats::QueueStats;

/// The engine type svqd runs: vhost-user descriptors carry guest-physical addresses unchanged.
pub type Engine = ShadowVirtqueue<IdentityTranslation>;

/// Everything a worker thread needs to relay one ring.
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
}

/// What a detached ring hands back.
pub struct WorkerExit {
    /// The engine, with its state.
    pub engine: Engine,
    /// The guest kick eventfd as last set (the VMM may have replaced it).
    pub guest_kick: Arc<EventFd>,
    /// The guest call eventfd as last set.
    pub guest_call: Option<Arc<EventFd>>,
}

/// One ring as its worker thread serves it.
pub struct Relay {
    /// Queue index (for logs).
    pub index: usize,
    engine: Engine,
    mem: Arc<SharedMemory>,
    log: Arc<SharedLog>,
    /// Guest kick (the VMM's eventfd), watched by the thread.
    pub guest_kick: Arc<EventFd>,
    /// Guest call (the VMM's eventfd).
    pub guest_call: Option<Arc<EventFd>>,
    backend_kick: Arc<EventFd>,
    /// svqd's call from the backend, watched by the thread.
    pub backend_call: Arc<EventFd>,
    /// Counters.
    pub stats: Arc<QueueStats>,
    /// Forward nothing new any more, whatever the VMM's enable says (a switch is taking the ring
    /// away); completions are still relayed, and the shadow used ring polled.
    pub holding: bool,
    reported: bool,
    /// Stopped because the VMM truncated memory this ring touched (a SIGBUS while it ran).
    memory_lost: bool,
}

/// The calling thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    crate::stats::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0)
}

impl Relay {
    /// Attach a ring to the calling worker thread, whose CPU clock is `clock`: its CPU time
    /// counts for the ring from now on.
    pub fn attach(setup: WorkerSetup, clock: libc::clockid_t) -> Relay {
        setup
            .stats
            .worker_cpu_base
            .store(thread_cpu_ns(), Ordering::Relaxed);
        setup
            .stats
            .worker_clock
            .store(i64::from(clock), Ordering::Release);
        Relay {
            index: setup.index,
            engine: setup.engine,
            mem: setup.mem,
            log: setup.log,
            guest_kick: setup.guest_kick,
            guest_call: setup.guest_call,
            backend_kick: setup.backend_kick,
            backend_call: setup.backend_call,
            stats: setup.stats,
            holding: false,
            reported: false,
            memory_lost: false,
        }
    }

    /// Whether the ring can be worked on.
    pub fn live(&self) -> bool {
        self.engine.broken().is_none() && !self.memory_lost
    }

    /// Forward new guest buffers (the VMM's enable) unless holding.
    pub fn set_forwarding(&mut self, on: bool) {
        if !self.holding {
            self.engine.set_forwarding(on);
        }
    }

    /// Forward nothing new from now on; see [`Relay::holding`].
    pub fn hold(&mut self) {
        self.holding = true;
        self.engine.set_forwarding(false);
    }

    /// Whether the ring may go on after an engine call: false once the VMM truncated shared
    /// memory under svqd. `faults` is the thread's fault count as last seen; a fault since
    /// happened in the call just made, so it is this ring's.
    fn memory_intact(&mut self, faults: &mut u64) -> bool {
        let now = sigbus::faults_on_this_thread();
        if now != *faults {
            *faults = now;
            if !self.memory_lost {
                self.memory_lost = true;
                tracing::error!(
                    queue = self.index,
                    addr = format_args!("{:#x}", sigbus::last_fault_addr()),
                    "SIGBUS on guest memory or the dirty log: the VMM truncated a shared memory \
                     file under svqd; this shadow queue stops until the device is reset"
                );
            }
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
    fn avail(&mut self, mem: &GuestMemoryMmap, faults: &mut u64) -> u32 {
        if !self.live() || !self.engine.forwarding() {
            return 0;
        }
        let res = self.engine.forward_avail(mem, &self.log);
        if !self.memory_intact(faults) {
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
    fn used(&mut self, mem: &GuestMemoryMmap, faults: &mut u64) -> bool {
        if !self.live() {
            return false;
        }
        let res = self.engine.forward_used(mem, &self.log);
        if !self.memory_intact(faults) {
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
    pub fn pump(&mut self, faults: &mut u64) -> u32 {
        if !self.live() {
            return 0;
        }
        let mem = self.mem.snapshot();
        let completed = self.used(&mem, faults);
        let forwarded = self.avail(&mem, faults);
        forwarded + u32::from(completed)
    }

    /// Turn off guest kicks and backend calls while the thread works on the ring.
    pub fn suppress_notifications(&mut self, faults: &mut u64) {
        if !self.live() {
            return;
        }
        let mem = self.mem.snapshot();
        let res = self.engine.suppress_notifications(&*mem, &self.log);
        drop(mem);
        if self.memory_intact(faults) {
            if let Err(e) = res {
                self.fail(e);
            }
        }
    }

    /// Re-arm guest kicks and backend calls (fence, then re-check): returns whether work slipped
    /// in meanwhile, whose notification may never come.
    pub fn arm_notifications(&mut self, faults: &mut u64) -> bool {
        if !self.live() {
            return false;
        }
        let mem = self.mem.snapshot();
        let res = self.engine.arm_notifications(&*mem, &self.log);
        drop(mem);
        if !self.memory_intact(faults) {
            return false;
        }
        match res {
            Ok(again) => again,
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

    /// Detach the ring from its thread. With `relay`, hand it over with notifications armed (a
    /// kick-driven backend must see no NO_NOTIFY left behind) and relay what the backend
    /// completed first; without, touch the rings no more (the guest ring is being reset).
    pub fn detach(mut self, relay: bool, faults: &mut u64) -> WorkerExit {
        if relay {
            self.arm_notifications(faults);
            let mem = self.mem.snapshot();
            self.used(&mem, faults);
        }
        let base = self.stats.worker_cpu_base.load(Ordering::Relaxed);
        let cpu = thread_cpu_ns().saturating_sub(base);
        self.stats.worker_clock.store(0, Ordering::Release);
        QueueStats::add(&self.stats.worker_cpu_ns_exited, cpu);
        WorkerExit {
            engine: self.engine,
            guest_kick: self.guest_kick,
            guest_call: self.guest_call,
        }
    }
}
