//! IOVA allocator: an interval map of a device's `[first, last]` I/O virtual address range.
//!
//! Every allocation maps a range of "translated" addresses (`taddr`: a guest-physical or host
//! virtual address, the caller decides) to an IOVA range. Three ordered indexes keep every
//! operation O(log n):
//!
//! * allocations by IOVA (lookup by IOVA: predecessor search),
//! * allocations by taddr (lookup by taddr: predecessor search; taddr ranges must not overlap),
//! * free intervals by address (merging on `remove`) and by `(size, start)` (allocation).
//!
//! Allocation is best-fit (the smallest free interval that holds the aligned request, lowest
//! address among equals), which keeps large holes for large requests; QEMU's `iova-tree` walks the
//! free space linearly instead. It is O(log n) except near exhaustion with an alignment larger
//! than the request's slack, where holes of the right size class are scanned before giving up:
//! exhaustion is reported only when no free interval can hold the request, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// Why an IOVA operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IovaError {
    /// No free interval can hold the request.
    #[error("IOVA space exhausted: no free range of {size:#x} bytes (align {align:#x})")]
    Exhausted {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },
    /// A fixed mapping overlaps an existing allocation or lies outside `[first, last]`.
    #[error("IOVA range {iova:#x}+{size:#x} is not free")]
    NotFree {
        /// Requested IOVA.
        iova: u64,
        /// Requested size.
        size: u64,
    },
    /// The translated range overlaps one that is already mapped.
    #[error("translated range {taddr:#x}+{size:#x} overlaps an existing mapping")]
    TaddrOverlap {
        /// Requested translated address.
        taddr: u64,
        /// Requested size.
        size: u64,
    },
    /// No allocation starts at this IOVA.
    #[error("no IOVA mapping starts at {0:#x}")]
    NotFound(u64),
    /// Size zero, a range that wraps around, an alignment that is not a power of two, or
    /// `first > last`.
    #[error("invalid IOVA request: {0}")]
    Invalid(&'static str),
}

/// One mapping: `size` bytes at `iova` translate to `size` bytes at `taddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaMapping {
    /// First IOVA of the mapping.
    pub iova: u64,
    /// First translated address (GPA or HVA) of the mapping.
    pub taddr: u64,
    /// Length in bytes (at least 1).
    pub size: u64,
}

impl IovaMapping {
    fn last_iova(&self) -> u64 {
        self.iova + (self.size - 1)
    }
    fn last_taddr(&self) -> u64 {
        self.taddr + (self.size - 1)
    }
}

/// The IOVA allocator and two-way translation map. See the module docs.
#[derive(Debug, Clone)]
pub struct IovaTree {
    first: u64,
    last: u64,
    /// iova start -> mapping.
    by_iova: BTreeMap<u64, IovaMapping>,
    /// taddr start -> mapping (a copy: one tree walk per lookup either way).
    by_taddr: BTreeMap<u64, IovaMapping>,
    /// free interval start -> inclusive end.
    free_by_addr: BTreeMap<u64, u64>,
    /// (size - 1, start) of every free interval.
    free_by_size: BTreeSet<(u64, u64)>,
}

impl IovaTree {
    /// An empty tree allocating inside `[first, last]` (inclusive, as vhost-vdpa reports it).
    pub fn new(first: u64, last: u64) -> Result<Self, IovaError> {
        if first > last {
            return Err(IovaError::Invalid("first > last"));
        }
        let mut t = IovaTree {
            first,
            last,
            by_iova: BTreeMap::new(),
            by_taddr: BTreeMap::new(),
            free_by_addr: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
        };
        t.insert_free(first, last);
        Ok(t)
    }

