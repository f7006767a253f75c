//! Test harness: a simulated guest driver (driver side of the guest ring) and a simulated device
//! (device side of the shadow ring), both written independently of the engine's code, over
//! vm-memory guest memory.
//!
//! Memory: guest RAM is `[0, RAM_SIZE)` in two regions (so buffers may cross a region
//! boundary); the shadow ring lives in its own region at `SHADOW_GPA`, which only the device's
//! memory map contains (as with svqd, which adds the shadow region to the backend's table only).
#![allow(dead_code)]

pub mod sim;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use svq::ring::{vring_need_event, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use svq::{QueueConfig, RingArea, SplitLayout};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionCollection,
    GuestRegionMmap,
};

pub const RAM_SIZE: u64 = 8 << 20;
pub const RAM_SPLIT: u64 = 4 << 20;
pub const SHADOW_GPA: u64 = 1 << 40;
pub const SHADOW_BYTES: usize = 1 << 20;
/// Guest ring parts.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x9000;
/// The used ring deliberately straddles a page boundary, so the dirty-log check of used
/// elements is page exact.
pub const USED: u64 = 0xbf80;
/// Indirect tables: one 1 KiB slot per guest head.
pub const INDIRECT: u64 = 0x2_0000;
/// Data buffers: one 32 KiB slot per guest head, placed so that slot 95 crosses RAM_SPLIT
/// (buffers there may span both guest memory regions).
pub const DATA: u64 = 0x10_4000;
pub const DATA_SLOT: u64 = 0x8000;

pub type Mem = GuestMemoryMmap<()>;

/// Guest RAM as the VMM sees it, and the device's map (guest RAM + shadow region).
pub struct Memories {
    pub guest: Mem,
    pub device: Mem,
}

pub fn memories() -> Memories {
    let r0 =
        Arc::new(GuestRegionMmap::from_range(GuestAddress(0), RAM_SPLIT as usize, None).unwrap());
    let r1 = Arc::new(
        GuestRegionMmap::from_range(
            GuestAddress(RAM_SPLIT),
            (RAM_SIZE - RAM_SPLIT) as usize,
            None,
        )
        .unwrap(),
    );
    let sh = Arc::new(
        GuestRegionMmap::from_range(GuestAddress(SHADOW_GPA), SHADOW_BYTES, None).unwrap(),
    );
    Memories {
        guest: GuestRegionCollection::from_arc_regions(vec![r0.clone(), r1.clone()]).unwrap(),
        device: GuestRegionCollection::from_arc_regions(vec![r0, r1, sh]).unwrap(),
    }
}

/// A ring area at `SHADOW_GPA + off` in the device's memory.
pub fn shadow_area(m: &Memories, off: u64, size: u16) -> RingArea {
    let len = SplitLayout::new(size).unwrap().total_bytes();
    let p = m
        .device
        .get_host_address(GuestAddress(SHADOW_GPA + off))
        .unwrap();
    // SAFETY: inside the shadow region, which lives as long as `m` (tests keep it alive longer
    // than the engine).
    unsafe { RingArea::new(p, len, SHADOW_GPA + off).unwrap() }
}

pub fn config(guest_size: u16, shadow_size: u16, event_idx: bool, indirect: bool) -> QueueConfig {
    QueueConfig {
        guest_size,
        shadow_size,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        event_idx,
        indirect,
        in_order: false,
    }
}

/// One buffer as the driver posts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn put_desc(mem: &Mem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let a = GuestAddress(table + 16 * u64::from(i));
    mem.write_obj(addr.to_le(), a).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(a.0 + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(a.0 + 12))
        .unwrap();
    mem.write_obj(next.to_le(), GuestAddress(a.0 + 14)).unwrap();
}

fn ld16(mem: &Mem, a: u64) -> u16 {
    u16::from_le(mem.load(GuestAddress(a), Ordering::Acquire).unwrap())
}
fn st16(mem: &Mem, a: u64, v: u16) {
    mem.store(v.to_le(), GuestAddress(a), Ordering::Release)
        .unwrap();
}
fn ld32(mem: &Mem, a: u64) -> u32 {
    u32::from_le(mem.load(GuestAddress(a), Ordering::Relaxed).unwrap())
}
fn st32(mem: &Mem, a: u64, v: u32) {
    mem.store(v.to_le(), GuestAddress(a), Ordering::Relaxed)
        .unwrap();
}

