//! A vring whose used-ring writes are atomic with respect to `SET_VRING_ADDR`.
//!
//! vhost-user-backend handles `SET_VRING_ADDR` in three separate steps (set the addresses, read
//! used.idx from the new ring, set next_used), each under the vring lock but not together. A
//! completion thread adding a used entry between them writes the new ring at the old index and is
//! then overwritten. qemu-storage-daemon cannot do that (its completions run in the same event loop
//! as the protocol), so a reference backend that emulates it must not either: this wrapper makes
//! `add_used` wait while an address change is in progress.
//!
//! It also fixes a second gap: vhost-user-backend registers a kick fd with its epoll loop only
//! when a ring is initialised, so a `SET_VRING_KICK` on a *running* ring (what svqd does to take
//! the notifications over before draining) leaves the new fd unwatched and every later kick is
//! lost. qemu-storage-daemon re-watches the new fd; here the backend installs a hook that
//! registers it as an extra listener of the vring's worker.
//!
//! And like qemu-storage-daemon, a new call fd is signalled once at once (a spurious interrupt
//! per ring start, which every driver and proxy must tolerate).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLockReadGuard, RwLockWriteGuard};

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};

use super::BackendMemory;

#[derive(Default)]
struct Gate {
    changing: Mutex<bool>,
    cv: Condvar,
}

/// Registers (`true`) or removes (`false`) a kick fd of a running ring with the vring worker.
pub type RekickHook = Arc<dyn Fn(std::os::fd::RawFd, bool) + Send + Sync>;

/// [`VringRwLock`] with the `SET_VRING_ADDR` gate and the running-ring kick fix described in the
/// module documentation.
#[derive(Clone)]
pub struct GatedVring {
    inner: VringRwLock<BackendMemory>,
    gate: Arc<Gate>,
    rekick: Arc<Mutex<Option<RekickHook>>>,
    /// Held across a completion and its signal, and by a call fd change: a single-threaded
    /// backend (qemu-storage-daemon) never handles GET_VRING_BASE between the two.
    completing: Arc<Mutex<()>>,
    /// Watch a kick fd replaced on a running ring even while it is disabled (libvhost-user).
    serves_disabled: Arc<AtomicBool>,
}

impl GatedVring {
    /// Installs the hook that watches a kick fd replaced while the ring runs (once).
    pub fn install_rekick(&self, make: impl FnOnce() -> RekickHook) {
        let mut h = self.rekick.lock().unwrap_or_else(|e| e.into_inner());
        if h.is_none() {
            *h = Some(make());
        }
    }

    /// Keep watching a kick fd replaced on a running ring while the ring is disabled, as
    /// libvhost-user, which serves a disabled ring.
    pub fn set_serves_disabled(&self, serves: bool) {
        self.serves_disabled.store(serves, Ordering::Release);
    }

    /// Runs `complete` (a used entry and its signal) with no call fd change in between, as one
    /// step of a single-threaded backend.
    pub fn completing<R>(&self, complete: impl FnOnce() -> R) -> R {
        let _g = self.completing.lock().unwrap_or_else(|e| e.into_inner());
        complete()
    }

    fn open_gate(&self) {
        let mut g = self.gate.changing.lock().unwrap_or_else(|e| e.into_inner());
        *g = false;
        self.gate.cv.notify_all();
    }
}

impl<'a> VringStateGuard<'a, BackendMemory> for GatedVring {
    type G = RwLockReadGuard<'a, VringState<BackendMemory>>;
}

impl<'a> VringStateMutGuard<'a, BackendMemory> for GatedVring {
    type G = RwLockWriteGuard<'a, VringState<BackendMemory>>;
}

impl VringT<BackendMemory> for GatedVring {
    fn new(mem: BackendMemory, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(GatedVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            gate: Arc::new(Gate::default()),
            rekick: Arc::new(Mutex::new(None)),
            completing: Arc::new(Mutex::new(())),
            serves_disabled: Arc::new(AtomicBool::new(false)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, BackendMemory>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, BackendMemory>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        let mut g = self.gate.changing.lock().unwrap_or_else(|e| e.into_inner());
        while *g {
            g = self.gate.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        // The gate stays held while the entry and used.idx are written.
        let r = self.inner.add_used(desc_index, len);
        drop(g);
        r
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        tracing::debug!(enabled, "backend: enabled");
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        // Close the gate (waiting for an add_used in progress), until set_queue_next_used.
        *self.gate.changing.lock().unwrap_or_else(|e| e.into_inner()) = true;
        let r = self.inner.set_queue_info(desc_table, avail_ring, used_ring);
        if r.is_err() {
            self.open_gate();
        }
        r
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        tracing::debug!(base, "backend: SET_VRING_BASE");
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        tracing::debug!(idx, "backend: SET_VRING_ADDR next_used");
        self.inner.set_queue_next_used(idx);
        self.open_gate();
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        let r = self.inner.queue_used_idx();
        if r.is_err() {
            self.open_gate();
        }
        r
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        tracing::debug!(ready, "backend: queue ready");
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        let (running, enabled, old_fd) = {
            let st = self.inner.get_ref();
            (
                st.get_queue().ready(),
                st.is_enabled(),
                st.get_kick().as_ref().map(|k| k.as_raw_fd()),
            )
        };
        tracing::debug!(
            running,
            enabled,
            some = file.is_some(),
            "backend: SET_VRING_KICK"
        );
        let hook = self
            .rekick
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if running {
            // The library would close the old fd while it is still in the epoll set; the
            // eventfd lives on in the frontend, so the stale entry would keep firing (and a
            // failed kick read ends the worker). Remove it first.
            if let (Some(old), Some(h)) = (old_fd, &hook) {
                h(old, false);
            }
        }
        self.inner.set_kick(file);
        let served = enabled || self.serves_disabled.load(Ordering::Acquire);
        if !(running && served) {
            // Not running: the library registers the fd when it initialises or enables the
            // ring (with a pending event, so nothing kicked meanwhile is lost).
            return;
        }
        let fd = self
            .inner
            .get_ref()
            .get_kick()
            .as_ref()
            .map(|k| k.as_raw_fd());
        if let (Some(fd), Some(h)) = (fd, hook) {
            h(fd, true);
        }
    }

    /// Consumes a kick without ever failing or blocking: the worker calls this for the fd
    /// epoll reported, but the frontend may have replaced the kick fd since (svqd does, to take
    /// the notifications over), and the library's version then reads an empty eventfd — an error
    /// that ends the worker for a non-blocking fd, a hang for a blocking one.
    fn read_kick(&self) -> io::Result<bool> {
        let st = self.inner.get_ref();
        if let Some(k) = st.get_kick().as_ref() {
            let mut pfd = libc::pollfd {
                fd: k.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let ready = unsafe { libc::poll(&mut pfd, 1, 0) } > 0;
            if ready {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a u64 from an eventfd that poll reported readable;
                // only this worker reads it, so the read cannot block.
                unsafe { libc::read(pfd.fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
            }
        }
        Ok(st.is_enabled())
    }

    /// Like qemu-storage-daemon, signal a new call fd once right away: drivers and proxies must
    /// tolerate a spurious interrupt at every ring (re)start.
    fn set_call(&self, file: Option<File>) {
        let some = file.is_some();
        let guard = self.completing.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.set_call(file);
        drop(guard);
        if some {
            if let Err(e) = self.inner.signal_used_queue() {
                tracing::debug!("backend: initial call signal failed: {e}");
            }
        }
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}