    /// The managed range `(first, last)`.
    pub fn range(&self) -> (u64, u64) {
        (self.first, self.last)
    }

    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.by_iova.len()
    }

    /// Whether there is no mapping.
    pub fn is_empty(&self) -> bool {
        self.by_iova.is_empty()
    }

    fn insert_free(&mut self, start: u64, end: u64) {
        self.free_by_addr.insert(start, end);
        self.free_by_size.insert((end - start, start));
    }

    fn remove_free(&mut self, start: u64, end: u64) {
        self.free_by_addr.remove(&start);
        self.free_by_size.remove(&(end - start, start));
    }

    /// Aligned start inside free `[start, end]` for `size` bytes, if it fits.
    fn fit(start: u64, end: u64, size: u64, align: u64) -> Option<u64> {
        let s = start.checked_add(align - 1)? & !(align - 1);
        let last = s.checked_add(size - 1)?;
        (s >= start && last <= end).then_some(s)
    }

    fn check_taddr_free(&self, taddr: u64, size: u64) -> Result<(), IovaError> {
        let last = taddr
            .checked_add(size - 1)
            .ok_or(IovaError::Invalid("taddr range wraps"))?;
        if let Some((_, m)) = self.by_taddr.range(..=last).next_back() {
            if m.last_taddr() >= taddr {
                return Err(IovaError::TaddrOverlap { taddr, size });
            }
        }
        Ok(())
    }

    fn take(&mut self, free_start: u64, free_end: u64, m: IovaMapping) {
        self.remove_free(free_start, free_end);
        if m.iova > free_start {
            self.insert_free(free_start, m.iova - 1);
        }
        if m.last_iova() < free_end {
            self.insert_free(m.last_iova() + 1, free_end);
        }
        self.by_iova.insert(m.iova, m);
        self.by_taddr.insert(m.taddr, m);
    }

    /// Allocate `size` bytes aligned to `align` (a power of two; 1 for none) and map them to
    /// `taddr`. Returns the IOVA.
    pub fn alloc(&mut self, size: u64, align: u64, taddr: u64) -> Result<u64, IovaError> {
        if size == 0 {
            return Err(IovaError::Invalid("size 0"));
        }
        if align == 0 || !align.is_power_of_two() {
            return Err(IovaError::Invalid("alignment not a power of two"));
        }
        self.check_taddr_free(taddr, size)?;
        // Best fit: smallest interval at least `size` long whose aligned start still fits. Look
        // at a few candidates of the exact size class first; then any interval long enough to
        // fit whatever its alignment (size + align - 1), which always fits: O(log n) overall.
        let mut found = None;
        for &(_, start) in self.free_by_size.range((size - 1, 0)..).take(8) {
            let end = self.free_by_addr[&start];
            if let Some(s) = Self::fit(start, end, size, align) {
                found = Some((start, end, s));
                break;
            }
        }
        if found.is_none() {
            if let Some(need) = (size - 1).checked_add(align - 1) {
                if let Some(&(_, start)) = self.free_by_size.range((need, 0)..).next() {
                    let end = self.free_by_addr[&start];
                    found = Self::fit(start, end, size, align).map(|s| (start, end, s));
                }
                // Near exhaustion only: a hole shorter than size + align - 1 may still fit if
                // it happens to be aligned. Scan those before reporting exhaustion.
                if found.is_none() {
                    found = self
                        .free_by_size
                        .range((size - 1, 0)..(need, 0))
                        .skip(8)
                        .find_map(|&(_, start)| {
                            let end = self.free_by_addr[&start];
                            Self::fit(start, end, size, align).map(|s| (start, end, s))
                        });
                }
            }
        }
        let (fs, fe, iova) = found.ok_or(IovaError::Exhausted { size, align })?;
        self.take(fs, fe, IovaMapping { iova, taddr, size });
        Ok(iova)
    }

    /// Map `size` bytes at the fixed `iova` to `taddr` (the range must be free and inside
    /// `[first, last]`).
    pub fn map_fixed(&mut self, iova: u64, size: u64, taddr: u64) -> Result<(), IovaError> {
        if size == 0 {
            return Err(IovaError::Invalid("size 0"));
        }
        let last = iova
            .checked_add(size - 1)
            .ok_or(IovaError::Invalid("IOVA range wraps"))?;
        self.check_taddr_free(taddr, size)?;
        let (&fs, &fe) = self
            .free_by_addr
            .range(..=iova)
            .next_back()
            .ok_or(IovaError::NotFree { iova, size })?;
        if fe < last {
            return Err(IovaError::NotFree { iova, size });
        }
        self.take(fs, fe, IovaMapping { iova, taddr, size });
        Ok(())
    }

    /// The mapping containing `iova`.
    pub fn find_by_iova(&self, iova: u64) -> Option<IovaMapping> {
        let (_, m) = self.by_iova.range(..=iova).next_back()?;
        (m.last_iova() >= iova).then_some(*m)
    }

    /// The mapping containing translated address `taddr`.
    pub fn find_by_taddr(&self, taddr: u64) -> Option<IovaMapping> {
        let (_, m) = self.by_taddr.range(..=taddr).next_back()?;
        (m.last_taddr() >= taddr).then_some(*m)
    }

    /// IOVA of `[taddr, taddr + len)` if one mapping covers all of it (`len` 0 counts as 1).
    pub fn translate_taddr(&self, taddr: u64, len: u64) -> Option<u64> {
        let m = self.find_by_taddr(taddr)?;
        let off = taddr - m.taddr;
        (off.checked_add(len.max(1) - 1)? < m.size).then_some(m.iova + off)
    }

    /// Translated address of `iova` (inverse of [`IovaTree::translate_taddr`]).
    pub fn translate_iova(&self, iova: u64) -> Option<u64> {
        let m = self.find_by_iova(iova)?;
        Some(m.taddr + (iova - m.iova))
    }

    /// Remove the mapping that starts at `iova`, returning it; its range becomes free again.
    pub fn remove(&mut self, iova: u64) -> Result<IovaMapping, IovaError> {
        let m = self
            .by_iova
            .remove(&iova)
            .ok_or(IovaError::NotFound(iova))?;
        self.by_taddr.remove(&m.taddr);
        let (mut start, mut end) = (m.iova, m.last_iova());
        // Merge with the free neighbours on both sides.
        if start > 0 {
            if let Some((&ps, &pe)) = self.free_by_addr.range(..start).next_back() {
                if pe == start - 1 {
                    self.remove_free(ps, pe);
                    start = ps;
                }
            }
        }
        if end < u64::MAX {
            if let Some(&ne) = self.free_by_addr.get(&(end + 1)) {
                self.remove_free(end + 1, ne);
                end = ne;
            }
        }
        self.insert_free(start, end);
        Ok(m)
    }

    /// Total free bytes (saturating at `u64::MAX`).
    pub fn free_bytes(&self) -> u64 {
        self.free_by_addr.iter().fold(0u64, |a, (&s, &e)| {
            a.saturating_add(e - s).saturating_add(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_and_lookup_both_ways() {
        let mut t = IovaTree::new(0x1000, 0xffff).unwrap();
        let a = t.alloc(0x1000, 0x1000, 0x10_0000).unwrap();
        let b = t.alloc(0x800, 1, 0x20_0000).unwrap();
        assert_eq!(a, 0x1000);
        assert_ne!(a, b);
        assert_eq!(t.find_by_iova(a + 0x10).unwrap().taddr, 0x10_0000);
        assert_eq!(t.translate_taddr(0x10_0010, 0x20), Some(a + 0x10));
        assert_eq!(
            t.translate_taddr(0x10_0ff0, 0x20),
            None,
            "crosses mapping end"
        );
        assert_eq!(t.translate_iova(b + 7), Some(0x20_0007));
        assert_eq!(t.find_by_taddr(0x30_0000), None);
        assert_eq!(t.find_by_iova(0xffff), None);
    }

    #[test]
    fn exhaustion_is_an_error_and_remove_frees() {
        let mut t = IovaTree::new(0, 0x3fff).unwrap();
        let ids: Vec<u64> = (0..4)
            .map(|i| t.alloc(0x1000, 0x1000, i * 0x1_0000).unwrap())
            .collect();
        assert_eq!(
            t.alloc(1, 1, 0x9_0000),
            Err(IovaError::Exhausted { size: 1, align: 1 })
        );
        t.remove(ids[1]).unwrap();
        t.remove(ids[2]).unwrap();
        assert_eq!(t.free_bytes(), 0x2000);
        // The two freed neighbours merged: an 8 KiB request fits.
        assert_eq!(t.alloc(0x2000, 1, 0x9_0000).unwrap(), 0x1000);
        assert_eq!(t.remove(0x1234), Err(IovaError::NotFound(0x1234)));
    }

    #[test]
    fn fixed_mappings_and_overlaps() {
        let mut t = IovaTree::new(0, u64::MAX).unwrap();
        t.map_fixed(0x5000, 0x1000, 0x5000).unwrap();
        assert_eq!(
            t.map_fixed(0x5800, 0x1000, 0x9000),
            Err(IovaError::NotFree {
                iova: 0x5800,
                size: 0x1000
            })
        );
        assert_eq!(
            t.alloc(0x10, 1, 0x5ff0),
            Err(IovaError::TaddrOverlap {
                taddr: 0x5ff0,
                size: 0x10
            })
        );
        // The whole 64-bit space minus one mapping is free.
        assert_eq!(t.free_bytes(), u64::MAX - 0xfff);
        let big = t.alloc(1 << 40, 1 << 30, 1 << 50).unwrap();
        assert_eq!(big % (1 << 30), 0);
        assert_eq!(t.alloc(0, 1, 0), Err(IovaError::Invalid("size 0")));
        assert!(IovaTree::new(2, 1).is_err());
    }

    #[test]
    fn best_fit_keeps_big_holes() {
        let mut t = IovaTree::new(0, 0xffff).unwrap();
        let a = t.alloc(0x100, 1, 0x100_0000).unwrap();
        let _b = t.alloc(0x100, 1, 0x200_0000).unwrap();
        t.remove(a).unwrap(); // a 0x100 hole at 0, and a big hole after b
        let c = t.alloc(0x80, 1, 0x300_0000).unwrap();
        assert_eq!(c, 0, "small request goes into the small hole");
    }

    #[test]
    fn an_aligned_hole_behind_many_unaligned_ones_is_found() {
        // Holes of 0x10 bytes: twenty unaligned ones, one 0x100-aligned one at 0x8000.
        let mut holes: Vec<u64> = (0..20).map(|k| 0x108 + k * 0x200).collect();
        holes.push(0x8000);
        let mut t = IovaTree::new(0, 0xffff).unwrap();
        let mut cur = 0;
        for (i, &h) in holes.iter().enumerate() {
            t.map_fixed(cur, h - cur, 0x100_0000 * (i as u64 + 1))
                .unwrap();
            cur = h + 0x10;
        }
        t.map_fixed(cur, 0x1_0000 - cur, 0x1_0000_0000).unwrap();
        assert_eq!(t.free_bytes(), 21 * 0x10);
        assert_eq!(t.alloc(0x10, 0x100, 0x7777_0000), Ok(0x8000));
        assert_eq!(
            t.alloc(0x10, 0x100, 0x7778_0000),
            Err(IovaError::Exhausted {
                size: 0x10,
                align: 0x100
            })
        );
    }

    #[test]
    fn random_ops_keep_indexes_consistent() {
        // Deterministic pseudo-random workload checked against a brute-force model.
        let mut t = IovaTree::new(0x1000, 0x10_0fff).unwrap();
        let mut live: Vec<IovaMapping> = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next_taddr = 0u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !x.is_multiple_of(3) || live.is_empty() {
                let size = 1 + (x >> 8) % 0x4000;
                let align = 1 << ((x >> 32) % 13);
                if let Ok(iova) = t.alloc(size, align, next_taddr) {
                    assert_eq!(iova % align, 0);
                    assert!(iova >= 0x1000 && iova + size - 1 <= 0x10_0fff);
                    for m in &live {
                        assert!(iova + size - 1 < m.iova || iova > m.last_iova(), "overlap");
                    }
                    live.push(IovaMapping {
                        iova,
                        taddr: next_taddr,
                        size,
                    });
                    next_taddr += size + 7;
                }
            } else {
                let m = live.swap_remove((x >> 20) as usize % live.len());
                assert_eq!(t.remove(m.iova).unwrap(), m);
            }
            let used: u64 = live.iter().map(|m| m.size).sum();
            assert_eq!(t.free_bytes() + used, 0x10_0000);
        }
        for m in &live {
            assert_eq!(t.find_by_iova(m.last_iova()), Some(*m));
            assert_eq!(t.find_by_taddr(m.last_taddr()), Some(*m));
        }
    }
}
