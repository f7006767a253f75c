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
