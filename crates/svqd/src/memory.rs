//! The VMM's memory table as svqd sees it: every region mapped into svqd (the shadow engine reads
//! and writes guest rings and buffers through these mappings), ring-address translation from the
//! VMM's user address space to guest-physical addresses, and the table to forward to the backend.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::backend::DeviceRegion;
use crate::error::ProxyError;
use crate::sigbus;

/// Most regions a SET_MEM_TABLE may carry (VHOST_MEMORY_BASELINE_NREGIONS: what QEMU and
/// libvhost-user accept without CONFIGURE_MEM_SLOTS).
pub const MAX_TABLE_REGIONS: usize = 8;

/// One region of guest RAM shared by the VMM.
#[derive(Clone)]
pub struct VmmRegion {
    /// Guest-physical address of the region.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Address of the region in the VMM's address space (what ring addresses are expressed in).
    pub uva: u64,
    /// Offset of the region in `file`.
    pub mmap_offset: u64,
    /// The VMM's fd for the region, kept to forward it to a reconnected or re-tabled backend.
    pub file: Arc<File>,
    /// svqd's own mapping of the region.
    mapping: Arc<GuestRegionMmap>,
    /// Keeps svqd alive if the VMM truncates the file later ([`sigbus`]).
    _guard: Arc<sigbus::Guard>,
}

/// The region must lie inside its file: a mapping past the end would map, and the first access
/// there would raise SIGBUS. Files that are not regular (a device, /dev/zero) have no size to
/// check. A file without F_SEAL_SHRINK can still be truncated later: [`sigbus`] guards that.
fn check_file_extent(file: &File, gpa: u64, size: u64, mmap_offset: u64) -> Result<(), ProxyError> {
    let meta = file
        .metadata()
        .map_err(|e| ProxyError::Io("fstat memory region", e))?;
    if meta.is_file()
        && mmap_offset
            .checked_add(size)
            .is_none_or(|end| end > meta.len())
    {
        return Err(ProxyError::BadRequest(format!(
            "memory region gpa {gpa:#x} of {size:#x} bytes at file offset {mmap_offset:#x} \
             extends past the end of its file ({:#x} bytes)",
            meta.len()
        )));
    }
    Ok(())
}

impl VmmRegion {
    fn new(
        gpa: u64,
        size: u64,
        uva: u64,
        mmap_offset: u64,
        file: File,
    ) -> Result<Self, ProxyError> {
        if size == 0 {
            return Err(ProxyError::BadRequest("memory region of size 0".into()));
        }
        if gpa.checked_add(size).is_none() || uva.checked_add(size).is_none() {
            return Err(ProxyError::BadRequest(format!(
                "memory region gpa {gpa:#x} uva {uva:#x} size {size:#x} wraps"
            )));
        }
        let len = usize::try_from(size)
            .map_err(|_| ProxyError::BadRequest(format!("memory region size {size:#x}")))?;
        check_file_extent(&file, gpa, size, mmap_offset)?;
        let file = Arc::new(file);
        let dup = file
            .try_clone()
            .map_err(|e| ProxyError::Io("dup memory region fd", e))?;
        let region =
            MmapRegion::from_file(FileOffset::new(dup, mmap_offset), len).map_err(|e| {
                ProxyError::BadRequest(format!(
                    "cannot map memory region gpa {gpa:#x} size {size:#x}: {e}"
                ))
            })?;
        let mapping = GuestRegionMmap::new(region, GuestAddress(gpa))
            .ok_or_else(|| ProxyError::BadRequest(format!("memory region at {gpa:#x} wraps")))?;
        let guard = Arc::new(sigbus::guard(mapping.as_ptr() as usize, len));
        Ok(VmmRegion {
            gpa,
            size,
            uva,
            mmap_offset,
            file,
            mapping: Arc::new(mapping),
            _guard: guard,
        })
    }

