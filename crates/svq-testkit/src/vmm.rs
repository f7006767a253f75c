//! A simulated VMM: the vhost-user frontend side of QEMU or Cloud Hypervisor.
//!
//! It hands the guest RAM (memfd) and the guest's rings to a backend (directly, or through svqd:
//! it only connects to a socket path), and drives dirty logging the way each real VMM does:
//!
//! * QEMU: `SET_LOG_BASE` (one memfd for the whole migration) → `SET_FEATURES | LOG_ALL` →
//!   `SET_VRING_ADDR` with `VHOST_VRING_F_LOG`; each sync reads the log and clears it with an
//!   atomic exchange per word.
//! * Cloud Hypervisor: the same start, but each sync installs a *fresh* memfd with `SET_LOG_BASE`
//!   and reads the old one (double buffering).
//!
//! Stopping a ring is QEMU's VM stop: `SET_VRING_ENABLE 0` (acked) then `GET_VRING_BASE`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;
use vmm_sys_util::eventfd::EventFd;

use crate::guest::ram::{memfd, GuestRam, PAGE_SIZE};
use crate::guest::vring::{DriverQueue, QueueLayout};

/// Bit 26: the device must log its writes (migration running).
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Bit 35: VIRTIO_F_IN_ORDER (descriptors used in ring order, completions in avail order).
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;

/// How the memory table is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemTableStyle {
    /// One SET_MEM_TABLE with every region.
    SetMemTable,
    /// ADD_MEM_REG per region (QEMU when CONFIGURE_MEM_SLOTS is negotiated). Falls back to
    /// SET_MEM_TABLE if the backend lacks CONFIGURE_MEM_SLOTS.
    AddMemReg,
}

/// How dirty logging is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    /// One log region; each sync clears it word by word with atomic exchanges.
    Qemu,
    /// A fresh log region for every sync; the old one is read after the switch.
    CloudHypervisor,
}

/// VMM options.
#[derive(Debug, Clone, Copy)]
pub struct VmmOptions {
    /// Memory table style.
    pub mem_style: MemTableStyle,
    /// Dirty log style.
    pub log_style: LogStyle,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered.
    pub event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC if offered.
    pub indirect: bool,
    /// Negotiate VIRTIO_F_IN_ORDER if offered (the guest driver must then keep its rules: see
    /// [`crate::guest::vring::DriverQueue::in_order`]).
    pub in_order: bool,
    /// How long to retry connecting while the socket is not there yet.
    pub connect_timeout: Duration,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            mem_style: MemTableStyle::AddMemReg,
            log_style: LogStyle::Qemu,
            event_idx: true,
            indirect: true,
            in_order: false,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors of the simulated VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A vhost-user request failed.
    #[error("vhost-user {what}: {source}")]
    Vhost {
        /// The request.
        what: &'static str,
        /// Underlying error.
        source: vhost::Error,
    },
    /// Local I/O (memfd, mmap, socket).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The backend cannot do what is asked (QEMU's "Migration disabled: ...").
    #[error("{0}")]
    Unsupported(String),
}

fn vh<T>(what: &'static str, r: Result<T, vhost::Error>) -> Result<T, VmmError> {
    r.map_err(|source| VmmError::Vhost { what, source })
}

/// A dirty log region shared with the backend (1 bit per 4 KiB page).
struct LogRegion {
    file: File,
    map: MmapRegion<()>,
    size: u64,
}

