//! The shadow rings' place in the device's memory: an address for each shadow region outside all
//! guest RAM (GPA) and above all of the VMM's user addresses (UVA), regions parked between shadow
//! periods, and the device memory-table edits that add and remove them.
//!
//! Parking: after a switch back the shadow region stays in the device's table and the queue's
//! next shadow period reuses it. Adding or removing a region costs a whole memory-table rebuild
//! in a backend without CONFIGURE_MEM_SLOTS (DPDK: about 50 ms each, measured), and the switch
//! back happens on the VM-stop path of a migration, inside its downtime.

use std::collections::BTreeMap;

use svq::IovaTree;

use crate::backend::{BackendDevice, DeviceRegion};
use crate::error::ProxyError;
use crate::memory::{MemoryTable, MAX_TABLE_REGIONS};
use crate::queue::{Mode, QueueSlot};
use crate::shadow::ShadowRegion;

/// Lowest GPA used for shadow rings: 1 TiB, above the RAM of any guest svqd is meant for (and
/// always above the highest guest region).
const SHADOW_GPA_FLOOR: u64 = 1 << 40;
const GIB: u64 = 1 << 30;

/// What a memory-table edit needs besides the shadow space: the device, the VMM's regions and
/// the queues (whose shadow regions in use are part of the table).
pub struct TableCtx<'a> {
    /// The device whose table is edited.
    pub device: &'a mut dyn BackendDevice,
    /// The VMM's memory table.
    pub mem: &'a MemoryTable,
    /// The queues.
    pub queues: &'a [QueueSlot],
}

impl TableCtx<'_> {
    /// The same context for one more call.
    pub fn reborrow(&mut self) -> TableCtx<'_> {
        TableCtx {
            device: &mut *self.device,
            mem: self.mem,
            queues: self.queues,
        }
    }
}

/// Address allocators, derived from the memory table when the first region is placed.
struct Allocators {
    gpa: IovaTree,
    uva: IovaTree,
}

/// The shadow address space of one session.
#[derive(Default)]
pub struct ShadowSpace {
    alloc: Option<Allocators>,
    parked: BTreeMap<usize, ShadowRegion>,
}

/// Memory-table slots reserved for shadow regions out of the device's GET_MAX_MEM_SLOTS.
pub fn reserved_slots(queues: usize) -> u64 {
    queues.clamp(1, 64) as u64
}

impl ShadowSpace {
    /// Forget everything (the session ends; the device connection goes with it).
    pub fn clear(&mut self) {
        *self = ShadowSpace::default();
    }

    /// The region queue `q` parked, if any.
    pub fn parked(&self, q: usize) -> Option<&ShadowRegion> {
        self.parked.get(&q)
    }

    /// Keep `region` in the device's table for queue `q`'s next shadow period.
    pub fn park(&mut self, q: usize, region: ShadowRegion) {
        if let Some(old) = self.parked.insert(q, region) {
            // Never happens: a queue parks only the region it used, and took the parked one.
            tracing::error!(
                queue = q,
                gpa = old.gpa,
                "a parked shadow region was replaced"
            );
        }
    }

    /// Take every parked region out (device reset: dropped once the device reset its rings).
    pub fn take_parked(&mut self) -> Vec<ShadowRegion> {
        std::mem::take(&mut self.parked).into_values().collect()
    }

    /// The first GPA of the shadow range, while it exists.
    pub fn gpa_floor(&self) -> Option<u64> {
        self.alloc.as_ref().map(|a| a.gpa.range().0)
    }

    fn allocate(
        &mut self,
        mem: &MemoryTable,
        size: u64,
        host: u64,
    ) -> Result<(u64, u64), ProxyError> {
        let err = |e: svq::IovaError| ProxyError::Engine(format!("shadow address space: {e}"));
        let alloc = match &mut self.alloc {
            Some(a) => a,
            None => {
                let gpa_first = mem.gpa_end().max(SHADOW_GPA_FLOOR).next_multiple_of(GIB);
                let uva_first = mem.uva_end().next_multiple_of(GIB).max(GIB);
                self.alloc.insert(Allocators {
                    gpa: IovaTree::new(gpa_first, (1u64 << 52) - 1).map_err(err)?,
                    uva: IovaTree::new(uva_first, (1u64 << 63) - 1).map_err(err)?,
                })
            }
        };
        let gpa = alloc.gpa.alloc(size, 4096, host).map_err(err)?;
        match alloc.uva.alloc(size, 4096, host) {
            Ok(uva) => Ok((gpa, uva)),
            Err(e) => {
                let _ = alloc.gpa.remove(gpa);
                Err(err(e))
            }
        }
    }

    fn release(&mut self, region: &ShadowRegion) {
        if let Some(a) = self.alloc.as_mut() {
            let _ = a.gpa.remove(region.gpa);
            let _ = a.uva.remove(region.uva);
            if a.gpa.is_empty() {
                // Re-derive from the memory table next time (it may have grown).
                self.alloc = None;
            }
        }
    }

    /// The device's whole memory table: the VMM's regions plus every shadow region, in use or
    /// parked, plus `extra` (for SET_MEM_TABLE, which replaces the whole table).
    pub fn device_table(
        &self,
        mem: &MemoryTable,
        queues: &[QueueSlot],
        extra: Option<&ShadowRegion>,
    ) -> Vec<DeviceRegion> {
        let in_use = queues.iter().filter_map(|q| match &q.mode {
            Mode::Shadow(sq) => Some(&sq.region),
            Mode::Passthrough => None,
        });
        mem.regions()
            .iter()
            .map(|r| r.device_region())
            .chain(
                in_use
                    .chain(self.parked.values())
                    .chain(extra)
                    .map(ShadowRegion::device_region),
            )
            .collect()
    }

