//! The guest's split ring, seen from the device side: a strictly validated reader of the avail
//! ring and descriptor chains (indirect tables flattened), and the used-ring writer.
//!
//! virtio-queue's `Queue` is not used for reading chains: its iterator stops silently at a bad
//! descriptor, and the engine must instead break the queue with a typed error (a shadowed chain
//! cut short would hand the device a different request than the guest built).
//!
//! Validation rules (each has a malicious-guest test in `tests/malicious_guest.rs`):
//! * every ring part lies inside one guest memory region and is aligned as the spec requires;
//! * the avail index is never more than a queue size ahead of the last index read;
//! * heads and `next` indexes are inside their table (queue or indirect table);
//! * a chain is at most queue-size descriptors long (an indirect table: its entry count), which
//!   also catches loops;
//! * indirect descriptors only when negotiated, not nested, not combined with NEXT, with a
//!   length that is a non-zero multiple of 16 and a table inside one guest memory region;
//! * every buffer lies entirely inside guest memory.
//!
//! All ring fields shared with the guest are accessed with atomic loads/stores (little-endian).

use crate::error::QueueError;
use crate::ring::{
    vring_need_event, SplitLayout, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use std::cell::Cell;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};
use vm_memory::bitmap::{Bitmap, BitmapSlice, MS};
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice,
};

/// One buffer of a guest chain (after flattening).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Receives the validated buffers of a chain in order (see [`GuestRings::read_chain_with`]).
pub trait BufferSink {
    /// Take one buffer; an error stops the walk and is returned by `read_chain_with`.
    fn buffer(&mut self, b: GuestBuffer) -> Result<(), QueueError>;
}

impl<F: FnMut(GuestBuffer) -> Result<(), QueueError>> BufferSink for F {
    #[inline(always)]
    fn buffer(&mut self, b: GuestBuffer) -> Result<(), QueueError> {
        self(b)
    }
}

/// A split descriptor as laid out in memory (`le64 addr, le32 len, le16 flags, le16 next`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}
// SAFETY: plain-old-data, no padding (8 + 4 + 2 + 2 = 16 bytes), any bit pattern is valid.
unsafe impl ByteValued for Desc {}

/// Static description of a guest split ring (from SET_VRING_NUM / SET_VRING_ADDR / features).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestQueue {
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    event_idx: bool,
    indirect: bool,
}

impl GuestQueue {
    /// Describe a guest ring; checks the size (power of two) and the spec's alignments
    /// (descriptor table 16, avail ring 2, used ring 4).
    pub fn new(
        size: u16,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self, QueueError> {
        SplitLayout::new(size)?;
        for (what, addr, align) in [
            ("descriptor table", desc_table, 16),
            ("avail ring", avail_ring, 2),
            ("used ring", used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(QueueError::MisalignedRing { what, addr, align });
            }
        }
        Ok(GuestQueue {
            size,
            desc_table,
            avail_ring,
            used_ring,
            event_idx,
            indirect,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX is negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Guest-physical address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    /// Offset of used element `idx` (mod size) from the used ring start.
    pub fn used_elem_offset(&self, idx: u16) -> u64 {
        4 + 8 * u64::from(idx & (self.size - 1))
    }

    /// Offset of `avail_event` from the used ring start.
    pub fn avail_event_offset(&self) -> u64 {
        4 + 8 * u64::from(self.size)
    }

    /// Resolve the ring parts in `mem` for one batch of work. Fails if a part is not inside one
    /// guest memory region.
    pub fn map<'m, M: GuestMemoryBackend>(
        &self,
        mem: &'m M,
    ) -> Result<GuestRings<'m, M>, QueueError> {
        let part = |what: &'static str, addr: u64, len: usize, align: usize| {
            let slice = mem
                .get_slice(GuestAddress(addr), len)
                .map_err(|_| bad(addr, len as u64))?;
            Part::new(slice, what, addr, align)
        };
        Ok(GuestRings {
            q: *self,
            mem,
            desc: part(
                "descriptor table",
                self.desc_table,
                SplitLayout::desc_bytes(self.size),
                16,
            )?,
            avail: part(
                "avail ring",
                self.avail_ring,
                SplitLayout::avail_bytes(self.size, self.event_idx),
                2,
            )?,
            used: part(
                "used ring",
                self.used_ring,
                SplitLayout::used_bytes(self.size, self.event_idx),
                4,
            )?,
            region: Cell::new((1, 0)),
        })
    }
}

/// One ring part: its slice (kept for the bitmap and the pointer guard) and a raw pointer to
/// it, so that per-field accesses need no bounds checks: every offset used below is derived
/// from the queue size the part was sized for.
struct Part<'m, B> {
    slice: VolatileSlice<'m, B>,
    _guard: PtrGuardMut,
    ptr: *mut u8,
}

