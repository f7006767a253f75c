//! The shadow ring: the driver side of a virtqueue in memory the engine owns.
//!
//! [`ShadowRing`] is the seam between the engine and the ring format: the engine hands it
//! flattened chains and gets used elements back. [`SplitShadowRing`] implements it for the split
//! layout; a packed shadow ring would be a second implementation, and the transports (which only
//! see [`crate::ShadowVirtqueue`], [`RingArea`] and device addresses) would not change.
//!
//! Concurrency: the device reads the descriptor table and avail ring and writes the used ring
//! while we run. Fields the device reads are written before the avail index is published with a
//! release store; used elements are read after an acquire load of the used index. The free list
//! lives in private memory (never read back from the shared table), so a device scribbling over
//! the descriptor table cannot corrupt our bookkeeping.
//!
//! With `VIRTIO_F_IN_ORDER` (virtio 1.x, "In-order use of descriptors") the ring changes in two
//! ways. Descriptors are used in ring order: a chain starts at the descriptor after the previous
//! chain's last one, `next` is `x + 1` (0 after the last table entry), so a device may find the
//! next head without reading the avail ring. And the device completes chains in the order they
//! were made available, and may write ONE used element for a batch: at the used position of the
//! batch's first chain, with the id of its last chain, the used index advanced by the batch size.
//! The skipped chains were used completely; [`ShadowRing::next_used`] still returns one element
//! per chain (a skipped chain's length is its device-writable byte count), so the engine and the
//! guest see one completion per chain either way.

use crate::error::QueueError;
use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

/// `VIRTQ_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const DESC_F_INDIRECT: u16 = 4;
/// `VRING_USED_F_NO_NOTIFY`: the device asks the driver not to kick.
pub const USED_F_NO_NOTIFY: u16 = 1;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks the device not to interrupt.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest split queue size the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// `vring_need_event`: whether moving an index from `old` to `new` crossed `event` (the other
/// side asked to be notified once index `event + 1` is reached). Wrapping u16 arithmetic.
#[inline(always)]
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Byte layout of a split virtqueue of a given size (virtio 1.x, event-idx fields included).
///
/// The descriptor table and the avail ring are placed back to back at the alignments the spec
/// requires (16 and 2); the used ring starts on its own 4 KiB page, so the device's used-ring
/// writes never share a cache line with our avail ring, and a device behind an IOMMU (vhost-vdpa's
/// IOTLB maps whole pages) can be given the driver part read-only and the device part read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitLayout {
    size: u16,
    avail: usize,
    used: usize,
    total: usize,
}

impl SplitLayout {
    /// Alignment of the area start the layout needs.
    pub const ALIGN: usize = 64;
    /// Alignment of the used ring's offset (a page: see the type's docs).
    pub const USED_ALIGN: usize = 4096;

    /// Layout for `size` entries (a power of two, 1..=32768).
    pub fn new(size: u16) -> Result<Self, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(QueueError::InvalidConfig(
                "queue size must be a power of two in 1..=32768",
            ));
        }
        let avail = Self::desc_bytes(size);
        let used = (avail + Self::avail_bytes(size, true)).next_multiple_of(Self::USED_ALIGN);
        let total = used + Self::used_bytes(size, true);
        Ok(SplitLayout {
            size,
            avail,
            used,
            total,
        })
    }

    /// Bytes of a descriptor table of `size` entries.
    pub fn desc_bytes(size: u16) -> usize {
        16 * size as usize
    }

    /// Bytes of an avail ring (flags, idx, ring, and `used_event` when `event_idx`).
    pub fn avail_bytes(size: u16, event_idx: bool) -> usize {
        4 + 2 * size as usize + if event_idx { 2 } else { 0 }
    }

    /// Bytes of a used ring (flags, idx, ring, and `avail_event` when `event_idx`).
    pub fn used_bytes(size: u16, event_idx: bool) -> usize {
        4 + 8 * size as usize + if event_idx { 2 } else { 0 }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Offset of the descriptor table (0).
    pub fn desc_offset(&self) -> usize {
        0
    }

    /// Offset of the avail ring.
    pub fn avail_offset(&self) -> usize {
        self.avail
    }

    /// Offset of the used ring.
    pub fn used_offset(&self) -> usize {
        self.used
    }

    /// Bytes the whole ring needs.
    pub fn total_bytes(&self) -> usize {
        self.total
    }

    /// Bytes rounded up to whole 4 KiB pages (what to allocate for an mmap'd area).
    pub fn total_pages_bytes(&self) -> usize {
        self.total.next_multiple_of(4096)
    }

    /// Device address of the descriptor table for an area at device address `base`.
    pub fn desc_addr(&self, base: u64) -> u64 {
        base
    }

    /// Device address of the avail (driver) ring.
    pub fn avail_addr(&self, base: u64) -> u64 {
        base + self.avail as u64
    }

    /// Device address of the used (device) ring.
    pub fn used_addr(&self, base: u64) -> u64 {
        base + self.used as u64
    }
}

/// Memory the engine owns for a shadow ring: a host mapping plus the address the device uses
/// for its start (vhost-user: an address inside a region added with ADD_MEM_REG / SET_MEM_TABLE;
/// vDPA: an IOVA).
pub struct RingArea {
    ptr: NonNull<u8>,
    len: usize,
    device_addr: u64,
    /// Keeps the mapping alive (an `Arc<MmapRegion>`, an owned heap buffer, ...).
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: the area is plain shared memory accessed with volatile/atomic operations only; the
// owner (if any) is itself Send + Sync.
unsafe impl Send for RingArea {}

impl std::fmt::Debug for RingArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingArea")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("device_addr", &format_args!("{:#x}", self.device_addr))
            .finish()
    }
}

