//! A queue in shadow mode: the shadow ring's memory (a memfd region svqd adds to the backend's
//! memory table) and the worker relaying between the guest ring and it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Instant;

use svq::{IdentityTranslation, QueueConfig, QueueState, RingArea, SplitLayout};
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{DeviceRegion, RingAddressSpace};
use crate::error::ProxyError;
use crate::quiesce::RingIndices;
use crate::report::ShadowRingState;
use crate::worker::{Engine, Worker};

/// The memory of one shadow ring.
#[derive(Clone)]
pub struct ShadowRegion {
    /// The memfd shared with the backend.
    pub file: Arc<File>,
    /// svqd's mapping of it.
    pub mapping: Arc<MmapRegion>,
    /// Size in bytes (whole pages).
    pub size: u64,
    /// Entries of the split ring it is laid out for.
    pub ring_size: u16,
    /// Guest-physical address given to the backend (outside all guest RAM).
    pub gpa: u64,
    /// User address given to the backend (above all of the VMM's); ring addresses use it.
    pub uva: u64,
}

impl ShadowRegion {
    /// A zeroed memfd region large enough for a split ring of `size` entries.
    pub fn create(queue: usize, size: u16) -> Result<Self, ProxyError> {
        let layout = SplitLayout::new(size).map_err(|e| ProxyError::Engine(e.to_string()))?;
        let bytes = layout.total_pages_bytes();
        let name = std::ffi::CString::new(format!("svqd-shadow-q{queue}")).expect("no NUL");
        // SAFETY: valid NUL-terminated name; the returned fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(ProxyError::Io(
                "memfd_create",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh, valid descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes as u64)
            .map_err(|e| ProxyError::Io("ftruncate shadow ring", e))?;
        let dup = file.try_clone().map_err(|e| ProxyError::Io("dup", e))?;
        let mapping = MmapRegion::from_file(FileOffset::new(dup, 0), bytes)
            .map_err(|e| ProxyError::Engine(format!("mmap shadow ring: {e}")))?;
        Ok(ShadowRegion {
            file: Arc::new(file),
            mapping: Arc::new(mapping),
            size: bytes as u64,
            ring_size: size,
            gpa: 0,
            uva: 0,
        })
    }

    /// svqd's address of the mapping (the key under which the address allocators record it).
    pub fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }

    /// The engine on this region: the ring's device addresses are in the device's address space
    /// (the region's `uva` for vhost-user, its `gpa` for a device translating guest addresses).
    ///
    /// The shadow ring starts at the guest's index (`start.last_avail_idx`), not at 0, and since
    /// the engine forwards each guest chain as one shadow chain the two rings' indices stay equal
    /// whenever nothing is in flight. A backend that keeps its used index across a ring change
    /// (vhost-user-backend up to 0.10 sets only the avail index on SET_VRING_BASE and never
    /// re-reads `used.idx`) then continues on either ring from the right place.
    pub fn engine(
        &self,
        cfg: QueueConfig,
        start: QueueState,
        space: RingAddressSpace,
    ) -> Result<Engine, ProxyError> {
        let device_addr = match space {
            RingAddressSpace::VmmUser => self.uva,
            RingAddressSpace::GuestPhysical => self.gpa,
        };
        let area = RingArea::from_mmap_region(self.mapping.clone(), 0, device_addr)
            .map_err(|e| ProxyError::Engine(e.to_string()))?;
        let base = start.last_avail_idx;
        Engine::new_with_base(cfg, area, IdentityTranslation, start, base)
            .map_err(|e| ProxyError::Engine(e.to_string()))
    }

    /// Read the little-endian u16 at byte `off` of the ring, as the device may be writing it.
    fn load_u16(&self, off: usize) -> u16 {
        if off + 2 > self.mapping.size() {
            return 0;
        }
        // SAFETY: in bounds of the live mapping; a 2-byte aligned u16 (ring fields are) the
        // device may write concurrently, read atomically.
        unsafe {
            let p = self.mapping.as_ptr().add(off) as *const std::sync::atomic::AtomicU16;
            u16::from_le((*p).load(std::sync::atomic::Ordering::Acquire))
        }
    }

    /// The indices of the shadow ring of `size` entries, as they are in memory (what the
    /// device sees and wrote).
    pub fn indices(&self, size: u16) -> Option<RingIndices> {
        let layout = SplitLayout::new(size).ok()?;
        let u = layout.used_offset();
        Some(RingIndices {
            avail_idx: self.load_u16(layout.avail_offset() + 2),
            used_idx: self.load_u16(u + 2),
            avail_event: self.load_u16(u + 4 + 8 * usize::from(size)),
        })
    }

    /// The shadow ring's indices and flags as they are in memory (for diagnostics).
    pub fn ring_state(&self, size: u16) -> Option<ShadowRingState> {
        let layout = SplitLayout::new(size).ok()?;
        let s = usize::from(size);
        let a = layout.avail_offset();
        let u = layout.used_offset();
        Some(ShadowRingState {
            avail_flags: self.load_u16(a),
            avail_idx: self.load_u16(a + 2),
            used_event: self.load_u16(a + 4 + 2 * s),
            used_flags: self.load_u16(u),
            used_idx: self.load_u16(u + 2),
            avail_event: self.load_u16(u + 4 + 8 * s),
        })
    }

    /// The region as the device's memory table holds it (borrowing our fd).
    pub fn device_region(&self) -> DeviceRegion {
        DeviceRegion {
            gpa: self.gpa,
            size: self.size,
            uva: self.uva,
            mmap_offset: 0,
            fd: self.file.as_raw_fd(),
            host_addr: self.host_addr(),
            // The descriptor table and avail ring come before the used ring, which starts on its
            // own page.
            device_readonly: SplitLayout::new(self.ring_size).map_or(0, |l| l.used_offset() as u64),
        }
    }
}

/// A queue in shadow mode.
pub struct ShadowQueue {
    /// The shadow ring's memory.
    pub region: ShadowRegion,
    /// The worker (taken while the switch code holds the engine).
    pub worker: Option<Worker>,
    /// svqd's kick towards the backend.
    pub backend_kick: Arc<EventFd>,
    /// svqd's call from the backend.
    pub backend_call: Arc<EventFd>,
    /// Shadow ring size.
    pub shadow_size: u16,
    /// When shadowing started.
    pub started: Instant,
}

impl ShadowQueue {
    /// Stop the worker of queue `queue` at once, dropping the engine (device reset or a
    /// connection is gone).
    pub fn abandon_worker(&mut self, queue: usize) {
        if let Some(w) = self.worker.take() {
            let exit = w.abandon();
            if exit.engine.in_flight() > 0 {
                tracing::warn!(
                    queue,
                    in_flight = exit.engine.in_flight(),
                    "shadow queue abandoned with requests in flight"
                );
            }
        }
    }
}