/// The guest driver: posts chains into the guest ring, kicks with suppression, reaps used
/// elements on interrupts. With IN_ORDER ([`Driver::in_order`]) it takes descriptors in ring
/// order, accepts one used element per batch (as Linux's in-order driver does) and panics on a
/// completion out of avail order.
pub struct Driver {
    pub size: u16,
    pub event_idx: bool,
    pub in_order: bool,
    /// Free descriptors: a stack, or with IN_ORDER a queue in ring order (completions return
    /// the oldest chain's descriptors, which go to the back).
    free: VecDeque<u16>,
    /// IN_ORDER: outstanding heads in avail order.
    avail_order: VecDeque<u16>,
    /// head -> (descriptors taken from the table, buffers)
    pub outstanding: HashMap<u16, (Vec<u16>, Vec<Buf>)>,
    pub next_avail: u16,
    published: u16,
    pub last_used: u16,
}

impl Driver {
    /// A driver whose ring is at the layout of [`config`], starting at index `start`.
    pub fn new(mem: &Mem, size: u16, event_idx: bool, start: u16) -> Self {
        st16(mem, AVAIL, 0);
        st16(mem, AVAIL + 2, start);
        st16(mem, USED, 0);
        st16(mem, USED + 2, start);
        if event_idx {
            st16(mem, AVAIL + 4 + 2 * u64::from(size), start);
            st16(mem, USED + 4 + 8 * u64::from(size), start);
        }
        Driver {
            size,
            event_idx,
            in_order: false,
            free: (0..size).rev().collect(),
            avail_order: VecDeque::new(),
            outstanding: HashMap::new(),
            next_avail: start,
            published: start,
            last_used: start,
        }
    }

    /// Drive the ring with VIRTIO_F_IN_ORDER (before posting anything).
    pub fn in_order(mut self, on: bool) -> Self {
        assert!(self.outstanding.is_empty());
        self.in_order = on;
        if on {
            self.free = (0..self.size).collect();
        }
        self
    }

    fn take_desc(&mut self) -> Option<u16> {
        if self.in_order {
            self.free.pop_front()
        } else {
            self.free.pop_back()
        }
    }

