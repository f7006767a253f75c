//! Reference virtio-net backend that echoes every transmitted frame into the receive queue of the
//! same queue pair.
//!
//! Receive buffers are written by the device (header + frame), so a proxy that fails to log them
//! loses guest-visible data across a migration, exactly as for block reads. Transmit buffers are
//! completed as soon as their frame is queued for echo; frames wait in a bounded FIFO until the
//! driver posts receive buffers (beyond the bound they are dropped and counted, as a NIC would).

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::segments::{read_stream, write_stream, ChainSegments};
use super::{config_window, drain_ring, lock, protocol_features, ring_error, stalled};
use super::{
    exit_pair, serve, BackendError, BackendHandle, BackendMemory, ConnectionBackend, GatedVring,
    Rekick,
};

/// Size of `struct virtio_net_hdr_v1` (VERSION_1 always has num_buffers).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame accepted (64 KiB + header room); longer transmit chains are errors.
pub const MAX_FRAME: usize = 65_550;

/// Options of the reference net device.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Queue pairs (RX = 2*i, TX = 2*i+1). VIRTIO_NET_F_MQ is offered when > 1.
    pub queue_pairs: u16,
    /// Largest queue size a frontend may set.
    pub max_queue_size: u16,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Offer VIRTIO_F_IN_ORDER: the echo device completes every chain it pops before popping
    /// the next one, one used element each, so it already keeps the in-order rules.
    pub in_order: bool,
    /// Frames held per pair while no receive buffer is posted; more are dropped.
    pub backlog: usize,
    /// MAC address in the config space.
    pub mac: [u8; 6],
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            queue_pairs: 1,
            max_queue_size: 256,
            event_idx: true,
            in_order: false,
            backlog: 4096,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        }
    }
}

/// Counters of the net backend, shared by every connection of one [`NetHandle`].
#[derive(Debug, Default)]
pub struct NetStats {
    tx_frames: AtomicU64,
    rx_frames: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
}

/// A point-in-time copy of [`NetStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStatsSnapshot {
    /// Frames taken from transmit queues.
    pub tx_frames: u64,
    /// Frames written into receive buffers.
    pub rx_frames: u64,
    /// Frames dropped because the backlog was full.
    pub dropped: u64,
    /// Malformed chains (no header, too long, memory out of range).
    pub errors: u64,
}

impl NetStats {
    /// Copies the counters.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Acquire);
        NetStatsSnapshot {
            tx_frames: l(&self.tx_frames),
            rx_frames: l(&self.rx_frames),
            dropped: l(&self.dropped),
            errors: l(&self.errors),
        }
    }
}

/// Per-connection echo device instance.
#[derive(Clone)]
pub struct NetBackend(Arc<NetInner>);

struct NetInner {
    opts: NetOptions,
    stats: Arc<NetStats>,
    mem: Mutex<Option<BackendMemory>>,
    event_idx: AtomicBool,
    backlog: Vec<Mutex<VecDeque<Vec<u8>>>>,
    rekick: Rekick<NetBackend>,
}

impl NetBackend {
    /// A device instance for one connection.
    pub fn new(opts: NetOptions, stats: Arc<NetStats>) -> Self {
        let backlog = (0..opts.queue_pairs)
            .map(|_| Mutex::new(VecDeque::new()))
            .collect();
        NetBackend(Arc::new(NetInner {
            opts,
            stats,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            backlog,
            rekick: Rekick::default(),
        }))
    }

    fn notify(vring: &GatedVring) {
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    tracing::warn!("net: signalling the call fd failed: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("net: needs_notification failed: {e}"),
        }
    }