impl LogRegion {
    fn new(ram_size: u64) -> Result<Self, VmmError> {
        // Cloud Hypervisor's sizing: last_ram_addr / (4096 * 8) + 1 bytes.
        let size = ram_size / (PAGE_SIZE * 8) + 1;
        let io = |what| move |source| VmmError::Io { what, source };
        let file = memfd("vhost_user_dirty_log", size).map_err(io("log memfd"))?;
        let map = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().map_err(io("dup log fd"))?, 0),
            size as usize,
        )
        .map_err(|e| VmmError::Io {
            what: "mmap log",
            source: std::io::Error::other(e),
        })?;
        Ok(LogRegion { file, map, size })
    }

    fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: the mapping is `size` bytes long, lives as long as `self`, and is only accessed
        // atomically (the backend/proxy sets bits with atomic OR from another process view).
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr() as *const AtomicU8, self.size as usize)
        }
    }

    /// Dirty pages, clearing each byte atomically (QEMU's per-word xchg, byte-sized here).
    fn take(&self, pages: u64, out: &mut Vec<u64>) {
        for (i, b) in self.bytes().iter().enumerate() {
            let v = b.swap(0, Ordering::AcqRel);
            collect_bits(i, v, pages, out);
        }
    }

    /// Dirty pages without clearing (the region is being retired).
    fn read(&self, pages: u64, out: &mut Vec<u64>) {
        for (i, b) in self.bytes().iter().enumerate() {
            collect_bits(i, b.load(Ordering::Acquire), pages, out);
        }
    }
}

fn collect_bits(byte: usize, mut v: u8, pages: u64, out: &mut Vec<u64>) {
    while v != 0 {
        let b = v.trailing_zeros() as u64;
        let pfn = byte as u64 * 8 + b;
        if pfn < pages {
            out.push(pfn);
        }
        v &= v - 1;
    }
}

/// A started queue, remembered to re-send its address with the log flag.
#[derive(Debug, Clone, Copy)]
struct StartedQueue {
    index: u16,
    layout: QueueLayout,
}

/// The simulated VMM's vhost-user connection to one device.
pub struct Vmm {
    fe: Frontend,
    ram: Arc<GuestRam>,
    opts: VmmOptions,
    device_features: u64,
    acked: u64,
    proto: VhostUserProtocolFeatures,
    num_queues: u64,
    started: Vec<StartedQueue>,
    log: Option<LogRegion>,
    logging: bool,
}

