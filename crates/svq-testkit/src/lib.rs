//! svq-testkit: the pieces that let svq prove itself without a real VM.
//!
//! * [`backend`]: reference vhost-user backends (virtio-blk on a file, echo virtio-net) that offer
//!   no dirty logging, with qemu-storage-daemon-like asynchronous completion.
//!
//! The crate depends only on `svq`, never on `svqd`: a proxy is injected by the caller.

#![deny(missing_docs)]

pub mod backend;
pub mod guest;
pub mod migration;
pub mod oracle;
pub mod scenario;
pub mod vmm;