    /// The head the next `post` will use.
    pub fn peek_head(&self) -> u16 {
        let h = if self.in_order {
            self.free.front()
        } else {
            self.free.back()
        };
        *h.expect("a free descriptor")
    }

    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// Post a chain (not yet visible). `indirect`: put the buffers in an indirect table (one
    /// ring descriptor). Returns the head, or None if the ring has no room.
    pub fn post(&mut self, mem: &Mem, bufs: &[Buf], indirect: bool) -> Option<u16> {
        let need = if indirect { 1 } else { bufs.len() };
        if need == 0 || self.free.len() < need {
            return None;
        }
        let descs: Vec<u16> = (0..need).map(|_| self.take_desc().unwrap()).collect();
        let head = descs[0];
        if indirect {
            let table = INDIRECT + 0x400 * u64::from(head);
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let fl =
                    if b.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                put_desc(
                    mem,
                    table,
                    i as u16,
                    b.addr,
                    b.len,
                    fl,
                    if last { 0 } else { i as u16 + 1 },
                );
            }
            put_desc(
                mem,
                DESC,
                head,
                table,
                16 * bufs.len() as u32,
                DESC_F_INDIRECT,
                0,
            );
        } else {
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let fl =
                    if b.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                put_desc(
                    mem,
                    DESC,
                    descs[i],
                    b.addr,
                    b.len,
                    fl,
                    if last { 0 } else { descs[i + 1] },
                );
            }
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.next_avail & (self.size - 1));
        st16(mem, slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.outstanding.insert(head, (descs, bufs.to_vec()));
        if self.in_order {
            self.avail_order.push_back(head);
        }
        Some(head)
    }

    /// Publish posted chains; returns whether the driver must kick.
    pub fn publish(&mut self, mem: &Mem) -> bool {
        let (old, new) = (self.published, self.next_avail);
        if old == new {
            return false;
        }
        st16(mem, AVAIL + 2, new);
        self.published = new;
        fence(Ordering::SeqCst);
        if self.event_idx {
            vring_need_event(ld16(mem, USED + 4 + 8 * u64::from(self.size)), new, old)
        } else {
            ld16(mem, USED) & 1 == 0
        }
    }

    /// Reap used elements (as on an interrupt), re-arming used_event and re-checking.
    pub fn reap(&mut self, mem: &Mem) -> Vec<(u16, u32, Vec<Buf>)> {
        let mut out = Vec::new();
        if !self.event_idx {
            // As Linux's virtqueue_disable_cb: no interrupts while reaping.
            st16(mem, AVAIL, 1);
        }
        loop {
            let idx = ld16(mem, USED + 2);
            while self.last_used != idx {
                let e = USED + 4 + 8 * u64::from(self.last_used & (self.size - 1));
                let id = ld32(mem, e);
                let len = ld32(mem, e + 4);
                let head = u16::try_from(id).expect("used id fits u16");
                if self.in_order {
                    self.reap_batch(head, len, idx, &mut out);
                    continue;
                }
                let (descs, bufs) = self
                    .outstanding
                    .remove(&head)
                    .unwrap_or_else(|| panic!("guest got head {head} that is not outstanding"));
                self.free.extend(descs);
                out.push((head, len, bufs));
                self.last_used = self.last_used.wrapping_add(1);
            }
            if self.event_idx {
                st16(mem, AVAIL + 4 + 2 * u64::from(self.size), self.last_used);
            } else {
                st16(mem, AVAIL, 0);
            }
            fence(Ordering::SeqCst);
            if ld16(mem, USED + 2) == self.last_used {
                return out;
            }
            if !self.event_idx {
                st16(mem, AVAIL, 1);
            }
        }
    }

    /// IN_ORDER: the element at `last_used` names the last chain of a batch that starts at the
    /// oldest outstanding chain; the others were used completely (their writable bytes).
    fn reap_batch(&mut self, id: u16, len: u32, idx: u16, out: &mut Vec<(u16, u32, Vec<Buf>)>) {
        let k = self
            .avail_order
            .iter()
            .position(|&h| h == id)
            .unwrap_or_else(|| panic!("in-order guest got head {id} that is not outstanding"))
            + 1;
        assert!(
            k <= usize::from(idx.wrapping_sub(self.last_used)),
            "in-order batch of {k} beyond the used index"
        );
        for n in 0..k {
            let head = self.avail_order.pop_front().unwrap();
            let (descs, bufs) = self.outstanding.remove(&head).unwrap();
            self.free.extend(descs);
            let len = if n + 1 == k {
                len
            } else {
                writable_bytes(&bufs)
            };
            out.push((head, len, bufs));
        }
        self.last_used = self.last_used.wrapping_add(k as u16);
    }

    /// Ask for no interrupts (without EVENT_IDX) or the opposite.
    pub fn set_no_interrupt(&self, mem: &Mem, on: bool) {
        st16(mem, AVAIL, u16::from(on));
    }
}

/// Device-writable bytes of a chain (what a chain used completely reports).
pub fn writable_bytes(bufs: &[Buf]) -> u32 {
    bufs.iter()
        .filter(|b| b.write)
        .fold(0u32, |n, b| n.saturating_add(b.len))
}

/// The device on the shadow ring: pops chains when kicked, completes them in any order with
/// any length (with IN_ORDER: in order, possibly one used element per batch), writes the bytes
/// it reports (a pattern), and calls with suppression.
pub struct Device {
    pub size: u16,
    pub event_idx: bool,
    desc: u64,
    avail: u64,
    used: u64,
    pub last_avail: u16,
    pub used_idx: u16,
    published_used: u16,
    /// Chains popped and not completed: (id, buffers as seen in shadow descriptors).
    pub popped: Vec<(u16, Vec<Buf>)>,
    /// Accept indirect descriptors (a device running the guest ring in passthrough).
    pub allow_indirect: bool,
    /// IN_ORDER ring written by a driver from descriptor 0: the descriptor the next chain must
    /// start at (checked, as is `next` = `x + 1` inside chains).
    pub ring_order: Option<u16>,
}

