//! Per-queue counters, readable at any time without locks (reported by
//! [`crate::report::QueueCounters`]).

use std::sync::atomic::{
    AtomicI64, AtomicU64,
    Ordering::{Acquire, Relaxed},
};

/// Counters of one queue. Written by the queue's worker thread and by the switch code, read by the
/// control plane.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Guest chains forwarded to the backend in shadow mode.
    pub chains: AtomicU64,
    /// Shadow descriptors written.
    pub descriptors: AtomicU64,
    /// Bytes described by forwarded chains.
    pub bytes: AtomicU64,
    /// Bytes the backend wrote into guest buffers (reported used lengths).
    pub bytes_written: AtomicU64,
    /// Guest chains completed back to the guest.
    pub completed: AtomicU64,
    /// Guest kicks received by svqd.
    pub kicks: AtomicU64,
    /// Backend calls received by svqd.
    pub calls: AtomicU64,
    /// Kicks svqd sent to the backend.
    pub backend_kicks: AtomicU64,
    /// Interrupts svqd sent to the guest.
    pub guest_notifies: AtomicU64,
    /// Dirty-log page marks.
    pub dirty_pages: AtomicU64,
    /// Mode switches (either direction).
    pub mode_switches: AtomicU64,
    /// Duration of the last switch to shadow mode, in microseconds.
    pub last_switch_to_shadow_us: AtomicU64,
    /// Duration of the last switch back to passthrough, in microseconds.
    pub last_switch_to_passthrough_us: AtomicU64,
    /// Requests found in flight in the backend at GET_VRING_BASE and waited for.
    pub late_completions: AtomicU64,
    /// Buffers the backend never took, given back to the guest ring on a switch to passthrough.
    pub reclaimed: AtomicU64,
    /// Times a shadow worker woke from sleep (epoll) to work.
    pub worker_wakeups: AtomicU64,
    /// Nanoseconds shadow workers spent polling empty rings (the poll phase's cost).
    pub poll_ns: AtomicU64,
    /// CPU nanoseconds of worker threads in the periods they served this queue that have ended.
    pub worker_cpu_ns_exited: AtomicU64,
    /// CPU-time clock of the worker thread serving the queue now (pthread_getcpuclockid; 0 =
    /// none — thread CPU clock ids are negative on Linux). Read by the control plane, so the
    /// worker never pays a syscall for its own accounting.
    pub worker_clock: AtomicI64,
    /// That thread's CPU time when it took the queue on.
    pub worker_cpu_base: AtomicU64,
}

/// CPU time of the clock `clock` in nanoseconds (`None` if it cannot be read, e.g. the thread
/// exited).
pub fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; an invalid clock id is an error return.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

impl QueueStats {
    /// CPU nanoseconds of the worker threads while they served this queue (earlier periods plus
    /// the current one). A thread serves all the shadowed rings of a device (or of its CPU), so
    /// rings served together each show the thread's whole time. A period ending between the
    /// loads is momentarily missing from the sum.
    pub fn worker_cpu_ns(&self) -> u64 {
        let clock = self.worker_clock.load(Acquire);
        let live = if clock < 0 {
            clock_ns(clock as libc::clockid_t)
                .unwrap_or(0)
                .saturating_sub(self.worker_cpu_base.load(Relaxed))
        } else {
            0
        };
        self.worker_cpu_ns_exited.load(Relaxed) + live
    }

    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