impl<'m, B: BitmapSlice> Part<'m, B> {
    fn new(
        slice: VolatileSlice<'m, B>,
        what: &'static str,
        addr: u64,
        align: usize,
    ) -> Result<Self, QueueError> {
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr();
        // The guest-physical alignment was checked; the host mapping could still be skewed
        // (a region starting at an odd guest address). Atomic accesses need host alignment.
        if !(ptr as usize).is_multiple_of(align) {
            return Err(QueueError::MisalignedRing {
                what,
                addr,
                align: align as u64,
            });
        }
        Ok(Part {
            slice,
            _guard: guard,
            ptr,
        })
    }

    #[inline(always)]
    fn at<T>(&self, off: usize) -> &T {
        debug_assert!(off + std::mem::size_of::<T>() <= self.slice.len());
        debug_assert!((self.ptr as usize + off).is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: callers pass offsets inside the part (derived from the queue size the slice
        // was sized for) and aligned for T (part alignment checked in `new`, field offsets are
        // multiples of the field size). The memory stays mapped for 'm (the slice's lifetime),
        // and is shared with the guest, so it is only accessed through atomics.
        unsafe { &*(self.ptr.add(off) as *const T) }
    }

    #[inline(always)]
    fn load16(&self, off: usize, o: Ordering) -> u16 {
        u16::from_le(self.at::<AtomicU16>(off).load(o))
    }

    #[inline(always)]
    fn store16(&self, off: usize, v: u16, o: Ordering) {
        self.at::<AtomicU16>(off).store(v.to_le(), o);
        self.slice.bitmap().mark_dirty(off, 2);
    }
}

/// The guest ring parts resolved in one memory snapshot, for one batch.
pub struct GuestRings<'m, M: GuestMemoryBackend> {
    q: GuestQueue,
    mem: &'m M,
    desc: Part<'m, MS<'m, M>>,
    avail: Part<'m, MS<'m, M>>,
    used: Part<'m, MS<'m, M>>,
    /// Last guest region a buffer fell into, `[start, end)`: most buffers of a batch hit the
    /// same region, so this saves a region lookup per descriptor.
    region: Cell<(u64, u64)>,
}

fn bad(addr: u64, len: u64) -> QueueError {
    QueueError::BadGuestAddress { addr, len }
}

impl<'m, M: GuestMemoryBackend> GuestRings<'m, M> {
    /// The ring description.
    pub fn queue(&self) -> &GuestQueue {
        &self.q
    }

    /// The guest's avail index (acquire: ring entries and descriptors it covers are visible).
    #[inline]
    pub fn avail_idx(&self) -> Result<u16, QueueError> {
        Ok(self.avail.load16(2, Ordering::Acquire))
    }

    /// The guest's avail flags.
    pub fn avail_flags(&self) -> Result<u16, QueueError> {
        Ok(self.avail.load16(0, Ordering::Relaxed))
    }

    /// The guest's `used_event` (only meaningful with EVENT_IDX).
    pub fn used_event(&self) -> Result<u16, QueueError> {
        if !self.q.event_idx {
            return Err(QueueError::InvalidConfig("used_event without EVENT_IDX"));
        }
        Ok(self
            .avail
            .load16(4 + 2 * self.q.size as usize, Ordering::Relaxed))
    }

    /// The head the guest put into avail slot `idx` (mod size); not yet validated.
    #[inline]
    pub fn avail_head(&self, idx: u16) -> Result<u16, QueueError> {
        let off = 4 + 2 * (idx & (self.q.size - 1)) as usize;
        Ok(self.avail.load16(off, Ordering::Relaxed))
    }

    /// The used index currently in guest memory.
    pub fn used_idx(&self) -> Result<u16, QueueError> {
        Ok(self.used.load16(2, Ordering::Acquire))
    }

