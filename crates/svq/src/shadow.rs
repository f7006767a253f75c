//! The shadow virtqueue: one descriptor's journey through shadow mode, top to bottom.
//!
//! ```text
//!  guest avail ring ──forward_avail──▶ shadow desc table + avail ring ──kick──▶ device
//!   (validated chain,                  (translated addresses, in-flight
//!    indirect flattened)                slot: shadow head → guest head
//!                                       + device-writable guest ranges)
//!  device ──call──▶ shadow used ring ──forward_used──▶ guest used ring (len unchanged)
//!                                                     + dirty log: written bytes (len clipped to
//!                                                       the writable ranges) + used elements/idx
//! ```
//!
//! 1. [`ShadowVirtqueue::forward_avail`] (guest kick): read the guest avail index, and for every
//!    new head read and validate the chain ([`crate::guest`]), translate each buffer, write it into
//!    the shadow ring ([`crate::ring`]) and remember the writable ranges in the in-flight slot of
//!    the shadow head. One avail-index publish and one kick decision per batch. With EVENT_IDX,
//!    write the guest's `avail_event` and re-check the avail index so no kick is missed.
//!    Without it, clear a `VRING_USED_F_NO_NOTIFY` the previous device left in the guest's used
//!    flags (once, on the first call), or the guest would never kick.
//! 2. The device processes the chain and returns `(shadow head, len)` in the shadow used ring,
//!    in any order.
//! 3. [`ShadowVirtqueue::forward_used`] (device call): for every shadow used element, write
//!    `(guest head, len)` into the guest used ring, and mark in the dirty log the first `len`
//!    bytes of the chain's writable ranges. Then publish the guest used index once, mark the used
//!    elements and index, and decide once whether to interrupt the guest. With EVENT_IDX, re-arm
//!    the shadow `used_event` and re-check so no completion is missed.
//! 4. Switching back, a chain the stopped device never took (a receive buffer with no traffic)
//!    leaves the shadow ring with [`ShadowVirtqueue::reclaim_untaken`]: the guest avail index
//!    steps back over it, and the device finds it in the guest ring.
//!
//! With VIRTIO_F_IN_ORDER ([`QueueConfig::in_order`], negotiated on both rings) the guest
//! expects its chains back in the order it made them available. The engine keeps that order end
//! to end: chains enter the shadow ring in guest avail order (imported in-flight chains first,
//! oldest first), the shadow ring allocates descriptors in ring order and hands back the device's
//! completions one chain at a time in avail order (a device batch is split: see
//! [`crate::ring`]), and the guest gets one used element per chain, which is always valid for an
//! in-order driver (and the only form some read: DPDK's in-order receive path takes each
//! element's length). [`ShadowVirtqueue::export_state`] lists in-flight chains oldest first so
//! that an importer keeps the order too.
//!
//! A violation by the guest or the device breaks only this queue: the error is logged once
//! (`tracing::warn!`) and returned by every later call, which does no work.

use crate::error::QueueError;
use crate::guest::{BufferSink, GuestBuffer, GuestQueue, GuestRings};
use crate::log::{LogBatch, SharedLog};
use crate::ring::{RingArea, ShadowDesc, ShadowRing, SplitShadowRing, USED_F_NO_NOTIFY};
use crate::translate::Translate;
use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use vm_memory::GuestMemoryBackend;

/// Static configuration of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Guest queue size (SET_VRING_NUM), power of two.
    pub guest_size: u16,
    /// Shadow ring size, power of two; may differ from `guest_size`. A flattened chain longer
    /// than this breaks the queue, so with indirect descriptors pick at least `guest_size`.
    pub shadow_size: u16,
    /// Guest-physical address of the guest descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the guest avail ring.
    pub avail_ring: u64,
    /// Guest-physical address of the guest used ring.
    pub used_ring: u64,
    /// VIRTIO_RING_F_EVENT_IDX negotiated (the same on both rings).
    pub event_idx: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated (the guest may post indirect tables).
    pub indirect: bool,
    /// VIRTIO_F_IN_ORDER negotiated (the same on both rings): the shadow ring uses descriptors
    /// in ring order and accepts one used element per batch; the guest gets its chains back in
    /// avail order, one used element each.
    pub in_order: bool,
}