impl Device {
    pub fn new(addrs: (u64, u64, u64), size: u16, event_idx: bool, base: u16) -> Self {
        Self::with_used(addrs, size, event_idx, base, base)
    }

    /// A device taking over a ring at avail index `base` whose used index is `used`.
    pub fn with_used(
        addrs: (u64, u64, u64),
        size: u16,
        event_idx: bool,
        base: u16,
        used: u16,
    ) -> Self {
        Device {
            size,
            event_idx,
            desc: addrs.0,
            avail: addrs.1,
            used: addrs.2,
            last_avail: base,
            used_idx: used,
            published_used: used,
            popped: Vec::new(),
            allow_indirect: false,
            ring_order: None,
        }
    }

    /// Pop every available chain (as on a kick), re-arming avail_event with EVENT_IDX.
    pub fn pop_all(&mut self, mem: &Mem) -> usize {
        let mut n = 0;
        if !self.event_idx {
            // As vhost does: no kicks while we are popping; re-enable and re-check below.
            st16(mem, self.used, 1);
        }
        loop {
            let idx = ld16(mem, self.avail + 2);
            assert!(
                idx.wrapping_sub(self.last_avail) <= self.size,
                "shadow avail index ran more than a ring ahead"
            );
            while self.last_avail != idx {
                let head = ld16(
                    mem,
                    self.avail + 4 + 2 * u64::from(self.last_avail & (self.size - 1)),
                );
                let mut bufs = Vec::new();
                let mut i = head;
                if let Some(want) = self.ring_order {
                    assert_eq!(head, want, "IN_ORDER: chain does not start in ring order");
                }
                loop {
                    assert!(i < self.size);
                    let a = self.desc + 16 * u64::from(i);
                    let addr: u64 = mem.read_obj(GuestAddress(a)).unwrap();
                    let len = ld32(mem, a + 8);
                    let fl = ld16(mem, a + 12);
                    if fl & DESC_F_INDIRECT != 0 {
                        // Only a guest ring run in passthrough has these; shadow rings are flat.
                        assert!(self.allow_indirect, "shadow descriptors must be flat");
                        let table = u64::from_le(addr);
                        let mut j = 0u64;
                        loop {
                            let t = table + 16 * j;
                            let ta: u64 = mem.read_obj(GuestAddress(t)).unwrap();
                            let tf = ld16(mem, t + 12);
                            bufs.push(Buf {
                                addr: u64::from_le(ta),
                                len: ld32(mem, t + 8),
                                write: tf & DESC_F_WRITE != 0,
                            });
                            if tf & DESC_F_NEXT == 0 {
                                break;
                            }
                            j = u64::from(ld16(mem, t + 14));
                        }
                        break;
                    }
                    bufs.push(Buf {
                        addr: u64::from_le(addr),
                        len,
                        write: fl & DESC_F_WRITE != 0,
                    });
                    assert!(bufs.len() <= self.size as usize, "loop in shadow chain");
                    if fl & DESC_F_NEXT == 0 {
                        if let Some(next) = self.ring_order.as_mut() {
                            *next = (i + 1) & (self.size - 1);
                        }
                        break;
                    }
                    let prev = i;
                    i = ld16(mem, a + 14);
                    if self.ring_order.is_some() {
                        assert_eq!(
                            i,
                            (prev + 1) & (self.size - 1),
                            "IN_ORDER: next is not x + 1"
                        );
                    }
                }
                self.popped.push((head, bufs));
                self.last_avail = self.last_avail.wrapping_add(1);
                n += 1;
            }
            if self.event_idx {
                st16(
                    mem,
                    self.used + 4 + 8 * u64::from(self.size),
                    self.last_avail,
                );
            } else {
                st16(mem, self.used, 0);
            }
            fence(Ordering::SeqCst);
            if ld16(mem, self.avail + 2) == self.last_avail {
                return n;
            }
            if !self.event_idx {
                st16(mem, self.used, 1);
            }
        }
    }