    /// Descriptor `i < size` of the guest's descriptor table.
    #[inline(always)]
    fn table_desc(&self, i: u16) -> Desc {
        let off = 16 * i as usize;
        // Two 8-byte loads; the table is 16-byte aligned (checked in `map`).
        let a = u64::from_le(self.desc.at::<AtomicU64>(off).load(Ordering::Relaxed));
        let b = u64::from_le(self.desc.at::<AtomicU64>(off + 8).load(Ordering::Relaxed));
        Desc {
            addr: a,
            len: b as u32,
            flags: (b >> 32) as u16,
            next: (b >> 48) as u16,
        }
    }

    /// Descriptor `i` of an indirect table (any alignment).
    #[inline(always)]
    fn read_desc(table: &VolatileSlice<'m, MS<'m, M>>, i: u16) -> Option<Desc> {
        let off = 16 * i as usize;
        // Fast path: two aligned 8-byte loads. Indirect tables need not be 8-byte aligned in
        // host memory; fall back to a byte copy then.
        if let (Ok(a), Ok(b)) = (
            table.load::<u64>(off, Ordering::Relaxed),
            table.load::<u64>(off + 8, Ordering::Relaxed),
        ) {
            let b = u64::from_le(b);
            return Some(Desc {
                addr: u64::from_le(a),
                len: b as u32,
                flags: (b >> 32) as u16,
                next: (b >> 48) as u16,
            });
        }
        table.read_obj::<Desc>(off).ok().map(|d| Desc {
            addr: u64::from_le(d.addr),
            len: u32::from_le(d.len),
            flags: u16::from_le(d.flags),
            next: u16::from_le(d.next),
        })
    }

    /// Check `[addr, addr + len)` lies in guest memory (may span adjacent regions).
    #[inline]
    fn check_buffer(&self, addr: u64, len: u32) -> Result<(), QueueError> {
        let end = addr
            .checked_add(u64::from(len))
            .ok_or_else(|| bad(addr, u64::from(len)))?;
        if len == 0 {
            return Ok(());
        }
        let (s, e) = self.region.get();
        if addr >= s && end <= e {
            return Ok(());
        }
        if let Some(r) = self.mem.find_region(GuestAddress(addr)) {
            let rs = r.start_addr().raw_value();
            let re = rs + r.len();
            self.region.set((rs, re));
            if end <= re {
                return Ok(());
            }
        }
        if self.mem.check_range(GuestAddress(addr), len as usize) {
            Ok(())
        } else {
            Err(bad(addr, u64::from(len)))
        }
    }

    /// Read and validate the chain starting at `head`, flattening an indirect table, appending
    /// its buffers to `out` (cleared first). At most `max_descs` buffers are accepted (the shadow
    /// ring size): a longer flattened chain is [`QueueError::ChainExceedsShadow`].
    pub fn read_chain(
        &self,
        head: u16,
        out: &mut Vec<GuestBuffer>,
        max_descs: u16,
    ) -> Result<(), QueueError> {
        out.clear();
        self.read_chain_with(head, max_descs, &mut |b| {
            out.push(b);
            Ok(())
        })
        .map(|_| ())
    }

    /// As [`GuestRings::read_chain`], handing each validated buffer to `sink` in chain order
    /// (the engine translates and writes shadow descriptors in the same pass). An error from
    /// `sink` stops the walk and is returned. Returns the number of buffers.
    #[inline(always)]
    pub fn read_chain_with<F: BufferSink>(
        &self,
        head: u16,
        max_descs: u16,
        sink: &mut F,
    ) -> Result<u16, QueueError> {
        let size = self.q.size;
        if head >= size {
            return Err(QueueError::DescIndexOutOfRange { index: head, size });
        }
        let mut n: u16 = 0;
        let mut idx = head;
        // At most `size` descriptors: a longer walk has visited one twice (a loop).
        for _ in 0..size {
            let d = self.table_desc(idx);
            if d.flags & DESC_F_INDIRECT != 0 {
                self.read_indirect(d, max_descs, &mut n, sink)?;
                return Ok(n);
            }
            self.push(d, max_descs, &mut n, sink)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(n);
            }
            idx = d.next;
            if idx >= size {
                return Err(QueueError::DescIndexOutOfRange { index: idx, size });
            }
        }
        Err(QueueError::ChainTooLong {
            max: u32::from(size),
        })
    }