/// A guest chain forwarded to the device and not completed yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InFlightChain {
    /// Guest head index.
    pub head: u16,
    /// Device-writable guest ranges `(gpa, len)` of the chain, in chain order (empty for a
    /// chain imported but not forwarded yet).
    pub writable: Vec<(u64, u32)>,
}

/// What crosses a mode switch (passthrough ↔ shadow) or a GET_VRING_BASE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueState {
    /// Next guest avail index the engine will read (= the vring base of the guest ring).
    pub last_avail_idx: u16,
    /// Next guest used index the engine will write.
    pub used_idx: u16,
    /// Guest chains taken from the avail ring but not completed, oldest first (the order they
    /// were taken). On import, these chains are forwarded to the device again, in this order and
    /// before any new avail chain (with IN_ORDER the guest gets them back in this order): pass
    /// only chains that no device will complete otherwise.
    pub in_flight: Vec<InFlightChain>,
}

impl QueueState {
    /// State for taking over a guest ring that a device ran until now: `vring_base` from
    /// GET_VRING_BASE and the used index the device left in guest memory. The transport must
    /// have drained the device first (every popped chain completed: used idx == base), or the
    /// chains in between are lost.
    pub fn from_vring_base<M: GuestMemoryBackend>(
        mem: &M,
        cfg: &QueueConfig,
        vring_base: u16,
    ) -> Result<Self, QueueError> {
        let q = guest_queue(cfg)?;
        let used_idx = q.map(mem)?.used_idx()?;
        Ok(QueueState {
            last_avail_idx: vring_base,
            used_idx,
            in_flight: Vec::new(),
        })
    }
}

/// Result of one [`ShadowVirtqueue::forward_avail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AvailBatch {
    /// Guest chains forwarded.
    pub chains: u32,
    /// Shadow descriptors written.
    pub descriptors: u32,
    /// Bytes described by the forwarded chains (readable + writable).
    pub bytes: u64,
    /// The device must be kicked (it did not suppress notifications).
    pub kick_device: bool,
    /// Stopped because the shadow ring is full: call `forward_avail` again when
    /// [`UsedBatch::retry_avail`] says so.
    pub shadow_full: bool,
}

/// Result of one [`ShadowVirtqueue::forward_used`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsedBatch {
    /// Guest chains completed.
    pub completed: u32,
    /// Bytes the device wrote into guest buffers (reported lengths, clipped to the writable
    /// ranges).
    pub bytes_written: u64,
    /// Pages marked in the dirty log (buffer pages plus used-ring pages, counted per mark).
    pub pages_logged: u64,
    /// The guest must be interrupted.
    pub notify_guest: bool,
    /// A previous `forward_avail` stopped on a full shadow ring and descriptors were freed:
    /// call `forward_avail` now (the guest will not kick again for those chains).
    pub retry_avail: bool,
    /// Used entries whose length exceeded their chain's writable size (a buggy or hostile
    /// device): the guest gets the length as reported, the log covers only the chain.
    pub overlong: u32,
}

/// Writes each validated guest buffer of a chain straight into the shadow ring (translated)
/// and records the device-writable ranges.
struct ChainWriter<'a, T, R> {
    ring: &'a mut R,
    xlate: &'a T,
    writable: &'a mut Vec<(u64, u32)>,
    bytes: u64,
    /// False once the shadow ring ran out of descriptors (the chain is then not consumed).
    room: bool,
}

impl<T: Translate, R: ShadowRing> BufferSink for ChainWriter<'_, T, R> {
    #[inline(always)]
    fn buffer(&mut self, b: GuestBuffer) -> Result<(), QueueError> {
        let addr = self.xlate.to_device(b.addr, b.len)?;
        // Out of room: keep walking (the whole chain is validated either way).
        if self.room
            && self.ring.push_desc(ShadowDesc {
                addr,
                len: b.len,
                write: b.write,
            })
        {
            if b.write && b.len > 0 {
                self.writable.push((b.addr, b.len));
            }
            self.bytes += u64::from(b.len);
        } else {
            self.room = false;
        }
        Ok(())
    }
}