/// Page-aligned zeroed heap memory (for [`RingArea::new_owned`]).
struct OwnedPages {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}
// SAFETY: exclusively owned heap memory.
unsafe impl Send for OwnedPages {}
// SAFETY: the buffer is only accessed through the RingArea with volatile/atomic operations.
unsafe impl Sync for OwnedPages {}
impl Drop for OwnedPages {
    fn drop(&mut self) {
        // SAFETY: allocated in `RingArea::new_owned` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl RingArea {
    /// An area over `len` bytes at `ptr` that the device sees at `device_addr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must stay mapped and writable for the lifetime of the area and of any
    /// [`crate::ShadowVirtqueue`] built on it, and nothing but the engine and the device may write
    /// it while the engine runs.
    pub unsafe fn new(ptr: *mut u8, len: usize, device_addr: u64) -> Result<Self, QueueError> {
        let ptr = NonNull::new(ptr).ok_or(QueueError::InvalidConfig("null ring area"))?;
        Ok(RingArea {
            ptr,
            len,
            device_addr,
            _owner: None,
        })
    }

    /// An area at `offset` inside an mmap'd region (a memfd shared with the device), kept alive
    /// by the `Arc`.
    pub fn from_mmap_region<B: vm_memory::bitmap::Bitmap + Send + Sync + 'static>(
        region: Arc<vm_memory::MmapRegion<B>>,
        offset: usize,
        device_addr: u64,
    ) -> Result<Self, QueueError> {
        if offset > region.size() {
            return Err(QueueError::InvalidConfig("ring offset beyond region"));
        }
        // SAFETY: offset <= size, inside the mapping; the Arc keeps the mapping alive.
        let ptr = unsafe { region.as_ptr().add(offset) };
        let len = region.size() - offset;
        // SAFETY: see above; the region is alive as long as `_owner`.
        let mut area = unsafe { Self::new(ptr, len, device_addr)? };
        area._owner = Some(region);
        Ok(area)
    }

    /// A zeroed, page-aligned heap area of `len` bytes (tests, in-process simulations where the
    /// simulated device reads the ring through [`RingArea::as_ptr`]).
    ///
    /// # Panics
    ///
    /// If `len` rounded up to a page exceeds `isize::MAX` (no allocation can hold it); aborts
    /// if the allocation fails, as `Vec` does.
    pub fn new_owned(len: usize, device_addr: u64) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
            .expect("ring area layout is valid");
        // SAFETY: non-zero size layout.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        RingArea {
            ptr,
            len,
            device_addr,
            _owner: Some(Arc::new(OwnedPages { ptr, layout })),
        }
    }

    /// Host address of the area.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the area is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address the device uses for the start of the area.
    pub fn device_addr(&self) -> u64 {
        self.device_addr
    }
}

/// One device-visible buffer of a flattened chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowDesc {
    /// Device address (already translated).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A used element returned by the device: chain id (the head the ring returned from
/// [`ShadowRing::add_chain`]) and the length the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Chain id.
    pub id: u16,
    /// Bytes written by the device, as reported.
    pub len: u32,
}

/// The driver side of a shadow ring, independent of the ring format.
pub trait ShadowRing: Send {
    /// Ring size (maximum number of descriptors in flight).
    fn size(&self) -> u16;
    /// Free descriptors.
    fn num_free(&self) -> u16;
    /// Chains added and not yet returned by the device.
    fn in_flight(&self) -> u16;
    /// Start building a chain in place (no intermediate buffer on the data path). Returns the
    /// id the chain will have if committed. Requires `num_free() > 0`. Nothing is visible and
    /// no descriptor is taken until [`ShadowRing::commit_chain`].
    fn begin_chain(&mut self) -> u16;
    /// Append a descriptor to the chain being built; false (nothing written) if the ring has
    /// no free descriptor left for it: the caller must then [`ShadowRing::abort_chain`].
    fn push_desc(&mut self, d: ShadowDesc) -> bool;
    /// Finish the chain being built (at least one descriptor): it becomes part of the next
    /// [`ShadowRing::publish`]. Returns its id.
    fn commit_chain(&mut self) -> u16;
    /// Drop the chain being built; the ring is as before `begin_chain`.
    fn abort_chain(&mut self);
    /// Write a whole chain (1..=num_free descriptors); invisible to the device until
    /// [`ShadowRing::publish`]. Returns the chain id the device will return.
    fn add_chain(&mut self, descs: &[ShadowDesc]) -> Result<u16, QueueError> {
        if descs.is_empty() || descs.len() > usize::from(self.num_free()) {
            return Err(QueueError::ChainExceedsShadow {
                len: descs.len() as u32,
                size: self.num_free(),
            });
        }
        self.begin_chain();
        for d in descs {
            let ok = self.push_desc(*d);
            debug_assert!(ok, "room was checked");
        }
        Ok(self.commit_chain())
    }
    /// Take back the chains a stopped device never took: those at avail positions from
    /// `device_avail_idx` (its vring base, from GET_VRING_BASE) to the last one added. Their
    /// descriptors are free again and the avail index is rewound to `device_avail_idx`. Returns
    /// their ids in avail order. Nothing changes on error. The device must be stopped.
    fn take_back(&mut self, device_avail_idx: u16) -> Result<Vec<u16>, QueueError>;
    /// Make every added chain visible to the device (one index publish). Returns whether the
    /// device asked to be kicked (NO_NOTIFY / avail_event honoured).
    fn publish(&mut self) -> bool;
    /// Next used element (one per chain, also when an IN_ORDER device wrote one element for a
    /// batch), its descriptors already back on the free list. Validates the element (id in
    /// flight, index not jumping; with IN_ORDER: the batch it ends lies inside the published
    /// used index).
    fn next_used(&mut self) -> Result<Option<UsedElem>, QueueError>;
    /// Ask the device to notify on its next used element; returns true if elements arrived in
    /// the meantime (the caller must process them, or it would wait for a call that never comes).
    fn enable_used_notify(&mut self) -> bool;
    /// Ask the device not to notify on used elements for now (the transport polls the used
    /// ring); [`ShadowRing::enable_used_notify`] asks again. Without EVENT_IDX this sets
    /// `VRING_AVAIL_F_NO_INTERRUPT`; with it, not re-arming `used_event` is enough (the device
    /// notifies at most once more), so the default does nothing.
    fn suppress_used_notify(&mut self) {}
    /// Device addresses of (descriptor area, driver area, device area).
    fn device_addrs(&self) -> (u64, u64, u64);
    /// The index the ring started at (what `SET_VRING_BASE` must tell the device).
    fn base(&self) -> u16;
    /// Avail index published so far (wrapping, in the ring's own index space).
    fn avail_idx(&self) -> u16;
    /// Used index consumed so far.
    fn used_idx(&self) -> u16;
}

