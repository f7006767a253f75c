//! Driver side of a split virtqueue, laid out in guest RAM.
//!
//! This is what a guest kernel's virtio_ring does: a free list of descriptors, chains (direct or
//! through an indirect table), avail ring publishing with a release barrier, kick suppression
//! (VRING_USED_F_NO_NOTIFY or avail_event with EVENT_IDX), used ring reaping with an acquire
//! barrier and interrupt suppression (VRING_AVAIL_F_NO_INTERRUPT or used_event).
//!
//! Every completion is checked: a used id that is not an in-flight head (a stray or duplicated
//! completion) or an out-of-range id is recorded as an [`Anomaly`] instead of being trusted.
//!
//! With VIRTIO_F_IN_ORDER ([`DriverQueue::in_order`]) descriptors are taken in ring order and
//! every completion must be the oldest chain in flight. The spec also lets an in-order device
//! write one used element for a batch; this driver does not accept that: the testkit's devices
//! and svq write one element per chain, so an id other than the oldest chain is an ordering
//! fault ([`Anomaly::OutOfOrder`]).

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ram::GuestMem;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn ro(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn wo(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// Where a queue's parts live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size (power of two).
    pub size: u16,
    /// Descriptor table GPA.
    pub desc: u64,
    /// Avail (driver) ring GPA.
    pub avail: u64,
    /// Used (device) ring GPA (page aligned, on its own page(s)).
    pub used: u64,
    /// Indirect tables: `size` tables of `indirect_max` descriptors each.
    pub indirect: u64,
    /// Largest indirect table (descriptors).
    pub indirect_max: u16,
}

impl QueueLayout {
    /// Bytes needed for a queue of `size` with indirect tables of `indirect_max`, when laid out by
    /// [`QueueLayout::at`].
    pub fn bytes_needed(size: u16, indirect_max: u16) -> u64 {
        let s = u64::from(size);
        let ring = align(s * 16 + 6 + 2 * s, 4096) + align(6 + 8 * s, 4096);
        ring + align(s * u64::from(indirect_max) * 16, 4096)
    }

    /// Lays a queue out at `base` (4 KiB aligned): desc table + avail ring, then the used ring on
    /// its own page(s), then the indirect tables.
    pub fn at(base: u64, size: u16, indirect_max: u16) -> Self {
        let s = u64::from(size);
        let desc = base;
        let avail = desc + s * 16;
        let used = align(avail + 6 + 2 * s, 4096);
        let indirect = align(used + 6 + 8 * s, 4096);
        QueueLayout {
            size,
            desc,
            avail,
            used,
            indirect,
            indirect_max,
        }
    }

    /// GPA of the used ring's `idx` field.
    pub fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Something the driver saw that a correct device (and proxy) never produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// A used entry names a descriptor index that is not the head of an in-flight chain: a
    /// duplicated or stray completion.
    StrayCompletion {
        /// Queue index.
        queue: u16,
        /// The id in the used entry.
        id: u32,
    },
    /// The device moved used.idx more than the queue size ahead of what the driver reaped.
    UsedIdxJump {
        /// Queue index.
        queue: u16,
        /// Driver's last seen used index.
        last_used: u16,
        /// Device's used.idx.
        used_idx: u16,
    },
    /// VIRTIO_F_IN_ORDER: a completion for a chain in flight that is not the oldest one.
    OutOfOrder {
        /// Queue index.
        queue: u16,
        /// The id in the used entry.
        id: u32,
        /// The oldest head in flight (the only one an in-order device may complete next).
        expected: u16,
    },
    /// Request payload mismatch found by a workload (text describes it).
    Data(String),
    /// A request id completed twice or never issued (ledger level).
    Ledger(String),
}

impl std::fmt::Display for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Anomaly::StrayCompletion { queue, id } => {
                write!(f, "queue {queue}: used id {id} is not an in-flight head")
            }
            Anomaly::UsedIdxJump {
                queue,
                last_used,
                used_idx,
            } => write!(
                f,
                "queue {queue}: used.idx {used_idx} is more than a ring ahead of {last_used}"
            ),
            Anomaly::OutOfOrder {
                queue,
                id,
                expected,
            } => write!(
                f,
                "queue {queue}: in-order completion of head {id} while {expected} is older"
            ),
            Anomaly::Data(s) => write!(f, "data: {s}"),
            Anomaly::Ledger(s) => write!(f, "ledger: {s}"),
        }
    }
}