    #[inline(always)]
    fn push<F: BufferSink>(
        &self,
        d: Desc,
        max: u16,
        n: &mut u16,
        sink: &mut F,
    ) -> Result<(), QueueError> {
        self.check_buffer(d.addr, d.len)?;
        if *n >= max {
            return Err(QueueError::ChainExceedsShadow {
                len: u32::from(*n) + 1,
                size: max,
            });
        }
        *n += 1;
        sink.buffer(GuestBuffer {
            addr: d.addr,
            len: d.len,
            write: d.flags & DESC_F_WRITE != 0,
        })
    }

    fn read_indirect<F: BufferSink>(
        &self,
        d: Desc,
        max_descs: u16,
        n_out: &mut u16,
        sink: &mut F,
    ) -> Result<(), QueueError> {
        if !self.q.indirect {
            return Err(QueueError::BadIndirect(
                "indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC not negotiated",
            ));
        }
        if d.flags & DESC_F_NEXT != 0 {
            return Err(QueueError::BadIndirect("indirect descriptor with NEXT set"));
        }
        if d.len == 0 || !d.len.is_multiple_of(16) {
            return Err(QueueError::BadIndirect(
                "indirect table length not a non-zero multiple of 16",
            ));
        }
        let n = d.len / 16;
        if n > u32::from(u16::MAX) {
            return Err(QueueError::BadIndirect("indirect table too large"));
        }
        let n = n as u16;
        let table = self
            .mem
            .get_slice(GuestAddress(d.addr), d.len as usize)
            .map_err(|_| bad(d.addr, u64::from(d.len)))?;
        let mut j: u16 = 0;
        for _ in 0..n {
            let td =
                Self::read_desc(&table, j).ok_or_else(|| bad(d.addr + 16 * u64::from(j), 16))?;
            if td.flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::BadIndirect("nested indirect descriptor"));
            }
            self.push(td, max_descs, n_out, sink)?;
            if td.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            j = td.next;
            if j >= n {
                return Err(QueueError::DescIndexOutOfRange { index: j, size: n });
            }
        }
        Err(QueueError::ChainTooLong { max: u32::from(n) })
    }

    /// Write used element `idx` (mod size): chain `id`, `len` bytes written. Not visible to the
    /// guest until [`GuestRings::publish_used`].
    #[inline]
    pub fn write_used(&self, idx: u16, id: u16, len: u32) -> Result<(), QueueError> {
        let off = self.q.used_elem_offset(idx) as usize;
        // Relaxed: published by the release store of used.idx.
        self.used
            .at::<AtomicU32>(off)
            .store(u32::from(id).to_le(), Ordering::Relaxed);
        self.used
            .at::<AtomicU32>(off + 4)
            .store(len.to_le(), Ordering::Relaxed);
        self.used.slice.bitmap().mark_dirty(off, 8);
        Ok(())
    }

    /// Publish the used index (release: the elements written before are visible first).
    #[inline]
    pub fn publish_used(&self, idx: u16) -> Result<(), QueueError> {
        self.used.store16(2, idx, Ordering::Release);
        Ok(())
    }

    /// The used-ring flags currently in guest memory (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> Result<u16, QueueError> {
        Ok(self.used.load16(0, Ordering::Relaxed))
    }

    /// Write the used-ring flags (without EVENT_IDX they tell the guest whether to kick).
    pub fn set_used_flags(&self, flags: u16) -> Result<(), QueueError> {
        self.used.store16(0, flags, Ordering::Relaxed);
        Ok(())
    }

    /// The `avail_event` value currently in guest memory (EVENT_IDX).
    pub fn avail_event(&self) -> Result<u16, QueueError> {
        if !self.q.event_idx {
            return Err(QueueError::InvalidConfig("avail_event without EVENT_IDX"));
        }
        Ok(self
            .used
            .load16(self.q.avail_event_offset() as usize, Ordering::Relaxed))
    }

    /// Write `avail_event` (EVENT_IDX): the guest kicks once its avail index passes `idx`.
    pub fn set_avail_event(&self, idx: u16) -> Result<(), QueueError> {
        if !self.q.event_idx {
            return Err(QueueError::InvalidConfig("avail_event without EVENT_IDX"));
        }
        self.used
            .store16(self.q.avail_event_offset() as usize, idx, Ordering::Relaxed);
        Ok(())
    }

    /// After publishing used index `new` (previous decision at `old`): must the guest be
    /// interrupted? Honours `used_event` with EVENT_IDX, else `VRING_AVAIL_F_NO_INTERRUPT`.
    pub fn needs_interrupt(&self, old: u16, new: u16) -> Result<bool, QueueError> {
        // Our used.idx store must be visible before we read the guest's suppression state; pairs
        // with the guest's barrier between writing used_event/flags and re-reading used.idx.
        fence(Ordering::SeqCst);
        if self.q.event_idx {
            Ok(vring_need_event(self.used_event()?, new, old))
        } else {
            Ok(self.avail_flags()? & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put_desc(
        m: &GuestMemoryMmap<()>,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        fl: u16,
        nx: u16,
    ) {
        let d = Desc {
            addr: addr.to_le(),
            len: len.to_le(),
            flags: fl.to_le(),
            next: nx.to_le(),
        };
        m.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    #[test]
    fn reads_a_mixed_chain_and_an_unaligned_indirect_table() {
        let m = mem();
        let q = GuestQueue::new(8, 0x1000, 0x2000, 0x3000, true, true).unwrap();
        put_desc(&m, 0x1000, 2, 0x8000, 100, DESC_F_NEXT, 5);
        put_desc(&m, 0x1000, 5, 0x9000, 200, DESC_F_WRITE, 0);
        // An indirect table at an odd address (8-byte loads are not possible there).
        put_desc(&m, 0x1000, 0, 0x4003, 32, DESC_F_INDIRECT, 0);
        put_desc(&m, 0x4003, 0, 0xa000, 10, DESC_F_NEXT, 1);
        put_desc(&m, 0x4003, 1, 0xb000, 20, DESC_F_WRITE, 0);
        let r = q.map(&m).unwrap();
        let mut out = Vec::new();
        r.read_chain(2, &mut out, 8).unwrap();
        assert_eq!(
            out,
            vec![
                GuestBuffer {
                    addr: 0x8000,
                    len: 100,
                    write: false
                },
                GuestBuffer {
                    addr: 0x9000,
                    len: 200,
                    write: true
                }
            ]
        );
        r.read_chain(0, &mut out, 8).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].addr, 0xb000);
        assert!(out[1].write);
        // Too long for a shadow ring of 1.
        assert_eq!(
            r.read_chain(2, &mut out, 1),
            Err(QueueError::ChainExceedsShadow { len: 2, size: 1 })
        );
    }

    #[test]
    fn misaligned_or_unmapped_rings_are_rejected() {
        assert!(matches!(
            GuestQueue::new(8, 0x1008, 0x2000, 0x3000, false, false),
            Err(QueueError::MisalignedRing { .. })
        ));
        assert!(matches!(
            GuestQueue::new(8, 0x1000, 0x2001, 0x3000, false, false),
            Err(QueueError::MisalignedRing { .. })
        ));
        let q = GuestQueue::new(8, 0x1000, 0x2000, 0x10_0000 - 8, false, false).unwrap();
        assert!(matches!(
            q.map(&mem()),
            Err(QueueError::BadGuestAddress { .. })
        ));
    }

    #[test]
    fn used_writer_and_interrupt_decision() {
        let m = mem();
        let q = GuestQueue::new(4, 0x1000, 0x2000, 0x3000, true, false).unwrap();
        let r = q.map(&m).unwrap();
        r.write_used(5, 3, 77).unwrap(); // slot 1
        r.publish_used(6).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x3000 + 4 + 8)).unwrap(), 3);
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x3000 + 4 + 12)).unwrap(),
            77
        );
        assert_eq!(r.used_idx().unwrap(), 6);
        // used_event = 5: interrupt when used idx passes 5.
        m.write_obj(5u16, GuestAddress(0x2000 + 4 + 8)).unwrap();
        assert!(r.needs_interrupt(5, 6).unwrap());
        assert!(!r.needs_interrupt(6, 7).unwrap());
        r.set_avail_event(9).unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x3000 + 4 + 32)).unwrap(), 9);
        // Without event idx, the NO_INTERRUPT flag decides.
        let q = GuestQueue::new(4, 0x1000, 0x2000, 0x3000, false, false).unwrap();
        let r = q.map(&m).unwrap();
        assert!(r.needs_interrupt(0, 1).unwrap());
        m.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(0x2000))
            .unwrap();
        assert!(!r.needs_interrupt(0, 1).unwrap());
    }
}