/// Bytes of a split descriptor: `le64 addr, le32 len, le16 flags, le16 next`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split shadow ring in a [`RingArea`].
///
/// `repr(C)` and the field order are deliberate: the counters one completion or one new chain
/// updates (`num_free`, `in_flight`, `last_used` / `next_avail`, `free_head`) are kept apart by
/// fields that path does not write. Adjacent, the compiler merges their updates into one wide
/// load and a narrower store, and the next chain's wide load then waits for that store to
/// commit (a store-forwarding stall per chain, 37 % of `forward_used`'s samples in a profile).
#[repr(C)]
pub struct SplitShadowRing {
    area: RingArea,
    layout: SplitLayout,
    /// Private links: free list for free descriptors, chain links for used ones. With IN_ORDER
    /// always `i + 1` (wrapping): `free_head` is the next descriptor in ring order.
    next: Vec<u16>,
    /// Per chain head: number of descriptors (0: not a head in flight).
    chain_len: Vec<u16>,
    /// Per chain head: device-writable bytes (saturating): the length of a chain an IN_ORDER
    /// device completed inside a batch without writing its used element.
    writable_len: Vec<u32>,
    /// Per chain head: the avail position it was published at (IN_ORDER: its used position).
    head_pos: Vec<u16>,
    /// Per avail position (mod size): the head published there. A private copy: the device
    /// could scribble over the shared avail ring.
    pos_head: Vec<u16>,
    /// IN_ORDER: the length of the element the device wrote for the batch being returned.
    batch_len: u32,
    /// Chain under construction: its device-writable bytes.
    b_writable: u32,
    num_free: u16,
    size: u16,
    in_flight: u16,
    base: u16,
    /// Next used index to consume.
    last_used: u16,
    /// Device used index as last loaded (avoid a load per element).
    seen_used: u16,
    /// Next avail index to write into the avail ring.
    next_avail: u16,
    /// Avail index as last published to the device.
    avail_idx: u16,
    free_head: u16,
    /// Chain under construction: descriptors pushed, the last one.
    b_n: u16,
    b_cur: u16,
    /// IN_ORDER: chains of the batch being returned still to go (the last one carries
    /// `batch_len`).
    batch_left: u16,
    event_idx: bool,
    /// VIRTIO_F_IN_ORDER: descriptors allocated in ring order, completions in avail order
    /// (possibly one used element per batch).
    in_order: bool,
    /// Chain under construction: its WRITE flag.
    b_write: bool,
    /// `VRING_AVAIL_F_NO_INTERRUPT` is set in the avail flags (without EVENT_IDX, while the
    /// transport polls).
    no_interrupt: bool,
}

impl std::fmt::Debug for SplitShadowRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitShadowRing")
            .field("size", &self.size)
            .field("in_order", &self.in_order)
            .field("base", &self.base)
            .field("avail_idx", &self.next_avail)
            .field("last_used", &self.last_used)
            .field("in_flight", &self.in_flight)
            .field("num_free", &self.num_free)
            .finish()
    }
}

impl SplitShadowRing {
    /// Lay out and initialise a ring of `size` in `area`, starting at index `base`: the area is
    /// zeroed, avail.idx = used.idx = used_event = avail_event = base. The device must be told `base` with
    /// `SET_VRING_BASE` (vhost reads used.idx from memory when the ring starts, so it must already
    /// be there). Chains never complete in any particular order (no VIRTIO_F_IN_ORDER; see
    /// [`SplitShadowRing::new_in_order`]).
    pub fn new(area: RingArea, size: u16, event_idx: bool, base: u16) -> Result<Self, QueueError> {
        Self::build(area, size, event_idx, false, base)
    }

