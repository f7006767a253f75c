//! A descriptor chain flattened into readable and writable byte streams.
//!
//! Requests are parsed when they are popped but their data moves only when they complete (which may
//! be much later, after the ring was re-pointed): so a chain is kept as plain guest ranges, and every
//! access goes through the guest memory current at that time, bounds-checked by vm-memory.

use std::ops::{Deref, Range};

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// One guest buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// The readable and writable parts of one chain, in chain order.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChainSegments {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    /// A readable descriptor followed a writable one (forbidden by the spec).
    pub misordered: bool,
}

impl ChainSegments {
    /// Flattens `chain` (indirect tables included, virtio-queue resolves them).
    pub fn from_chain<M>(chain: DescriptorChain<M>) -> Self
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut out = ChainSegments {
            head: chain.head_index(),
            ..Default::default()
        };
        for d in chain {
            let seg = Segment {
                addr: d.addr().0,
                len: d.len(),
            };
            if d.is_write_only() {
                out.writable.push(seg);
            } else {
                if !out.writable.is_empty() {
                    out.misordered = true;
                }
                out.readable.push(seg);
            }
        }
        out
    }

    /// Total readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Walks `len` bytes starting `offset` bytes into the stream formed by `segs`, handing each piece
/// to `access` as its range within those `len` bytes and its guest address. Returns false if the
/// stream is too short, an address overflows, or `access` fails.
fn walk_stream(
    segs: &[Segment],
    mut offset: u64,
    len: usize,
    mut access: impl FnMut(Range<usize>, GuestAddress) -> bool,
) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(s.len);
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = ((seg_len - offset) as usize).min(len - done);
        let Some(addr) = s.addr.checked_add(offset) else {
            return false;
        };
        if !access(done..done + n, GuestAddress(addr)) {
            return false;
        }
        done += n;
        offset = 0;
    }
    done == len
}

/// Reads `buf.len()` bytes starting `offset` bytes into the stream formed by `segs`.
/// Returns false if the stream is too short or memory is out of range.
pub(crate) fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> bool {
    walk_stream(segs, offset, buf.len(), |r, addr| {
        mem.read_slice(&mut buf[r], addr).is_ok()
    })
}

/// Writes `data` starting `offset` bytes into the stream formed by `segs`.
/// Returns false if the stream is too short or memory is out of range.
pub(crate) fn write_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    data: &[u8],
) -> bool {
    walk_stream(segs, offset, data.len(), |r, addr| {
        mem.write_slice(&data[r], addr).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn stream_spans_segments_and_rejects_out_of_range() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = [
            Segment {
                addr: 0x100,
                len: 3,
            },
            Segment {
                addr: 0x200,
                len: 5,
            },
        ];
        assert!(write_stream(&mem, &segs, 1, b"abcdef"));
        let mut b = [0u8; 6];
        assert!(read_stream(&mem, &segs, 1, &mut b));
        assert_eq!(&b, b"abcdef");
        let mut one = [0u8; 2];
        mem.read_slice(&mut one, GuestAddress(0x101)).unwrap();
        assert_eq!(&one, b"ab");
        // Too long for the stream.
        assert!(!write_stream(&mem, &segs, 0, &[0u8; 9]));
        // Outside guest memory.
        let bad = [Segment {
            addr: 0xfff0,
            len: 0x100,
        }];
        assert!(!write_stream(&mem, &bad, 0, &[0u8; 0x20]));
    }
}