/// Errors posting a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PostError {
    /// Not enough free descriptors.
    #[error("queue full")]
    Full,
    /// Empty request or indirect table too large.
    #[error("bad request shape: {0}")]
    Shape(&'static str),
    /// Guest memory access failed (layout bug).
    #[error("guest memory access failed")]
    Memory,
}

/// One completion reaped from the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The token given when the request was posted.
    pub token: u64,
    /// The length the device reported.
    pub len: u32,
}

#[derive(Debug, Clone)]
struct InFlight {
    token: u64,
    descs: Vec<u16>,
}

/// Driver-side split virtqueue.
pub struct DriverQueue {
    index: u16,
    layout: QueueLayout,
    event_idx: bool,
    indirect_ok: bool,
    /// Free descriptors: taken from the back (a stack, like Linux's free list), or with
    /// IN_ORDER from the front in ring order (completions return the oldest chain's
    /// descriptors to the back).
    free: VecDeque<u16>,
    in_order: bool,
    /// IN_ORDER: heads in flight, oldest first.
    order: VecDeque<u16>,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
    heads: Vec<Option<InFlight>>,
    kick: EventFd,
    call: EventFd,
    interrupts_enabled: bool,
    anomalies: Vec<Anomaly>,
    /// Kicks sent / suppressed (notification suppression statistics).
    pub kicks: u64,
    /// Kicks the device asked us not to send.
    pub kicks_suppressed: u64,
}

impl DriverQueue {
    /// Initialises a queue at `layout` in `mem` (rings zeroed, as a driver does before
    /// DRIVER_OK) with fresh kick/call eventfds.
    pub fn new(
        mem: &GuestMem,
        index: u16,
        layout: QueueLayout,
        event_idx: bool,
        indirect: bool,
    ) -> std::io::Result<Self> {
        if !layout.size.is_power_of_two() {
            return Err(std::io::Error::other("queue size must be a power of two"));
        }
        let s = u64::from(layout.size);
        let zero = |addr: u64, len: u64| {
            mem.write_slice(&vec![0u8; len as usize], GuestAddress(addr))
                .map_err(std::io::Error::other)
        };
        zero(layout.desc, s * 16)?;
        zero(layout.avail, 6 + 2 * s)?;
        zero(layout.used, 6 + 8 * s)?;
        Ok(DriverQueue {
            index,
            layout,
            event_idx,
            indirect_ok: indirect,
            free: (0..layout.size).rev().collect(),
            in_order: false,
            order: VecDeque::new(),
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            heads: vec![None; usize::from(layout.size)],
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            interrupts_enabled: true,
            anomalies: Vec::new(),
            kicks: 0,
            kicks_suppressed: 0,
        })
    }

    /// Drive the queue with VIRTIO_F_IN_ORDER (call before adding anything): descriptors in
    /// ring order from 0 (`next` = x + 1, wrapping), completions checked to come in avail order.
    pub fn in_order(mut self, on: bool) -> Self {
        debug_assert!(self.order.is_empty() && self.heads.iter().all(Option::is_none));
        self.in_order = on;
        self.free = if on {
            (0..self.layout.size).collect()
        } else {
            (0..self.layout.size).rev().collect()
        };
        self
    }

    /// Whether the queue runs with VIRTIO_F_IN_ORDER.
    pub fn is_in_order(&self) -> bool {
        self.in_order
    }

    fn take_free(&mut self) -> Option<u16> {
        if self.in_order {
            self.free.pop_front()
        } else {
            self.free.pop_back()
        }
    }

