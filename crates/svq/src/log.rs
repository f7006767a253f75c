//! The vhost dirty log: one bit per 4 KiB guest page, set with an atomic OR.
//!
//! Format (as QEMU and Cloud Hypervisor read it): page `n` (guest-physical address `n * 4096`) is
//! bit `n % 8` of byte `n / 8` of the region. The bytes are shared with the VMM, which clears them
//! with atomic exchanges while we set them, so every access here is an atomic read-modify-write on
//! an [`AtomicU8`]; no bit is ever written with a plain store.
//!
//! [`SharedLog`] wraps the current log so that a transport can swap it at runtime
//! (`VHOST_USER_SET_LOG_BASE` with a fresh region, as Cloud Hypervisor does for every read)
//! without losing a bit: writers mark a whole batch under a read lock, `replace` takes the write
//! lock, so once `replace` returns no writer touches the old region any more and every bit set
//! before the swap is in the old region, every bit after it in the new one.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Size of a page in the vhost dirty log, whatever the host page size is.
pub const LOG_PAGE_SIZE: u64 = 4096;
const LOG_PAGE_SHIFT: u32 = 12;

/// Who keeps the log bytes alive.
enum Backing {
    /// Heap buffer owned by the log (tests, simulations), from `Box::into_raw`: kept as a raw
    /// pointer so that moving the log does not retag the buffer and invalidate `base` (a `Box`
    /// field would; Miri's Stacked Borrows check found it). Freed in `Drop`.
    Owned(*mut [AtomicU8]),
    /// Memory owned by the caller of [`DirtyLog::from_raw`].
    Borrowed,
    /// A `MAP_SHARED` mapping created by [`DirtyLog::from_fd`]; unmapped on drop.
    Mmap { addr: *mut libc::c_void, len: usize },
}

/// A dirty log over a byte region shared with the VMM (vhost log format).
pub struct DirtyLog {
    base: NonNull<AtomicU8>,
    len: usize,
    backing: Backing,
    /// Pages that fell beyond the end of the region (the VMM sized its log too small).
    out_of_range: AtomicU64,
}

// SAFETY: the region is only ever accessed through `AtomicU8` operations, which are safe to share
// between threads; the raw pointers in `Backing::Mmap` are only used by `Drop`.
unsafe impl Send for DirtyLog {}
// SAFETY: see `Send`: all shared access goes through atomics.
unsafe impl Sync for DirtyLog {}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("bytes", &self.len)
            .field("pages", &self.pages())
            .finish()
    }
}

impl DirtyLog {
    /// A zeroed log of `bytes` bytes on the heap (covers `bytes * 8` pages). For tests and for
    /// simulated VMMs.
    pub fn new_owned(bytes: usize) -> Self {
        let buf: Box<[AtomicU8]> = (0..bytes.max(1)).map(|_| AtomicU8::new(0)).collect();
        let raw = Box::into_raw(buf);
        let base = NonNull::new(raw as *mut AtomicU8).expect("Box pointer is non-null");
        DirtyLog {
            base,
            len: bytes,
            backing: Backing::Owned(raw),
            out_of_range: AtomicU64::new(0),
        }
    }

    /// A zeroed heap log large enough for guest memory ending at `mem_end` (exclusive).
    pub fn for_memory_end(mem_end: u64) -> Self {
        let pages = mem_end.div_ceil(LOG_PAGE_SIZE);
        Self::new_owned(pages.div_ceil(8) as usize)
    }