    /// As [`SplitShadowRing::new`], for a device that negotiated VIRTIO_F_IN_ORDER: descriptors
    /// are used in ring order from table offset 0, and the device completes chains in order,
    /// possibly with one used element per batch.
    pub fn new_in_order(
        area: RingArea,
        size: u16,
        event_idx: bool,
        base: u16,
    ) -> Result<Self, QueueError> {
        Self::build(area, size, event_idx, true, base)
    }

    fn build(
        area: RingArea,
        size: u16,
        event_idx: bool,
        in_order: bool,
        base: u16,
    ) -> Result<Self, QueueError> {
        let layout = SplitLayout::new(size)?;
        if area.len() < layout.total_bytes() {
            return Err(QueueError::InvalidConfig(
                "ring area too small for shadow ring",
            ));
        }
        if !(area.as_ptr() as usize).is_multiple_of(SplitLayout::ALIGN) {
            return Err(QueueError::InvalidConfig("ring area not 64-byte aligned"));
        }
        if area
            .device_addr()
            .checked_add(layout.total_bytes() as u64)
            .is_none()
        {
            return Err(QueueError::InvalidConfig("ring device address wraps"));
        }
        // SAFETY: the area is valid for `total_bytes` (checked) and not yet given to the device.
        unsafe { std::ptr::write_bytes(area.as_ptr(), 0, layout.total_bytes()) };
        let mut next: Vec<u16> = (1..=size).collect();
        next[size as usize - 1] = 0;
        let r = SplitShadowRing {
            area,
            layout,
            size,
            event_idx,
            in_order,
            base,
            next,
            chain_len: vec![0; size as usize],
            writable_len: vec![0; size as usize],
            head_pos: vec![0; size as usize],
            pos_head: vec![0; size as usize],
            batch_left: 0,
            batch_len: 0,
            free_head: 0,
            num_free: size,
            in_flight: 0,
            next_avail: base,
            avail_idx: base,
            last_used: base,
            seen_used: base,
            b_n: 0,
            b_cur: 0,
            b_write: false,
            no_interrupt: false,
            b_writable: 0,
        };
        r.avail_idx_ref().store(base.to_le(), Ordering::Relaxed);
        r.used_idx_ref().store(base.to_le(), Ordering::Relaxed);
        r.used_event_ref().store(base.to_le(), Ordering::Relaxed);
        // Until the device writes its own avail_event, ask for a kick on the first chain.
        r.avail_event_ref().store(base.to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(r)
    }

    /// The area the ring lives in.
    pub fn area(&self) -> &RingArea {
        &self.area
    }

    /// The ring's layout.
    pub fn layout(&self) -> &SplitLayout {
        &self.layout
    }

    #[inline(always)]
    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.layout.total_bytes());
        // SAFETY: every caller passes an offset inside the layout, which fits the area.
        unsafe { self.area.as_ptr().add(off) }
    }

    #[inline(always)]
    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: in-bounds (see `at`), 2-byte aligned (layout offsets are even, area 64-aligned),
        // shared memory only accessed atomically for these fields.
        unsafe { &*(self.at(off) as *const AtomicU16) }
    }

    fn avail_flags_ref(&self) -> &AtomicU16 {
        self.u16_at(self.layout.avail)
    }
    fn avail_idx_ref(&self) -> &AtomicU16 {
        self.u16_at(self.layout.avail + 2)
    }
    fn used_event_ref(&self) -> &AtomicU16 {
        self.u16_at(self.layout.avail + 4 + 2 * self.size as usize)
    }
    fn used_flags_ref(&self) -> &AtomicU16 {
        self.u16_at(self.layout.used)
    }
    fn used_idx_ref(&self) -> &AtomicU16 {
        self.u16_at(self.layout.used + 2)
    }
    fn avail_event_ref(&self) -> &AtomicU16 {
        self.u16_at(self.layout.used + 4 + 8 * self.size as usize)
    }

    /// Whether the ring runs with VIRTIO_F_IN_ORDER.
    pub fn in_order(&self) -> bool {
        self.in_order
    }

    /// Put the descriptors of chain `head` (in flight) back on the free list. With IN_ORDER the
    /// chain is the oldest in flight (completions) or among the newest (take-back, which moves
    /// `free_head` itself): its descriptors rejoin the free run without relinking.
    #[inline(always)]
    fn free_chain(&mut self, head: u16) {
        let n = std::mem::take(&mut self.chain_len[usize::from(head)]);
        if self.in_order {
            self.num_free += n;
            return;
        }
        let mut last = head;
        for _ in 1..n {
            last = self.next[usize::from(last)];
        }
        self.next[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += n;
    }

    /// Load the device's used index if everything seen so far was consumed; false when no
    /// element is pending.
    #[inline(always)]
    fn used_pending(&mut self) -> Result<bool, QueueError> {
        if self.last_used == self.seen_used {
            let idx = u16::from_le(self.used_idx_ref().load(Ordering::Acquire));
            if idx.wrapping_sub(self.last_used) > self.in_flight {
                return Err(QueueError::UsedIndexJump {
                    last: self.last_used,
                    new: idx,
                });
            }
            self.seen_used = idx;
        }
        Ok(self.last_used != self.seen_used)
    }

    /// The used element at `last_used` (id, len), its id checked to name a chain in flight.
    /// Only after `used.idx` was loaded with acquire and found beyond `last_used`.
    #[inline]
    fn used_elem_at_last_used(&self) -> Result<(u32, u32), QueueError> {
        let off = self.layout.used + 4 + 8 * (self.last_used & (self.size - 1)) as usize;
        // SAFETY: in-bounds, 4-byte aligned used element, published by the caller's acquire
        // load of used.idx.
        let (id, len) = unsafe {
            let p = self.at(off) as *const u32;
            (
                u32::from_le(p.read_volatile()),
                u32::from_le(p.add(1).read_volatile()),
            )
        };
        if id >= u32::from(self.size) || self.chain_len[id as usize] == 0 {
            return Err(QueueError::BogusUsedId { id });
        }
        Ok((id, len))
    }

    /// [`ShadowRing::next_used`] with IN_ORDER: read the element at the oldest chain's used
    /// position; it names the last chain of a batch, and the chains are returned one by one in
    /// avail order from the private avail copy.
    #[inline]
    fn next_used_in_order(&mut self) -> Result<Option<UsedElem>, QueueError> {
        if self.batch_left == 0 {
            if !self.used_pending()? {
                return Ok(None);
            }
            let (id, len) = self.used_elem_at_last_used()?;
            // In flight, so published at a position in last_used..next_avail: the batch covers
            // every chain from the oldest up to it, and the device must have published them all.
            let batch = self.head_pos[id as usize]
                .wrapping_sub(self.last_used)
                .wrapping_add(1);
            let mut published = self.seen_used.wrapping_sub(self.last_used);
            if batch > published {
                // The cached index may be older than the element (a second publish since).
                self.seen_used = self.last_used;
                self.used_pending()?;
                published = self.seen_used.wrapping_sub(self.last_used);
            }
            if batch > published {
                return Err(QueueError::InOrderBatchBeyondUsed {
                    id: id as u16,
                    batch,
                    published,
                });
            }
            self.batch_left = batch;
            self.batch_len = len;
        }
        let head = self.pos_head[usize::from(self.last_used & (self.size - 1))];
        self.batch_left -= 1;
        let len = if self.batch_left == 0 {
            self.batch_len
        } else {
            self.writable_len[usize::from(head)]
        };
        self.free_chain(head);
        self.in_flight -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedElem { id: head, len }))
    }

    #[inline(always)]
    fn write_desc(&self, i: u16, d: RawDesc) {
        let p = self.at(16 * i as usize) as *mut u64;
        // Two 8-byte stores (little-endian layout: addr, then len | flags << 32 | next << 48).
        let hi = u64::from(u32::from_le(d.len))
            | u64::from(u16::from_le(d.flags)) << 32
            | u64::from(u16::from_le(d.next)) << 48;
        // SAFETY: i < size, so the 16 bytes are inside the descriptor table, 16-byte aligned.
        // The device does not read a descriptor before it is published.
        unsafe {
            p.write_volatile(d.addr);
            p.add(1).write_volatile(hi.to_le());
        }
    }
}