    /// Undo taking `ids` (in the order they were taken).
    fn untake(&mut self, ids: &[u16]) {
        for &id in ids.iter().rev() {
            if self.in_order {
                self.free.push_front(id);
            } else {
                self.free.push_back(id);
            }
        }
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Ring layout.
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The kick eventfd (give it to the device with SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (give it to the device with SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Replaces both eventfds (the destination VMM's irqfd/ioeventfd after a migration).
    pub fn replace_eventfds(&mut self) -> std::io::Result<()> {
        self.kick = EventFd::new(EFD_NONBLOCK)?;
        self.call = EventFd::new(EFD_NONBLOCK)?;
        Ok(())
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains posted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.heads.iter().filter(|h| h.is_some()).count()
    }

    /// Next avail index the driver will publish (what a device's base should end up at).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Last used index reaped.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Anomalies seen so far (taken).
    pub fn take_anomalies(&mut self) -> Vec<Anomaly> {
        std::mem::take(&mut self.anomalies)
    }

    /// Whether a request of `n` buffers fits now.
    pub fn fits(&self, n: usize, indirect: bool) -> bool {
        if indirect && self.indirect_ok {
            !self.free.is_empty()
        } else {
            self.free.len() >= n
        }
    }

    /// Posts one chain (not yet visible to the device: call [`DriverQueue::publish`]).
    /// `indirect` uses an indirect table when VIRTIO_RING_F_INDIRECT_DESC is in use.
    pub fn add(
        &mut self,
        mem: &GuestMem,
        bufs: &[Buf],
        indirect: bool,
        token: u64,
    ) -> Result<u16, PostError> {
        if bufs.is_empty() {
            return Err(PostError::Shape("empty chain"));
        }
        let w = |addr: u64, d: &Buf, next: u16, more: bool| -> Result<(), PostError> {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            let mut flags = 0u16;
            if d.writable {
                flags |= VRING_DESC_F_WRITE;
            }
            if more {
                flags |= VRING_DESC_F_NEXT;
            }
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(addr))
                .map_err(|_| PostError::Memory)
        };
        let head;
        let descs;
        if indirect && self.indirect_ok {
            if bufs.len() > usize::from(self.layout.indirect_max) {
                return Err(PostError::Shape("indirect table too large"));
            }
            head = self.take_free().ok_or(PostError::Full)?;
            let table =
                self.layout.indirect + u64::from(head) * u64::from(self.layout.indirect_max) * 16;
            for (i, b) in bufs.iter().enumerate() {
                let more = i + 1 < bufs.len();
                if let Err(e) = w(
                    table + i as u64 * 16,
                    b,
                    (i + 1) as u16 * u16::from(more),
                    more,
                ) {
                    self.untake(&[head]);
                    return Err(e);
                }
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&table.to_le_bytes());
            raw[8..12].copy_from_slice(&((bufs.len() * 16) as u32).to_le_bytes());
            raw[12..14].copy_from_slice(&VRING_DESC_F_INDIRECT.to_le_bytes());
            if mem
                .write_slice(&raw, GuestAddress(self.layout.desc + u64::from(head) * 16))
                .is_err()
            {
                self.untake(&[head]);
                return Err(PostError::Memory);
            }
            descs = vec![head];
        } else {
            if self.free.len() < bufs.len() {
                return Err(PostError::Full);
            }
            let ids: Vec<u16> = (0..bufs.len())
                .map(|_| self.take_free().expect("checked"))
                .collect();
            for (i, b) in bufs.iter().enumerate() {
                let more = i + 1 < bufs.len();
                let next = if more { ids[i + 1] } else { 0 };
                if let Err(e) = w(self.layout.desc + u64::from(ids[i]) * 16, b, next, more) {
                    self.untake(&ids);
                    return Err(e);
                }
            }
            head = ids[0];
            descs = ids;
        }
        let slot = u64::from(self.next_avail % self.layout.size);
        if mem
            .write_obj(head.to_le(), GuestAddress(self.layout.avail + 4 + slot * 2))
            .is_err()
        {
            self.untake(&descs);
            return Err(PostError::Memory);
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        if self.in_order {
            self.order.push_back(head);
        }
        self.heads[usize::from(head)] = Some(InFlight { token, descs });
        Ok(head)
    }

    /// Makes every added chain visible to the device (release store of avail.idx).
    pub fn publish(&mut self, mem: &GuestMem) {
        // Descriptors and ring entries must be visible before the index that exposes them.
        fence(Ordering::Release);
        let _ = mem.store(
            self.next_avail.to_le(),
            GuestAddress(self.layout.avail + 2),
            Ordering::Release,
        );
    }

    /// Kicks the device unless it suppressed notifications (NO_NOTIFY flag or avail_event).
    /// Returns whether a kick was sent.
    pub fn kick_if_needed(&mut self, mem: &GuestMem) -> bool {
        let new = self.next_avail;
        let old = self.kicked_avail;
        if new == old {
            return false;
        }
        // The avail.idx store must be ordered before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let s = u64::from(self.layout.size);
        let need = if self.event_idx {
            let ev: u16 = mem
                .load(
                    GuestAddress(self.layout.used + 4 + 8 * s),
                    Ordering::Acquire,
                )
                .map(u16::from_le)
                .unwrap_or(0);
            // vring_need_event(event, new, old)
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = mem
                .load(GuestAddress(self.layout.used), Ordering::Acquire)
                .map(u16::from_le)
                .unwrap_or(0);
            flags & VRING_USED_F_NO_NOTIFY == 0
        };
        self.kicked_avail = new;
        if need {
            let _ = self.kick.write(1);
            self.kicks += 1;
        } else {
            self.kicks_suppressed += 1;
        }
        need
    }

    /// Kicks unconditionally (after a migration, to restart a device).
    pub fn kick_now(&mut self) {
        self.kicked_avail = self.next_avail;
        let _ = self.kick.write(1);
        self.kicks += 1;
    }

    /// The device's used.idx.
    pub fn device_used_idx(&self, mem: &GuestMem) -> u16 {
        mem.load(GuestAddress(self.layout.used_idx_addr()), Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(self.last_used)
    }

    /// Whether used entries are waiting to be reaped.
    pub fn has_used(&self, mem: &GuestMem) -> bool {
        self.device_used_idx(mem) != self.last_used
    }

    /// Reaps every used entry; anomalies are recorded, never trusted.
    pub fn reap(&mut self, mem: &GuestMem) -> Vec<Completion> {
        let used_idx = self.device_used_idx(mem);
        let pending = used_idx.wrapping_sub(self.last_used);
        let mut out = Vec::new();
        if pending > self.layout.size {
            self.anomalies.push(Anomaly::UsedIdxJump {
                queue: self.index,
                last_used: self.last_used,
                used_idx,
            });
            // Resynchronise so a single bad index does not make every later reap fail.
            self.last_used = used_idx;
            return out;
        }
        // used.idx read (acquire) before the entries it covers.
        fence(Ordering::Acquire);
        let s = u64::from(self.layout.size);
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used % self.layout.size);
            let addr = self.layout.used + 4 + slot * 8;
            let id: u32 = mem
                .read_obj::<u32>(GuestAddress(addr))
                .map(u32::from_le)
                .unwrap_or(u32::MAX);
            let len: u32 = mem
                .read_obj::<u32>(GuestAddress(addr + 4))
                .map(u32::from_le)
                .unwrap_or(0);
            self.last_used = self.last_used.wrapping_add(1);
            if self.in_order {
                self.check_order(id);
            }
            match self.heads.get_mut(id as usize).and_then(|h| h.take()) {
                Some(f) => {
                    if self.in_order {
                        self.free.extend(f.descs.iter());
                    } else {
                        self.free.extend(f.descs.iter().rev());
                    }
                    out.push(Completion {
                        token: f.token,
                        len,
                    });
                }
                None => self.anomalies.push(Anomaly::StrayCompletion {
                    queue: self.index,
                    id,
                }),
            }
        }
        if self.event_idx && self.interrupts_enabled {
            // Ask for an interrupt at the next completion.
            let _ = mem.store(
                self.last_used.to_le(),
                GuestAddress(self.layout.avail + 4 + 2 * s),
                Ordering::Release,
            );
        }
        out
    }

    /// IN_ORDER: `id` must be the oldest chain in flight; an in-flight chain completed early is
    /// an [`Anomaly::OutOfOrder`] (a stray id is reported by the caller).
    fn check_order(&mut self, id: u32) {
        match self.order.front() {
            Some(&oldest) if u32::from(oldest) == id => {
                self.order.pop_front();
            }
            Some(&oldest) => {
                if let Some(pos) = self.order.iter().position(|&h| u32::from(h) == id) {
                    self.order.remove(pos);
                    self.anomalies.push(Anomaly::OutOfOrder {
                        queue: self.index,
                        id,
                        expected: oldest,
                    });
                }
            }
            None => {}
        }
    }

    /// Requests interrupts again; returns true if completions arrived meanwhile (reap again).
    pub fn enable_interrupts(&mut self, mem: &GuestMem) -> bool {
        self.interrupts_enabled = true;
        let s = u64::from(self.layout.size);
        if self.event_idx {
            let _ = mem.store(
                self.last_used.to_le(),
                GuestAddress(self.layout.avail + 4 + 2 * s),
                Ordering::Release,
            );
        } else {
            let _ = mem.store(0u16, GuestAddress(self.layout.avail), Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.has_used(mem)
    }

    /// Reaps until no completion arrived while interrupts were off: interrupts are suppressed
    /// while reaping and re-enabled at the end, as a driver's interrupt handler does.
    pub fn reap_all(&mut self, mem: &GuestMem) -> Vec<Completion> {
        let mut out = Vec::new();
        loop {
            self.disable_interrupts(mem);
            out.extend(self.reap(mem));
            if !self.enable_interrupts(mem) {
                return out;
            }
        }
    }

    /// Suppresses interrupts (while the driver polls).
    pub fn disable_interrupts(&mut self, mem: &GuestMem) {
        self.interrupts_enabled = false;
        if !self.event_idx {
            let _ = mem.store(
                VRING_AVAIL_F_NO_INTERRUPT.to_le(),
                GuestAddress(self.layout.avail),
                Ordering::Release,
            );
        }
        // With EVENT_IDX, used_event is simply left behind: the device interrupts at most once
        // more (when it passes it), which the driver tolerates.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::ram::GuestRam;
    use virtio_queue::{Queue, QueueT};

    /// A device-side queue (virtio-queue's, an independent implementation) on our layout.
    fn device(l: &QueueLayout, event_idx: bool) -> Queue {
        let mut q = Queue::new(l.size).unwrap();
        q.try_set_size(l.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(l.desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(l.avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(l.used)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn setup(event_idx: bool) -> (std::sync::Arc<GuestRam>, DriverQueue, Queue) {
        let ram = GuestRam::new("t", 4 << 20).unwrap();
        let l = QueueLayout::at(0x10000, 8, 4);
        let dq = DriverQueue::new(ram.memory(), 0, l, event_idx, true).unwrap();
        let dev = device(&l, event_idx);
        (ram, dq, dev)
    }

    #[test]
    fn chains_read_back_by_an_independent_device_implementation() {
        let (ram, mut dq, mut dev) = setup(true);
        let mem = ram.memory();
        let bufs = [
            Buf::ro(0x20000, 16),
            Buf::wo(0x21000, 4096),
            Buf::wo(0x22000, 1),
        ];
        dq.add(mem, &bufs, false, 7).unwrap();
        dq.add(mem, &bufs, true, 8).unwrap();
        dq.publish(mem);
        for _ in 0..2 {
            let chain = dev.pop_descriptor_chain(mem).expect("a chain");
            let got: Vec<Buf> = chain
                .map(|d| Buf {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            assert_eq!(got, bufs);
        }
        assert!(dev.pop_descriptor_chain(mem).is_none());
        // 3 descriptors direct + 1 for the indirect chain.
        assert_eq!(dq.free_descriptors(), 8 - 4);
    }

    #[test]
    fn completions_come_back_once_and_free_the_descriptors() {
        let (ram, mut dq, mut dev) = setup(false);
        let mem = ram.memory();
        let h1 = dq.add(mem, &[Buf::wo(0x20000, 64)], false, 1).unwrap();
        let h2 = dq
            .add(mem, &[Buf::wo(0x21000, 64), Buf::wo(0x22000, 8)], false, 2)
            .unwrap();
        dq.publish(mem);
        while dev.pop_descriptor_chain(mem).is_some() {}
        // Out of order.
        dev.add_used(mem, h2, 72).unwrap();
        dev.add_used(mem, h1, 64).unwrap();
        let c = dq.reap(mem);
        assert_eq!(
            c,
            vec![
                Completion { token: 2, len: 72 },
                Completion { token: 1, len: 64 }
            ]
        );
        assert_eq!(dq.free_descriptors(), 8);
        assert_eq!(dq.in_flight(), 0);
        assert!(dq.take_anomalies().is_empty());
        // A device completing the same head again is caught, not trusted.
        dev.add_used(mem, h1, 64).unwrap();
        assert!(dq.reap(mem).is_empty());
        assert_eq!(
            dq.take_anomalies(),
            vec![Anomaly::StrayCompletion {
                queue: 0,
                id: u32::from(h1)
            }]
        );
    }

    #[test]
    fn in_order_takes_descriptors_in_ring_order_and_flags_early_completions() {
        let (ram, dq, mut dev) = setup(false);
        let mut dq = dq.in_order(true);
        assert!(dq.is_in_order());
        let mem = ram.memory();
        let h1 = dq.add(mem, &[Buf::wo(0x20000, 64)], false, 1).unwrap();
        let h2 = dq
            .add(mem, &[Buf::wo(0x21000, 64), Buf::wo(0x22000, 8)], false, 2)
            .unwrap();
        let h3 = dq.add(mem, &[Buf::wo(0x23000, 8)], true, 3).unwrap();
        assert_eq!((h1, h2, h3), (0, 1, 3), "ring order from descriptor 0");
        dq.publish(mem);
        while dev.pop_descriptor_chain(mem).is_some() {}
        dev.add_used(mem, h1, 64).unwrap();
        assert_eq!(dq.reap(mem), vec![Completion { token: 1, len: 64 }]);
        // Descriptor 0 goes to the back: the next chains take 4..7, then wrap to 0.
        let more: Vec<u16> = (0..5)
            .map(|t| dq.add(mem, &[Buf::wo(0x24000, 8)], false, 10 + t).unwrap())
            .collect();
        assert_eq!(more, vec![4, 5, 6, 7, 0]);
        dq.publish(mem);
        while dev.pop_descriptor_chain(mem).is_some() {}
        // Chain 3 before chain 1 (both in flight): an ordering fault, still completed once.
        dev.add_used(mem, h3, 8).unwrap();
        dev.add_used(mem, h2, 72).unwrap();
        assert_eq!(dq.reap(mem).len(), 2);
        assert_eq!(
            dq.take_anomalies(),
            vec![Anomaly::OutOfOrder {
                queue: 0,
                id: u32::from(h3),
                expected: h2
            }]
        );
        for &h in &more {
            dev.add_used(mem, h, 8).unwrap();
        }
        assert_eq!(dq.reap(mem).len(), 5);
        assert!(dq.take_anomalies().is_empty());
        assert_eq!((dq.free_descriptors(), dq.in_flight()), (8, 0));
    }

    #[test]
    fn used_index_running_away_is_an_anomaly() {
        let (ram, mut dq, _dev) = setup(false);
        let mem = ram.memory();
        mem.store(
            100u16,
            GuestAddress(dq.layout().used_idx_addr()),
            Ordering::Release,
        )
        .unwrap();
        assert!(dq.reap(mem).is_empty());
        assert!(matches!(
            dq.take_anomalies()[..],
            [Anomaly::UsedIdxJump { used_idx: 100, .. }]
        ));
    }

    #[test]
    fn kicks_honour_no_notify_and_avail_event() {
        // Without EVENT_IDX: VRING_USED_F_NO_NOTIFY suppresses the kick.
        let (ram, mut dq, mut dev) = setup(false);
        let mem = ram.memory();
        dq.add(mem, &[Buf::wo(0x20000, 8)], false, 1).unwrap();
        dq.publish(mem);
        assert!(dq.kick_if_needed(mem));
        dev.disable_notification(mem).unwrap();
        dq.add(mem, &[Buf::wo(0x20000, 8)], false, 2).unwrap();
        dq.publish(mem);
        assert!(!dq.kick_if_needed(mem));
        // With EVENT_IDX: kick only when avail idx passes avail_event.
        let (ram, mut dq, mut dev) = setup(true);
        let mem = ram.memory();
        dev.enable_notification(mem).unwrap(); // avail_event = 0
        dq.add(mem, &[Buf::wo(0x20000, 8)], false, 1).unwrap();
        dq.publish(mem);
        assert!(dq.kick_if_needed(mem), "0 -> 1 passes avail_event 0");
        dq.add(mem, &[Buf::wo(0x20000, 8)], false, 2).unwrap();
        dq.publish(mem);
        assert!(
            !dq.kick_if_needed(mem),
            "1 -> 2 does not pass avail_event 0"
        );
        assert_eq!((dq.kicks, dq.kicks_suppressed), (1, 1));
        let _ = dev.pop_descriptor_chain(mem);
        let _ = dev.pop_descriptor_chain(mem);
        dev.enable_notification(mem).unwrap(); // avail_event = 2
        dq.add(mem, &[Buf::wo(0x20000, 8)], false, 3).unwrap();
        dq.publish(mem);
        assert!(dq.kick_if_needed(mem), "2 -> 3 passes avail_event 2");
    }

    #[test]
    fn interrupt_suppression_is_visible_to_the_device() {
        let (ram, mut dq, mut dev) = setup(false);
        let mem = ram.memory();
        let h = dq.add(mem, &[Buf::wo(0x20000, 8)], false, 1).unwrap();
        dq.publish(mem);
        let _ = dev.pop_descriptor_chain(mem);
        dq.disable_interrupts(mem);
        let flags: u16 = mem
            .load(GuestAddress(dq.layout().avail), Ordering::Acquire)
            .unwrap();
        assert_eq!(flags, VRING_AVAIL_F_NO_INTERRUPT);
        dev.add_used(mem, h, 8).unwrap();
        // Completion arrived while interrupts were off: enabling reports it.
        assert!(dq.enable_interrupts(mem));
        assert_eq!(dq.reap(mem).len(), 1);
    }

    #[test]
    fn full_queue_and_bad_shapes_are_errors() {
        let (ram, mut dq, _dev) = setup(false);
        let mem = ram.memory();
        assert_eq!(
            dq.add(mem, &[], false, 0),
            Err(PostError::Shape("empty chain"))
        );
        let five = [Buf::wo(0x20000, 8); 5];
        assert!(matches!(
            dq.add(mem, &five, true, 0),
            Err(PostError::Shape(_))
        ));
        let nine = [Buf::wo(0x20000, 8); 9];
        assert_eq!(dq.add(mem, &nine, false, 0), Err(PostError::Full));
        assert_eq!(dq.free_descriptors(), 8);
    }
}
