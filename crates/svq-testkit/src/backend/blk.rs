//! Reference virtio-blk backend on a file, with optional asynchronous, out-of-order, delayed
//! completion and qemu-storage-daemon's `GET_VRING_BASE` behaviour.
//!
//! Request data moves when a request *completes*, not when it is popped: with a delay configured,
//! a read writes guest RAM up to `max` later, possibly after the ring was stopped and re-pointed.
//! That is what makes a proxy's drain and dirty logging observable: a lost late write shows up as
//! a differing page or a missing completion in the oracle.
//!
//! `GET_VRING_BASE` replies at once (the default, as qemu-storage-daemon 10 does) with the number of
//! requests *popped*, including ones still in flight; their completions are later written into
//! whatever used ring is configured at that time and signalled on whatever call fd is set then.
//! With [`BlkOptions::disconnect_on_closed_call`] a completion that must be signalled while no call
//! fd is set drops the connection, as qsd does (`vu_panic: Error writing eventfd`).
//!
//! With [`BlkOptions::libvhost_user`] it also looks and drains like libvhost-user: it offers the
//! protocol features libvhost-user offers unconditionally (a proxy recognises it by them), serves
//! a ring it was told to disable when a replaced kick fd is kicked, and reads such a kick only
//! after a lag (a starved single-threaded daemon), counting every `GET_VRING_BASE` that arrives
//! while one waits unread: the request a proxy must not send before the device's scan.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::segments::{read_stream, write_stream, ChainSegments};
use super::XorShift;
use super::{config_window, drain_ring, lock, protocol_features};
use super::{
    exit_pair, serve, BackendError, BackendHandle, BackendMemory, ConnectionBackend, GatedVring,
    Rekick,
};

/// Sector size of the virtio-blk protocol (always 512, whatever blk_size says).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the virtio-blk request header (type, reserved, sector).
pub const BLK_HEADER_LEN: u64 = 16;
/// Largest data transfer of one request the backend accepts (larger ones fail with IOERR rather
/// than allocating whatever a guest asks for).
pub const MAX_TRANSFER: u64 = 16 << 20;

/// Random completion delay: each request is held for a uniformly random time in `min..=max`
/// before its data moves and its used entry is written, so completions come out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionDelay {
    /// Shortest hold time.
    pub min: Duration,
    /// Longest hold time.
    pub max: Duration,
}

impl CompletionDelay {
    /// Every request held for exactly `d`.
    pub fn fixed(d: Duration) -> Self {
        CompletionDelay { min: d, max: d }
    }
}

/// libvhost-user's (qemu-storage-daemon's) behaviour at a drain; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibvhostUserLike {
    /// How long a kick on a replaced kick fd waits before the device reads it and scans the ring.
    pub kick_lag: Duration,
}

/// Options of the reference block device.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Number of request queues (VIRTIO_BLK_F_MQ is offered when > 1).
    pub num_queues: u16,
    /// Largest queue size a frontend may set.
    pub max_queue_size: u16,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Complete asynchronously after a random delay (`None`: complete inline, in order).
    pub delay: Option<CompletionDelay>,
    /// Make `GET_VRING_BASE` wait until the queue's in-flight requests completed (a well-behaved
    /// backend). Default false: reply at once like qemu-storage-daemon.
    pub stop_drains: bool,
    /// Drop the connection when a completion must be signalled and no call fd is set (qsd).
    pub disconnect_on_closed_call: bool,
    /// Look and drain like libvhost-user (see the module documentation).
    pub libvhost_user: Option<LibvhostUserLike>,
    /// Serial number returned by VIRTIO_BLK_T_GET_ID (up to 20 bytes).
    pub serial: String,
    /// Seed of the delay generator.
    pub seed: u64,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            num_queues: 1,
            max_queue_size: 256,
            event_idx: true,
            delay: None,
            stop_drains: false,
            disconnect_on_closed_call: false,
            libvhost_user: None,
            serial: "svq-testkit-blk".to_owned(),
            seed: 1,
        }
    }
}

