//! Per-queue counters, readable at any time without locks (reported by
//! [`crate::report::QueueCounters`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
    /// Time the worker spent polling the rings after work (`--poll-us`), in nanoseconds.
    pub poll_ns: AtomicU64,
    /// CPU time of the queue's shadow workers, in nanoseconds (updated at each wake-up).
    pub worker_cpu_ns: AtomicU64,
}

impl QueueStats {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