    fn overlaps(&self, other: &VmmRegion) -> bool {
        let gpa = self.gpa < other.gpa + other.size && other.gpa < self.gpa + self.size;
        let uva = self.uva < other.uva + other.size && other.uva < self.uva + self.size;
        gpa || uva
    }

    /// The region as the device's memory table holds it (borrowing our fd).
    pub fn device_region(&self) -> DeviceRegion {
        DeviceRegion {
            gpa: self.gpa,
            size: self.size,
            uva: self.uva,
            mmap_offset: self.mmap_offset,
            fd: self.file.as_raw_fd(),
            host_addr: self.mapping.as_ptr() as u64,
            device_readonly: 0,
        }
    }
}

/// Guest memory shared with worker threads: replaced as a whole when the table changes, so a worker
/// holding a snapshot keeps valid mappings until it drops it.
#[derive(Default)]
pub struct SharedMemory {
    current: RwLock<Arc<GuestMemoryMmap>>,
}

impl SharedMemory {
    /// The current guest memory.
    pub fn snapshot(&self) -> Arc<GuestMemoryMmap> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, mem: GuestMemoryMmap) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(mem);
    }
}

/// The VMM's memory table.
#[derive(Default)]
pub struct MemoryTable {
    regions: Vec<VmmRegion>,
    shared: Arc<SharedMemory>,
}

impl MemoryTable {
    /// The guest memory handle shared with workers.
    pub fn shared(&self) -> Arc<SharedMemory> {
        self.shared.clone()
    }

    /// The regions, in the order the VMM gave them.
    pub fn regions(&self) -> &[VmmRegion] {
        &self.regions
    }

    /// Replace the whole table (SET_MEM_TABLE).
    pub fn set(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), ProxyError> {
        if regions.len() > MAX_TABLE_REGIONS {
            return Err(ProxyError::BadRequest(format!(
                "SET_MEM_TABLE with {} regions (at most {MAX_TABLE_REGIONS})",
                regions.len()
            )));
        }
        if regions.len() != files.len() {
            return Err(ProxyError::BadRequest(format!(
                "SET_MEM_TABLE with {} regions but {} fds",
                regions.len(),
                files.len()
            )));
        }
        let mut new: Vec<VmmRegion> = Vec::with_capacity(regions.len());
        for (r, f) in regions.iter().zip(files) {
            let region = VmmRegion::new(
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
                f,
            )?;
            if new.iter().any(|o| o.overlaps(&region)) {
                return Err(ProxyError::BadRequest(format!(
                    "memory region at gpa {:#x} overlaps another",
                    region.gpa
                )));
            }
            new.push(region);
        }
        self.regions = new;
        self.publish()
    }

    /// Add one region (ADD_MEM_REG). `limit` is the slot count advertised to the VMM.
    pub fn add(
        &mut self,
        r: &VhostUserMemoryRegion,
        file: File,
        limit: usize,
    ) -> Result<VmmRegion, ProxyError> {
        if self.regions.len() >= limit {
            return Err(ProxyError::BadRequest(format!(
                "ADD_MEM_REG beyond the {limit} advertised slots"
            )));
        }
        let region = VmmRegion::new(
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
            file,
        )?;
        if self.regions.iter().any(|o| o.overlaps(&region)) {
            return Err(ProxyError::BadRequest(format!(
                "ADD_MEM_REG at gpa {:#x} overlaps an existing region",
                region.gpa
            )));
        }
        self.regions.push(region.clone());
        self.publish()?;
        Ok(region)
    }

