//! The device's IOTLB as svqd keeps it: which IOVA ranges are mapped to which svqd addresses, and
//! validation of a batch of map/unmap operations before any of it reaches the kernel.
//!
//! The kernel's answer to a bad IOTLB message is an opaque `EFAULT` (a duplicate UPDATE, an
//! overlapping range, an unknown ASID all look the same), and its entries outlive a device reset.
//! So svqd mirrors the table and refuses overlaps, unknown unmaps and ranges outside the device's
//! `VHOST_VDPA_GET_IOVA_RANGE` itself, with an error that says which range is wrong.

use std::collections::BTreeMap;

/// One IOVA range mapped to svqd memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes (at least 1).
    pub size: u64,
    /// svqd's virtual address of the first byte. VDUSE maps it by VA: it must lie in a shared file
    /// mapping (memfd), or the device silently cannot reach it.
    pub uaddr: u64,
    /// The device may only read (a shadow ring's driver area).
    pub readonly: bool,
}

impl Mapping {
    /// Last IOVA of the range (inclusive).
    pub fn last(&self) -> u64 {
        self.iova + (self.size - 1)
    }

    fn overlaps(&self, iova: u64, size: u64) -> bool {
        self.iova <= iova + (size - 1) && iova <= self.last()
    }
}

/// One step of an IOTLB batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbOp {
    /// VHOST_IOTLB_UPDATE.
    Map(Mapping),
    /// VHOST_IOTLB_INVALIDATE of a range mapped earlier (exactly as mapped).
    Unmap {
        /// First IOVA of the mapping.
        iova: u64,
        /// Its size.
        size: u64,
    },
}

/// Why a batch was refused before reaching the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IotlbError {
    /// Size zero or a range that wraps.
    #[error("IOVA range {iova:#x}+{size:#x} is empty or wraps")]
    Invalid {
        /// First IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// Outside the device's IOVA range.
    #[error("IOVA range {iova:#x}+{size:#x} is outside the device's range {first:#x}..={last:#x}")]
    OutOfRange {
        /// First IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// First usable IOVA of the device.
        first: u64,
        /// Last usable IOVA of the device.
        last: u64,
    },
    /// Overlaps a range that is mapped (unmap it first, in the same batch if need be).
    #[error("IOVA range {iova:#x}+{size:#x} overlaps the mapping at {existing:#x}")]
    Overlap {
        /// First IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// The mapping in the way.
        existing: u64,
    },
    /// An unmap of a range that is not mapped exactly so.
    #[error("no mapping of exactly {iova:#x}+{size:#x} to unmap")]
    NotMapped {
        /// First IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
}

/// The mirror of the device's IOTLB (ASID 0).
#[derive(Debug, Clone)]
pub struct IotlbMap {
    first: u64,
    last: u64,
    maps: BTreeMap<u64, Mapping>,
}

impl IotlbMap {
    /// An empty table for a device whose usable IOVAs are `first..=last`.
    pub fn new(first: u64, last: u64) -> Self {
        IotlbMap {
            first,
            last,
            maps: BTreeMap::new(),
        }
    }

    /// First usable IOVA.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Last usable IOVA.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether `size` bytes at `iova` lie inside the device's range.
    pub fn fits(&self, iova: u64, size: u64) -> bool {
        size > 0
            && iova
                .checked_add(size - 1)
                .is_some_and(|end| iova >= self.first && end <= self.last)
    }

    /// The current mappings, by IOVA.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.maps.values()
    }

    /// The mapping that contains `iova`, if any.
    pub fn find(&self, iova: u64) -> Option<&Mapping> {
        self.maps
            .range(..=iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.last() >= iova)
    }

    /// Applies `ops` in order to a copy of the table, refusing the whole batch on the first
    /// invalid step; returns the table as it will be after the batch.
    pub fn check(&self, ops: &[IotlbOp]) -> Result<IotlbMap, IotlbError> {
        let mut next = self.clone();
        for op in ops {
            next.apply_one(op)?;
        }
        Ok(next)
    }

    /// Records one step that the kernel accepted.
    pub fn apply_one(&mut self, op: &IotlbOp) -> Result<(), IotlbError> {
        match *op {
            IotlbOp::Map(m) => {
                let (iova, size) = (m.iova, m.size);
                if size == 0 || iova.checked_add(size - 1).is_none() {
                    return Err(IotlbError::Invalid { iova, size });
                }
                if !self.fits(iova, size) {
                    return Err(IotlbError::OutOfRange {
                        iova,
                        size,
                        first: self.first,
                        last: self.last,
                    });
                }
                // The only candidates: the last mapping starting at or before the new range's end.
                let end = iova + (size - 1);
                if let Some((_, e)) = self.maps.range(..=end).next_back() {
                    if e.overlaps(iova, size) {
                        return Err(IotlbError::Overlap {
                            iova,
                            size,
                            existing: e.iova,
                        });
                    }
                }
                self.maps.insert(iova, m);
                Ok(())
            }
            IotlbOp::Unmap { iova, size } => match self.maps.get(&iova) {
                Some(m) if m.size == size => {
                    self.maps.remove(&iova);
                    Ok(())
                }
                _ => Err(IotlbError::NotMapped { iova, size }),
            },
        }
    }
}

