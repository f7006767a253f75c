//! Reference vhost-user backends that deliberately offer **no** dirty logging.
//!
//! They stand in for the population svq exists for (vhost-device-*, qemu-storage-daemon with its
//! logging hidden): neither `VHOST_F_LOG_ALL` nor `VHOST_USER_PROTOCOL_F_LOG_SHMFD` is offered, so a
//! migration is only correct if something in between (svqd) logs the pages the device writes.
//!
//! * [`blk`]: a virtio-blk device on a file, optionally completing requests asynchronously, out of
//!   order and after an injected delay, with qemu-storage-daemon's `GET_VRING_BASE` behaviour
//!   (reply at once, late completions land in whatever ring is mapped then).
//! * [`net`]: a virtio-net device that echoes every transmitted frame back into the receive queue.
//!
//! Both run in-process on a socket path through [`serve`], which returns a [`BackendHandle`] that
//! stops them.

pub mod blk;
pub mod net;
mod segments;
mod vring;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringT,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use segments::ChainSegments;
pub use segments::Segment;
pub use vring::GatedVring;

/// Guest memory as the reference backends see it (no dirty bitmap: they never log).
pub type BackendMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Errors starting a reference backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The listening socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: vhost::vhost_user::Error,
    },
    /// The disk image could not be opened or sized.
    #[error("disk image {path}: {source}")]
    Disk {
        /// Image path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Invalid option combination.
    #[error("invalid backend option: {0}")]
    Option(String),
    /// A thread could not be spawned.
    #[error("cannot spawn thread: {0}")]
    Spawn(io::Error),
}

/// A per-connection device instance: the accept loop creates a fresh one for every frontend
/// connection (like qemu-storage-daemon, which serves one VMM after another on the same export).
pub trait ConnectionBackend:
    VhostUserBackend<Bitmap = (), Vring = GatedVring> + Clone + 'static
{
    /// Called once the connection has ended and the vring worker threads were told to exit;
    /// stops any helper threads (completion threads) of this instance.
    fn connection_closed(&self);

    /// Hands the instance its vring workers (to watch kick fds replaced on running rings).
    fn set_epoll_handlers(&self, handlers: Vec<Arc<VringEpollHandler<Self>>>);

    /// Hands the instance a way to drop its own connection (used to emulate qemu-storage-daemon,
    /// which disconnects when it must signal a closed call fd).
    fn set_shutdown_handle(&self, _handle: ShutdownHandle) {}
}

/// Handle on a running in-process backend: stops it on [`BackendHandle::stop`] or drop.
pub struct BackendHandle {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    connections: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl BackendHandle {
    /// The socket path the backend listens on.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// How many frontend connections were accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    /// Drops the current frontend connection (if any) without stopping the listener, as a crashing
    /// or restarting backend would look to the peer.
    pub fn disconnect_current(&self) {
        if let Some(h) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            h.shutdown();
        }
    }

