//! `svq`: the shadow virtqueue engine.
//!
//! Pure logic over guest memory: no sockets, no eventfds, no threads. A transport (the vhost-user
//! proxy `svqd`, a vhost-vdpa VMM) owns the notifiers and calls into [`ShadowVirtqueue`]:
//!
//! * guest kick  → [`ShadowVirtqueue::forward_avail`] → kick the device if the batch says so;
//! * device call → [`ShadowVirtqueue::forward_used`]  → interrupt the guest if the batch says so.
//!
//! Every guest page the device wrote (and the guest used ring) is marked in a [`DirtyLog`]
//! in the vhost log format.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::Ordering;
//! use svq::*;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // 1 MiB of guest RAM with a 4-entry guest ring at 0x1000 / 0x2000 / 0x3000.
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let cfg = QueueConfig {
//!     guest_size: 4, shadow_size: 8,
//!     desc_table: 0x1000, avail_ring: 0x2000, used_ring: 0x3000,
//!     event_idx: false, indirect: false, in_order: false,
//! };
//! // The shadow ring in memory we own; the device sees it at 0x1_0000_0000.
//! let area = RingArea::new_owned(SplitLayout::new(8)?.total_bytes(), 0x1_0000_0000);
//! let mut q = ShadowVirtqueue::new(cfg, area, IdentityTranslation, QueueState::default())?;
//! let log = SharedLog::new(Some(Arc::new(DirtyLog::for_memory_end(1 << 20))));
//!
//! // The guest posts one device-writable 512-byte buffer at 0x8000 (descriptor 0).
//! mem.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
//! mem.write_obj(512u32, GuestAddress(0x1008)).unwrap();
//! mem.write_obj(2u16, GuestAddress(0x100c)).unwrap(); // VIRTQ_DESC_F_WRITE
//! mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // avail.ring[0] = head 0
//! mem.store(1u16, GuestAddress(0x2002), Ordering::Release).unwrap(); // avail.idx = 1
//!
//! let b = q.forward_avail(&mem, &log)?;
//! assert_eq!((b.chains, b.kick_device), (1, true));
//!
//! // The device completes shadow chain 0 with 100 bytes written (here: by hand).
//! let ring = q.ring().area().as_ptr();
//! let used = q.ring().layout().used_offset();
//! // SAFETY: offsets inside the used ring of the area allocated above, aligned.
//! unsafe {
//!     (ring.add(used + 4) as *mut u32).write_volatile(0); // id
//!     (ring.add(used + 8) as *mut u32).write_volatile(100); // len
//!     (*(ring.add(used + 2) as *const std::sync::atomic::AtomicU16)).store(1, Ordering::Release);
//! }
//! let u = q.forward_used(&mem, &log)?;
//! assert_eq!((u.completed, u.notify_guest), (1, true));
//! // The guest sees (head 0, len 100); page 8 (0x8000) and the used ring page 3 are dirty.
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3008)).unwrap(), 100);
//! assert_eq!(log.current().unwrap().dirty_pages(), vec![3, 8]);
//! # Ok::<(), QueueError>(())
//! ```

#![deny(missing_docs)]

pub mod error;
pub mod guest;
pub mod iova;
pub mod log;
pub mod ring;
pub mod shadow;
pub mod translate;

pub use error::QueueError;
pub use guest::{GuestBuffer, GuestQueue, GuestRings};
pub use iova::{IovaError, IovaMapping, IovaTree};
pub use log::{DirtyLog, LogBatch, SharedLog, LOG_PAGE_SIZE};
pub use ring::{RingArea, ShadowDesc, ShadowRing, SplitLayout, SplitShadowRing, UsedElem};
pub use shadow::{AvailBatch, InFlightChain, QueueConfig, QueueState, ShadowVirtqueue, UsedBatch};
pub use translate::{IdentityTranslation, IovaTranslation, Translate};

#[cfg(test)]
mod tests {
    /// Transports run each queue on a worker thread.
    #[test]
    fn engine_types_are_send() {
        fn send<T: Send>() {}
        fn sync<T: Send + Sync>() {}
        send::<crate::ShadowVirtqueue<crate::IdentityTranslation>>();
        send::<crate::ShadowVirtqueue<crate::IovaTranslation>>();
        sync::<crate::SharedLog>();
        sync::<crate::DirtyLog>();
        sync::<crate::IovaTree>();
    }
}
