//! Survives a VMM that shrinks a memory file under svqd's mapping. A region the VMM shares is a
//! file mapping; if the file is truncated later (no F_SEAL_SHRINK), touching the lost part
//! raises SIGBUS, which would kill svqd and every queue with it. Guarded ranges (guest RAM, the
//! dirty log) are registered here; the SIGBUS handler maps an anonymous zero page over the
//! faulting page of a guarded range and returns, so the access completes (reads zeros, writes
//! are lost), and records the fault for the faulting thread. A worker checks
//! [`faults_on_this_thread`] after each batch and stops its queue with a clear error (only the
//! queue that touched lost memory stops); a fault outside every guarded range is a bug in svqd
//! and still kills it (the default action is restored and the access repeats).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Ranges that can be guarded at once (guest regions, shadow rings, dirty logs).
const SLOTS: usize = 128;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};
static GUARDED: [Slot; SLOTS] = [EMPTY; SLOTS];
static FAULTS: AtomicU64 = AtomicU64::new(0);
static LAST_FAULT_ADDR: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

thread_local! {
    /// Guarded faults taken by this thread. Const-initialised, no destructor: a plain TLS
    /// access, safe from the signal handler.
    static THREAD_FAULTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A guarded range; unguarded when dropped (before the mapping goes away).
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            GUARDED[i].len.store(0, Ordering::Release);
            GUARDED[i].start.store(0, Ordering::Release);
        }
    }
}

/// Guard `len` bytes at `start` (a shared file mapping of svqd's). When every slot is taken the
/// range is not guarded (logged): svqd then depends on the VMM keeping the file's size.
pub fn guard(start: usize, len: usize) -> Guard {
    INSTALL.call_once(install);
    for (i, slot) in GUARDED.iter().enumerate() {
        if slot
            .start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            slot.len.store(len, Ordering::Release);
            return Guard { slot: Some(i) };
        }
    }
    tracing::warn!(
        start,
        len,
        "no free SIGBUS guard slot; a VMM shrinking this memory would stop svqd"
    );
    Guard { slot: None }
}

/// How many guarded accesses faulted so far, in all threads.
pub fn fault_count() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// How many guarded accesses of the calling thread faulted so far.
pub fn faults_on_this_thread() -> u64 {
    THREAD_FAULTS.with(|c| c.get())
}

/// The address of the last guarded fault.
pub fn last_fault_addr() -> usize {
    LAST_FAULT_ADDR.load(Ordering::Relaxed)
}

fn install() {
    // SAFETY: a zeroed sigaction with an SA_SIGINFO handler of the right signature and an empty
    // mask is valid; the handler only does async-signal-safe work (atomics, mmap, sigaction).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            tracing::warn!("cannot install the SIGBUS handler");
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let guarded = GUARDED.iter().any(|s| {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        start != 0 && addr >= start && addr - start < len
    });
    if guarded {
        let page = addr & !(4096 - 1);
        // SAFETY: replaces one page of a mapping svqd owns (registered as guarded) with private
        // anonymous memory; MAP_FIXED over our own mapping is what makes the access complete.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            LAST_FAULT_ADDR.store(addr, Ordering::Relaxed);
            FAULTS.fetch_add(1, Ordering::AcqRel);
            THREAD_FAULTS.with(|c| c.set(c.get() + 1));
            return;
        }
    }
    // Not ours to survive: the default action, taken when the access repeats.
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd};

    use super::*;

    #[test]
    fn a_truncated_guarded_mapping_reads_zeros_and_counts_the_fault() {
        // SAFETY: memfd_create with a valid name; the File owns the fd.
        let file =
            unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"sigbus-test".as_ptr(), 0)) };
        file.set_len(8192).unwrap();
        // SAFETY: a fresh shared mapping of our memfd, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        } as *mut u8;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        let g = guard(p as usize, 8192);
        // SAFETY: inside the mapping.
        unsafe { p.add(4096).write_volatile(7) };
        let before = fault_count();
        let mine = faults_on_this_thread();
        file.set_len(4096).unwrap();
        // SAFETY: inside the mapping; the page beyond the file now faults and is replaced.
        let v = unsafe { p.add(4096).read_volatile() };
        assert_eq!(v, 0);
        assert_eq!(fault_count(), before + 1);
        assert_eq!(faults_on_this_thread(), mine + 1);
        assert_eq!(last_fault_addr(), p as usize + 4096);
        // SAFETY: the first page is still in the file.
        unsafe { p.write_volatile(1) };
        assert_eq!(fault_count(), before + 1);
        drop(g);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p.cast(), 8192) };
    }
}