    /// Stops accepting, drops the current connection and waits for the backend thread to end.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.disconnect_current();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Listens on `path` (replacing a stale socket file) and serves one frontend connection after
/// another, each with a fresh device instance from `make`, until the handle is stopped. If `make`
/// fails the accept loop ends (logged).
///
/// The socket exists when this returns, so a frontend may connect at once.
pub fn serve<B, F>(name: &str, path: &Path, mut make: F) -> Result<BackendHandle, BackendError>
where
    B: ConnectionBackend,
    F: FnMut() -> io::Result<B> + Send + 'static,
{
    let mut listener = Listener::new(path, true).map_err(|source| BackendError::Listen {
        path: path.to_owned(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let conn: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
    let connections = Arc::new(AtomicU64::new(0));
    let (stop2, conn2, connections2) = (stop.clone(), conn.clone(), connections.clone());
    let name2 = name.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                if !wait_readable(&listener, Duration::from_millis(20)) {
                    continue;
                }
                let backend = match make() {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!("{name2}: cannot create a device instance: {e}");
                        break;
                    }
                };
                let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
                let mut daemon = match VhostUserDaemon::new(name2.clone(), backend.clone(), mem) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!("{name2}: cannot create daemon: {e}");
                        backend.connection_closed();
                        break;
                    }
                };
                backend.set_epoll_handlers(daemon.get_epoll_handlers());
                if let Err(e) = daemon.start(&mut listener) {
                    tracing::error!("{name2}: accept failed: {e}");
                    continue;
                }
                connections2.fetch_add(1, Ordering::AcqRel);
                if let Some(h) = daemon.shutdown_handle() {
                    backend.set_shutdown_handle(h.clone());
                    *conn2.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
                }
                if stop2.load(Ordering::Acquire) {
                    daemon.request_shutdown();
                }
                match daemon.wait() {
                    Ok(()) => tracing::debug!("{name2}: frontend disconnected"),
                    Err(e) => tracing::info!("{name2}: connection ended: {e}"),
                }
                *conn2.lock().unwrap_or_else(|e| e.into_inner()) = None;
                for h in daemon.get_epoll_handlers() {
                    h.send_exit_event();
                }
                backend.connection_closed();
            }
        })
        .map_err(BackendError::Spawn)?;
    Ok(BackendHandle {
        path: path.to_owned(),
        stop,
        conn,
        connections,
        thread: Some(thread),
    })
}

/// Waits until the listening socket has a pending connection, or the timeout passes.
fn wait_readable(listener: &Listener, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    r > 0 && (pfd.revents & libc::POLLIN) != 0
}

/// Logs a ring access failure (a ring re-pointed or unmapped under a running worker, or a bogus
/// address from the driver) and lets the worker live on: only this queue stops until restarted.
pub(crate) fn ring_error(e: &virtio_queue::Error) {
    tracing::warn!("backend: ring access failed, queue processing stopped: {e}");
}

/// Guards a worker against a ring that reports available entries it cannot pop (an avail entry
/// naming a descriptor beyond the queue size makes virtio-queue refuse it without advancing):
/// after two rounds without progress the queue is given up until the next kick, so a malicious
/// driver stalls only its own queue instead of spinning the worker that serves all of them.
pub(crate) fn stalled(idle_rounds: &mut u32, popped: u32, queue: u16) -> bool {
    if popped > 0 {
        *idle_rounds = 0;
        return false;
    }
    *idle_rounds += 1;
    if *idle_rounds >= 2 {
        tracing::warn!(
            "backend: queue {queue} has entries that cannot be popped; waiting for a kick"
        );
        return true;
    }
    false
}

/// Pops every available chain of a started `vring` (queue `queue`) and hands it, with the memory
/// it was popped from, to `each`, until the ring is empty with kicks re-enabled, stops, fails or
/// stalls (see [`stalled`]). The notification protocol is the one both reference devices follow.
pub(crate) fn drain_ring(
    vring: &GatedVring,
    atomic: &BackendMemory,
    queue: u16,
    mut each: impl FnMut(&GuestMemoryMmap<()>, ChainSegments),
) {
    let mut idle_rounds = 0;
    loop {
        // A stopped ring (after GET_VRING_BASE) may still get a late event: popping from it
        // fails, and enable_notification would report the unpopped entries forever.
        if !vring.get_ref().get_queue().ready() {
            break;
        }
        // With EVENT_IDX this leaves avail_event alone; without, it sets VRING_USED_F_NO_NOTIFY
        // so a proxy's shadow ring sees the device suppress kicks while it drains the ring.
        if let Err(e) = vring.disable_notification() {
            ring_error(&e);
            break;
        }
        let mut popped = 0u32;
        loop {
            let mem = atomic.memory();
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            popped += 1;
            each(&mem, ChainSegments::from_chain(chain));
        }
        // Re-enables kicks (writes avail_event = next_avail with EVENT_IDX) and re-checks the
        // avail index to close the race with a driver that added a chain meanwhile.
        if !vring.enable_notification().unwrap_or_else(|e| {
            ring_error(&e);
            false
        }) {
            break;
        }
        if stalled(&mut idle_rounds, popped, queue) {
            break;
        }
    }
}

