//! Per-queue state: what the VMM configured for a ring, its mode (passthrough or shadow) and its
//! counters, plus reads of the guest ring's indices that the drains observe.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::VringConfigData;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::RingAddressSpace;
use crate::quiesce::RingIndices;
use crate::shadow::ShadowQueue;
use crate::stats::QueueStats;

/// Ring addresses as the VMM gave them, with their guest-physical translation.
#[derive(Debug, Clone, Copy, Default)]
pub struct VringAddr {
    /// Flags (VHOST_VRING_F_LOG).
    pub flags: u32,
    /// Descriptor table, VMM user address.
    pub desc: u64,
    /// Used ring, VMM user address.
    pub used: u64,
    /// Avail ring, VMM user address.
    pub avail: u64,
    /// Used-ring log address (a GPA).
    pub log: u64,
    /// Descriptor table GPA.
    pub desc_gpa: u64,
    /// Used ring GPA.
    pub used_gpa: u64,
    /// Avail ring GPA.
    pub avail_gpa: u64,
}

impl VringAddr {
    /// The guest ring of `num` entries as the device should see it: the VMM's addresses in the
    /// device's address space, without the log flag (the device never logs; svqd does).
    pub fn device_config(&self, num: u16, space: RingAddressSpace) -> VringConfigData {
        let (desc, used, avail) = match space {
            RingAddressSpace::VmmUser => (self.desc, self.used, self.avail),
            RingAddressSpace::GuestPhysical => (self.desc_gpa, self.used_gpa, self.avail_gpa),
        };
        VringConfigData {
            queue_max_size: num,
            queue_size: num,
            flags: self.flags & !VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        }
    }
}

/// What the VMM configured for one ring.
#[derive(Default)]
pub struct VmmVring {
    /// Queue size (SET_VRING_NUM); 0 = not set.
    pub num: u16,
    /// Last SET_VRING_BASE.
    pub base: u16,
    /// SET_VRING_ADDR.
    pub addr: Option<VringAddr>,
    /// Guest kick eventfd.
    pub kick: Option<Arc<EventFd>>,
    /// Guest call eventfd (None: the VMM asked for no interrupts).
    pub call: Option<Arc<EventFd>>,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
    /// Started: kick received since the last GET_VRING_BASE.
    pub started: bool,
}

impl VmmVring {
    /// Whether the device is running this ring (so it can be switched).
    pub fn running(&self) -> bool {
        self.started && self.num != 0 && self.addr.is_some() && self.kick.is_some()
    }

    /// Size and addresses known: a kick would start the ring.
    pub fn configured(&self) -> bool {
        self.num != 0 && self.addr.is_some()
    }

    /// The guest ring's configuration as the device should see it (see
    /// [`VringAddr::device_config`]).
    pub fn device_config(&self, space: RingAddressSpace) -> Option<VringConfigData> {
        Some(self.addr?.device_config(self.num, space))
    }

    /// The guest used ring's idx.
    pub fn guest_used_idx(&self, mem: &GuestMemoryMmap) -> Option<u16> {
        let addr = self.addr?;
        mem.load::<u16>(GuestAddress(addr.used_gpa + 2), Ordering::Acquire)
            .ok()
    }

    /// The guest ring's avail idx, used idx and the avail_event the device writes at the end of
    /// the used ring.
    pub fn guest_indices(&self, mem: &GuestMemoryMmap) -> Option<RingIndices> {
        let addr = self.addr?;
        let load = |gpa: u64| mem.load::<u16>(GuestAddress(gpa), Ordering::Acquire).ok();
        Some(RingIndices {
            avail_idx: load(addr.avail_gpa + 2)?,
            used_idx: load(addr.used_gpa + 2)?,
            avail_event: load(addr.used_gpa + 4 + 8 * u64::from(self.num))?,
        })
    }

    /// Interrupt the guest (a spurious interrupt is harmless, a lost one hangs it).
    pub fn notify_guest(&self) {
        if let Some(call) = &self.call {
            let _ = call.write(1);
        }
    }
}

/// Mode of one queue.
pub enum Mode {
    /// The device runs the guest ring directly.
    Passthrough,
    /// The device runs svqd's shadow ring; the worker relays.
    Shadow(Box<ShadowQueue>),
}

impl Mode {
    /// The mode's name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Passthrough => "passthrough",
            Mode::Shadow(_) => "shadow",
        }
    }

    /// Whether the queue is shadowed.
    pub fn is_shadow(&self) -> bool {
        matches!(self, Mode::Shadow(_))
    }
}

/// One queue.
pub struct QueueSlot {
    /// What the VMM configured.
    pub vmm: VmmVring,
    /// Current mode.
    pub mode: Mode,
    /// Counters.
    pub stats: Arc<QueueStats>,
}

impl QueueSlot {
    /// A queue the VMM has not configured yet.
    pub fn new() -> Self {
        QueueSlot {
            vmm: VmmVring::default(),
            mode: Mode::Passthrough,
            stats: Arc::new(QueueStats::default()),
        }
    }

    /// Stop the shadow worker without draining (device reset, a connection is gone) and return
    /// the queue (index `queue`) to passthrough; the shadow queue is handed back (for its
    /// region).
    pub fn abandon_shadow(&mut self, queue: usize) -> Option<Box<ShadowQueue>> {
        match std::mem::replace(&mut self.mode, Mode::Passthrough) {
            Mode::Shadow(mut sq) => {
                sq.abandon_worker(queue);
                Some(sq)
            }
            Mode::Passthrough => None,
        }
    }
}

impl Default for QueueSlot {
    fn default() -> Self {
        Self::new()
    }
}