/// The disk image: a file and its size in sectors.
#[derive(Debug)]
pub struct BlkDisk {
    file: File,
    sectors: u64,
}

impl BlkDisk {
    /// Opens (creating if needed) `path` read-write. With `size`, the file is resized to it
    /// (rounded down to whole sectors); otherwise its current size is used.
    pub fn open(path: &Path, size: Option<u64>) -> Result<Self, BackendError> {
        let err = |source| BackendError::Disk {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        if let Some(size) = size {
            file.set_len(size / SECTOR_SIZE * SECTOR_SIZE)
                .map_err(err)?;
        }
        let len = file.metadata().map_err(err)?.len();
        Ok(BlkDisk {
            file,
            sectors: len / SECTOR_SIZE,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Reads `buf.len()` bytes at byte offset `off` (test helper: check what the guest wrote).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
}

/// Counters of the block backend, shared by every connection of one [`BlkHandle`].
#[derive(Debug, Default)]
pub struct BlkStats {
    popped: AtomicU64,
    completed: AtomicU64,
    late_completions: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    unsignalled: AtomicU64,
    in_flight: AtomicU64,
    stops_before_scan: AtomicU64,
}

/// A point-in-time copy of [`BlkStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkStatsSnapshot {
    /// Requests taken from an avail ring.
    pub popped: u64,
    /// Requests whose used entry was written.
    pub completed: u64,
    /// Completions written while their queue was stopped (after GET_VRING_BASE, before the ring
    /// was restarted): the qsd behaviour a proxy's drain must cope with.
    pub late_completions: u64,
    /// Bytes read from the disk into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the disk.
    pub bytes_written: u64,
    /// Requests answered with IOERR/UNSUPP or without a status byte.
    pub errors: u64,
    /// Completions that needed a notification while no call fd was set.
    pub unsignalled: u64,
    /// Requests popped but not yet completed.
    pub in_flight: u64,
    /// `GET_VRING_BASE` requests that arrived while a kick on a replaced kick fd waited unread
    /// ([`BlkOptions::libvhost_user`]): qemu-storage-daemon may scan the ring first and then
    /// have requests in flight when it answers.
    pub stops_before_scan: u64,
}

impl BlkStats {
    /// Copies the counters.
    pub fn snapshot(&self) -> BlkStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Acquire);
        BlkStatsSnapshot {
            popped: l(&self.popped),
            completed: l(&self.completed),
            late_completions: l(&self.late_completions),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            errors: l(&self.errors),
            unsignalled: l(&self.unsignalled),
            in_flight: l(&self.in_flight),
            stops_before_scan: l(&self.stops_before_scan),
        }
    }
}

/// A parsed request: header read at pop time, data moved at completion time.
#[derive(Debug, Clone)]
struct BlkRequest {
    segs: ChainSegments,
    /// Request type, or `None` when the header could not be read.
    kind: Option<u32>,
    sector: u64,
}

impl BlkRequest {
    fn parse<M: vm_memory::GuestMemory + ?Sized>(mem: &M, segs: ChainSegments) -> Self {
        let mut hdr = [0u8; BLK_HEADER_LEN as usize];
        if segs.misordered || !read_stream(mem, &segs.readable, 0, &mut hdr) {
            return BlkRequest {
                segs,
                kind: None,
                sector: 0,
            };
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        BlkRequest {
            segs,
            kind: Some(kind),
            sector,
        }
    }
}

/// Executes a request against the disk and guest memory; returns the used length.
fn execute<M: vm_memory::GuestMemory + ?Sized>(
    mem: &M,
    disk: &BlkDisk,
    serial: &[u8],
    req: &BlkRequest,
    stats: &BlkStats,
) -> u32 {
    let wlen = req.segs.writable_len();
    let Some(kind) = req.kind.filter(|_| wlen >= 1) else {
        // No readable header or no status byte: nothing can be reported, complete with len 0.
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return 0;
    };
    let status_off = wlen - 1;
    let in_range = |len: u64| {
        len.is_multiple_of(SECTOR_SIZE)
            && len <= MAX_TRANSFER
            && req
                .sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= disk.sectors)
    };
    let (status, used) = match kind {
        VIRTIO_BLK_T_IN => {
            let len = status_off;
            if !in_range(len) {
                (VIRTIO_BLK_S_IOERR, 1)
            } else {
                let mut buf = vec![0u8; len as usize];
                match disk.file.read_exact_at(&mut buf, req.sector * SECTOR_SIZE) {
                    Ok(()) if write_stream(mem, &req.segs.writable, 0, &buf) => {
                        stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                        (VIRTIO_BLK_S_OK, len as u32 + 1)
                    }
                    _ => (VIRTIO_BLK_S_IOERR, 1),
                }
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = req.segs.readable_len().saturating_sub(BLK_HEADER_LEN);
            if !in_range(len) {
                (VIRTIO_BLK_S_IOERR, 1)
            } else {
                let mut buf = vec![0u8; len as usize];
                if read_stream(mem, &req.segs.readable, BLK_HEADER_LEN, &mut buf)
                    && disk
                        .file
                        .write_all_at(&buf, req.sector * SECTOR_SIZE)
                        .is_ok()
                {
                    stats.bytes_written.fetch_add(len, Ordering::Relaxed);
                    (VIRTIO_BLK_S_OK, 1)
                } else {
                    (VIRTIO_BLK_S_IOERR, 1)
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => match disk.file.sync_data() {
            Ok(()) => (VIRTIO_BLK_S_OK, 1),
            Err(_) => (VIRTIO_BLK_S_IOERR, 1),
        },
        VIRTIO_BLK_T_GET_ID => {
            let n = status_off.min(u64::from(VIRTIO_BLK_ID_BYTES)) as usize;
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let k = serial.len().min(id.len());
            id[..k].copy_from_slice(&serial[..k]);
            if write_stream(mem, &req.segs.writable, 0, &id[..n]) {
                (VIRTIO_BLK_S_OK, n as u32 + 1)
            } else {
                (VIRTIO_BLK_S_IOERR, 1)
            }
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 1),
    };
    if status != VIRTIO_BLK_S_OK {
        stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    if !write_stream(mem, &req.segs.writable, status_off, &[status as u8]) {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return 0;
    }
    used
}

/// With EVENT_IDX, writes `avail_event` (after the used ring) = the next index to pop, as
/// libvhost-user does on every pop (`vu_queue_pop`), where virtio-queue writes it only when
/// notifications are re-enabled.
fn publish_avail_event(vring: &GatedVring, mem: &GuestMemoryMmap<()>) {
    let st = vring.get_ref();
    let q = st.get_queue();
    if q.event_idx_enabled() {
        let at = GuestAddress(q.used_ring() + 4 + 8 * u64::from(q.size()));
        let _ = mem.store(q.next_avail().to_le(), at, Ordering::Release);
    }
}

/// A request held by the completion thread until `due`.
struct Pending {
    due: Instant,
    seq: u64,
    queue: u16,
    vring: GatedVring,
    req: BlkRequest,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        self.due == o.due && self.seq == o.seq
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // Reversed: BinaryHeap is a max-heap and the earliest due request must come out first.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        o.due.cmp(&self.due).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct CompleterState {
    heap: BinaryHeap<Pending>,
    seq: u64,
    stop: bool,
    /// In-flight requests per queue (for `stop_drains`).
    per_queue: Vec<u64>,
    /// Queues whose GET_VRING_BASE is waiting for them (their completions are not late).
    draining: Vec<bool>,
}

struct Completer {
    state: Mutex<CompleterState>,
    cv: Condvar,
}

/// Per-connection device instance (cheap to clone: vhost-user-backend clones it per thread).
#[derive(Clone)]
pub struct BlkBackend(Arc<BlkInner>);

struct BlkInner {
    opts: BlkOptions,
    disk: Arc<BlkDisk>,
    stats: Arc<BlkStats>,
    mem: Mutex<Option<BackendMemory>>,
    event_idx: AtomicBool,
    rng: Mutex<XorShift>,
    completer: Arc<Completer>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
    closed_call_reported: AtomicBool,
    rekick: Rekick<BlkBackend>,
    /// Per queue: a kick on a replaced kick fd waits to be read ([`LibvhostUserLike`]).
    kick_waiting: Vec<AtomicBool>,
}

impl BlkBackend {
    /// A device instance for one connection.
    pub fn new(opts: BlkOptions, disk: Arc<BlkDisk>, stats: Arc<BlkStats>) -> io::Result<Self> {
        let completer = Arc::new(Completer {
            state: Mutex::new(CompleterState {
                per_queue: vec![0; usize::from(opts.num_queues)],
                draining: vec![false; usize::from(opts.num_queues)],
                ..Default::default()
            }),
            cv: Condvar::new(),
        });
        let kick_waiting = (0..opts.num_queues)
            .map(|_| AtomicBool::new(false))
            .collect();
        let inner = Arc::new(BlkInner {
            rng: Mutex::new(XorShift::new(opts.seed)),
            kick_waiting,
            opts,
            disk,
            stats,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            completer,
            thread: Mutex::new(None),
            shutdown: Mutex::new(None),
            closed_call_reported: AtomicBool::new(false),
            rekick: Rekick::default(),
        });
        if inner.opts.delay.is_some() {
            let weak = Arc::downgrade(&inner);
            let t = std::thread::Builder::new()
                .name("blk-complete".into())
                .spawn(move || completion_loop(weak))?;
            *lock(&inner.thread) = Some(t);
        }
        Ok(BlkBackend(inner))
    }

    fn config_space(&self) -> [u8; 64] {
        let mut c = [0u8; 64];
        c[0..8].copy_from_slice(&self.0.disk.sectors.to_le_bytes());
        let seg_max = u32::from(self.0.opts.max_queue_size.saturating_sub(2).max(1));
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&self.0.opts.num_queues.to_le_bytes());
        c
    }

    /// A kick on a fd that replaced the original one while the ring ran: read it and serve the
    /// ring if it is enabled; as libvhost-user, after the lag and disabled or not.
    fn rekicked(&self, queue: u16, vring: &GatedVring) -> io::Result<()> {
        let Some(lvu) = self.0.opts.libvhost_user else {
            if Rekick::<BlkBackend>::consume(vring) {
                return self.process_queue(queue, vring);
            }
            return Ok(());
        };
        let waiting = &self.0.kick_waiting[usize::from(queue)];
        waiting.store(true, Ordering::Release);
        std::thread::sleep(lvu.kick_lag);
        // Read, then scan at once: libvhost-user's kick handler does both in one step.
        let _enabled = Rekick::<BlkBackend>::consume(vring);
        waiting.store(false, Ordering::Release);
        self.process_queue(queue, vring)
    }

    /// Pops and dispatches every available request of `vring` (queue `queue`).
    fn process_queue(&self, queue: u16, vring: &GatedVring) -> io::Result<()> {
        let Some(atomic) = lock(&self.0.mem).clone() else {
            return Ok(());
        };
        let mut completed_inline = false;
        let avail_event_each_pop = self.0.opts.libvhost_user.is_some();
        drain_ring(vring, &atomic, queue, |mem, segs| {
            if avail_event_each_pop {
                publish_avail_event(vring, mem);
            }
            let req = BlkRequest::parse(mem, segs);
            self.0.stats.popped.fetch_add(1, Ordering::Relaxed);
            match self.0.opts.delay {
                Some(d) => self.submit_delayed(queue, vring, req, d),
                None => {
                    let len = execute(
                        mem,
                        &self.0.disk,
                        self.0.opts.serial.as_bytes(),
                        &req,
                        &self.0.stats,
                    );
                    if let Err(e) = vring.add_used(req.segs.head, len) {
                        tracing::warn!("blk: add_used failed on queue {queue}: {e}");
                    }
                    self.0.stats.completed.fetch_add(1, Ordering::Relaxed);
                    completed_inline = true;
                }
            }
        });
        tracing::debug!(
            queue,
            next_avail = vring.queue_next_avail(),
            "backend: queue processed"
        );
        if completed_inline {
            self.notify(vring);
        }
        Ok(())
    }

    fn submit_delayed(&self, queue: u16, vring: &GatedVring, req: BlkRequest, d: CompletionDelay) {
        let delay_ns = lock(&self.0.rng).range(d.min.as_nanos() as u64, d.max.as_nanos() as u64);
        let c = &self.0.completer;
        let mut st = lock(&c.state);
        st.seq += 1;
        let seq = st.seq;
        if let Some(n) = st.per_queue.get_mut(usize::from(queue)) {
            *n += 1;
        }
        st.heap.push(Pending {
            due: Instant::now() + Duration::from_nanos(delay_ns),
            seq,
            queue,
            vring: vring.clone(),
            req,
        });
        self.0.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        c.cv.notify_all();
    }

    /// Signals the used queue if the driver wants it; emulates qsd on a closed call fd.
    fn notify(&self, vring: &GatedVring) {
        match vring.needs_notification() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!("blk: needs_notification failed: {e}");
                return;
            }
        }
        if vring.get_ref().get_call().is_none() {
            self.0.stats.unsignalled.fetch_add(1, Ordering::Relaxed);
            if self.0.opts.disconnect_on_closed_call {
                if !self.0.closed_call_reported.swap(true, Ordering::AcqRel) {
                    tracing::error!("blk: must signal a closed call fd: dropping the connection");
                }
                if let Some(h) = lock(&self.0.shutdown).as_ref() {
                    h.shutdown();
                }
            }
            return;
        }
        if let Err(e) = vring.signal_used_queue() {
            tracing::warn!("blk: signalling the call fd failed: {e}");
        }
    }

    /// Completes a batch of due requests, then notifies each touched ring once (qsd-like: each
    /// request as it completes).
    fn complete_batch(&self, batch: Vec<Pending>) {
        let Some(atomic) = lock(&self.0.mem).clone() else {
            return;
        };
        let mut touched: Vec<GatedVring> = Vec::new();
        let mut touched_q: Vec<u16> = Vec::new();
        for p in batch {
            let mem = atomic.memory();
            let len = execute(
                &*mem,
                &self.0.disk,
                self.0.opts.serial.as_bytes(),
                &p.req,
                &self.0.stats,
            );
            let ready = p.vring.get_ref().get_queue().ready();
            let draining = lock(&self.0.completer.state)
                .draining
                .get(usize::from(p.queue))
                .copied()
                .unwrap_or(false);
            if !ready && !draining {
                self.0
                    .stats
                    .late_completions
                    .fetch_add(1, Ordering::Relaxed);
            }
            let add_used = || {
                if let Err(e) = p.vring.add_used(p.req.segs.head, len) {
                    tracing::warn!("blk: late add_used failed on queue {}: {e}", p.queue);
                }
            };
            if self.0.opts.disconnect_on_closed_call {
                // As qemu-storage-daemon: each completion pushed and signalled in one step of
                // its single thread, which also handles GET_VRING_BASE.
                p.vring.completing(|| {
                    add_used();
                    self.notify(&p.vring);
                });
            } else {
                add_used();
            }
            self.0.stats.completed.fetch_add(1, Ordering::Relaxed);
            self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            {
                let mut st = lock(&self.0.completer.state);
                if let Some(n) = st.per_queue.get_mut(usize::from(p.queue)) {
                    *n = n.saturating_sub(1);
                }
            }
            if !self.0.opts.disconnect_on_closed_call && !touched_q.contains(&p.queue) {
                touched_q.push(p.queue);
                touched.push(p.vring);
            }
        }
        self.0.completer.cv.notify_all();
        for v in &touched {
            self.notify(v);
        }
    }
}

fn completion_loop(weak: std::sync::Weak<BlkInner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let batch = {
            let c = &inner.completer;
            let mut st = lock(&c.state);
            loop {
                if st.stop {
                    // Connection gone: finish what was accepted (its data still moves, as an
                    // in-progress AIO would), without waiting for the delay.
                    break std::mem::take(&mut st.heap).into_vec();
                }
                let now = Instant::now();
                match st.heap.peek() {
                    None => st = c.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                    Some(p) if p.due > now => {
                        let wait = p.due - now;
                        st =
                            c.cv.wait_timeout(st, wait)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                    }
                    Some(_) => {
                        let mut batch = Vec::new();
                        while st.heap.peek().is_some_and(|p| p.due <= now) {
                            batch.push(st.heap.pop().expect("peeked"));
                        }
                        break batch;
                    }
                }
            }
        };
        let stop = lock(&inner.completer.state).stop;
        BlkBackend(inner.clone()).complete_batch(batch);
        if stop {
            return;
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = GatedVring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.opts.max_queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.opts.event_idx {
            f |= 1u64 << VIRTIO_RING_F_EVENT_IDX;
        }
        if self.0.opts.num_queues > 1 {
            f |= 1u64 << VIRTIO_BLK_F_MQ;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let libvhost_user = VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::HOST_NOTIFIER
            | VhostUserProtocolFeatures::BACKEND_SEND_FD
            | VhostUserProtocolFeatures::REPLY_ACK;
        match self.0.opts.libvhost_user {
            Some(_) => protocol_features() | libvhost_user,
            None => protocol_features(),
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_window(&self.config_space(), offset, size)
    }

    fn update_memory(&self, mem: BackendMemory) -> io::Result<()> {
        *lock(&self.0.mem) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_pair()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let kick_unread = self
            .0
            .kick_waiting
            .get(queue_index as usize)
            .is_some_and(|w| w.load(Ordering::Acquire));
        if kick_unread {
            self.0
                .stats
                .stops_before_scan
                .fetch_add(1, Ordering::Relaxed);
        }
        if !self.0.opts.stop_drains {
            // qemu-storage-daemon: reply at once, requests stay in flight.
            return Ok(());
        }
        let c = &self.0.completer;
        let mut st = lock(&c.state);
        if let Some(d) = st.draining.get_mut(queue_index as usize) {
            *d = true;
        }
        while st
            .per_queue
            .get(queue_index as usize)
            .is_some_and(|n| *n > 0)
            && !st.stop
        {
            st = c.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(d) = st.draining.get_mut(queue_index as usize) {
            *d = false;
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let nq = usize::from(self.0.opts.num_queues);
        self.0.rekick.install(nq, vrings);
        if self.0.opts.libvhost_user.is_some() {
            vrings.iter().for_each(|v| v.set_serves_disabled(true));
        }
        tracing::debug!(device_event, "backend: event");
        if let Some(q) = Rekick::<BlkBackend>::queue_of(nq, device_event) {
            // A kick on a fd that replaced the original one while the ring ran.
            return match vrings.get(q) {
                Some(v) => self.rekicked(q as u16, v),
                None => Ok(()),
            };
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(device_event, vring),
            None => Ok(()),
        }
    }
}

impl ConnectionBackend for BlkBackend {
    fn connection_closed(&self) {
        lock(&self.0.completer.state).stop = true;
        self.0.completer.cv.notify_all();
        if let Some(t) = lock(&self.0.thread).take() {
            let _ = t.join();
        }
    }

    fn set_epoll_handlers(&self, handlers: Vec<Arc<VringEpollHandler<Self>>>) {
        self.0.rekick.set(handlers);
    }

    fn set_shutdown_handle(&self, handle: ShutdownHandle) {
        *lock(&self.0.shutdown) = Some(handle);
    }
}

/// A running reference block backend.
pub struct BlkHandle {
    handle: BackendHandle,
    stats: Arc<BlkStats>,
    disk: Arc<BlkDisk>,
}

impl BlkHandle {
    /// Counters over all connections so far.
    pub fn stats(&self) -> BlkStatsSnapshot {
        self.stats.snapshot()
    }

    /// The disk image (to verify what the guest wrote).
    pub fn disk(&self) -> &BlkDisk {
        &self.disk
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        self.handle.socket_path()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.handle.connections()
    }

    /// Drops the current connection (the listener stays).
    pub fn disconnect_current(&self) {
        self.handle.disconnect_current()
    }

    /// Stops the backend (completing what is in flight) and waits for it.
    pub fn stop(self) {
        self.handle.stop()
    }
}

/// Starts a block backend on `socket` serving `disk`.
pub fn serve_blk(
    socket: &Path,
    disk: BlkDisk,
    opts: BlkOptions,
) -> Result<BlkHandle, BackendError> {
    if opts.num_queues == 0 || opts.num_queues > 64 {
        return Err(BackendError::Option(format!(
            "num_queues must be 1..=64, not {}",
            opts.num_queues
        )));
    }
    if !opts.max_queue_size.is_power_of_two() {
        return Err(BackendError::Option(format!(
            "max_queue_size must be a power of two, not {}",
            opts.max_queue_size
        )));
    }
    if let Some(d) = opts.delay {
        if d.min > d.max {
            return Err(BackendError::Option("delay min > max".into()));
        }
    }
    let stats = Arc::new(BlkStats::default());
    let disk = Arc::new(disk);
    let (s2, d2) = (stats.clone(), disk.clone());
    let mut conn_no = 0u64;
    let handle = serve("svq-ref-blk", socket, move || {
        conn_no += 1;
        let mut o = opts.clone();
        o.seed = o.seed.wrapping_add(conn_no);
        BlkBackend::new(o, d2.clone(), s2.clone())
    })?;
    Ok(BlkHandle {
        handle,
        stats,
        disk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use crate::backend::Segment;

    fn setup() -> (tempfile::TempDir, BlkDisk, GuestMemoryMmap<()>, BlkStats) {
        let dir = tempfile::tempdir().unwrap();
        let disk = BlkDisk::open(&dir.path().join("d.img"), Some(64 * 1024)).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (dir, disk, mem, BlkStats::default())
    }

    fn req(
        mem: &GuestMemoryMmap<()>,
        kind: u32,
        sector: u64,
        r: &[Segment],
        w: &[Segment],
    ) -> BlkRequest {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(r[0].addr)).unwrap();
        let segs = ChainSegments {
            head: 0,
            readable: r.to_vec(),
            writable: w.to_vec(),
            misordered: false,
        };
        BlkRequest::parse(mem, segs)
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    fn status(mem: &GuestMemoryMmap<()>, addr: u64) -> u8 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn write_then_read_round_trips_through_the_file() {
        let (_d, disk, mem, st) = setup();
        mem.write_slice(&[0xabu8; 1024], GuestAddress(0x2000))
            .unwrap();
        let w = req(
            &mem,
            VIRTIO_BLK_T_OUT,
            2,
            &[seg(0x1000, 16), seg(0x2000, 1024)],
            &[seg(0x1100, 1)],
        );
        assert_eq!(execute(&mem, &disk, b"id", &w, &st), 1);
        assert_eq!(status(&mem, 0x1100), VIRTIO_BLK_S_OK as u8);
        let mut f = [0u8; 1024];
        disk.read_at(&mut f, 1024).unwrap();
        assert_eq!(f, [0xab; 1024]);
        // Read back split over two writable buffers plus the status byte.
        let r = req(
            &mem,
            VIRTIO_BLK_T_IN,
            2,
            &[seg(0x1000, 16)],
            &[seg(0x3000, 1000), seg(0x4000, 25)],
        );
        assert_eq!(execute(&mem, &disk, b"id", &r, &st), 1025);
        let mut g = [0u8; 1000];
        mem.read_slice(&mut g, GuestAddress(0x3000)).unwrap();
        assert_eq!(g, [0xab; 1000]);
        assert_eq!(status(&mem, 0x4000 + 24), VIRTIO_BLK_S_OK as u8);
        let s = st.snapshot();
        assert_eq!((s.bytes_written, s.bytes_read, s.errors), (1024, 1024, 0));
    }

    #[test]
    fn bad_requests_get_error_statuses_not_panics() {
        let (_d, disk, mem, st) = setup();
        // Beyond the end of the disk (128 sectors).
        let r = req(
            &mem,
            VIRTIO_BLK_T_IN,
            127,
            &[seg(0x1000, 16)],
            &[seg(0x3000, 1024), seg(0x4000, 1)],
        );
        assert_eq!(execute(&mem, &disk, b"", &r, &st), 1);
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR as u8);
        // Not a whole number of sectors.
        let r = req(
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[seg(0x1000, 16)],
            &[seg(0x3000, 100), seg(0x4000, 1)],
        );
        assert_eq!(execute(&mem, &disk, b"", &r, &st), 1);
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR as u8);
        // Unknown type.
        let r = req(&mem, 99, 0, &[seg(0x1000, 16)], &[seg(0x4000, 1)]);
        assert_eq!(execute(&mem, &disk, b"", &r, &st), 1);
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_UNSUPP as u8);
        // Data buffer outside guest memory.
        let r = req(
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[seg(0x1000, 16)],
            &[seg(0xffe00, 4096), seg(0x4000, 1)],
        );
        assert_eq!(execute(&mem, &disk, b"", &r, &st), 1);
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_IOERR as u8);
        // No status byte at all: completed with length 0.
        let r = req(&mem, VIRTIO_BLK_T_FLUSH, 0, &[seg(0x1000, 16)], &[]);
        assert_eq!(execute(&mem, &disk, b"", &r, &st), 0);
        // Header too short to parse.
        let r = BlkRequest::parse(
            &mem,
            ChainSegments {
                head: 0,
                readable: vec![seg(0x1000, 8)],
                writable: vec![seg(0x4000, 1)],
                misordered: false,
            },
        );
        assert_eq!(execute(&mem, &disk, b"", &r, &st), 0);
        assert_eq!(st.snapshot().errors, 6);
    }

    #[test]
    fn get_id_and_flush() {
        let (_d, disk, mem, st) = setup();
        let r = req(
            &mem,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[seg(0x1000, 16)],
            &[seg(0x3000, 20), seg(0x4000, 1)],
        );
        assert_eq!(execute(&mem, &disk, b"serial-1", &r, &st), 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x3000)).unwrap();
        assert_eq!(&id[..8], b"serial-1");
        assert!(id[8..].iter().all(|b| *b == 0));
        let f = req(
            &mem,
            VIRTIO_BLK_T_FLUSH,
            0,
            &[seg(0x1000, 16)],
            &[seg(0x4000, 1)],
        );
        assert_eq!(execute(&mem, &disk, b"", &f, &st), 1);
        assert_eq!(status(&mem, 0x4000), VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn config_space_reports_capacity_and_queues() {
        let (_d, disk, _mem, st) = setup();
        let b = BlkBackend::new(
            BlkOptions {
                num_queues: 4,
                ..Default::default()
            },
            Arc::new(disk),
            Arc::new(st),
        )
        .unwrap();
        let c = b.get_config(0, 36);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 128);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        // Beyond the config space: zeros, never a panic.
        assert_eq!(b.get_config(1000, 8), vec![0u8; 8]);
        assert_eq!(b.features() & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
        assert!(!b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD));
        b.connection_closed();
    }
}