/// Per shadow head: which guest chain it carries and where the device may write.
#[derive(Debug, Default)]
struct Slot {
    /// The shadow head is in flight.
    live: bool,
    /// The guest chain came from the resubmit list (imported state), not the avail ring.
    resubmitted: bool,
    /// Forwarding order (exported state lists in-flight chains oldest first).
    seq: u64,
    guest_head: u16,
    writable: Vec<(u64, u32)>,
}

/// The shadow virtqueue engine for one queue. See the module docs for the data path.
///
/// `T` translates guest addresses for the device; `R` is the shadow ring format (split by
/// default).
pub struct ShadowVirtqueue<T: Translate, R: ShadowRing = SplitShadowRing> {
    cfg: QueueConfig,
    guest: GuestQueue,
    ring: R,
    xlate: T,
    /// Next guest avail index to read.
    last_avail: u16,
    /// Next guest used index to write.
    used_idx: u16,
    /// Used index at the last interrupt decision (`None`: no decision yet, notify).
    signalled_used: Option<u16>,
    /// Last value written to the guest's avail_event.
    avail_event: Option<u16>,
    /// Offset from the guest used ring of a notification field (avail_event, or the flags)
    /// written in this batch and not logged yet.
    notify_field_written: Option<u64>,
    /// Without EVENT_IDX: the guest's used flags were checked for a stale NO_NOTIFY.
    used_flags_checked: bool,
    slots: Vec<Slot>,
    /// Imported in-flight guest heads to forward before new avail chains.
    resubmit: VecDeque<u16>,
    /// Sequence number of the next chain forwarded.
    next_seq: u64,
    forwarding: bool,
    shadow_was_full: bool,
    /// The transport polls both rings: notifications are not re-armed after a batch
    /// ([`ShadowVirtqueue::suppress_notifications`]).
    suppressing: bool,
    broken: Option<QueueError>,
}

impl<T: Translate, R: ShadowRing> std::fmt::Debug for ShadowVirtqueue<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowVirtqueue")
            .field("cfg", &self.cfg)
            .field("last_avail", &self.last_avail)
            .field("used_idx", &self.used_idx)
            .field("in_flight", &self.ring.in_flight())
            .field("forwarding", &self.forwarding)
            .field("broken", &self.broken)
            .finish()
    }
}

fn guest_queue(cfg: &QueueConfig) -> Result<GuestQueue, QueueError> {
    GuestQueue::new(
        cfg.guest_size,
        cfg.desc_table,
        cfg.avail_ring,
        cfg.used_ring,
        cfg.event_idx,
        cfg.indirect,
    )
}

impl<T: Translate> ShadowVirtqueue<T, SplitShadowRing> {
    /// Build the engine with a split shadow ring in `ring`, starting at shadow index 0, from the
    /// guest-side state `start`. The shadow ring memory is initialised (avail.idx = used.idx = 0)
    /// before this returns: tell the device `SET_VRING_BASE` = [`ShadowVirtqueue::shadow_base`]
    /// and the addresses of [`ShadowVirtqueue::device_addrs`].
    pub fn new(
        cfg: QueueConfig,
        ring: RingArea,
        xlate: T,
        start: QueueState,
    ) -> Result<Self, QueueError> {
        Self::new_with_base(cfg, ring, xlate, start, 0)
    }

    /// As [`ShadowVirtqueue::new`], with the shadow ring starting at index `shadow_base` (the
    /// shadow ring has its own index space; any start works).
    pub fn new_with_base(
        cfg: QueueConfig,
        ring: RingArea,
        xlate: T,
        start: QueueState,
        shadow_base: u16,
    ) -> Result<Self, QueueError> {
        let r = if cfg.in_order {
            SplitShadowRing::new_in_order(ring, cfg.shadow_size, cfg.event_idx, shadow_base)?
        } else {
            SplitShadowRing::new(ring, cfg.shadow_size, cfg.event_idx, shadow_base)?
        };
        Self::with_ring(cfg, r, xlate, start)
    }
}

