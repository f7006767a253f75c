//! Guest RAM: a shared memfd, as QEMU's `memory-backend-memfd,share=on`.
//!
//! The guest's own view is a `GuestMemoryMmap<AtomicBitmap>` whose bitmap (4 KiB pages) plays the
//! role of KVM's dirty log: every write the simulated guest CPU makes through vm-memory marks its
//! page. Device writes come through the backend's separate mapping of the same memfd and are *not*
//! in this bitmap: only the vhost dirty log can report them, which is what the oracle tests.

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::Hasher;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

/// Size of a dirty-log page (the vhost log is always 4 KiB per bit).
pub const PAGE_SIZE: u64 = 4096;

// The oracle's page is the engine's log page: a mismatch would make every comparison meaningless.
const _: () = assert!(PAGE_SIZE == svq::LOG_PAGE_SIZE);

/// The guest's memory type: dirty bitmap = simulated KVM dirty log of guest CPU writes.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Creates an anonymous memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string; the flags are valid for memfd_create.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// One guest RAM instance (source or destination of a migration).
pub struct GuestRam {
    file: Arc<File>,
    size: u64,
    mem: GuestMem,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("fd", &self.file.as_raw_fd())
            .field("size", &self.size)
            .finish()
    }
}

impl GuestRam {
    /// Allocates `size` bytes (a multiple of 4 KiB) of shared guest RAM at guest address 0.
    pub fn new(name: &str, size: u64) -> io::Result<Arc<Self>> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "guest RAM size must be a non-zero multiple of 4 KiB",
            ));
        }
        let file = Arc::new(memfd(name, size)?);
        let bitmap = AtomicBitmap::new(
            size as usize,
            NonZeroUsize::new(PAGE_SIZE as usize).expect("non-zero"),
        );
        let region = MmapRegionBuilder::new_with_bitmap(size as usize, bitmap)
            .with_file_offset(FileOffset::from_arc(file.clone(), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(io::Error::other)?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| io::Error::other("guest region overflows"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(io::Error::other)?;
        Ok(Arc::new(GuestRam { file, size, mem }))
    }

    /// The guest's view of its memory (writes mark the CPU dirty bitmap).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The memfd backing the RAM (handed to backends with SET_MEM_TABLE / ADD_MEM_REG).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Size of the backing memfd as the kernel reports it (the oracle checks both sides are full).
    pub fn file_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The host virtual address of the mapping: the "userspace address" a VMM sends in its memory
    /// table and ring addresses.
    pub fn host_addr(&self) -> u64 {
        let region = self.mem.find_region(GuestAddress(0)).expect("region at 0");
        region.as_ptr() as u64
    }

    fn cpu_bitmap(&self) -> &AtomicBitmap {
        let region = self.mem.find_region(GuestAddress(0)).expect("region at 0");
        let mmap: &vm_memory::MmapRegion<AtomicBitmap> = region;
        mmap.bitmap()
    }

    /// Pages the guest CPU wrote since the last call (and resets the bitmap), like
    /// KVM_GET_DIRTY_LOG with manual protect clear.
    pub fn take_cpu_dirty(&self) -> Vec<u64> {
        let words = self.cpu_bitmap().get_and_reset();
        let mut pages = Vec::new();
        for (w, word) in words.iter().enumerate() {
            let mut v = *word;
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                let pfn = w as u64 * 64 + b;
                if pfn < self.pages() {
                    pages.push(pfn);
                }
                v &= v - 1;
            }
        }
        pages
    }

    /// Clears the CPU dirty bitmap.
    pub fn reset_cpu_dirty(&self) {
        self.cpu_bitmap().reset();
    }

    /// Reads page `pfn` into `buf` (4 KiB).
    pub fn read_page(&self, pfn: u64, buf: &mut [u8; PAGE_SIZE as usize]) -> io::Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(pfn * PAGE_SIZE))
            .map_err(io::Error::other)
    }

    /// Copies page `pfn` from `self` into `dst` (the migration stream, one page).
    pub fn copy_page_to(&self, dst: &GuestRam, pfn: u64) -> io::Result<()> {
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.read_page(pfn, &mut buf)?;
        dst.mem
            .write_slice(&buf, GuestAddress(pfn * PAGE_SIZE))
            .map_err(io::Error::other)
    }

    /// Copies every page to `dst` (the first pre-copy round).
    pub fn copy_all_to(&self, dst: &GuestRam) -> io::Result<()> {
        if dst.size != self.size {
            return Err(io::Error::other("RAM sizes differ"));
        }
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        while off < self.size {
            let n = CHUNK.min((self.size - off) as usize);
            self.mem
                .read_slice(&mut buf[..n], GuestAddress(off))
                .map_err(io::Error::other)?;
            dst.mem
                .write_slice(&buf[..n], GuestAddress(off))
                .map_err(io::Error::other)?;
            off += n as u64;
        }
        Ok(())
    }

    /// A 64-bit hash of every page (to compare a memory with a later state of another).
    pub fn page_hashes(&self) -> io::Result<Vec<u64>> {
        let mut buf = [0u8; PAGE_SIZE as usize];
        let mut out = Vec::with_capacity(self.pages() as usize);
        for pfn in 0..self.pages() {
            self.read_page(pfn, &mut buf)?;
            let mut h = DefaultHasher::new();
            h.write(&buf);
            out.push(h.finish());
        }
        Ok(out)
    }
}