impl ShadowRing for SplitShadowRing {
    fn size(&self) -> u16 {
        self.size
    }

    fn num_free(&self) -> u16 {
        self.num_free
    }

    fn in_flight(&self) -> u16 {
        self.in_flight
    }

    #[inline]
    fn begin_chain(&mut self) -> u16 {
        debug_assert!(self.num_free > 0);
        self.b_n = 0;
        self.b_cur = self.free_head;
        self.b_writable = 0;
        self.free_head
    }

    #[inline(always)]
    fn push_desc(&mut self, d: ShadowDesc) -> bool {
        if self.b_n == self.num_free {
            return false;
        }
        if self.b_n > 0 {
            self.b_cur = self.next[usize::from(self.b_cur)];
        }
        let i = self.b_cur;
        // Written with NEXT pointing at the following free descriptor; the last one is fixed
        // up in `commit_chain`. Free descriptors are never read by the device, so a chain
        // that is aborted leaves nothing visible.
        self.write_desc(
            i,
            RawDesc {
                addr: d.addr.to_le(),
                len: d.len.to_le(),
                flags: (if d.write { DESC_F_WRITE } else { 0 } | DESC_F_NEXT).to_le(),
                next: self.next[usize::from(i)].to_le(),
            },
        );
        self.b_write = d.write;
        if d.write {
            self.b_writable = self.b_writable.saturating_add(d.len);
        }
        self.b_n += 1;
        true
    }

