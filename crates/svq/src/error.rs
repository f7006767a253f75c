//! Errors that break one queue (never the process).
use thiserror::Error;

/// Why a queue was marked broken. A broken queue stops forwarding; other queues keep running.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueueError {
    /// The guest published an avail index more than a queue size ahead of the last one seen.
    #[error("guest avail index jumped from {last} to {new} (queue size {size})")]
    AvailIndexJump { last: u16, new: u16, size: u16 },
    /// A head or `next` index outside the descriptor table.
    #[error("descriptor index {index} out of range (table size {size})")]
    DescIndexOutOfRange { index: u16, size: u16 },
    /// The chain is longer than the queue size: a loop or an over-long chain.
    #[error("descriptor chain longer than {max} descriptors (loop?)")]
    ChainTooLong { max: u32 },
    /// A buffer (or ring, or indirect table) that is not entirely inside guest memory.
    #[error("guest address {addr:#x}+{len:#x} is not in guest memory")]
    BadGuestAddress { addr: u64, len: u64 },
    /// An indirect descriptor that is malformed (nested, bad length, with NEXT set, or not allowed).
    #[error("bad indirect descriptor: {0}")]
    BadIndirect(&'static str),
    /// A translation to device addresses failed (vDPA: no IOVA mapping covers the buffer).
    #[error("no device mapping for guest address {addr:#x}+{len:#x}")]
    Untranslatable { addr: u64, len: u64 },
    /// The device returned a used id that is not in flight (or a length beyond the chain).
    #[error("device returned bogus used id {id}")]
    BogusUsedId { id: u32 },
    /// The device's used index moved more than a ring size ahead.
    #[error("device used index jumped from {last} to {new}")]
    UsedIndexJump { last: u16, new: u16 },
    /// A flattened chain cannot fit the shadow ring at all.
    #[error("chain of {len} descriptors cannot fit a shadow ring of {size}")]
    ChainExceedsShadow { len: u32, size: u16 },
}