/// The protocol features both reference devices offer: deliberately no LOG_SHMFD (and neither
/// offers VHOST_F_LOG_ALL in its features), so only a proxy in between can log their writes.
pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Locks `m`, recovering from poison: a panicking completion or worker thread must not take the
/// whole backend down with poisoned locks.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `size` bytes of config space `cfg` from `offset` (zero beyond its end), as
/// `GET_CONFIG` returns them.
pub(crate) fn config_window(cfg: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(cfg.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(cfg.len());
    out[..end - start].copy_from_slice(&cfg[start..end]);
    out
}

/// A new (consumer, notifier) pair for a vring worker's exit event.
pub(crate) fn exit_pair() -> Option<(
    vmm_sys_util::event::EventConsumer,
    vmm_sys_util::event::EventNotifier,
)> {
    vmm_sys_util::event::new_event_consumer_and_notifier(vmm_sys_util::event::EventFlag::NONBLOCK)
        .ok()
}

/// Tiny xorshift generator: the delays and completion order only need to be scrambled, not
/// cryptographically random, and a seed makes a failing run reproducible.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 is replaced by a fixed non-zero constant).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// Next pseudo-random 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `lo..=hi` (returns `lo` when `hi <= lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo + 1)
        }
    }
}

/// Per-connection glue for [`GatedVring`]'s running-ring kick fix: the worker that watches the
/// rings, and the listener id of each queue's replacement kick fd.
pub(crate) struct Rekick<B: VhostUserBackend> {
    handler: Mutex<Option<std::sync::Weak<VringEpollHandler<B>>>>,
}

impl<B: VhostUserBackend> Default for Rekick<B> {
    fn default() -> Self {
        Rekick {
            handler: Mutex::new(None),
        }
    }
}

impl<B: ConnectionBackend> Rekick<B> {
    /// Remembers the (single) vring worker.
    pub(crate) fn set(&self, handlers: Vec<Arc<VringEpollHandler<B>>>) {
        if let Some(h) = handlers.first() {
            *self.handler.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(h));
        }
    }

    /// Listener id of queue `q`'s replacement kick (ids up to num_queues are the library's).
    pub(crate) fn listener_id(num_queues: usize, q: usize) -> u16 {
        (num_queues + 1 + q) as u16
    }

    /// The queue a listener id belongs to, if it is one of ours.
    pub(crate) fn queue_of(num_queues: usize, device_event: u16) -> Option<usize> {
        (usize::from(device_event))
            .checked_sub(num_queues + 1)
            .filter(|q| *q < num_queues)
    }

    /// Makes sure every ring has its hook (cheap after the first call).
    pub(crate) fn install(&self, num_queues: usize, vrings: &[GatedVring]) {
        let weak = self
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(weak) = weak else { return };
        for (q, v) in vrings.iter().enumerate() {
            let w = weak.clone();
            v.install_rekick(|| {
                Arc::new(move |fd, register| {
                    if let Some(h) = w.upgrade() {
                        let id = u64::from(Self::listener_id(num_queues, q));
                        let r = if register {
                            h.register_listener(fd, EventSet::IN, id)
                        } else {
                            // EPOLL_CTL_DEL ignores the id; ENOENT (not registered) is fine.
                            h.unregister_listener(fd, EventSet::IN, id)
                        };
                        if let Err(e) = r {
                            if register || e.raw_os_error() != Some(libc::ENOENT) {
                                tracing::warn!("kick fd of queue {q} (register {register}): {e}");
                            }
                        }
                    }
                })
            });
        }
    }

    /// Handles a kick on a replacement fd: consume it; true if the ring is enabled.
    pub(crate) fn consume(vring: &GatedVring) -> bool {
        vring.read_kick().unwrap_or(false)
    }
}