    #[inline]
    fn commit_chain(&mut self) -> u16 {
        debug_assert!(self.b_n > 0);
        let head = self.free_head;
        let last = self.b_cur;
        // Clear NEXT on the last descriptor (flags and next: one 4-byte store).
        let tail = u32::from(if self.b_write { DESC_F_WRITE } else { 0 });
        // SAFETY: last < size: offset 12 of a descriptor inside the table, 4-byte aligned.
        unsafe { (self.at(16 * usize::from(last) + 12) as *mut u32).write_volatile(tail.to_le()) };
        self.free_head = self.next[usize::from(last)];
        self.num_free -= self.b_n;
        self.chain_len[usize::from(head)] = self.b_n;
        self.writable_len[usize::from(head)] = self.b_writable;
        self.head_pos[usize::from(head)] = self.next_avail;
        self.pos_head[usize::from(self.next_avail & (self.size - 1))] = head;
        self.in_flight += 1;
        let slot = self.layout.avail + 4 + 2 * usize::from(self.next_avail & (self.size - 1));
        // Relaxed: published by the release store of avail.idx in `publish`.
        self.u16_at(slot).store(head.to_le(), Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.b_n = 0;
        head
    }

    #[inline]
    fn abort_chain(&mut self) {
        self.b_n = 0;
    }

    fn take_back(&mut self, device_avail_idx: u16) -> Result<Vec<u16>, QueueError> {
        let n = self.next_avail.wrapping_sub(device_avail_idx);
        // Everything not yet completed is either taken (before the base) or not (after it); the
        // rest of a batch being returned was taken too.
        if n > self.in_flight - self.batch_left {
            return Err(QueueError::BogusVringBase {
                base: device_avail_idx,
                used: self.next_avail.wrapping_sub(self.in_flight),
                avail: self.next_avail,
            });
        }
        // Read and check every id first: the avail ring is shared memory, and an error must
        // leave the ring as it was.
        let mut ids = Vec::with_capacity(usize::from(n));
        let mut seen = vec![false; usize::from(self.size)];
        for k in 0..n {
            let pos = device_avail_idx.wrapping_add(k);
            let slot = self.layout.avail + 4 + 2 * usize::from(pos & (self.size - 1));
            let id = u16::from_le(self.u16_at(slot).load(Ordering::Relaxed));
            if id >= self.size
                || self.chain_len[usize::from(id)] == 0
                || std::mem::replace(&mut seen[usize::from(id)], true)
                || self.pos_head[usize::from(pos & (self.size - 1))] != id
            {
                return Err(QueueError::InvalidConfig(
                    "shadow avail ring was overwritten while the device held it",
                ));
            }
            ids.push(id);
        }
        for &id in &ids {
            self.free_chain(id);
        }
        if let (true, Some(&oldest)) = (self.in_order, ids.first()) {
            // The newest chains went back: ring-order allocation resumes at the oldest of them.
            self.free_head = oldest;
        }
        self.in_flight -= n;
        self.next_avail = device_avail_idx;
        self.avail_idx = device_avail_idx;
        self.avail_idx_ref()
            .store(device_avail_idx.to_le(), Ordering::Release);
        Ok(ids)
    }

    fn publish(&mut self) -> bool {
        let old = self.avail_idx;
        let new = self.next_avail;
        if old == new {
            return false;
        }
        self.avail_idx_ref().store(new.to_le(), Ordering::Release);
        self.avail_idx = new;
        // The index store must be visible before we read the device's suppression state,
        // or both sides may decide not to notify (the device re-checks avail after its store).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let ev = u16::from_le(self.avail_event_ref().load(Ordering::Relaxed));
            vring_need_event(ev, new, old)
        } else {
            u16::from_le(self.used_flags_ref().load(Ordering::Relaxed)) & USED_F_NO_NOTIFY == 0
        }
    }