    /// Remove the region matching gpa, size and uva exactly (REM_MEM_REG).
    pub fn remove(&mut self, r: &VhostUserMemoryRegion) -> Result<VmmRegion, ProxyError> {
        let (gpa, size, uva) = (r.guest_phys_addr, r.memory_size, r.user_addr);
        let pos = self
            .regions
            .iter()
            .position(|o| o.gpa == gpa && o.size == size && o.uva == uva)
            .ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "REM_MEM_REG of unknown region gpa {gpa:#x} size {size:#x}"
                ))
            })?;
        let region = self.regions.remove(pos);
        self.publish()?;
        Ok(region)
    }

    /// Forget everything (VMM disconnect, RESET_OWNER).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.shared.publish(GuestMemoryMmap::default());
    }

    fn publish(&mut self) -> Result<(), ProxyError> {
        let mem = GuestMemoryMmap::from_arc_regions(
            self.regions.iter().map(|r| r.mapping.clone()).collect(),
        )
        .map_err(|e| ProxyError::BadRequest(format!("inconsistent memory table: {e}")))?;
        self.shared.publish(mem);
        Ok(())
    }

    /// Translate a VMM user address range to a guest-physical address, if one region holds it all.
    pub fn uva_to_gpa(&self, uva: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = uva.checked_sub(r.uva)?;
            (off.checked_add(len)? <= r.size).then_some(r.gpa + off)
        })
    }

    /// First guest-physical address above all regions.
    pub fn gpa_end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.gpa + r.size)
            .max()
            .unwrap_or(0)
    }

    /// First VMM user address above all regions.
    pub fn uva_end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.uva + r.size)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn memfd(size: u64) -> File {
        let f = tempfile_memfd();
        f.set_len(size).unwrap();
        f
    }

    fn tempfile_memfd() -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
        unsafe {
            let fd = libc::memfd_create(c"svqd-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }
    }

    #[test]
    fn table_translates_and_rejects_overlaps() {
        let mut t = MemoryTable::default();
        let regs = [
            VhostUserMemoryRegion::new(0, 0x10000, 0x7f00_0000_0000, 0),
            VhostUserMemoryRegion::new(0x10_0000, 0x10000, 0x7f10_0000_0000, 0),
        ];
        t.set(&regs, vec![memfd(0x10000), memfd(0x10000)]).unwrap();
        assert_eq!(t.uva_to_gpa(0x7f00_0000_1000, 16), Some(0x1000));
        assert_eq!(t.uva_to_gpa(0x7f10_0000_0ff0, 16), Some(0x10_0ff0));
        assert_eq!(t.uva_to_gpa(0x7f00_0000_fff8, 16), None, "crosses the end");
        assert_eq!(t.uva_to_gpa(0x1234, 1), None);
        assert_eq!(t.gpa_end(), 0x11_0000);
        let overlap = VhostUserMemoryRegion::new(0x8000, 0x10000, 0x7f20_0000_0000, 0);
        assert!(t.add(&overlap, memfd(0x10000), 16).is_err());
        let ok = VhostUserMemoryRegion::new(0x20_0000, 0x1000, 0x7f20_0000_0000, 0);
        t.add(&ok, memfd(0x1000), 16).unwrap();
        assert_eq!(t.shared().snapshot().num_regions(), 3);
        t.remove(&ok).unwrap();
        assert!(t.remove(&ok).is_err());
        let too_many: Vec<_> = (0..9)
            .map(|i| VhostUserMemoryRegion::new(i * 0x1000, 0x1000, 0x1000_0000 + i * 0x1000, 0))
            .collect();
        let files = (0..9).map(|_| memfd(0x1000)).collect();
        assert!(t.set(&too_many, files).is_err());
    }

    #[test]
    fn regions_past_the_end_of_their_file_are_refused() {
        let mut t = MemoryTable::default();
        for (size, offset) in [(0x20000, 0), (0x10000, 0x1000), (0x1000, u64::MAX - 0x800)] {
            let r = VhostUserMemoryRegion::new(0, size, 0x7f00_0000_0000, offset);
            let err = t.set(&[r], vec![memfd(0x10000)]).unwrap_err();
            assert!(err.to_string().contains("past the end"), "{err}");
            assert!(t.add(&r, memfd(0x10000), 8).is_err());
        }
        assert!(t.regions().is_empty());
        let fits = VhostUserMemoryRegion::new(0, 0x8000, 0x7f00_0000_0000, 0x8000);
        t.set(&[fits], vec![memfd(0x10000)]).unwrap();
    }
}