    /// The memory of queue `q`'s shadow ring of `size` entries: the region it parked when it
    /// fits, else a new one, added to the device's table.
    pub fn region_for(
        &mut self,
        mut ctx: TableCtx<'_>,
        q: usize,
        size: u16,
    ) -> Result<ShadowRegion, ProxyError> {
        if let Some(r) = self.parked.remove(&q) {
            if r.ring_size == size {
                return Ok(r);
            }
            self.drop_region(ctx.reborrow(), r)?;
        }
        let mut region = ShadowRegion::create(q, size)?;
        let (gpa, uva) = self.allocate(ctx.mem, region.size, region.host_addr())?;
        region.gpa = gpa;
        region.uva = uva;
        if let Err(e) = self.add_to_device(ctx, &region) {
            self.release(&region);
            return Err(e);
        }
        Ok(region)
    }

    /// A SET_MEM_TABLE carries [`MAX_TABLE_REGIONS`] regions at most: forget parked regions
    /// until the table about to be sent, plus `extra` regions, fits. The SET_MEM_TABLE that
    /// follows removes them from the device.
    pub fn evict_parked_for(&mut self, mem: &MemoryTable, queues: &[QueueSlot], extra: usize) {
        while self.device_table(mem, queues, None).len() + extra > MAX_TABLE_REGIONS {
            let Some((_, r)) = self.parked.pop_first() else {
                return;
            };
            self.release(&r);
        }
    }

    /// Drop the parked regions that overlap guest memory the VMM just added (a region above the
    /// ones the shadow address space was derived from), in guest-physical or user addresses.
    pub fn evict_parked_overlapping(
        &mut self,
        mut ctx: TableCtx<'_>,
        gpa: u64,
        uva: u64,
        size: u64,
    ) {
        let overlaps =
            |a: u64, b: u64, len: u64| a < b.saturating_add(len) && b < a.saturating_add(size);
        let hit: Vec<usize> = self
            .parked
            .iter()
            .filter(|(_, r)| overlaps(gpa, r.gpa, r.size) || overlaps(uva, r.uva, r.size))
            .map(|(&q, _)| q)
            .collect();
        for q in hit {
            let r = self.parked.remove(&q).expect("listed");
            tracing::warn!(
                queue = q,
                gpa = r.gpa,
                "guest memory overlaps a parked shadow region; dropping it"
            );
            if let Err(e) = self.drop_region(ctx.reborrow(), r) {
                tracing::error!(queue = q, error = %e, "cannot remove the parked shadow region");
            }
        }
    }

    /// Remove a region no ring uses from the device's table and release its addresses (only
    /// once the device let go of it: they must not be handed out again while it maps them).
    pub fn drop_region(
        &mut self,
        ctx: TableCtx<'_>,
        region: ShadowRegion,
    ) -> Result<(), ProxyError> {
        self.remove_from_device(ctx, &region)?;
        self.release(&region);
        Ok(())
    }

    /// Remove `regions` (no longer held by a queue or parked) from the device: one removal each,
    /// or one table for all of them.
    pub fn drop_regions(&mut self, mut ctx: TableCtx<'_>, regions: Vec<ShadowRegion>) {
        let Some(first) = regions.first() else {
            return;
        };
        if !ctx.device.incremental_memory() {
            // The table sent leaves out every region svqd no longer holds: once is enough.
            if let Err(e) = self.remove_from_device(ctx, first) {
                tracing::warn!(error = %e, "cannot remove the shadow regions after a reset");
                return;
            }
            for r in &regions {
                self.release(r);
            }
            return;
        }
        for r in regions {
            if let Err(e) = self.drop_region(ctx.reborrow(), r) {
                tracing::warn!(error = %e, "cannot remove a shadow region after a reset");
            }
        }
    }

    fn add_to_device(
        &mut self,
        ctx: TableCtx<'_>,
        region: &ShadowRegion,
    ) -> Result<(), ProxyError> {
        if ctx.device.incremental_memory() {
            return ctx.device.add_mem_region(&region.device_region());
        }
        self.evict_parked_for(ctx.mem, ctx.queues, 1);
        let table = self.device_table(ctx.mem, ctx.queues, Some(region));
        if table.len() > MAX_TABLE_REGIONS {
            return Err(ProxyError::NotAllowed(format!(
                "no free memory-table slot for a shadow ring ({} regions, backend without \
                 CONFIGURE_MEM_SLOTS takes {MAX_TABLE_REGIONS})",
                table.len() - 1
            )));
        }
        ctx.device.set_mem_table(&table)
    }

    /// Remove `region` from the device's table. It must be held by no queue and not be parked
    /// any more (a whole-table device gets the table without it).
    fn remove_from_device(
        &mut self,
        ctx: TableCtx<'_>,
        region: &ShadowRegion,
    ) -> Result<(), ProxyError> {
        if ctx.device.incremental_memory() {
            return ctx.device.remove_mem_region(&region.device_region());
        }
        let table = self.device_table(ctx.mem, ctx.queues, None);
        if table.is_empty() {
            // Nothing to tell: an empty table cannot be sent, and the device keeps a region it
            // will never be pointed at again until the VMM sends its own table.
            return Ok(());
        }
        ctx.device.set_mem_table(&table)
    }
}
