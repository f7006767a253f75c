//! A userspace virtio driver: the simulated guest.
//!
//! * [`ram`]: guest RAM in a shared memfd, with a CPU dirty bitmap standing in for KVM's log.
//! * [`vring`]: the driver side of split virtqueues laid out in that RAM.
//! * [`blk`] / [`net`]: workloads that keep a virtio-blk or virtio-net device busy and verify every
//!   byte the device wrote into guest RAM, and every request's single completion.
//! * [`latency`]: a fixed-bucket latency histogram for benchmarks.
//! * [`runner`]: the guest "vCPU" thread that runs a workload and can be paused (VM stop) and moved
//!   to another RAM (after migration).

pub mod blk;
pub mod latency;
pub mod net;
pub mod ram;
pub mod runner;
pub mod vring;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ram::{GuestRam, PAGE_SIZE};
use vring::{Anomaly, DriverQueue};

/// A bump allocator over guest-physical space (the guest kernel's page allocator, simplified:
/// workloads allocate everything once at start).
#[derive(Debug, Clone)]
pub struct GuestAllocator {
    next: u64,
    end: u64,
}

impl GuestAllocator {
    /// Allocates from `start..end`.
    pub fn new(start: u64, end: u64) -> Self {
        GuestAllocator { next: start, end }
    }

    /// `len` bytes aligned to `align` (a power of two), or None when RAM is exhausted.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let a = self.next.checked_add(align - 1)? & !(align - 1);
        let end = a.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(a)
    }

    /// `len` bytes on whole pages of their own.
    pub fn alloc_pages(&mut self, len: u64) -> Option<u64> {
        let a = self.alloc(len.div_ceil(PAGE_SIZE) * PAGE_SIZE, PAGE_SIZE)?;
        Some(a)
    }
}

/// Live counters of a workload (read by the orchestrator for throughput reports).
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests completed.
    pub ops: AtomicU64,
    /// Bytes the device wrote into guest buffers (reads / received frames).
    pub bytes_in: AtomicU64,
    /// Bytes the device read from guest buffers (writes / transmitted frames).
    pub bytes_out: AtomicU64,
}

impl Progress {
    /// (ops, bytes_in, bytes_out).
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.ops.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// Exactly-once accounting of every request a workload issued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Requests posted.
    pub issued: u64,
    /// Requests completed exactly once.
    pub completed: u64,
    /// Requests still outstanding.
    pub outstanding: u64,
    /// Completions for a request that had already completed or never existed.
    pub duplicates: u64,
}

/// What the guest runner drives.
pub trait GuestWorkload: Send {
    /// Posts new requests (when posting is on) and kicks.
    fn step(&mut self);
    /// Reaps completions and verifies them.
    fn reap(&mut self);
    /// The call eventfds to wait on (one per queue).
    fn call_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.queues()
            .iter()
            .map(|q| q.call_fd().as_raw_fd())
            .collect()
    }
    /// Turns posting of new requests on or off (off: in-flight ones still complete).
    fn set_posting(&mut self, on: bool);
    /// Anomalies found so far (data mismatches, stray completions, ...).
    fn anomalies(&self) -> Vec<Anomaly>;
    /// The exactly-once ledger.
    fn ledger(&self) -> Ledger;
    /// The driver queues (their layouts, eventfds and indices are what the VMM hands the device).
    fn queues(&self) -> &[DriverQueue];
    /// Mutable access to the queues.
    fn queues_mut(&mut self) -> &mut [DriverQueue];
    /// The RAM the guest runs on.
    fn ram(&self) -> &Arc<GuestRam>;
    /// Moves the guest to another RAM (the migration destination, already holding a copy) and
    /// gives every queue fresh eventfds.
    fn attach(&mut self, ram: Arc<GuestRam>) -> std::io::Result<()>;
    /// Live counters.
    fn progress(&self) -> Arc<Progress>;
}

/// What [`GuestWorkload::attach`] does for a workload whose RAM is `current` and whose queues are
/// `queues`: refuses a RAM of another size, then moves to `ram` and gives every queue fresh
/// eventfds.
fn attach_ram(
    current: &mut Arc<GuestRam>,
    queues: &mut [DriverQueue],
    ram: Arc<GuestRam>,
) -> std::io::Result<()> {
    if ram.size() != current.size() {
        return Err(std::io::Error::other("destination RAM size differs"));
    }
    *current = ram;
    for q in queues {
        q.replace_eventfds()?;
    }
    Ok(())
}

/// splitmix64: a deterministic pattern generator for data that must be recognisable.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