impl Vmm {
    /// Connects to `socket` (retrying while it does not exist yet), negotiates features the way
    /// QEMU does and installs the memory table. Rings are started with [`Vmm::start_queue`].
    pub fn connect(socket: &Path, ram: Arc<GuestRam>, opts: VmmOptions) -> Result<Self, VmmError> {
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!("vmm: waiting for {}: {e}", socket.display());
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(VmmError::Io {
                        what: "connect",
                        source,
                    })
                }
            }
        };
        let mut fe = Frontend::from_stream(stream, 1);
        let device_features = vh("GET_FEATURES", fe.get_features())?;
        if device_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VmmError::Unsupported(
                "backend lacks VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        let offered = vh("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        let proto = offered & wanted;
        vh("SET_PROTOCOL_FEATURES", fe.set_protocol_features(proto))?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Like QEMU: wait for every ack, so a failed request is seen where it happened.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let num_queues = if proto.contains(VhostUserProtocolFeatures::MQ) {
            vh("GET_QUEUE_NUM", fe.get_queue_num())?
        } else {
            1
        };
        if proto.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            vh("GET_MAX_MEM_SLOTS", fe.get_max_mem_slots())?;
        }
        vh("SET_OWNER", fe.set_owner())?;
        let mut acked = device_features & !VHOST_F_LOG_ALL;
        if !opts.event_idx {
            acked &= !(1u64 << VIRTIO_RING_F_EVENT_IDX);
        }
        if !opts.indirect {
            acked &= !(1u64 << VIRTIO_RING_F_INDIRECT_DESC);
        }
        if !opts.in_order {
            acked &= !VIRTIO_F_IN_ORDER;
        }
        vh("SET_FEATURES", fe.set_features(acked))?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_addr(),
            mmap_offset: 0,
            mmap_handle: ram.file().as_raw_fd(),
        };
        let use_add = opts.mem_style == MemTableStyle::AddMemReg
            && proto.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        if use_add {
            vh("ADD_MEM_REG", fe.add_mem_region(&region))?;
        } else {
            vh("SET_MEM_TABLE", fe.set_mem_table(&[region]))?;
        }
        Ok(Vmm {
            fe,
            ram,
            opts,
            device_features,
            acked,
            proto,
            num_queues,
            started: Vec::new(),
            log: None,
            logging: false,
        })
    }

    /// Features the device offered.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Features acked (without LOG_ALL).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.acked & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// Whether VIRTIO_F_IN_ORDER was negotiated.
    pub fn in_order(&self) -> bool {
        self.acked & VIRTIO_F_IN_ORDER != 0
    }

    /// Whether INDIRECT_DESC was negotiated.
    pub fn indirect(&self) -> bool {
        self.acked & (1u64 << VIRTIO_RING_F_INDIRECT_DESC) != 0
    }

    /// Queues the device has.
    pub fn num_queues(&self) -> u64 {
        self.num_queues
    }

    /// Protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.proto
    }

    /// Whether the device (or the proxy in front of it) can log: QEMU refuses to migrate
    /// without both VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD.
    pub fn supports_logging(&self) -> bool {
        self.device_features & VHOST_F_LOG_ALL != 0
            && self.proto.contains(VhostUserProtocolFeatures::LOG_SHMFD)
    }

    /// Reads the device config space.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, VmmError> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = vh(
            "GET_CONFIG",
            self.fe
                .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf),
        )?;
        Ok(payload.to_vec())
    }

    fn vring_config(&self, layout: &QueueLayout, log: bool) -> VringConfigData {
        let hva = self.ram.host_addr();
        VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: if log {
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
            } else {
                0
            },
            desc_table_addr: hva + layout.desc,
            used_ring_addr: hva + layout.used,
            avail_ring_addr: hva + layout.avail,
            // Both QEMU and Cloud Hypervisor send the used ring's guest-physical address.
            log_addr: log.then_some(layout.used),
        }
    }

    /// Starts ring `index` at `layout` from avail index `base`:
    /// SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL,
    /// SET_VRING_ENABLE 1.
    pub fn start_queue(
        &mut self,
        index: u16,
        layout: QueueLayout,
        base: u16,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VmmError> {
        let i = usize::from(index);
        vh("SET_VRING_NUM", self.fe.set_vring_num(i, layout.size))?;
        vh("SET_VRING_BASE", self.fe.set_vring_base(i, base))?;
        let cfg = self.vring_config(&layout, self.logging);
        vh("SET_VRING_ADDR", self.fe.set_vring_addr(i, &cfg))?;
        vh("SET_VRING_KICK", self.fe.set_vring_kick(i, kick))?;
        vh("SET_VRING_CALL", self.fe.set_vring_call(i, call))?;
        vh("SET_VRING_ENABLE", self.fe.set_vring_enable(i, true))?;
        self.started.retain(|q| q.index != index);
        self.started.push(StartedQueue { index, layout });
        Ok(())
    }

    /// Start `guest`'s rings on the device, then run it on its own vCPU thread.
    pub fn run_guest<W: crate::guest::GuestWorkload + 'static>(
        &mut self,
        guest: W,
    ) -> Result<crate::guest::runner::GuestRunner<W>, VmmError> {
        self.start_queues(guest.queues())?;
        crate::guest::runner::GuestRunner::spawn(guest).map_err(|source| VmmError::Io {
            what: "spawn the guest vCPU",
            source,
        })
    }

    /// Starts every ring of `queues` with [`Vmm::start_queue`], each from the driver's own next avail
    /// index (0 for a fresh queue, where it left off for a migrated one).
    pub fn start_queues(&mut self, queues: &[DriverQueue]) -> Result<(), VmmError> {
        for q in queues {
            self.start_queue(
                q.index(),
                q.layout(),
                q.next_avail(),
                q.kick_fd(),
                q.call_fd(),
            )?;
        }
        Ok(())
    }

    /// Replaces the kick and call eventfds of ring `index` without stopping it (what a proxy does
    /// to take the notifications over, and what QEMU does when it rewires irqfds).
    pub fn replace_notifiers(
        &mut self,
        index: u16,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VmmError> {
        let i = usize::from(index);
        vh("SET_VRING_CALL", self.fe.set_vring_call(i, call))?;
        vh("SET_VRING_KICK", self.fe.set_vring_kick(i, kick))?;
        Ok(())
    }

    /// VM stop for one ring: SET_VRING_ENABLE 0 (acked), then GET_VRING_BASE; returns the base.
    pub fn stop_queue(&mut self, index: u16) -> Result<u16, VmmError> {
        let i = usize::from(index);
        vh("SET_VRING_ENABLE", self.fe.set_vring_enable(i, false))?;
        let base = vh("GET_VRING_BASE", self.fe.get_vring_base(i))?;
        self.started.retain(|q| q.index != index);
        Ok(base as u16)
    }

    fn install_log(&mut self) -> Result<Option<LogRegion>, VmmError> {
        let region = LogRegion::new(self.ram.size())?;
        vh(
            "SET_LOG_BASE",
            self.fe.set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: region.size,
                    mmap_offset: 0,
                    mmap_handle: region.file.as_raw_fd(),
                }),
            ),
        )?;
        Ok(self.log.replace(region))
    }

    /// The file of the dirty log installed last (for tests of a VMM that truncates it).
    pub fn log_file(&self) -> Option<&std::fs::File> {
        self.log.as_ref().map(|l| &l.file)
    }

    /// Migration start: SET_LOG_BASE, SET_FEATURES | LOG_ALL, SET_VRING_ADDR with the log flag
    /// on every started ring. Fails like QEMU when the device cannot log.
    pub fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        if self.device_features & VHOST_F_LOG_ALL == 0 {
            return Err(VmmError::Unsupported(
                "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature.".into(),
            ));
        }
        if !self.proto.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(VmmError::Unsupported(
                "Migration disabled: vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD feature."
                    .into(),
            ));
        }
        self.install_log()?;
        vh(
            "SET_FEATURES",
            self.fe.set_features(self.acked | VHOST_F_LOG_ALL),
        )?;
        self.logging = true;
        self.readdress_started_rings()
    }

    /// Pages the device side logged since the last sync (empty when not logging).
    pub fn sync_dirty_log(&mut self) -> Result<Vec<u64>, VmmError> {
        let mut out = Vec::new();
        let pages = self.ram.pages();
        match self.opts.log_style {
            LogStyle::Qemu => {
                if let Some(l) = &self.log {
                    l.take(pages, &mut out);
                }
            }
            LogStyle::CloudHypervisor => {
                if self.log.is_some() {
                    if let Some(old) = self.install_log()? {
                        // After SET_LOG_BASE was acked nobody writes the old region any more.
                        old.read(pages, &mut out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Migration end/cancel: SET_FEATURES without LOG_ALL, ring addresses without the log flag.
    /// The log region is kept until the VMM is dropped (a late writer must not fault).
    pub fn stop_dirty_log(&mut self) -> Result<(), VmmError> {
        if !self.logging {
            return Ok(());
        }
        vh("SET_FEATURES", self.fe.set_features(self.acked))?;
        self.logging = false;
        self.readdress_started_rings()
    }

    /// SET_VRING_ADDR on every started ring, with the log flag as dirty logging now is.
    fn readdress_started_rings(&mut self) -> Result<(), VmmError> {
        for q in self.started.clone() {
            let cfg = self.vring_config(&q.layout, self.logging);
            vh(
                "SET_VRING_ADDR",
                self.fe.set_vring_addr(usize::from(q.index), &cfg),
            )?;
        }
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn logging(&self) -> bool {
        self.logging
    }

    /// The guest RAM this VMM handed out.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
}