    /// Moves every transmitted frame of `tx` into the pair's backlog.
    fn process_tx(&self, pair: usize, tx: &GatedVring) -> io::Result<()> {
        let Some(atomic) = lock(&self.0.mem).clone() else {
            return Ok(());
        };
        let mut done = false;
        drain_ring(tx, &atomic, (2 * pair + 1) as u16, |mem, segs| {
            let total = segs.readable_len() as usize;
            if segs.misordered || !(NET_HDR_LEN..=MAX_FRAME + NET_HDR_LEN).contains(&total) {
                self.0.stats.errors.fetch_add(1, Ordering::Relaxed);
            } else {
                let mut frame = vec![0u8; total - NET_HDR_LEN];
                if read_stream(mem, &segs.readable, NET_HDR_LEN as u64, &mut frame) {
                    self.0.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    let mut q = lock(&self.0.backlog[pair]);
                    if q.len() < self.0.opts.backlog {
                        q.push_back(frame);
                    } else {
                        self.0.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    self.0.stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Err(e) = tx.add_used(segs.head, 0) {
                tracing::warn!("net: tx add_used failed: {e}");
            }
            done = true;
        });
        if done {
            Self::notify(tx);
        }
        Ok(())
    }

    /// Writes backlog frames into posted receive buffers.
    fn process_rx(&self, pair: usize, rx: &GatedVring) -> io::Result<()> {
        let Some(atomic) = lock(&self.0.mem).clone() else {
            return Ok(());
        };
        let mut done = false;
        let mut idle_rounds = 0;
        let mut q = lock(&self.0.backlog[pair]);
        while !q.is_empty() && rx.get_ref().get_queue().ready() {
            if let Err(e) = rx.disable_notification() {
                ring_error(&e);
                break;
            }
            let mem = atomic.memory();
            let chain = rx
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                // No buffer: ask for a kick and re-check (a buffer may have raced in).
                if rx.enable_notification().unwrap_or_else(|e| {
                    ring_error(&e);
                    false
                }) && !stalled(&mut idle_rounds, 0, (2 * pair) as u16)
                {
                    continue;
                }
                break;
            };
            idle_rounds = 0;
            let segs = ChainSegments::from_chain(chain);
            let frame = q.pop_front().expect("backlog not empty");
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            let room = segs.writable_len() as usize;
            let used = if segs.misordered || room < NET_HDR_LEN {
                self.0.stats.errors.fetch_add(1, Ordering::Relaxed);
                0
            } else {
                // A too-small buffer gets a truncated frame, as a device without MRG_RXBUF would
                // never be given; the length tells the driver.
                let n = frame.len().min(room - NET_HDR_LEN);
                if write_stream(&*mem, &segs.writable, 0, &hdr)
                    && write_stream(&*mem, &segs.writable, NET_HDR_LEN as u64, &frame[..n])
                {
                    self.0.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    (NET_HDR_LEN + n) as u32
                } else {
                    self.0.stats.errors.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if let Err(e) = rx.add_used(segs.head, used) {
                tracing::warn!("net: rx add_used failed: {e}");
            }
            done = true;
        }
        drop(q);
        if done {
            Self::notify(rx);
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = GatedVring;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.0.opts.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.opts.max_queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_NET_F_MAC)
            | (1u64 << VIRTIO_NET_F_STATUS)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.opts.event_idx {
            f |= 1u64 << VIRTIO_RING_F_EVENT_IDX;
        }
        if self.0.opts.queue_pairs > 1 {
            f |= 1u64 << VIRTIO_NET_F_MQ;
        }
        if self.0.opts.in_order {
            f |= crate::vmm::VIRTIO_F_IN_ORDER;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config: mac[6], status u16 (LINK_UP), max_virtqueue_pairs u16.
        let mut cfg = [0u8; 12];
        cfg[0..6].copy_from_slice(&self.0.opts.mac);
        cfg[6..8].copy_from_slice(&1u16.to_le_bytes());
        cfg[8..10].copy_from_slice(&self.0.opts.queue_pairs.to_le_bytes());
        config_window(&cfg, offset, size)
    }

    fn update_memory(&self, mem: BackendMemory) -> io::Result<()> {
        *lock(&self.0.mem) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_pair()
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
        let nq = 2 * usize::from(self.0.opts.queue_pairs);
        self.0.rekick.install(nq, vrings);
        let q = match Rekick::<NetBackend>::queue_of(nq, device_event) {
            Some(q) => match vrings.get(q) {
                // A kick on a fd that replaced the original one while the ring ran.
                Some(v) if Rekick::<NetBackend>::consume(v) => q,
                _ => return Ok(()),
            },
            None => usize::from(device_event),
        };
        let pair = q / 2;
        let (Some(rx), Some(tx)) = (vrings.get(2 * pair), vrings.get(2 * pair + 1)) else {
            return Ok(());
        };
        if q % 2 == 1 {
            self.process_tx(pair, tx)?;
        }
        // Only deliver into a started, enabled ring (the TX kick may come before RX is set up;
        // a disabled ring takes no buffers: frames wait in the backlog, as on a NIC).
        if rx.get_ref().get_queue().ready() && rx.get_ref().is_enabled() {
            self.process_rx(pair, rx)?;
        }
        Ok(())
    }
}

impl ConnectionBackend for NetBackend {
    fn connection_closed(&self) {}

    fn set_epoll_handlers(&self, handlers: Vec<Arc<VringEpollHandler<Self>>>) {
        self.0.rekick.set(handlers);
    }
}

/// A running reference net backend.
pub struct NetHandle {
    handle: BackendHandle,
    stats: Arc<NetStats>,
}

impl NetHandle {
    /// Counters over all connections so far.
    pub fn stats(&self) -> NetStatsSnapshot {
        self.stats.snapshot()
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        self.handle.socket_path()
    }

    /// Stops the backend and waits for it.
    pub fn stop(self) {
        self.handle.stop()
    }
}

/// Starts an echo net backend on `socket`.
pub fn serve_net(socket: &Path, opts: NetOptions) -> Result<NetHandle, BackendError> {
    if opts.queue_pairs == 0 || opts.queue_pairs > 32 {
        return Err(BackendError::Option(format!(
            "queue_pairs must be 1..=32, not {}",
            opts.queue_pairs
        )));
    }
    if !opts.max_queue_size.is_power_of_two() {
        return Err(BackendError::Option(format!(
            "max_queue_size must be a power of two, not {}",
            opts.max_queue_size
        )));
    }
    let stats = Arc::new(NetStats::default());
    let s2 = stats.clone();
    let handle = serve("svq-ref-net", socket, move || {
        Ok(NetBackend::new(opts.clone(), s2.clone()))
    })?;
    Ok(NetHandle { handle, stats })
}
