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
use crate::memory::{MemoryTable, VmmRegion, MAX_TABLE_REGIONS};
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

    /// Addresses for a region of `size` bytes svqd maps at `host`: a GPA (an IOVA for a
    /// vhost-vdpa device) above all guest RAM and inside the device's `range`, and a user
    /// address above all of the VMM's.
    fn allocate(
        &mut self,
        mem: &MemoryTable,
        range: Option<(u64, u64)>,
        size: u64,
        host: u64,
    ) -> Result<(u64, u64), ProxyError> {
        let err = |e: svq::IovaError| ProxyError::Engine(format!("shadow address space: {e}"));
        let alloc = match &mut self.alloc {
            Some(a) => a,
            None => {
                let (first, last) = range.unwrap_or((0, u64::MAX));
                // The 1 TiB floor only where the device reaches well beyond it.
                let floor = if last / 2 >= SHADOW_GPA_FLOOR {
                    SHADOW_GPA_FLOOR
                } else {
                    0
                };
                let gpa_first = mem.gpa_end().max(floor).max(first).next_multiple_of(GIB);
                let gpa_last = last.min((1u64 << 52) - 1);
                let uva_first = mem.uva_end().next_multiple_of(GIB).max(GIB);
                self.alloc.insert(Allocators {
                    gpa: IovaTree::new(gpa_first, gpa_last).map_err(err)?,
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

    /// The VMM replaced its memory table (already in `ctx.mem`): drop the parked regions the new
    /// guest memory overlaps or that no longer fit, and send the device the whole table.
    pub fn vmm_table_replaced(&mut self, mut ctx: TableCtx<'_>) -> Result<(), ProxyError> {
        let added: Vec<(u64, u64, u64)> = ctx
            .mem
            .regions()
            .iter()
            .map(|r| (r.gpa, r.uva, r.size))
            .collect();
        for (gpa, uva, size) in added {
            self.evict_parked_overlapping(ctx.reborrow(), gpa, uva, size);
        }
        self.evict_parked_for(ctx.mem, ctx.queues, 0);
        let table = self.device_table(ctx.mem, ctx.queues, None);
        if table.len() > MAX_TABLE_REGIONS && !ctx.device.incremental_memory() {
            return Err(ProxyError::NotAllowed(format!(
                "memory table of {} regions plus shadow rings exceeds {MAX_TABLE_REGIONS}",
                ctx.mem.regions().len()
            )));
        }
        ctx.device.set_mem_table(&table)
    }

    /// The VMM added `region` (already in `ctx.mem`): drop a parked region it overlaps and
    /// give it to the device.
    pub fn vmm_region_added(
        &mut self,
        mut ctx: TableCtx<'_>,
        region: &VmmRegion,
    ) -> Result<(), ProxyError> {
        self.evict_parked_overlapping(ctx.reborrow(), region.gpa, region.uva, region.size);
        if self
            .gpa_floor()
            .is_some_and(|first| region.gpa + region.size > first)
        {
            tracing::warn!(
                gpa = region.gpa,
                "new guest region reaches into the shadow ring address range"
            );
        }
        if ctx.device.incremental_memory() {
            return ctx.device.add_mem_region(&region.device_region());
        }
        let table = self.device_table(ctx.mem, ctx.queues, None);
        ctx.device.set_mem_table(&table)
    }

    /// The VMM removed `region` (already gone from `ctx.mem`): take it from the device.
    pub fn vmm_region_removed(
        &mut self,
        ctx: TableCtx<'_>,
        region: &VmmRegion,
    ) -> Result<(), ProxyError> {
        self.remove_region(ctx, &region.device_region())
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
        let range = ctx.device.address_range();
        let (gpa, uva) = self.allocate(ctx.mem, range, region.size, region.host_addr())?;
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
        self.remove_region(ctx, &region.device_region())?;
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
            if let Err(e) = self.remove_region(ctx, &first.device_region()) {
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

    /// Remove `region` from the device's table. It must be held by no queue, not be parked
    /// and not be in the VMM's table any more (a whole-table device gets the table without it).
    fn remove_region(&self, ctx: TableCtx<'_>, region: &DeviceRegion) -> Result<(), ProxyError> {
        if ctx.device.incremental_memory() {
            return ctx.device.remove_mem_region(region);
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

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::FromRawFd;

    use vhost::vhost_user::message::VhostUserMemoryRegion;

    use super::*;
    use crate::backend::recording::{RecordingDevice, Request};

    const MIB: u64 = 1 << 20;

    fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
        let f = unsafe {
            let fd = libc::memfd_create(c"svqd-space-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            File::from_raw_fd(fd)
        };
        f.set_len(size).unwrap();
        f
    }

    /// A guest of `n` regions of 1 MiB, at GPA i * 2 MiB, user address 0x7f00_0000_0000 + ...
    fn guest(n: u64) -> MemoryTable {
        let mut t = MemoryTable::default();
        let regions: Vec<_> = (0..n)
            .map(|i| {
                VhostUserMemoryRegion::new(i * 2 * MIB, MIB, 0x7f00_0000_0000 + i * 2 * MIB, 0)
            })
            .collect();
        t.set(&regions, (0..n).map(|_| memfd(MIB)).collect())
            .unwrap();
        t
    }

    fn queues(n: usize) -> Vec<QueueSlot> {
        (0..n).map(|_| QueueSlot::new()).collect()
    }

    fn ctx<'a>(
        dev: &'a mut RecordingDevice,
        mem: &'a MemoryTable,
        queues: &'a [QueueSlot],
    ) -> TableCtx<'a> {
        TableCtx {
            device: dev,
            mem,
            queues,
        }
    }

    #[test]
    fn regions_are_placed_outside_guest_memory_and_reused_when_parked() {
        let mem = guest(2);
        let qs = queues(2);
        let mut dev = RecordingDevice::new(2, true);
        let mut space = ShadowSpace::default();
        let r0 = space.region_for(ctx(&mut dev, &mem, &qs), 0, 256).unwrap();
        let r1 = space.region_for(ctx(&mut dev, &mem, &qs), 1, 256).unwrap();
        assert!(
            r0.gpa >= SHADOW_GPA_FLOOR && r0.gpa % GIB == 0,
            "{:#x}",
            r0.gpa
        );
        assert!(r0.uva >= mem.uva_end(), "{:#x}", r0.uva);
        assert!(r1.gpa >= r0.gpa + r0.size, "regions do not overlap");
        assert_eq!(
            dev.take(),
            [
                Request::AddMemRegion(r0.gpa, r0.size),
                Request::AddMemRegion(r1.gpa, r1.size)
            ]
        );
        assert_eq!(space.gpa_floor(), Some(r0.gpa));
        // Parked, it stays in the table and comes back without a request.
        let gpa = r0.gpa;
        space.park(0, r0);
        assert_eq!(space.parked(0).map(|r| r.gpa), Some(gpa));
        assert_eq!(space.device_table(&mem, &qs, None).len(), 3);
        let again = space.region_for(ctx(&mut dev, &mem, &qs), 0, 256).unwrap();
        assert_eq!(again.gpa, gpa);
        assert!(dev.take().is_empty(), "a parked region is reused as it is");
        // Another ring size: the parked region goes, a new one comes.
        space.park(0, again);
        let bigger = space.region_for(ctx(&mut dev, &mem, &qs), 0, 1024).unwrap();
        let log = dev.take();
        assert!(
            matches!(log[0], Request::RemoveMemRegion(g, _) if g == gpa),
            "{log:?}"
        );
        assert!(
            matches!(log[1], Request::AddMemRegion(g, s) if g == bigger.gpa && s == bigger.size)
        );
        // Dropping every region releases the address space; the next one is derived afresh.
        space.drop_region(ctx(&mut dev, &mem, &qs), bigger).unwrap();
        space.drop_region(ctx(&mut dev, &mem, &qs), r1).unwrap();
        assert_eq!(space.gpa_floor(), None);
    }

    #[test]
    fn whole_table_devices_get_the_table_with_guest_and_shadow_regions() {
        let mem = guest(2);
        let qs = queues(1);
        let mut dev = RecordingDevice::new(1, false);
        let mut space = ShadowSpace::default();
        let r = space.region_for(ctx(&mut dev, &mem, &qs), 0, 64).unwrap();
        assert_eq!(
            dev.take(),
            [Request::SetMemTable(vec![
                (0, MIB),
                (2 * MIB, MIB),
                (r.gpa, r.size)
            ])]
        );
        space.drop_region(ctx(&mut dev, &mem, &qs), r).unwrap();
        assert_eq!(
            dev.take(),
            [Request::SetMemTable(vec![(0, MIB), (2 * MIB, MIB)])]
        );
    }

    #[test]
    fn a_full_table_evicts_parked_regions_first() {
        // 7 guest regions + 1 parked = the 8 a whole-table device takes.
        let mem = guest(7);
        let qs = queues(2);
        let mut dev = RecordingDevice::new(2, false);
        let mut space = ShadowSpace::default();
        let r0 = space.region_for(ctx(&mut dev, &mem, &qs), 0, 64).unwrap();
        space.park(0, r0);
        dev.take();
        // Queue 1 needs a region: queue 0's parked one must give way.
        let r1 = space.region_for(ctx(&mut dev, &mem, &qs), 1, 64).unwrap();
        assert!(space.parked(0).is_none());
        let log = dev.take();
        let [Request::SetMemTable(t)] = &log[..] else {
            panic!("{log:?}")
        };
        assert_eq!(t.len(), 8);
        assert_eq!(t[7], (r1.gpa, r1.size));
        // With 8 guest regions nothing fits: a clear error, nothing sent.
        let mem8 = guest(8);
        let mut space = ShadowSpace::default();
        let Err(err) = space.region_for(ctx(&mut dev, &mem8, &qs), 0, 64) else {
            panic!("a ninth region was accepted");
        };
        assert!(
            err.to_string().contains("no free memory-table slot"),
            "{err}"
        );
        assert!(dev.take().is_empty());
        assert_eq!(space.gpa_floor(), None, "the addresses were released");
    }

    #[test]
    fn guest_memory_over_a_parked_region_drops_it() {
        let mem = guest(1);
        let qs = queues(1);
        let mut dev = RecordingDevice::new(1, true);
        let mut space = ShadowSpace::default();
        let r = space.region_for(ctx(&mut dev, &mem, &qs), 0, 64).unwrap();
        let (gpa, size) = (r.gpa, r.size);
        space.park(0, r);
        dev.take();
        // Unrelated memory: nothing happens.
        space.evict_parked_overlapping(ctx(&mut dev, &mem, &qs), 0x100_0000, 0x7e00_0000_0000, MIB);
        assert!(space.parked(0).is_some());
        // Memory over the region's GPA: dropped, removed from the device.
        space.evict_parked_overlapping(
            ctx(&mut dev, &mem, &qs),
            gpa - 4096,
            0x7e00_0000_0000,
            8192,
        );
        assert!(space.parked(0).is_none());
        assert_eq!(dev.take(), [Request::RemoveMemRegion(gpa, size)]);
    }

    #[test]
    fn a_refused_region_releases_its_addresses() {
        let mem = guest(1);
        let qs = queues(1);
        let mut dev = RecordingDevice::new(1, true);
        dev.fail = Some("ADD_MEM_REG");
        let mut space = ShadowSpace::default();
        assert!(space.region_for(ctx(&mut dev, &mem, &qs), 0, 64).is_err());
        assert_eq!(space.gpa_floor(), None);
    }

    #[test]
    fn a_reset_drops_every_region_in_one_table() {
        let mem = guest(1);
        let qs = queues(2);
        let mut dev = RecordingDevice::new(2, false);
        let mut space = ShadowSpace::default();
        for q in 0..2 {
            let r = space.region_for(ctx(&mut dev, &mem, &qs), q, 64).unwrap();
            space.park(q, r);
        }
        dev.take();
        let regions = space.take_parked();
        assert_eq!(regions.len(), 2);
        space.drop_regions(ctx(&mut dev, &mem, &qs), regions);
        assert_eq!(dev.take(), [Request::SetMemTable(vec![(0, MIB)])]);
        assert_eq!(space.gpa_floor(), None);
    }
}