/// Guest memory for passthrough: every `(gpa, size, uaddr)` region mapped at IOVA = GPA (the
/// guest's rings and descriptors carry GPAs, which the device then reads as IOVAs unchanged).
/// Fails when a region does not fit the device's IOVA range: such a guest can only run shadowed.
pub fn identity_mappings(
    table: &IotlbMap,
    regions: &[(u64, u64, u64)],
) -> Result<Vec<Mapping>, IotlbError> {
    regions
        .iter()
        .map(|&(gpa, size, uaddr)| {
            if !table.fits(gpa, size) {
                return Err(IotlbError::OutOfRange {
                    iova: gpa,
                    size,
                    first: table.first(),
                    last: table.last(),
                });
            }
            Ok(Mapping {
                iova: gpa,
                size,
                uaddr,
                readonly: false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(iova: u64, size: u64) -> IotlbOp {
        IotlbOp::Map(Mapping {
            iova,
            size,
            uaddr: 0x7f00_0000_0000u64.wrapping_add(iova),
            readonly: false,
        })
    }

    #[test]
    fn overlaps_and_unknown_unmaps_are_refused_before_the_kernel_sees_them() {
        let mut t = IotlbMap::new(0, u64::MAX);
        t = t
            .check(&[map(0x1000, 0x1000), map(0x3000, 0x1000)])
            .unwrap();
        assert_eq!(
            t.check(&[map(0x1800, 0x1000)]).unwrap_err(),
            IotlbError::Overlap {
                iova: 0x1800,
                size: 0x1000,
                existing: 0x1000
            }
        );
        assert!(matches!(
            t.check(&[map(0x2fff, 2)]),
            Err(IotlbError::Overlap {
                existing: 0x3000,
                ..
            })
        ));
        // Adjacent ranges are fine.
        assert!(t.check(&[map(0x2000, 0x1000)]).is_ok());
        // A partial unmap is not an unmap.
        assert_eq!(
            t.check(&[IotlbOp::Unmap {
                iova: 0x1000,
                size: 0x800
            }])
            .unwrap_err(),
            IotlbError::NotMapped {
                iova: 0x1000,
                size: 0x800
            }
        );
        // Unmap then map the same range in one batch (what a remap after reset does).
        let t2 = t
            .check(&[
                IotlbOp::Unmap {
                    iova: 0x1000,
                    size: 0x1000,
                },
                map(0x1000, 0x1000),
            ])
            .unwrap();
        assert_eq!(t2.mappings().count(), 2);
        assert_eq!(t2.find(0x1fff).map(|m| m.iova), Some(0x1000));
        assert_eq!(t2.find(0x2000), None);
    }

    #[test]
    fn range_limits_and_wrapping() {
        let t = IotlbMap::new(0x1000, 0xffff);
        assert!(matches!(
            t.check(&[map(0, 0x1000)]),
            Err(IotlbError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.check(&[map(0xf000, 0x1001)]),
            Err(IotlbError::OutOfRange { .. })
        ));
        assert!(t.check(&[map(0xf000, 0x1000)]).is_ok());
        assert!(matches!(
            t.check(&[map(u64::MAX, 2)]),
            Err(IotlbError::Invalid { .. })
        ));
        assert!(matches!(
            t.check(&[map(0x2000, 0)]),
            Err(IotlbError::Invalid { .. })
        ));
        let full = IotlbMap::new(0, u64::MAX);
        assert!(full.check(&[map(u64::MAX, 1)]).is_ok());
    }

    #[test]
    fn identity_mapping_needs_the_whole_region_in_range() {
        let t = IotlbMap::new(0, (1 << 32) - 1);
        let m = identity_mappings(&t, &[(0, 1 << 30, 0x7000_0000)]).unwrap();
        assert_eq!(m[0].iova, 0);
        assert!(identity_mappings(&t, &[(1 << 32, 4096, 0x7000_0000)]).is_err());
    }
}