    /// Complete popped chain number `k` (index into `popped`), writing `len` bytes of pattern
    /// into its writable buffers (clipped). Not published until [`Device::publish`].
    pub fn complete(&mut self, mem: &Mem, k: usize, len: u32) -> (u16, Vec<Buf>) {
        let (id, bufs) = self.popped.swap_remove(k);
        let mut rem = len;
        for b in bufs.iter().filter(|b| b.write) {
            let n = rem.min(b.len);
            if n > 0 {
                let data = vec![0xa5u8; n as usize];
                mem.write_slice(&data, GuestAddress(b.addr)).unwrap();
            }
            rem -= n;
        }
        let e = self.used + 4 + 8 * u64::from(self.used_idx & (self.size - 1));
        st32(mem, e, u32::from(id));
        st32(mem, e + 4, len);
        self.used_idx = self.used_idx.wrapping_add(1);
        (id, bufs)
    }

    /// IN_ORDER: complete the oldest `lens.len()` popped chains, in order, writing `lens[i]`
    /// bytes into chain `i`; with `batch`, one used element (the last chain's id and length)
    /// for all of them (the caller passes the writable size for the others: they must be used
    /// completely). Not published until [`Device::publish`].
    pub fn complete_in_order(
        &mut self,
        mem: &Mem,
        lens: &[u32],
        batch: bool,
    ) -> Vec<(u16, Vec<Buf>)> {
        let done: Vec<(u16, Vec<Buf>)> = self.popped.drain(..lens.len()).collect();
        for (k, ((id, bufs), &len)) in done.iter().zip(lens).enumerate() {
            let mut rem = len;
            for b in bufs.iter().filter(|b| b.write) {
                let n = rem.min(b.len);
                if n > 0 {
                    mem.write_slice(&vec![0x5au8; n as usize], GuestAddress(b.addr))
                        .unwrap();
                }
                rem -= n;
            }
            if batch && k + 1 < lens.len() {
                assert_eq!(
                    len,
                    writable_bytes(bufs),
                    "a skipped chain is used completely"
                );
                continue;
            }
            // A batch's element goes where its first chain's would have gone.
            let e = self.used + 4 + 8 * u64::from(self.used_idx & (self.size - 1));
            st32(mem, e, u32::from(*id));
            st32(mem, e + 4, len);
            self.used_idx = self
                .used_idx
                .wrapping_add(if batch { lens.len() as u16 } else { 1 });
        }
        done
    }

    /// Publish used elements; returns whether the device must call.
    pub fn publish(&mut self, mem: &Mem) -> bool {
        let (old, new) = (self.published_used, self.used_idx);
        if old == new {
            return false;
        }
        st16(mem, self.used + 2, new);
        self.published_used = new;
        fence(Ordering::SeqCst);
        if self.event_idx {
            vring_need_event(
                ld16(mem, self.avail + 4 + 2 * u64::from(self.size)),
                new,
                old,
            )
        } else {
            ld16(mem, self.avail) & 1 == 0
        }
    }

    /// Raw write of a used element (for malicious-device tests).
    pub fn raw_used(&mut self, mem: &Mem, id: u32, len: u32) {
        let e = self.used + 4 + 8 * u64::from(self.used_idx & (self.size - 1));
        st32(mem, e, id);
        st32(mem, e + 4, len);
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// Set the avail ring's NO_NOTIFY flag (without EVENT_IDX).
    pub fn set_no_notify(&self, mem: &Mem, on: bool) {
        st16(mem, self.used, u16::from(on));
    }
}

/// Pages touched by `[addr, addr + len)`.
pub fn pages(addr: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    if len == 0 {
        #[allow(clippy::reversed_empty_ranges)]
        return 1..=0;
    }
    (addr >> 12)..=((addr + len - 1) >> 12)
}

/// Guest buffer `i` of a chain for head `head`: inside the head's data slot.
pub fn buf_addr(head: u16, offset: u64) -> u64 {
    DATA + DATA_SLOT * u64::from(head) + offset
}