    /// A log over `len` bytes at `ptr` owned by the caller.
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` bytes that stay mapped, readable and writable for the whole
    /// lifetime of the returned log (and of every `Arc` clone of it), and that are only ever
    /// accessed atomically by other parties (the VMM uses atomic exchange/OR on them).
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        let base = NonNull::new(ptr as *mut AtomicU8).unwrap_or(NonNull::dangling());
        DirtyLog {
            base,
            len: if ptr.is_null() { 0 } else { len },
            backing: Backing::Borrowed,
            out_of_range: AtomicU64::new(0),
        }
    }

    /// Map `size` bytes of `fd` at `offset` shared and writable (the fd of `SET_LOG_BASE`, with
    /// the message's `mmap_offset` and `mmap_size`). The mapping is removed when the log drops.
    /// A region that does not fit a regular file is refused (`InvalidInput`): touching it would
    /// raise SIGBUS.
    pub fn from_fd(fd: BorrowedFd<'_>, offset: u64, size: u64) -> io::Result<Self> {
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log size too large"))?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty log region",
            ));
        }
        let invalid = |what| io::Error::new(io::ErrorKind::InvalidInput, what);
        // A region past the end of a file would map, and the first mark there would kill the
        // process with SIGBUS. Only regular files (memfd, shm, hugetlbfs) have a size to check.
        // SAFETY: `libc::stat` is plain integers, for which all-zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is valid for the borrow; fstat only writes the struct it is given.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG
            && offset
                .checked_add(size)
                .is_none_or(|end| end > st.st_size as u64)
        {
            return Err(invalid("log region extends beyond the end of its file"));
        }
        // mmap wants an offset aligned to the host page size: map from the page start and skip
        // the remainder.
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let skew = offset % page;
        let map_off =
            libc::off_t::try_from(offset - skew).map_err(|_| invalid("log offset too large"))?;
        let map_len = len
            .checked_add(skew as usize)
            .ok_or_else(|| invalid("log size too large"))?;
        // SAFETY: a fresh shared mapping of a caller-provided fd; we check the result and own
        // the mapping until Drop unmaps exactly this range.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                map_off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `skew < map_len`, inside the mapping just created.
        let base = unsafe { (addr as *mut u8).add(skew as usize) } as *mut AtomicU8;
        let Some(base) = NonNull::new(base) else {
            // SAFETY: unmapping exactly what was just mapped.
            unsafe { libc::munmap(addr, map_len) };
            return Err(io::Error::other("mmap returned address 0"));
        };
        Ok(DirtyLog {
            base,
            len,
            backing: Backing::Mmap { addr, len: map_len },
            out_of_range: AtomicU64::new(0),
        })
    }

    /// Where the log's bytes are in this process (to guard the range against a VMM that
    /// shrinks the file under the mapping).
    pub fn host_range(&self) -> (usize, usize) {
        (self.base.as_ptr() as usize, self.len)
    }

    /// Size of the region in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// Number of 4 KiB pages the log covers.
    pub fn pages(&self) -> u64 {
        self.len as u64 * 8
    }

    /// Pages that were to be marked but lie beyond the region (should stay 0).
    pub fn out_of_range_pages(&self) -> u64 {
        self.out_of_range.load(Ordering::Relaxed)
    }

    fn byte(&self, i: usize) -> &AtomicU8 {
        debug_assert!(i < self.len);
        // SAFETY: `i < len`, and the region is valid for `len` bytes for our lifetime.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    /// Mark every page overlapping `[gpa, gpa + len)`. Returns the number of pages in the range
    /// (whether or not their bit was already set). Pages beyond the region are counted in
    /// [`DirtyLog::out_of_range_pages`] and reported once.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let first = gpa >> LOG_PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> LOG_PAGE_SHIFT;
        if first == last && first < self.pages() {
            // The common case (a buffer within one page): one atomic OR. Release: see
            // `mark_pages`.
            self.byte((first / 8) as usize)
                .fetch_or(1 << (first % 8), Ordering::Release);
            return 1;
        }
        self.mark_pages(first, last);
        last - first + 1
    }

    /// Mark one page by number.
    pub fn mark_page(&self, pfn: u64) {
        self.mark_pages(pfn, pfn);
    }

    /// Mark pages `first..=last`.
    fn mark_pages(&self, first: u64, mut last: u64) {
        let pages = self.pages();
        if last >= pages {
            let lost = last - first.max(pages) + 1;
            if self.out_of_range.fetch_add(lost, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    first_page = first,
                    last_page = last,
                    log_pages = pages,
                    "dirty log too small for guest memory: pages beyond it cannot be logged"
                );
            }
            if first >= pages {
                return;
            }
            last = pages - 1;
        }
        let (fb, lb) = ((first / 8) as usize, (last / 8) as usize);
        for b in fb..=lb {
            let lo = if b == fb { first % 8 } else { 0 };
            let hi = if b == lb { last % 8 } else { 7 };
            let mask = ((0xffu16 << lo) & (0xffu16 >> (7 - hi))) as u8;
            // Release: whoever fetches-and-clears this byte (acquire) also sees the guest memory
            // writes we are logging. Always an RMW, never a load-then-skip: a plain load would not
            // synchronise with the VMM's clearing exchange.
            self.byte(b).fetch_or(mask, Ordering::Release);
        }
    }

    /// Whether page `pfn` is marked.
    pub fn is_page_dirty(&self, pfn: u64) -> bool {
        if pfn >= self.pages() {
            return false;
        }
        self.byte((pfn / 8) as usize).load(Ordering::Acquire) & (1 << (pfn % 8)) != 0
    }

    /// All marked pages, ascending.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.len {
            let v = self.byte(i).load(Ordering::Acquire);
            push_bits(&mut out, i, v);
        }
        out
    }

    /// All marked pages, ascending, clearing each byte atomically as it is read (what a VMM does
    /// per migration round).
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.len {
            if self.byte(i).load(Ordering::Relaxed) != 0 {
                let v = self.byte(i).swap(0, Ordering::AcqRel);
                push_bits(&mut out, i, v);
            }
        }
        out
    }

    /// Clear every bit.
    pub fn clear(&self) {
        for i in 0..self.len {
            self.byte(i).store(0, Ordering::Release);
        }
    }
}

fn push_bits(out: &mut Vec<u64>, byte: usize, v: u8) {
    for bit in 0..8 {
        if v & (1 << bit) != 0 {
            out.push(byte as u64 * 8 + bit);
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        match self.backing {
            Backing::Mmap { addr, len } => {
                // SAFETY: exactly the mapping `from_fd` created; nothing references it after drop.
                unsafe { libc::munmap(addr, len) };
            }
            // SAFETY: the pointer came from `Box::into_raw` in `new_owned` and is freed once.
            Backing::Owned(raw) => drop(unsafe { Box::from_raw(raw) }),
            Backing::Borrowed => {}
        }
    }
}

/// The current dirty log of a device, replaceable at runtime without losing a bit.
///
/// `None` means logging is off: marks are dropped. Writers use [`SharedLog::batch`] (one read lock
/// for a whole batch of marks); [`SharedLog::replace`] takes the write lock, so when it returns no
/// writer is still inside a batch on the old log.
#[derive(Debug, Default)]
pub struct SharedLog {
    current: RwLock<Option<Arc<DirtyLog>>>,
}

/// A batch of marks against the log that was current when the batch began.
pub struct LogBatch<'a> {
    guard: RwLockReadGuard<'a, Option<Arc<DirtyLog>>>,
}

impl LogBatch<'_> {
    /// Whether a log is installed (marks are not dropped).
    pub fn enabled(&self) -> bool {
        self.guard.is_some()
    }

    /// The log marks go to (`None`: logging is off).
    #[inline]
    pub fn log(&self) -> Option<&DirtyLog> {
        self.guard.as_deref()
    }

    /// Mark `[gpa, gpa + len)`; returns the pages covered (0 when logging is off).
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) -> u64 {
        match self.guard.as_ref() {
            Some(log) => log.mark(gpa, len),
            None => 0,
        }
    }
}

impl SharedLog {
    /// A shared log starting with `log` installed (`None`: logging off).
    pub fn new(log: Option<Arc<DirtyLog>>) -> Self {
        SharedLog {
            current: RwLock::new(log),
        }
    }

    /// Install `new` (or turn logging off with `None`) and return the previous log. When this
    /// returns, every mark made before it is in the returned log and no writer touches it again.
    pub fn replace(&self, new: Option<Arc<DirtyLog>>) -> Option<Arc<DirtyLog>> {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *cur, new)
    }

    /// The installed log, if any.
    pub fn current(&self) -> Option<Arc<DirtyLog>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a log is installed.
    pub fn is_enabled(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Begin a batch of marks (holds the read lock until dropped: keep batches short).
    pub fn batch(&self) -> LogBatch<'_> {
        LogBatch {
            guard: self.current.read().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Mark one range (a batch of one).
    pub fn mark(&self, gpa: u64, len: u64) -> u64 {
        self.batch().mark(gpa, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn bit_layout_matches_vhost_format() {
        let log = DirtyLog::new_owned(4);
        log.mark_page(0);
        log.mark_page(9);
        log.mark_page(31);
        // SAFETY: reading back the owned buffer's bytes through the atomics.
        let bytes: Vec<u8> = (0..4)
            .map(|i| log.byte(i).load(Ordering::Relaxed))
            .collect();
        assert_eq!(bytes, vec![0b0000_0001, 0b0000_0010, 0, 0b1000_0000]);
        assert_eq!(log.dirty_pages(), vec![0, 9, 31]);
    }

    #[test]
    fn mark_covers_exactly_the_overlapped_pages() {
        let log = DirtyLog::new_owned(8);
        assert_eq!(log.mark(0x1fff, 2), 2); // straddles pages 1 and 2
        assert_eq!(log.mark(0x5000, 0), 0); // empty range marks nothing
        assert_eq!(log.mark(0x7000, 0x1000), 1); // exactly page 7
        assert_eq!(log.dirty_pages(), vec![1, 2, 7]);
        // A long run crossing several whole bytes.
        let log = DirtyLog::new_owned(8);
        assert_eq!(log.mark(3 * 4096 + 5, 30 * 4096), 31);
        assert_eq!(log.dirty_pages(), (3..34).collect::<Vec<_>>());
    }

    #[test]
    fn out_of_range_pages_are_counted_not_written() {
        let log = DirtyLog::new_owned(1); // 8 pages
        assert_eq!(log.mark(6 * 4096, 4 * 4096), 4);
        assert_eq!(log.dirty_pages(), vec![6, 7]);
        assert_eq!(log.out_of_range_pages(), 2);
        assert!(!log.is_page_dirty(100));
    }

    #[test]
    fn take_clears_and_clear_clears() {
        let log = DirtyLog::new_owned(2);
        log.mark(0, 3 * 4096);
        assert_eq!(log.take_dirty_pages(), vec![0, 1, 2]);
        assert!(log.dirty_pages().is_empty());
        log.mark_page(15);
        log.clear();
        assert!(log.dirty_pages().is_empty());
    }

    /// A memfd of `len` bytes (what a VMM hands over with SET_LOG_BASE).
    fn memfd(len: u64) -> std::fs::File {
        let name = std::ffi::CString::new("svq-log-test").unwrap();
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by this OwnedFd only.
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let file = std::fs::File::from(owned);
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn from_fd_maps_a_shared_region() {
        let file = memfd(8192);
        let a = DirtyLog::from_fd(file.as_fd(), 4096 + 16, 64).unwrap();
        let b = DirtyLog::from_fd(file.as_fd(), 4096 + 16, 64).unwrap();
        a.mark_page(12);
        assert_eq!(b.dirty_pages(), vec![12], "both mappings share the bytes");
    }

    /// A region past the end of its file would map, and the first mark there would kill the
    /// process with SIGBUS: refused up front.
    #[test]
    fn from_fd_refuses_a_region_beyond_the_file() {
        let file = memfd(4096);
        for (offset, size) in [(0, 8192), (4000, 200), (u64::MAX - 1, 16)] {
            let e = DirtyLog::from_fd(file.as_fd(), offset, size).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidInput,
                "{offset:#x}+{size:#x}"
            );
        }
        let log = DirtyLog::from_fd(file.as_fd(), 0, 4096).unwrap();
        assert_eq!(log.mark(8 * 4096 * 4095, 1), 1, "last byte of the file");
    }

    #[test]
    fn replace_hands_over_without_losing_bits() {
        let shared = Arc::new(SharedLog::new(Some(Arc::new(DirtyLog::new_owned(64)))));
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for p in 0..512u64 {
                    let b = shared.batch();
                    b.mark(p * 4096, 1);
                }
            })
        };
        let mut old_logs = Vec::new();
        for _ in 0..20 {
            old_logs.push(
                shared
                    .replace(Some(Arc::new(DirtyLog::new_owned(64))))
                    .unwrap(),
            );
            std::thread::yield_now();
        }
        writer.join().unwrap();
        old_logs.push(shared.current().unwrap());
        let mut all: Vec<u64> = old_logs.iter().flat_map(|l| l.dirty_pages()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, (0..512).collect::<Vec<_>>());
        // Once replaced, an old log receives nothing more.
        let old = shared.replace(None).unwrap();
        let before = old.dirty_pages();
        shared.mark(0, 4096 * 100);
        assert_eq!(old.dirty_pages(), before);
    }
}