    #[inline]
    fn next_used(&mut self) -> Result<Option<UsedElem>, QueueError> {
        if self.in_order {
            return self.next_used_in_order();
        }
        if !self.used_pending()? {
            return Ok(None);
        }
        let (id, len) = self.used_elem_at_last_used()?;
        let head = id as u16;
        self.free_chain(head);
        self.in_flight -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedElem { id: head, len }))
    }

    fn suppress_used_notify(&mut self) {
        if !self.event_idx && !self.no_interrupt {
            self.avail_flags_ref()
                .store(AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
            self.no_interrupt = true;
        }
    }

    fn enable_used_notify(&mut self) -> bool {
        if self.batch_left > 0 {
            // Chains of a batch already read are waiting to be returned.
            return true;
        }
        if self.event_idx {
            self.used_event_ref()
                .store(self.last_used.to_le(), Ordering::Relaxed);
        } else if self.no_interrupt {
            self.avail_flags_ref().store(0, Ordering::Relaxed);
            self.no_interrupt = false;
        }
        // Our used_event store must be visible before we re-read used.idx; pairs with the
        // device's fence between its used.idx store and its used_event load.
        fence(Ordering::SeqCst);
        u16::from_le(self.used_idx_ref().load(Ordering::Acquire)) != self.last_used
    }

    fn device_addrs(&self) -> (u64, u64, u64) {
        let b = self.area.device_addr();
        (
            self.layout.desc_addr(b),
            self.layout.avail_addr(b),
            self.layout.used_addr(b),
        )
    }

    fn base(&self) -> u16 {
        self.base
    }

    fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    fn used_idx(&self) -> u16 {
        self.last_used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(size: u16, event_idx: bool, base: u16) -> SplitShadowRing {
        let l = SplitLayout::new(size).unwrap();
        SplitShadowRing::new(
            RingArea::new_owned(l.total_bytes(), 0x1_0000_0000),
            size,
            event_idx,
            base,
        )
        .unwrap()
    }

    /// Play device: complete chain `id` with `len`.
    fn device_complete(r: &SplitShadowRing, id: u32, len: u32) {
        let idx = u16::from_le(r.used_idx_ref().load(Ordering::Relaxed));
        let off = r.layout.used + 4 + 8 * (idx & (r.size - 1)) as usize;
        // SAFETY: in-bounds used element of the test's own ring.
        unsafe {
            let p = r.at(off) as *mut u32;
            p.write_volatile(id.to_le());
            p.add(1).write_volatile(len.to_le());
        }
        r.used_idx_ref()
            .store(idx.wrapping_add(1).to_le(), Ordering::Release);
    }

    /// Play an IN_ORDER device: one used element (`id`, `len`) for a batch of `n` chains.
    fn device_batch(r: &SplitShadowRing, id: u32, len: u32, n: u16) {
        let idx = u16::from_le(r.used_idx_ref().load(Ordering::Relaxed));
        device_complete(r, id, len);
        r.used_idx_ref()
            .store(idx.wrapping_add(n).to_le(), Ordering::Release);
    }

    fn in_order_ring(size: u16, event_idx: bool, base: u16) -> SplitShadowRing {
        let l = SplitLayout::new(size).unwrap();
        SplitShadowRing::new_in_order(
            RingArea::new_owned(l.total_bytes(), 0x1_0000_0000),
            size,
            event_idx,
            base,
        )
        .unwrap()
    }

    fn desc(len: u32, write: bool) -> ShadowDesc {
        ShadowDesc {
            addr: 0x1000,
            len,
            write,
        }
    }

    #[test]
    fn in_order_uses_descriptors_in_ring_order_and_splits_batches() {
        let mut r = in_order_ring(4, true, 0xfffe);
        assert!(r.in_order());
        let a = r.add_chain(&[desc(10, false), desc(20, true)]).unwrap();
        let b = r.add_chain(&[desc(30, true)]).unwrap();
        assert_eq!((a, b), (0, 2), "chains start where the previous one ended");
        assert_eq!(read_desc(&r, 0).next, 1);
        r.publish();
        device_complete(&r, u32::from(a), 7);
        assert_eq!(r.next_used().unwrap(), Some(UsedElem { id: a, len: 7 }));
        // Wraps around the table end: descriptor 3, then 0 (`next` of the last entry is 0).
        let c = r.add_chain(&[desc(40, true), desc(50, true)]).unwrap();
        assert_eq!(c, 3);
        let d3 = read_desc(&r, 3);
        assert_eq!((d3.flags, d3.next), (DESC_F_WRITE | DESC_F_NEXT, 0));
        assert_eq!(read_desc(&r, 0).flags, DESC_F_WRITE);
        r.publish();
        // One element for B and C: B was written completely (its writable bytes).
        device_batch(&r, u32::from(c), 5, 2);
        assert!(r.enable_used_notify(), "elements are pending");
        assert_eq!(r.next_used().unwrap(), Some(UsedElem { id: b, len: 30 }));
        assert!(
            r.enable_used_notify(),
            "the batch is not returned whole yet"
        );
        assert_eq!(r.next_used().unwrap(), Some(UsedElem { id: c, len: 5 }));
        assert_eq!(r.next_used().unwrap(), None);
        assert!(!r.enable_used_notify());
        assert_eq!(
            r.used_event_ref().load(Ordering::Relaxed),
            0xfffeu16.wrapping_add(3)
        );
        assert_eq!((r.num_free(), r.in_flight()), (4, 0));
        // Allocation continues in ring order after the wrapped chain.
        assert_eq!(r.add_chain(&[desc(1, false)]).unwrap(), 1);
    }

    #[test]
    fn in_order_device_breaking_the_order_is_detected() {
        let three = |r: &mut SplitShadowRing| {
            let ids: Vec<u16> = (0..3)
                .map(|_| r.add_chain(&[desc(8, true)]).unwrap())
                .collect();
            r.publish();
            ids
        };
        // The last chain's id with the used index advanced by 1: a batch of 3 not published.
        let mut r = in_order_ring(4, false, 0);
        let ids = three(&mut r);
        device_complete(&r, u32::from(ids[2]), 8);
        assert_eq!(
            r.next_used(),
            Err(QueueError::InOrderBatchBeyondUsed {
                id: ids[2],
                batch: 3,
                published: 1
            })
        );
        // An id that is not a head in flight (free descriptor, then one completed already).
        let mut r = in_order_ring(4, false, 0);
        let ids = three(&mut r);
        device_complete(&r, 3, 8);
        assert_eq!(r.next_used(), Err(QueueError::BogusUsedId { id: 3 }));
        let mut r = in_order_ring(4, false, 0);
        let ids2 = three(&mut r);
        assert_eq!(ids, ids2);
        device_complete(&r, u32::from(ids[0]), 8);
        device_complete(&r, u32::from(ids[0]), 8);
        assert!(r.next_used().unwrap().is_some());
        assert_eq!(
            r.next_used(),
            Err(QueueError::BogusUsedId {
                id: u32::from(ids[0])
            })
        );
        // An id beyond the ring.
        let mut r = in_order_ring(4, false, 0);
        three(&mut r);
        device_complete(&r, 9, 8);
        assert_eq!(r.next_used(), Err(QueueError::BogusUsedId { id: 9 }));
    }

    #[test]
    fn in_order_take_back_rewinds_ring_order_allocation() {
        let mut r = in_order_ring(8, false, 0x10);
        let a = r.add_chain(&[desc(8, true), desc(8, true)]).unwrap();
        let b = r.add_chain(&[desc(8, true)]).unwrap();
        let c = r.add_chain(&[desc(8, true), desc(8, true)]).unwrap();
        r.publish();
        // The device took A only.
        assert_eq!(r.take_back(0x11).unwrap(), vec![b, c]);
        assert_eq!((r.num_free(), r.in_flight(), r.avail_idx()), (6, 1, 0x11));
        // Allocation resumes where B was; A completes normally afterwards.
        assert_eq!(r.add_chain(&[desc(8, true)]).unwrap(), b);
        r.publish();
        device_batch(&r, u32::from(b), 3, 2);
        assert_eq!(r.next_used().unwrap(), Some(UsedElem { id: a, len: 16 }));
        assert_eq!(r.next_used().unwrap(), Some(UsedElem { id: b, len: 3 }));
        assert_eq!(r.next_used().unwrap(), None);
        assert_eq!(r.num_free(), 8);
    }

    fn read_desc(r: &SplitShadowRing, i: u16) -> RawDesc {
        // SAFETY: in-bounds descriptor of the test's own ring.
        unsafe { (r.at(16 * i as usize) as *const RawDesc).read_volatile() }
    }

    #[test]
    fn layout_matches_spec_sizes() {
        let l = SplitLayout::new(256).unwrap();
        assert_eq!(l.avail_offset(), 4096);
        assert_eq!(l.used_offset() % SplitLayout::USED_ALIGN, 0);
        assert!(l.used_offset() >= 4096 + 6 + 512);
        assert_eq!(l.total_bytes(), l.used_offset() + 6 + 8 * 256);
        assert_eq!(l.used_addr(0x1000), 0x1000 + l.used_offset() as u64);
        assert!(SplitLayout::new(3).is_err());
        assert!(SplitLayout::new(0).is_err());
    }

    #[test]
    fn need_event_semantics() {
        assert!(vring_need_event(5, 6, 5));
        assert!(!vring_need_event(5, 5, 4));
        assert!(vring_need_event(0xffff, 0, 0xfffe));
        assert!(!vring_need_event(10, 8, 2));
    }

    #[test]
    fn chains_are_written_and_freed() {
        let mut r = ring(4, false, 0xfffe);
        let d = |a: u64, w: bool| ShadowDesc {
            addr: a,
            len: 0x100,
            write: w,
        };
        let h1 = r.add_chain(&[d(0x1000, false), d(0x2000, true)]).unwrap();
        let h2 = r.add_chain(&[d(0x3000, true)]).unwrap();
        assert_eq!(r.num_free(), 1);
        assert!(r.add_chain(&[d(0, false), d(0, false)]).is_err());
        let d0 = read_desc(&r, h1);
        assert_eq!(
            (d0.addr, d0.flags),
            (0x1000, DESC_F_NEXT),
            "head readable with NEXT"
        );
        let d1 = read_desc(&r, d0.next);
        assert_eq!((d1.addr, d1.flags), (0x2000, DESC_F_WRITE));
        assert!(r.publish(), "no suppression: kick");
        assert!(!r.publish(), "nothing new: no kick");
        assert_eq!(r.avail_idx(), 0);
        // Complete out of order.
        device_complete(&r, h2 as u32, 7);
        device_complete(&r, h1 as u32, 9);
        assert_eq!(r.next_used().unwrap(), Some(UsedElem { id: h2, len: 7 }));
        assert_eq!(r.next_used().unwrap(), Some(UsedElem { id: h1, len: 9 }));
        assert_eq!(r.next_used().unwrap(), None);
        assert_eq!((r.num_free(), r.in_flight()), (4, 0));
        // All four descriptors are reusable.
        let ds = [d(1, true); 4];
        r.add_chain(&ds).unwrap();
    }

    #[test]
    fn bogus_device_is_detected() {
        let mut r = ring(4, false, 0);
        let h = r
            .add_chain(&[ShadowDesc {
                addr: 1,
                len: 1,
                write: true,
            }])
            .unwrap();
        r.publish();
        device_complete(&r, 3, 0); // never posted
        assert_eq!(r.next_used(), Err(QueueError::BogusUsedId { id: 3 }));
        let mut r2 = ring(4, false, 0);
        r2.add_chain(&[ShadowDesc {
            addr: 1,
            len: 1,
            write: true,
        }])
        .unwrap();
        r2.publish();
        r2.used_idx_ref().store(3, Ordering::Release); // 3 > 1 in flight
        assert!(matches!(
            r2.next_used(),
            Err(QueueError::UsedIndexJump { last: 0, new: 3 })
        ));
        let _ = h;
    }

    #[test]
    fn notification_suppression() {
        let mut r = ring(8, false, 0);
        let d = [ShadowDesc {
            addr: 1,
            len: 1,
            write: false,
        }];
        r.used_flags_ref()
            .store(USED_F_NO_NOTIFY, Ordering::Relaxed);
        r.add_chain(&d).unwrap();
        assert!(!r.publish(), "device said NO_NOTIFY");

        let mut r = ring(8, true, 10);
        assert_eq!(r.used_event_ref().load(Ordering::Relaxed), 10);
        r.avail_event_ref().store(11, Ordering::Relaxed); // kick when idx passes 11
        r.add_chain(&d).unwrap();
        assert!(!r.publish(), "10 -> 11 does not cross avail_event 11");
        r.add_chain(&d).unwrap();
        assert!(r.publish(), "11 -> 12 crosses it");
        device_complete(&r, 0, 0);
        assert!(r.next_used().unwrap().is_some());
        assert!(!r.enable_used_notify());
        assert_eq!(r.used_event_ref().load(Ordering::Relaxed), 11);
        device_complete(&r, 1, 0);
        assert!(r.enable_used_notify(), "re-check sees the late element");
    }
}
