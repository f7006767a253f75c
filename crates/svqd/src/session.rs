//! The state of one VMM session: the device it is served by, what the VMM negotiated and
//! configured (features, memory table, dirty log, queues), and the policy deciding each queue's
//! mode. The VMM's messages arrive in [`crate::handler`]; mode switches run in [`crate::switch`].

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use svq::{DirtyLog, SharedLog};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::BackendDevice;
use crate::config::{ProxyConfig, ShadowPolicy};
use crate::error::ProxyError;
use crate::features::{
    VHOST_F_LOG_ALL, VIRTIO_F_IN_ORDER, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::memory::MemoryTable;
use crate::queue::QueueSlot;
use crate::space::{ShadowSpace, TableCtx};
use crate::switch::{RingFeatures, Switch};
use crate::worker::WorkerThreads;

/// The error of a request while no device is connected (between sessions).
pub fn no_device() -> ProxyError {
    ProxyError::NotAllowed("no backend connection".into())
}

/// One VMM session (and the device connection that lives as long as it).
pub struct Session {
    /// Configuration.
    pub cfg: Arc<ProxyConfig>,
    /// The device (None between VMMs if it could not be re-established).
    pub device: Option<Box<dyn BackendDevice>>,
    /// A VMM is connected.
    pub vmm_connected: bool,
    /// Features the VMM acked (including LOG_ALL).
    pub acked_features: u64,
    /// Protocol features the VMM acked.
    pub acked_protocol: VhostUserProtocolFeatures,
    /// The VMM's memory table.
    pub mem: MemoryTable,
    /// The VMM's dirty log (SET_LOG_BASE).
    pub vmm_log: Option<Arc<DirtyLog>>,
    /// Guards the VMM's dirty log against a VMM that shrinks its file ([`crate::sigbus`]).
    pub vmm_log_guard: Option<crate::sigbus::Guard>,
    /// The log the engines write: the VMM's while LOG_ALL is on (and logging is enabled).
    pub active_log: Arc<SharedLog>,
    /// Queues.
    pub queues: Vec<QueueSlot>,
    /// Shadow forced on by the control plane.
    pub forced: bool,
    /// Where the shadow rings live in the device's memory.
    pub space: ShadowSpace,
    /// The request being handled is answered (acked, or with an empty reply) even when refused,
    /// so the connection stays usable after an error. Reset before each request.
    pub refusable: bool,
    /// An eventfd handed to the device when the VMM wants no interrupts on a ring.
    pub dummy_call: Option<Arc<EventFd>>,
    /// The threads serving shadowed rings.
    pub workers: WorkerThreads,
}

impl Session {
    /// New state for `cfg`, with no connections.
    pub fn new(cfg: Arc<ProxyConfig>) -> Self {
        Session {
            workers: WorkerThreads::new(&cfg),
            cfg,
            device: None,
            vmm_connected: false,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            mem: MemoryTable::default(),
            vmm_log: None,
            vmm_log_guard: None,
            active_log: Arc::new(SharedLog::new(None)),
            queues: Vec::new(),
            forced: false,
            space: ShadowSpace::default(),
            refusable: false,
            dummy_call: None,
        }
    }

    /// Install a fresh device connection for the next VMM, forgetting everything about the last.
    pub fn attach(&mut self, device: Box<dyn BackendDevice>) {
        self.reset_session();
        self.queues = (0..device.num_queues()).map(|_| QueueSlot::new()).collect();
        self.device = Some(device);
    }

    /// Stop all workers without draining (the VMM or the device is gone) and forget the session.
    pub fn reset_session(&mut self) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.abandon_shadow(i);
        }
        if let Some(d) = self.device.take() {
            d.close();
        }
        self.queues.clear();
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
        self.mem.clear();
        self.vmm_log = None;
        self.active_log.replace(None);
        self.vmm_log_guard = None;
        self.space.clear();
        self.vmm_connected = false;
    }

    /// The device, or an error between sessions.
    pub fn device(&mut self) -> Result<&mut dyn BackendDevice, ProxyError> {
        match self.device.as_deref_mut() {
            Some(d) => Ok(d),
            None => Err(no_device()),
        }
    }

    /// Whether the device takes ring enable/disable.
    pub fn device_has_enable(&self) -> bool {
        self.device.as_ref().is_some_and(|d| d.has_enable())
    }

    /// Validate a queue index from the VMM (a bad index must never reach the backend: it aborts
    /// qemu-storage-daemon).
    pub fn check_queue(&self, index: u32) -> Result<usize, ProxyError> {
        let i = index as usize;
        if i < self.queues.len() {
            Ok(i)
        } else {
            Err(ProxyError::BadQueue {
                index,
                queues: self.queues.len(),
            })
        }
    }

    /// LOG_ALL acked by the VMM.
    pub fn log_all(&self) -> bool {
        self.acked_features & VHOST_F_LOG_ALL != 0
    }

    /// Whether queues should be in shadow mode now.
    pub fn want_shadow(&self) -> bool {
        match self.cfg.shadow {
            ShadowPolicy::Never => false,
            ShadowPolicy::Always => true,
            ShadowPolicy::Auto => self.forced || self.log_all(),
        }
    }

    /// Point the engines at the VMM's log while LOG_ALL is on, at nothing otherwise.
    pub fn update_active_log(&mut self) {
        let log = if self.log_all() && self.cfg.log_enabled {
            self.vmm_log.clone()
        } else {
            None
        };
        self.active_log.replace(log);
    }

    /// Ring features the VMM negotiated that the shadow engine must honour.
    pub fn ring_features(&self) -> RingFeatures {
        RingFeatures {
            event_idx: self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0,
            indirect: self.acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0,
            in_order: self.acked_features & VIRTIO_F_IN_ORDER != 0,
        }
    }

    /// The switch logic over this session's device and queues.
    pub fn switch(&mut self) -> Result<Switch<'_>, ProxyError> {
        let features = self.ring_features();
        let Some(device) = self.device.as_deref_mut() else {
            return Err(no_device());
        };
        Ok(Switch {
            cfg: &self.cfg,
            device,
            mem: &self.mem,
            log: &self.active_log,
            space: &mut self.space,
            queues: &mut self.queues,
            features,
            dummy_call: &mut self.dummy_call,
            workers: &mut self.workers,
        })
    }

    /// The device's memory-table context with the shadow space beside it.
    pub fn table(&mut self) -> Result<(&mut ShadowSpace, TableCtx<'_>), ProxyError> {
        let Some(device) = self.device.as_deref_mut() else {
            return Err(no_device());
        };
        Ok((
            &mut self.space,
            TableCtx {
                device,
                mem: &self.mem,
                queues: &self.queues,
            },
        ))
    }

    /// Bring every queue to the mode the policy wants. Returns the first error; keeps going with
    /// the other queues.
    pub fn reconcile(&mut self) -> Result<(), ProxyError> {
        let want = self.want_shadow();
        if self.queues.is_empty() {
            return Ok(());
        }
        self.switch()?.reconcile(want)
    }

    /// An eventfd from a VMM's fd.
    pub fn eventfd(fd: File) -> EventFd {
        // SAFETY: the File owned the fd; ownership moves to the EventFd.
        unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
    }
}
