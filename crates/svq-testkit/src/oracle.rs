//! The migration oracle.
//!
//! 1. Memory: the destination RAM at switchover must equal the source's *final* RAM page for page
//!    (the source is compared after its device path was shut down, so a late device write into the
//!    source after the stop is caught too), and both must be full size.
//! 2. Requests: every request the guest issued completed exactly once, on one side or the other
//!    (no duplicates, none outstanding after a drain).
//! 3. Data: no anomaly in what the guest read back (block patterns, echoed frames), and for block
//!    devices the disk image holds what the guest's model says.

use std::fmt;

use crate::guest::ram::{GuestRam, PAGE_SIZE};
use crate::guest::Ledger;

/// A copy of a RAM at one instant (the destination at switchover).
pub struct RamSnapshot {
    data: Vec<u8>,
}

impl RamSnapshot {
    /// Copies all of `ram`.
    pub fn take(ram: &GuestRam) -> std::io::Result<Self> {
        let mut data = vec![0u8; ram.size() as usize];
        for (pfn, chunk) in data.chunks_mut(PAGE_SIZE as usize).enumerate() {
            let page: &mut [u8; PAGE_SIZE as usize] =
                chunk.try_into().map_err(std::io::Error::other)?;
            ram.read_page(pfn as u64, page)?;
        }
        Ok(RamSnapshot { data })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Pages of `ram` that differ from the snapshot (all pages of the larger one count if sizes
    /// differ).
    pub fn differing_pages(&self, ram: &GuestRam) -> std::io::Result<Vec<u64>> {
        let mut out = Vec::new();
        let pages = self.size().max(ram.size()) / PAGE_SIZE;
        let common = self.size().min(ram.size()) / PAGE_SIZE;
        let mut buf = [0u8; PAGE_SIZE as usize];
        for pfn in 0..common {
            ram.read_page(pfn, &mut buf)?;
            let off = (pfn * PAGE_SIZE) as usize;
            if buf[..] != self.data[off..off + PAGE_SIZE as usize] {
                out.push(pfn);
            }
        }
        out.extend(common..pages);
        Ok(out)
    }
}

/// The oracle's verdict.
#[derive(Debug, Clone, Default)]
pub struct OracleReport {
    /// Pages compared.
    pub pages: u64,
    /// Pages whose content differs between source final RAM and destination at switchover.
    pub differing_pages: Vec<u64>,
    /// Source and destination memfds have the full RAM size.
    pub sizes_ok: bool,
    /// The guest's exactly-once ledger at the end.
    pub ledger: Ledger,
    /// Data anomalies reported by the guest (and by the disk check).
    pub anomalies: Vec<String>,
}

impl OracleReport {
    /// Builds the memory part of the verdict.
    pub fn compare(
        src_final: &GuestRam,
        dst_at_switchover: &RamSnapshot,
        dst: &GuestRam,
    ) -> std::io::Result<Self> {
        let sizes_ok = src_final.file_size()? == src_final.size()
            && dst.file_size()? == dst.size()
            && dst_at_switchover.size() == src_final.size();
        Ok(OracleReport {
            pages: src_final.pages(),
            differing_pages: dst_at_switchover.differing_pages(src_final)?,
            sizes_ok,
            ..Default::default()
        })
    }

    /// Every way the migration went wrong (empty: it was correct).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if !self.sizes_ok {
            f.push("source or destination RAM is not full size".to_owned());
        }
        if !self.differing_pages.is_empty() {
            let first: Vec<_> = self.differing_pages.iter().take(8).collect();
            f.push(format!(
                "{} of {} pages differ (first: {:?})",
                self.differing_pages.len(),
                self.pages,
                first
            ));
        }
        if self.ledger.duplicates > 0 {
            f.push(format!(
                "{} requests completed twice",
                self.ledger.duplicates
            ));
        }
        if self.ledger.outstanding > 0 {
            f.push(format!(
                "{} requests never completed (lost)",
                self.ledger.outstanding
            ));
        }
        if self.ledger.completed + self.ledger.outstanding != self.ledger.issued {
            f.push(format!(
                "ledger does not add up: issued {} completed {} outstanding {}",
                self.ledger.issued, self.ledger.completed, self.ledger.outstanding
            ));
        }
        for a in self.anomalies.iter().take(8) {
            f.push(a.clone());
        }
        if self.anomalies.len() > 8 {
            f.push(format!(
                "... and {} more anomalies",
                self.anomalies.len() - 8
            ));
        }
        f
    }

    /// True when nothing failed.
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }
}

impl fmt::Display for OracleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "memory: {} pages differ of {} (sizes {})",
            self.differing_pages.len(),
            self.pages,
            if self.sizes_ok { "ok" } else { "WRONG" }
        )?;
        writeln!(
            f,
            "requests: {} issued, {} completed exactly once, {} duplicated, {} lost",
            self.ledger.issued,
            self.ledger.completed,
            self.ledger.duplicates,
            self.ledger.outstanding
        )?;
        write!(f, "data: {} anomalies", self.anomalies.len())
    }
}