impl<T: Translate, R: ShadowRing> ShadowVirtqueue<T, R> {
    /// Build the engine over an already initialised shadow ring of any format (with
    /// [`QueueConfig::in_order`], one that keeps the IN_ORDER rules).
    pub fn with_ring(
        cfg: QueueConfig,
        ring: R,
        xlate: T,
        start: QueueState,
    ) -> Result<Self, QueueError> {
        let guest = guest_queue(&cfg)?;
        if ring.size() != cfg.shadow_size {
            return Err(QueueError::InvalidConfig(
                "shadow ring size differs from config",
            ));
        }
        if ring.in_flight() != 0 {
            return Err(QueueError::InvalidConfig("shadow ring is not empty"));
        }
        if start.in_flight.len() > usize::from(cfg.guest_size) {
            return Err(QueueError::InvalidConfig(
                "more in-flight chains than the guest queue size",
            ));
        }
        if let Some(c) = start.in_flight.iter().find(|c| c.head >= cfg.guest_size) {
            return Err(QueueError::DescIndexOutOfRange {
                index: c.head,
                size: cfg.guest_size,
            });
        }
        let slots = (0..cfg.shadow_size).map(|_| Slot::default()).collect();
        Ok(ShadowVirtqueue {
            cfg,
            guest,
            ring,
            xlate,
            last_avail: start.last_avail_idx,
            used_idx: start.used_idx,
            signalled_used: None,
            avail_event: None,
            notify_field_written: None,
            used_flags_checked: false,
            slots,
            resubmit: start.in_flight.iter().map(|c| c.head).collect(),
            next_seq: 0,
            forwarding: true,
            shadow_was_full: false,
            suppressing: false,
            broken: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// The shadow ring (for transports and simulated devices that need its memory).
    pub fn ring(&self) -> &R {
        &self.ring
    }

    /// The translation in use.
    pub fn translation(&self) -> &T {
        &self.xlate
    }

    /// The shadow ring, mutably (tests and ring wrappers; do not add or consume chains behind
    /// the engine's back).
    pub fn ring_mut(&mut self) -> &mut R {
        &mut self.ring
    }

    /// The shadow ring's start index: what SET_VRING_BASE must tell the device (its avail.idx
    /// and used.idx were set to it in ring memory by the constructor).
    pub fn shadow_base(&self) -> u16 {
        self.ring.base()
    }

    /// Device addresses of the shadow ring: (descriptor table, avail/driver ring, used/device
    /// ring), for SET_VRING_ADDR.
    pub fn device_addrs(&self) -> (u64, u64, u64) {
        self.ring.device_addrs()
    }

    /// Guest chains forwarded to the device and not completed.
    pub fn in_flight(&self) -> usize {
        usize::from(self.ring.in_flight())
    }

    /// Guest chains not yet forwarded (available in the guest ring, plus imported ones waiting
    /// to be resubmitted).
    pub fn pending_guest<M: GuestMemoryBackend>(&self, mem: &M) -> Result<u16, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let idx = self.guest.map(mem)?.avail_idx()?;
        Ok(idx
            .wrapping_sub(self.last_avail)
            .wrapping_add(self.resubmit.len() as u16))
    }

    /// Turn forwarding of new guest chains on or off. Off: `forward_avail` does nothing (used
    /// entries still flow back), which is how a transport drains the shadow ring before
    /// handing the guest ring back to the device. After turning it back on, call
    /// `forward_avail` once: guest kicks that arrived meanwhile were not acted on.
    pub fn set_forwarding(&mut self, on: bool) {
        self.forwarding = on;
    }

    /// Whether forwarding is on.
    pub fn forwarding(&self) -> bool {
        self.forwarding
    }

    /// Guest-side state: what the device must resume from after a switch back to passthrough
    /// (SET_VRING_BASE = `last_avail_idx` once `in_flight` is empty). In-flight chains are
    /// listed oldest first: the ones in the shadow ring in forwarding order, then the imported
    /// ones not forwarded yet (every chain in the shadow ring was forwarded before them: the
    /// resubmit list drains first, and chains taken back return to its front).
    pub fn export_state(&self) -> QueueState {
        let mut live: Vec<&Slot> = self.slots.iter().filter(|s| s.live).collect();
        live.sort_unstable_by_key(|s| s.seq);
        let in_flight = live
            .into_iter()
            .map(|s| InFlightChain {
                head: s.guest_head,
                writable: s.writable.clone(),
            })
            .chain(self.resubmit.iter().map(|&head| InFlightChain {
                head,
                writable: Vec::new(),
            }))
            .collect();
        QueueState {
            last_avail_idx: self.last_avail,
            used_idx: self.used_idx,
            in_flight,
        }
    }

    /// Give the guest ring back the chains a stopped device never took, so that a device
    /// restarted on the guest ring at [`QueueState::last_avail_idx`] finds them there (chains
    /// that came from an imported state cannot go back there: they return to the resubmit list
    /// and stay in [`QueueState::in_flight`]).
    ///
    /// `device_avail_idx` is the shadow ring's vring base as the stopped device reports it
    /// (GET_VRING_BASE): the chains published from that position on were never taken. They are
    /// removed from the shadow ring and from the in-flight set, and the engine's guest avail index
    /// steps back over them (chains that came from an imported state go back to the resubmit
    /// list). Chains the device did take stay in flight: complete them with
    /// [`ShadowVirtqueue::forward_used`] before handing the guest ring over. This is what lets a
    /// receive queue with buffers posted and no traffic switch back without waiting for packets.
    ///
    /// With EVENT_IDX the guest's `avail_event` is set to the new guest avail index (and logged
    /// in `log`): the value the engine wrote last may lie beyond it, and a device that never
    /// writes the field (a polling one, like DPDK) would leave it there looking like its
    /// position.
    ///
    /// Call only with forwarding off and the device stopped. Returns the number of chains taken
    /// back; on a base outside what was published nothing changes.
    pub fn reclaim_untaken<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        log: &SharedLog,
        device_avail_idx: u16,
    ) -> Result<u16, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let g = match self.guest.map(mem) {
            Ok(g) => g,
            Err(e) => return Err(self.fail(e)),
        };
        let ids = self.ring.take_back(device_avail_idx)?;
        // Newest first: the last chain forwarded is the last one read from the guest ring, and
        // resubmitted chains were all forwarded before any avail-ring chain.
        for &id in ids.iter().rev() {
            let slot = &mut self.slots[usize::from(id)];
            slot.live = false;
            if slot.resubmitted {
                self.resubmit.push_front(slot.guest_head);
            } else {
                self.last_avail = self.last_avail.wrapping_sub(1);
            }
        }
        self.avail_event = None;
        if self.cfg.event_idx {
            let res = g.avail_event().and_then(|ev| {
                if ev != self.last_avail {
                    g.set_avail_event(self.last_avail)?;
                    log.mark(self.guest.used_ring() + self.guest.avail_event_offset(), 2);
                }
                Ok(())
            });
            if let Err(e) = res {
                return Err(self.fail(e));
            }
        }
        Ok(ids.len() as u16)
    }

