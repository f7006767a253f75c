//! Errors that break one queue (never the process).
use thiserror::Error;

/// Why a queue was marked broken. A broken queue stops forwarding; other queues keep running.
///
/// The first error is kept by the queue (see [`crate::ShadowVirtqueue::broken`]) and every later
/// call returns a clone of it without touching memory.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueueError {
    /// The guest published an avail index more than a queue size ahead of the last one seen.
    #[error("guest avail index jumped from {last} to {new} (queue size {size})")]
    AvailIndexJump {
        /// Next avail index the engine would have read.
        last: u16,
        /// Avail index the guest published.
        new: u16,
        /// Guest queue size.
        size: u16,
    },
    /// A head or `next` index outside the descriptor table.
    #[error("descriptor index {index} out of range (table size {size})")]
    DescIndexOutOfRange {
        /// The offending index.
        index: u16,
        /// Number of entries of the table it indexes (queue size or indirect table length).
        size: u16,
    },
    /// The chain is longer than the queue size: a loop or an over-long chain.
    #[error("descriptor chain longer than {max} descriptors (loop?)")]
    ChainTooLong {
        /// The limit that was exceeded.
        max: u32,
    },
    /// A buffer (or ring, or indirect table) that is not entirely inside guest memory.
    #[error("guest address {addr:#x}+{len:#x} is not in guest memory")]
    BadGuestAddress {
        /// Start guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A guest ring part whose address violates the alignment the virtio spec requires.
    #[error("guest {what} at {addr:#x} is not {align}-byte aligned")]
    MisalignedRing {
        /// Which ring part ("descriptor table", "avail ring", "used ring").
        what: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// An indirect descriptor that is malformed (nested, bad length, with NEXT set, or not allowed).
    #[error("bad indirect descriptor: {0}")]
    BadIndirect(&'static str),
    /// A translation to device addresses failed (vDPA: no IOVA mapping covers the buffer).
    #[error("no device mapping for guest address {addr:#x}+{len:#x}")]
    Untranslatable {
        /// Start guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The device returned a used id that is not in flight.
    #[error("device returned bogus used id {id}")]
    BogusUsedId {
        /// The id the device wrote into the shadow used ring.
        id: u32,
    },
    /// With VIRTIO_F_IN_ORDER, a used element names a chain whose batch (every chain in flight
    /// up to it, in avail order) is larger than the used index the device published: the
    /// device completed out of order, or wrote the element before publishing the batch.
    #[error(
        "in-order device used id {id} (a batch of {batch} chains) but published only {published} \
         used elements"
    )]
    InOrderBatchBeyondUsed {
        /// The id the device wrote into the shadow used ring.
        id: u16,
        /// Chains the element completes (the oldest in flight up to `id`).
        batch: u16,
        /// Used elements the device published past the last one consumed.
        published: u16,
    },
    /// The device's used index moved more than a ring size ahead.
    #[error("device used index jumped from {last} to {new}")]
    UsedIndexJump {
        /// Next shadow used index the engine would have read.
        last: u16,
        /// Used index the device published.
        new: u16,
    },
    /// A flattened chain cannot fit the shadow ring at all.
    #[error("chain of {len} descriptors cannot fit a shadow ring of {size}")]
    ChainExceedsShadow {
        /// Number of descriptors of the flattened chain.
        len: u32,
        /// Shadow ring size.
        size: u16,
    },
    /// A stopped device reported a vring base outside the chains published to it.
    #[error("device vring base {base} is not between used index {used} and avail index {avail}")]
    BogusVringBase {
        /// The base the device reported (GET_VRING_BASE).
        base: u16,
        /// Oldest shadow avail position still in flight (the device cannot have stopped before it).
        used: u16,
        /// Shadow avail index published.
        avail: u16,
    },
    /// The queue configuration or ring area handed to the engine is unusable.
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(&'static str),
}