    /// Guest kick: move every available guest chain into the shadow ring.
    ///
    /// Stops cleanly when the shadow ring is full ([`AvailBatch::shadow_full`]; resume when
    /// [`UsedBatch::retry_avail`] says so). Publishes the shadow avail index once and decides once
    /// whether to kick the device. `log` receives the guest `avail_event` write (EVENT_IDX), or
    /// the guest used-flags write that clears a stale `VRING_USED_F_NO_NOTIFY` (without it).
    pub fn forward_avail<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        log: &SharedLog,
    ) -> Result<AvailBatch, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let mut batch = AvailBatch::default();
        if !self.forwarding {
            return Ok(batch);
        }
        let g = match self.guest.map(mem) {
            Ok(g) => g,
            Err(e) => return Err(self.fail(e)),
        };
        let res = self.avail_loop(&g, &mut batch);
        // Chains written before an error are valid: publish them either way, so the device and
        // the guest agree on what was forwarded.
        if batch.chains > 0 {
            batch.kick_device = self.ring.publish();
        }
        if let Some(off) = self.notify_field_written.take() {
            // Log after the write: the VMM must see the bit only once the new value is there.
            log.mark(self.guest.used_ring() + off, 2);
        }
        if let Err(e) = res {
            return Err(self.fail(e));
        }
        Ok(batch)
    }

    /// Forward chains until the guest ring is empty (with EVENT_IDX: empty after re-arming
    /// avail_event) or the shadow ring is full.
    fn avail_loop<M: GuestMemoryBackend>(
        &mut self,
        g: &GuestRings<'_, M>,
        batch: &mut AvailBatch,
    ) -> Result<(), QueueError> {
        if !self.cfg.event_idx && !self.used_flags_checked {
            // The device that ran this ring before the switch may have left NO_NOTIFY set (it
            // was stopped while draining the ring with kicks off): the guest would never kick
            // us. Clear it once; only the engine writes the flags from now on.
            let flags = g.used_flags()?;
            if flags & USED_F_NO_NOTIFY != 0 {
                g.set_used_flags(flags & !USED_F_NO_NOTIFY)?;
                self.notify_field_written = Some(0);
            }
            self.used_flags_checked = true;
            // The flags store before the avail index load below; pairs with the guest's
            // barrier between its avail index store and its flags load.
            fence(Ordering::SeqCst);
        }
        while let Some(&head) = self.resubmit.front() {
            if !self.forward_chain(g, head, true, batch)? {
                return Ok(());
            }
            self.resubmit.pop_front();
        }
        loop {
            let avail = g.avail_idx()?;
            let pending = avail.wrapping_sub(self.last_avail);
            if pending > self.cfg.guest_size {
                return Err(QueueError::AvailIndexJump {
                    last: self.last_avail,
                    new: avail,
                    size: self.cfg.guest_size,
                });
            }
            while self.last_avail != avail {
                let head = g.avail_head(self.last_avail)?;
                if !self.forward_chain(g, head, false, batch)? {
                    return Ok(());
                }
                self.last_avail = self.last_avail.wrapping_add(1);
            }
            if !self.cfg.event_idx || self.suppressing || self.avail_event == Some(self.last_avail)
            {
                return Ok(());
            }
            // Ask the guest to kick when it adds entry `last_avail`, then re-check: a chain
            // added between our avail.idx read and the avail_event store would otherwise sit
            // unforwarded with no kick coming.
            // Only write (and log) when the value in guest memory changes.
            if g.avail_event()? != self.last_avail {
                g.set_avail_event(self.last_avail)?;
                self.notify_field_written = Some(self.guest.avail_event_offset());
            }
            self.avail_event = Some(self.last_avail);
            fence(Ordering::SeqCst);
        }
    }

    /// Read, validate and forward one guest chain. Returns false (nothing consumed) when the
    /// shadow ring has no room for it.
    #[inline(always)]
    fn forward_chain<M: GuestMemoryBackend>(
        &mut self,
        g: &GuestRings<'_, M>,
        head: u16,
        resubmitted: bool,
        batch: &mut AvailBatch,
    ) -> Result<bool, QueueError> {
        if self.ring.num_free() == 0 {
            batch.shadow_full = true;
            self.shadow_was_full = true;
            return Ok(false);
        }
        // One pass over the guest chain: validate, translate, write the shadow descriptors in
        // place and record the device-writable guest ranges in the slot of the future id.
        let id = self.ring.begin_chain();
        let slot = &mut self.slots[usize::from(id)];
        slot.writable.clear();
        let mut sink = ChainWriter {
            ring: &mut self.ring,
            xlate: &self.xlate,
            writable: &mut slot.writable,
            bytes: 0,
            room: true,
        };
        let res = g.read_chain_with(head, self.cfg.shadow_size, &mut sink);
        let (room, bytes) = (sink.room, sink.bytes);
        let n = match res {
            Ok(n) if room => n,
            Ok(_) => {
                // Not consumed: read again once the device returned descriptors.
                self.ring.abort_chain();
                batch.shadow_full = true;
                self.shadow_was_full = true;
                return Ok(false);
            }
            Err(e) => {
                self.ring.abort_chain();
                return Err(e);
            }
        };
        self.ring.commit_chain();
        slot.live = true;
        slot.resubmitted = resubmitted;
        slot.seq = self.next_seq;
        self.next_seq += 1;
        slot.guest_head = head;
        batch.chains += 1;
        batch.descriptors += u32::from(n);
        batch.bytes += bytes;
        Ok(true)
    }

    /// Device call: move every shadow used element to the guest used ring (lengths unchanged,
    /// any completion order), mark the written guest bytes and the used-ring writes in `log`,
    /// publish the guest used index once and decide once whether to interrupt the guest.
    pub fn forward_used<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        log: &SharedLog,
    ) -> Result<UsedBatch, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let g = match self.guest.map(mem) {
            Ok(g) => g,
            Err(e) => return Err(self.fail(e)),
        };
        let lb = log.batch();
        let mut batch = UsedBatch::default();
        let old = self.used_idx;
        let res = self.used_loop(&g, &lb, &mut batch);
        if batch.completed > 0 {
            let fin = self.finish_used(&g, &lb, old, &mut batch);
            if res.is_ok() {
                if let Err(e) = fin {
                    return Err(self.fail(e));
                }
            }
            if self.shadow_was_full {
                self.shadow_was_full = false;
                batch.retry_avail = self.forwarding;
            }
        }
        if let Err(e) = res {
            return Err(self.fail(e));
        }
        Ok(batch)
    }

    fn used_loop<M: GuestMemoryBackend>(
        &mut self,
        g: &GuestRings<'_, M>,
        lb: &LogBatch<'_>,
        batch: &mut UsedBatch,
    ) -> Result<(), QueueError> {
        let log = lb.log();
        let (mut completed, mut pages, mut bytes, mut overlong) = (0u32, 0u64, 0u64, 0u32);
        let mut used_idx = self.used_idx;
        let mut res = Ok(());
        'batch: loop {
            loop {
                let e = match self.ring.next_used() {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    Err(err) => {
                        res = Err(err);
                        break 'batch;
                    }
                };
                // The split ring validates ids; a ring implementation that does not must
                // still break only the queue.
                let Some(slot) = self.slots.get_mut(usize::from(e.id)).filter(|s| s.live) else {
                    res = Err(QueueError::BogusUsedId {
                        id: u32::from(e.id),
                    });
                    break 'batch;
                };
                slot.live = false;
                if let Err(err) = g.write_used(used_idx, slot.guest_head, e.len) {
                    res = Err(err);
                    break 'batch;
                }
                used_idx = used_idx.wrapping_add(1);
                completed += 1;
                // Log exactly the bytes the device reports having written: the first `len`
                // bytes of the writable ranges, in chain order.
                let mut rem = e.len;
                for &(addr, len) in &slot.writable {
                    if rem == 0 {
                        break;
                    }
                    let n = rem.min(len);
                    if let Some(log) = log {
                        pages += log.mark(addr, u64::from(n));
                    }
                    bytes += u64::from(n);
                    rem -= n;
                }
                if rem > 0 {
                    overlong += 1;
                }
            }
            // Re-arm the device's call (used_event) and re-check, else a completion landing
            // between our last read and the re-arm would never be signalled.
            if self.suppressing || !self.ring.enable_used_notify() {
                break;
            }
        }
        self.used_idx = used_idx;
        batch.completed += completed;
        batch.pages_logged += pages;
        batch.bytes_written += bytes;
        if overlong > 0 && batch.overlong == 0 {
            tracing::warn!(
                entries = overlong,
                "device reported used lengths beyond the chains' writable size; logged only the chains"
            );
        }
        batch.overlong += overlong;
        res
    }

    /// Publish the guest used index, log the used-ring writes, decide the interrupt.
    fn finish_used<M: GuestMemoryBackend>(
        &mut self,
        g: &GuestRings<'_, M>,
        lb: &LogBatch<'_>,
        old: u16,
        batch: &mut UsedBatch,
    ) -> Result<(), QueueError> {
        let new = self.used_idx;
        g.publish_used(new)?;
        // The used elements old..new (at most two runs when they wrap) and the idx field.
        let base = self.guest.used_ring();
        let size = self.cfg.guest_size;
        // `n` can exceed the ring size only if the guest posted a head twice: then every
        // element was written.
        let n = new.wrapping_sub(old).min(size);
        let first = old & (size - 1);
        let run1 = n.min(size - first);
        batch.pages_logged += lb.mark(
            base + self.guest.used_elem_offset(first),
            8 * u64::from(run1),
        );
        if n > run1 {
            batch.pages_logged += lb.mark(base + 4, 8 * u64::from(n - run1));
        }
        batch.pages_logged += lb.mark(base + 2, 2);
        let wanted = g.needs_interrupt(self.signalled_used.unwrap_or(old), new)?;
        // With EVENT_IDX, before our first decision we cannot know which used_event the guest
        // armed against the previous device: interrupt once (spurious interrupts are harmless,
        // a missing one hangs the guest). Without it, the flag alone is authoritative.
        batch.notify_guest = wanted || (self.cfg.event_idx && self.signalled_used.is_none());
        self.signalled_used = Some(new);
        Ok(())
    }

    /// A transport about to poll both rings: ask the guest not to kick and the device not to
    /// call until [`ShadowVirtqueue::arm_notifications`]. Without EVENT_IDX this sets
    /// `VRING_USED_F_NO_NOTIFY` in the guest used flags (logged in `log`) and
    /// `VRING_AVAIL_F_NO_INTERRUPT` in the shadow avail flags; with EVENT_IDX the guest's
    /// `avail_event` and the shadow `used_event` are simply not re-armed after each batch, so each
    /// side notifies at most once until the transport re-arms. Interrupts to the guest are
    /// decided as before.
    pub fn suppress_notifications<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        log: &SharedLog,
    ) -> Result<(), QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.suppressing {
            return Ok(());
        }
        self.suppressing = true;
        self.ring.suppress_used_notify();
        if !self.cfg.event_idx {
            let res = self.guest.map(mem).and_then(|g| {
                let flags = g.used_flags()?;
                if flags & USED_F_NO_NOTIFY == 0 {
                    g.set_used_flags(flags | USED_F_NO_NOTIFY)?;
                    log.mark(self.guest.used_ring(), 2);
                }
                Ok(())
            });
            if let Err(e) = res {
                return Err(self.fail(e));
            }
            // From now on only the engine writes the flags (no stale NO_NOTIFY to clear).
            self.used_flags_checked = true;
        }
        Ok(())
    }

    /// Before the transport sleeps: ask the guest to kick on its next chain and the device to
    /// call on its next completion, then re-check both rings (after a full fence, pairing with
    /// the other sides' fences between their index stores and their suppression loads). Returns
    /// whether work arrived meanwhile: guest chains to forward (forwarding on and room in the
    /// shadow ring) or device completions. Then the transport must call `forward_used` /
    /// `forward_avail` before sleeping, or those buffers would wait for a notification that was
    /// already skipped.
    pub fn arm_notifications<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        log: &SharedLog,
    ) -> Result<bool, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        self.suppressing = false;
        let res = self.guest.map(mem).and_then(|g| {
            if self.cfg.event_idx {
                if g.avail_event()? != self.last_avail {
                    g.set_avail_event(self.last_avail)?;
                    log.mark(self.guest.used_ring() + self.guest.avail_event_offset(), 2);
                }
                self.avail_event = Some(self.last_avail);
            } else {
                let flags = g.used_flags()?;
                if flags & USED_F_NO_NOTIFY != 0 {
                    g.set_used_flags(flags & !USED_F_NO_NOTIFY)?;
                    log.mark(self.guest.used_ring(), 2);
                }
                self.used_flags_checked = true;
            }
            // Our avail_event / flags store before the avail index load below.
            fence(Ordering::SeqCst);
            Ok(self.forwarding
                && !self.shadow_was_full
                && (g.avail_idx()? != self.last_avail || !self.resubmit.is_empty()))
        });
        let guest_pending = match res {
            Ok(p) => p,
            Err(e) => return Err(self.fail(e)),
        };
        let used_pending = self.ring.enable_used_notify();
        Ok(guest_pending || used_pending)
    }

    /// Whether notifications are suppressed ([`ShadowVirtqueue::suppress_notifications`]).
    pub fn suppressing(&self) -> bool {
        self.suppressing
    }

    /// The error that broke the queue, if any.
    pub fn broken(&self) -> Option<&QueueError> {
        self.broken.as_ref()
    }

    /// Record the first error (logged once) and return it.
    fn fail(&mut self, e: QueueError) -> QueueError {
        if self.broken.is_none() {
            tracing::warn!(error = %e, "virtqueue broken");
            self.broken = Some(e.clone());
        }
        e
    }
}
