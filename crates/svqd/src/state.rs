//! The proxy's state for one VMM connection, and the vhost-user request handler over it.
//!
//! Every VMM request arrives here (through the vhost crate's `BackendReqHandler`), is validated,
//! recorded (svqd must know the rings to shadow them later) and forwarded to the backend, except
//! what svqd implements itself: LOG_ALL, SET_LOG_BASE, and, for queues in shadow mode, the ring's
//! kick/call/enable, which then belong to the worker.

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use svq::{DirtyLog, IovaTree, SharedLog};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Frontend, GpuBackend, VhostUserBackendReqHandlerMut, VhostUserFrontend,
};
use vhost::{VhostBackend, VhostUserMemoryRegionBase, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::BackendConn;
use crate::config::{ProxyConfig, ShadowPolicy};
use crate::error::ProxyError;
use crate::features::{
    self, VHOST_F_LOG_ALL, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::memory::{MemoryTable, MAX_TABLE_REGIONS};
use crate::quiesce::{wait_for_used, Quiescer, RingIndices, QUIESCE_LIMIT};
use crate::shadow::{self, ShadowQueue};
use crate::stats::QueueStats;
use crate::worker::{Engine, Worker, WorkerExit, WorkerSetup};

type VhostResult<T> = vhost::vhost_user::Result<T>;

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
    /// Whether the backend is running this ring (so it can be switched).
    pub fn running(&self) -> bool {
        self.started && self.num != 0 && self.addr.is_some() && self.kick.is_some()
    }
}

/// Mode of one queue.
pub enum Mode {
    /// The backend runs the guest ring directly.
    Passthrough,
    /// The backend runs svqd's shadow ring; the worker relays.
    Shadow(Box<ShadowQueue>),
}

/// One queue.
pub struct QueueSlot {
    /// What the VMM configured.
    pub vmm: VmmVring,
    /// Current mode.
    pub mode: Mode,
    /// The shadow region of an earlier shadow period, still in the backend's memory table and
    /// reused by the next one. Adding or removing a region costs a whole memory-table rebuild
    /// in a backend without CONFIGURE_MEM_SLOTS (DPDK: about 50 ms each, measured), and the
    /// switch back happens on the VM-stop path of a migration, inside its downtime.
    pub parked: Option<shadow::ShadowRegion>,
    /// Counters.
    pub stats: Arc<QueueStats>,
}

impl QueueSlot {
    fn new() -> Self {
        QueueSlot {
            vmm: VmmVring::default(),
            mode: Mode::Passthrough,
            parked: None,
            stats: Arc::new(QueueStats::default()),
        }
    }
}

/// Allocators for the shadow rings' place in the backend's memory table: a guest-physical range
/// outside all guest RAM and a user-address range above all of the VMM's.
pub struct ShadowSpace {
    /// Guest-physical addresses.
    pub gpa: IovaTree,
    /// User addresses (what the backend translates ring addresses with).
    pub uva: IovaTree,
}

/// A passthrough ring being quiesced (see [`ProxyState::drain_passthrough`]).
struct DrainCtx {
    /// svqd's call fd given to the backend.
    drain_call: EventFd,
    /// svqd's kick fd given to the backend (kept open until the ring is stopped).
    _drain_kick: EventFd,
    quiet: Quiescer,
}

/// Lowest GPA used for shadow rings: 1 TiB, above the RAM of any guest svqd is meant for (and
/// always above the highest guest region).
const SHADOW_GPA_FLOOR: u64 = 1 << 40;
const GIB: u64 = 1 << 30;

/// The proxy state.
pub struct ProxyState {
    /// Configuration.
    pub cfg: Arc<ProxyConfig>,
    /// The backend connection (None between VMMs if it could not be re-established).
    pub backend: Option<BackendConn>,
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
    /// The log the engines write: the VMM's while LOG_ALL is on (and logging is enabled).
    pub active_log: Arc<SharedLog>,
    /// Queues.
    pub queues: Vec<QueueSlot>,
    /// Shadow forced on by the control plane.
    pub forced: bool,
    /// Shadow ring address allocators (while any shadow ring exists).
    pub space: Option<ShadowSpace>,
    /// The request being handled is answered (acked, or with an empty reply) even when refused,
    /// so the connection stays usable after an error. Reset before each request.
    pub refusable: bool,
    /// An eventfd handed to the backend when the VMM wants no interrupts on a ring.
    pub dummy_call: Option<Arc<EventFd>>,
}

impl ProxyState {
    /// New state for `cfg`, with no connections.
    pub fn new(cfg: Arc<ProxyConfig>) -> Self {
        ProxyState {
            cfg,
            backend: None,
            vmm_connected: false,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            mem: MemoryTable::default(),
            vmm_log: None,
            active_log: Arc::new(SharedLog::new(None)),
            queues: Vec::new(),
            forced: false,
            space: None,
            refusable: false,
            dummy_call: None,
        }
    }

    /// Install a fresh backend connection for the next VMM, forgetting everything about the last.
    pub fn attach(&mut self, mut backend: BackendConn) {
        self.reset_session();
        if !self.cfg.backend_mem_slots {
            // Treat the backend as one without CONFIGURE_MEM_SLOTS, towards both sides.
            backend
                .protocol
                .remove(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        }
        self.queues = (0..backend.num_queues).map(|_| QueueSlot::new()).collect();
        self.backend = Some(backend);
    }

    /// Stop all workers without draining (the VMM or the backend is gone) and forget the session.
    pub fn reset_session(&mut self) {
        for q in &mut self.queues {
            if let Mode::Shadow(sq) = std::mem::replace(&mut q.mode, Mode::Passthrough) {
                sq.abandon();
            }
        }
        if let Some(b) = self.backend.take() {
            b.close();
        }
        self.queues.clear();
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
        self.mem.clear();
        self.vmm_log = None;
        self.active_log.replace(None);
        self.space = None;
        self.vmm_connected = false;
    }

    fn be(&mut self) -> Result<&mut BackendConn, ProxyError> {
        self.backend
            .as_mut()
            .ok_or_else(|| ProxyError::NotAllowed("no backend connection".into()))
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
    fn update_active_log(&mut self) {
        let log = if self.log_all() && self.cfg.log_enabled {
            self.vmm_log.clone()
        } else {
            None
        };
        self.active_log.replace(log);
    }

    /// Bring every queue to the mode the policy wants. Returns the first error; keeps going with
    /// the other queues.
    pub fn reconcile(&mut self) -> Result<(), ProxyError> {
        let want = self.want_shadow();
        let mut first = None;
        // One queue after the other, never all rings stopped at once: queues of one device
        // depend on each other (a net backend completes a TX chain by filling an RX buffer), so
        // quiescing them together can stall every one of them until the deadline.
        for q in 0..self.queues.len() {
            let res = match (&self.queues[q].mode, want) {
                (Mode::Passthrough, true) if self.queues[q].vmm.running() => {
                    self.switch_to_shadow(q)
                }
                (Mode::Shadow(_), false) => self.switch_to_passthrough(q, false).map(|_| ()),
                _ => Ok(()),
            };
            if let Err(e) = res {
                tracing::error!(queue = q, error = %e, "mode switch failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn event_idx(&self) -> bool {
        self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    fn eventfd(fd: File) -> EventFd {
        // SAFETY: the File owned the fd; ownership moves to the EventFd.
        unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
    }

    /// An eventfd nobody reads, for a backend whose VMM asked for no interrupts.
    fn dummy_call(&mut self) -> Result<Arc<EventFd>, ProxyError> {
        if self.dummy_call.is_none() {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?;
            self.dummy_call = Some(Arc::new(fd));
        }
        Ok(self.dummy_call.clone().expect("just set"))
    }

    // ---------------------------------------------------------------------------------------
    // Guest ring access (used by the drains).

    /// Read the guest used ring's idx.
    pub fn guest_used_idx(&self, q: usize) -> Option<u16> {
        let addr = self.queues[q].vmm.addr?;
        let mem = self.mem.shared().snapshot();
        mem.load::<u16>(GuestAddress(addr.used_gpa + 2), Ordering::Acquire)
            .ok()
    }

    /// Read the guest ring's avail idx, used idx and the avail_event the backend writes at the
    /// end of the used ring.
    pub fn guest_indices(&self, q: usize) -> Option<RingIndices> {
        let v = &self.queues[q].vmm;
        let addr = v.addr?;
        let mem = self.mem.shared().snapshot();
        let load = |gpa: u64| mem.load::<u16>(GuestAddress(gpa), Ordering::Acquire).ok();
        Some(RingIndices {
            avail_idx: load(addr.avail_gpa + 2)?,
            used_idx: load(addr.used_gpa + 2)?,
            avail_event: load(addr.used_gpa + 4 + 8 * u64::from(v.num))?,
        })
    }

    fn notify_guest(&self, q: usize) {
        if let Some(call) = &self.queues[q].vmm.call {
            let _ = call.write(1);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Shadow ring space.

    /// Allocate a GPA and a user address for a shadow region of `size` bytes mapped at `host`.
    pub fn alloc_shadow_space(&mut self, size: u64, host: u64) -> Result<(u64, u64), ProxyError> {
        if self.space.is_none() {
            let gpa_first = self
                .mem
                .gpa_end()
                .max(SHADOW_GPA_FLOOR)
                .next_multiple_of(GIB);
            let uva_first = self.mem.uva_end().next_multiple_of(GIB).max(GIB);
            let err = |e: svq::IovaError| ProxyError::Engine(format!("shadow address space: {e}"));
            self.space = Some(ShadowSpace {
                gpa: IovaTree::new(gpa_first, (1u64 << 52) - 1).map_err(err)?,
                uva: IovaTree::new(uva_first, (1u64 << 63) - 1).map_err(err)?,
            });
        }
        let space = self.space.as_mut().expect("just set");
        let err = |e: svq::IovaError| ProxyError::Engine(format!("shadow address space: {e}"));
        let gpa = space.gpa.alloc(size, 4096, host).map_err(err)?;
        let uva = match space.uva.alloc(size, 4096, host) {
            Ok(u) => u,
            Err(e) => {
                let _ = space.gpa.remove(gpa);
                return Err(err(e));
            }
        };
        Ok((gpa, uva))
    }

    /// Release a shadow region's addresses.
    pub fn free_shadow_space(&mut self, gpa: u64, uva: u64) {
        if let Some(space) = self.space.as_mut() {
            let _ = space.gpa.remove(gpa);
            let _ = space.uva.remove(uva);
            if space.gpa.is_empty() {
                // Re-derive from the memory table next time (it may have grown).
                self.space = None;
            }
        }
    }

    /// The backend's memory table: the VMM's regions plus every shadow region, in use or
    /// parked (for SET_MEM_TABLE, which replaces the whole table).
    pub fn backend_table(
        &self,
        extra: Option<&shadow::ShadowRegion>,
    ) -> Vec<vhost::VhostUserMemoryRegionInfo> {
        let mut t: Vec<_> = self.mem.regions().iter().map(|r| r.info()).collect();
        for q in &self.queues {
            if let Mode::Shadow(sq) = &q.mode {
                t.push(sq.region.info());
            }
            if let Some(r) = &q.parked {
                t.push(r.info());
            }
        }
        if let Some(r) = extra {
            t.push(r.info());
        }
        t
    }

    /// Slots reserved for shadow regions out of the backend's GET_MAX_MEM_SLOTS.
    fn reserved_slots(&self) -> u64 {
        self.queues.len().clamp(1, 64) as u64
    }

    // ---------------------------------------------------------------------------------------
    // JSON views for the control plane.

    /// `query-status`.
    pub fn status_json(&self) -> Value {
        let queues: Vec<Value> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (mode, shadow) = match &q.mode {
                    Mode::Passthrough => ("passthrough", Value::Null),
                    Mode::Shadow(sq) => ("shadow", sq.status_json()),
                };
                json!({
                    "index": i,
                    "mode": mode,
                    "started": q.vmm.running(),
                    "enabled": q.vmm.enabled,
                    "size": q.vmm.num,
                    "shadow": shadow,
                    // A shadow region kept in the backend's table for the next switch.
                    "parked_region": q.parked.as_ref().map(|r| format!("{:#x}", r.gpa)),
                })
            })
            .collect();
        let (bf, bp) = self
            .backend
            .as_ref()
            .map(|b| (b.features, b.protocol.bits()))
            .unwrap_or_default();
        json!({
            "socket": self.cfg.socket.display().to_string(),
            "backend": self.cfg.backend.display().to_string(),
            "backend_connected": self.backend.is_some(),
            "vmm_connected": self.vmm_connected,
            "policy": self.cfg.shadow.as_str(),
            "forced": self.forced,
            "log_all": self.log_all(),
            "logging": self.active_log.is_enabled(),
            "log_bytes": self.vmm_log.as_ref().map(|l| l.len_bytes()),
            "features": {
                "backend": format!("{bf:#x}"),
                "offered": format!("{:#x}", features::vmm_virtio_features(bf)),
                "acked": format!("{:#x}", self.acked_features),
            },
            "protocol_features": {
                "backend": format!("{bp:#x}"),
                "offered": format!("{:#x}", features::vmm_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(bp)).bits()),
                "acked": format!("{:#x}", self.acked_protocol.bits()),
            },
            "queues": queues,
        })
    }

    /// `query-stats`.
    pub fn stats_json(&self) -> Value {
        let queues: Vec<Value> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut v = q.stats.to_json();
                v["index"] = json!(i);
                v["mode"] = json!(match q.mode {
                    Mode::Passthrough => "passthrough",
                    Mode::Shadow(_) => "shadow",
                });
                v
            })
            .collect();
        json!({ "queues": queues })
    }

    // ---------------------------------------------------------------------------------------
    // Mode switches.

    /// Passthrough → shadow for queue `q` (which the backend is running on the guest ring).
    pub fn switch_to_shadow(&mut self, q: usize) -> Result<(), ProxyError> {
        let t0 = Instant::now();
        let base = self.drain_passthrough(q)?;
        if let Err(e) = self.start_shadow(q, base) {
            tracing::error!(queue = q, error = %e, "cannot start shadow ring; back to passthrough");
            if let Err(e2) = self.restart_stopped_ring(q, base) {
                tracing::error!(queue = q, error = %e2, "restarting the guest ring failed too");
            }
            return Err(e);
        }
        self.reannounce_after_switch(q);
        let us = t0.elapsed().as_micros() as u64;
        let st = &self.queues[q].stats;
        QueueStats::add(&st.mode_switches, 1);
        st.last_switch_to_shadow_us.store(us, Ordering::Relaxed);
        tracing::info!(
            queue = q,
            base,
            micros = us,
            "queue switched to shadow mode"
        );
        Ok(())
    }

    /// Take the guest ring away from the backend without losing, doubling or straying a
    /// completion. Returns the guest index where the backend stopped (= guest used idx).
    ///
    /// 1. SET_VRING_CALL with svqd's eventfd: completions from now on notify svqd, which relays
    ///    them to the guest (the VMM's call fd stays open on svqd's side whatever the backend does
    ///    with its copy).
    /// 2. SET_VRING_ENABLE 0: a backend honouring it (vhost-user-backend) stops taking buffers
    ///    and unregisters the guest kick fd while that fd is still open.
    /// 3. Only for a backend ignoring enable (libvhost-user, qemu-storage-daemon; see
    ///    `BackendConn::ignores_disable`): SET_VRING_KICK with svqd's eventfd, so it no longer
    ///    sees guest kicks; svqd kicks once so it scans the ring and publishes its position.
    ///    Others keep their kick fd (vhost-user-backend up to 0.20 dies on the GET_VRING_BASE
    ///    after a kick swap).
    /// 4. Quiesce ([`Quiescer`]): until everything published is completed, or with EVENT_IDX
    ///    until the guest used idx equals the avail_event the backend writes on every pop
    ///    (everything popped is completed); otherwise until the used idx and calls stay still
    ///    for a quiet period.
    /// 5. GET_VRING_BASE, then verify its answer against the guest used idx: any difference is
    ///    requests still in flight (qemu-storage-daemon answers at once). Those complete into the
    ///    guest ring, which stays mapped in the backend, so wait for the used idx to reach the
    ///    base before the ring moves. Only then is the backend's state fully in guest memory.
    fn drain_passthrough(&mut self, q: usize) -> Result<u16, ProxyError> {
        let mut ctx = self.drain_begin(q)?;
        // Step 4: relay each completion signal to the guest while observing.
        let DrainCtx {
            drain_call, quiet, ..
        } = &mut ctx;
        quiet.wait(self.cfg.drain_timeout.min(QUIESCE_LIMIT), || {
            let signalled = drain_call.read().is_ok();
            if signalled {
                self.notify_guest(q);
            }
            self.guest_indices(q).map(|r| (r, signalled))
        });
        self.drain_finish(q, ctx)
    }

    /// Steps 1-3 of [`Self::drain_passthrough`]: svqd's call and kick fds, ring disabled.
    fn drain_begin(&mut self, q: usize) -> Result<DrainCtx, ProxyError> {
        let drain_call = EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?;
        let drain_kick = EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?;
        let res = (|| {
            let be = self.be()?;
            be.fe
                .set_vring_call(q, &drain_call)
                .map_err(|e| ProxyError::Backend("SET_VRING_CALL", e))?;
            if be.has_enable() {
                be.fe
                    .set_vring_enable(q, false)
                    .map_err(|e| ProxyError::Backend("SET_VRING_ENABLE", e))?;
            }
            if !be.ignores_disable() {
                // The disable stops it. Its kick fd must stay: vhost-user-backend does not
                // register a kick fd replaced on a started ring, and up to 0.20 the
                // GET_VRING_BASE that follows fails to unregister it (ENOENT), which ends the
                // daemon (vhost-device-rng/-vsock); the old fd's epoll entry also outlives the
                // swap. See DESIGN.md.
                return Ok(());
            }
            // Kick once, *before* handing the fd over: a backend thread may still hold an event
            // of the old kick fd and consume the new one for it; an empty eventfd can make that
            // read fail and end its event loop.
            let _ = drain_kick.write(1);
            be.fe
                .set_vring_kick(q, &drain_kick)
                .map_err(|e| ProxyError::Backend("SET_VRING_KICK", e))
        })();
        if let Err(e) = res {
            // Hand the running ring its own fds back rather than leave it signalling ours.
            let v = &self.queues[q].vmm;
            let (call, kick, enabled) = (v.call.clone(), v.kick.clone(), v.enabled);
            if let Ok(be) = self.be() {
                if let Some(c) = &call {
                    let _ = be.fe.set_vring_call(q, c);
                }
                if let Some(k) = &kick {
                    let _ = k.write(1);
                    let _ = be.fe.set_vring_kick(q, k);
                }
                if be.has_enable() {
                    let _ = be.fe.set_vring_enable(q, enabled);
                }
            }
            return Err(e);
        }
        Ok(DrainCtx {
            drain_call,
            _drain_kick: drain_kick,
            quiet: Quiescer::new(self.event_idx()),
        })
    }

    /// Step 5 of [`Self::drain_passthrough`]: GET_VRING_BASE, verified, late completions waited
    /// for. Returns the base.
    fn drain_finish(&mut self, q: usize, c: DrainCtx) -> Result<u16, ProxyError> {
        tracing::debug!(
            queue = q,
            settled = c.quiet.settled(),
            micros = c.quiet.elapsed().as_micros() as u64,
            "passthrough ring quiesced"
        );
        let drain_timeout = self.cfg.drain_timeout;
        let num = self.queues[q].vmm.num;
        let base = {
            let be = self.be()?;
            be.fe
                .get_vring_base(q)
                .map_err(|e| ProxyError::Backend("GET_VRING_BASE", e))?
        } as u16;
        // Verify against the guest used idx; wait for late completions.
        let used = self.guest_used_idx(q).unwrap_or(base);
        let in_flight = base.wrapping_sub(used);
        if in_flight > num {
            let reason = format!(
                "backend reports base {base} but the guest used idx is {used} (queue size {num})"
            );
            let _ = self.restart_stopped_ring(q, base);
            return Err(ProxyError::Switch { queue: q, reason });
        }
        if in_flight > 0 {
            QueueStats::add(&self.queues[q].stats.late_completions, in_flight.into());
            // GET_VRING_BASE closed the backend's call fd; give it one again so the late
            // completions can signal instead of hitting a closed fd (which makes
            // qemu-storage-daemon drop the connection). Narrows the window, cannot close it.
            let be = self.be()?;
            be.fe
                .set_vring_call(q, &c.drain_call)
                .map_err(|e| ProxyError::Backend("SET_VRING_CALL", e))?;
            tracing::debug!(
                queue = q,
                in_flight,
                "waiting for late completions after GET_VRING_BASE"
            );
            let deadline = Instant::now() + drain_timeout;
            if let Err(left) = wait_for_used(deadline, base, || self.guest_used_idx(q)) {
                let reason = format!(
                    "{left} requests still in flight in the backend after {drain_timeout:?}"
                );
                let _ = self.restart_stopped_ring(q, base);
                return Err(ProxyError::Switch { queue: q, reason });
            }
        }
        // Notifications of late completions went to a closed fd: interrupt the guest ourselves
        // (a spurious interrupt is harmless, a lost one hangs the guest).
        self.notify_guest(q);
        Ok(base)
    }

    /// Put the backend back on the guest ring at `base` after svqd stopped it (a failed switch),
    /// and re-announce the other rings (see [`Self::reannounce_other_rings`]).
    fn restart_stopped_ring(&mut self, q: usize, base: u16) -> Result<(), ProxyError> {
        self.restart_passthrough(q, base)?;
        self.reannounce_other_rings(q)
    }

    /// Put the backend back on the guest ring at `base`, as the VMM configured it.
    fn restart_passthrough(&mut self, q: usize, base: u16) -> Result<(), ProxyError> {
        let dummy = self.dummy_call()?;
        let v = &self.queues[q].vmm;
        let addr = v
            .addr
            .ok_or_else(|| ProxyError::NotAllowed("ring has no address".into()))?;
        let ring = guest_vring_config(v.num, &addr);
        let kick = v.kick.clone();
        let call = v.call.clone().unwrap_or(dummy);
        let enabled = v.enabled;
        // The kick covers guest kicks svqd consumed or that arrived while the ring was stopped.
        self.start_backend_ring(q, base, &ring, &call, enabled, kick.as_deref())
    }

    /// Start the stopped backend ring `q` on `ring` at index `base`, with `call` and `kick`
    /// (kicked once), enabled as `enabled` says. The order is what every backend survives:
    ///
    /// * call before kick: the ring starts at the kick, and its first completion must find a
    ///   call fd (qemu-storage-daemon drops the connection otherwise);
    /// * enable before kick: vhost-user-backend up to 0.20 reads and *discards* a kick that
    ///   arrives while the ring is disabled, and without REPLY_ACK svqd cannot wait for an enable
    ///   sent after the kick to be applied first. The backend handles messages in order, so the
    ///   ring is enabled by the time its kick fd is watched.
    fn start_backend_ring(
        &mut self,
        q: usize,
        base: u16,
        ring: &VringConfigData,
        call: &EventFd,
        enabled: bool,
        kick: Option<&EventFd>,
    ) -> Result<(), ProxyError> {
        self.configure_backend_ring(q, base, ring)?;
        let be = self.be()?;
        be.fe
            .set_vring_call(q, call)
            .map_err(|e| ProxyError::Backend("SET_VRING_CALL", e))?;
        if be.has_enable() {
            be.fe
                .set_vring_enable(q, enabled)
                .map_err(|e| ProxyError::Backend("SET_VRING_ENABLE", e))?;
        }
        if let Some(kick) = kick {
            be.hand_over_kick(q, kick)?;
        }
        Ok(())
    }

    /// Point the stopped backend ring `q` at `ring`, index `base` (the ring does not start).
    fn configure_backend_ring(
        &mut self,
        q: usize,
        base: u16,
        ring: &VringConfigData,
    ) -> Result<(), ProxyError> {
        let be = self.be()?;
        be.fe
            .set_vring_num(q, ring.queue_size)
            .map_err(|e| ProxyError::Backend("SET_VRING_NUM", e))?;
        be.fe
            .set_vring_base(q, base)
            .map_err(|e| ProxyError::Backend("SET_VRING_BASE", e))?;
        be.fe
            .set_vring_addr(q, ring)
            .map_err(|e| ProxyError::Backend("SET_VRING_ADDR", e))?;
        Ok(())
    }

    /// After svqd stopped and restarted ring `q` of a running device: re-send the enable of
    /// every other running ring, and kick them.
    ///
    /// DPDK's vhost library treats GET_VRING_BASE on any ring as the device stopping: its
    /// net_vhost port marks *every* ring disabled, and when the restarted ring makes the device
    /// ready again it re-announces only the rings whose enable state changed since; the others
    /// stay disabled for good (measured with testpmd: the guest's receive ring never got a packet
    /// again after a switch). Toggling the enable makes it announce them. The kicks afterwards
    /// (once a reply shows the backend applied the enables) cover guest kicks that a
    /// vhost-user-backend up to 0.20 read and discarded while a ring was disabled for a moment.
    fn reannounce_other_rings(&mut self, q: usize) -> Result<(), ProxyError> {
        if !be_has_enable(&self.backend) {
            return Ok(());
        }
        let others: Vec<(usize, Arc<EventFd>)> = (0..self.queues.len())
            .filter(|&i| i != q && self.queues[i].vmm.running())
            .filter_map(|i| match &self.queues[i].mode {
                // A shadow ring is always enabled towards the backend; the worker holds it.
                Mode::Shadow(sq) => Some((i, sq.backend_kick.clone())),
                Mode::Passthrough if self.queues[i].vmm.enabled => {
                    self.queues[i].vmm.kick.clone().map(|k| (i, k))
                }
                Mode::Passthrough => None,
            })
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let be = self.be()?;
        for &(i, _) in &others {
            for enable in [false, true] {
                be.fe
                    .set_vring_enable(i, enable)
                    .map_err(|e| ProxyError::Backend("SET_VRING_ENABLE", e))?;
            }
        }
        be.fe
            .get_features()
            .map_err(|e| ProxyError::Backend("GET_FEATURES", e))?;
        for (_, kick) in &others {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// [`Self::reannounce_other_rings`] after a switch that succeeded: a failure there does not
    /// undo the switch (the backend connection is broken then, which the proxy notices).
    fn reannounce_after_switch(&mut self, q: usize) {
        if let Err(e) = self.reannounce_other_rings(q) {
            tracing::error!(queue = q, error = %e, "re-announcing the other rings failed");
        }
    }

    /// Build the shadow ring for queue `q` at guest index `base` and start the backend and the
    /// worker on it.
    fn start_shadow(&mut self, q: usize, base: u16) -> Result<(), ProxyError> {
        let v = &self.queues[q].vmm;
        let addr = v
            .addr
            .ok_or_else(|| ProxyError::NotAllowed("ring has no address".into()))?;
        let guest_size = v.num;
        let shadow_size = match self.cfg.shadow_size {
            0 => guest_size,
            s => s,
        };
        let qcfg = svq::QueueConfig {
            guest_size,
            shadow_size,
            desc_table: addr.desc_gpa,
            avail_ring: addr.avail_gpa,
            used_ring: addr.used_gpa,
            event_idx: self.event_idx(),
            indirect: self.acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0,
            in_order: self.acked_features & features::VIRTIO_F_IN_ORDER != 0,
        };
        let region = self.shadow_region(q, shadow_size)?;
        let start = svq::QueueState {
            last_avail_idx: base,
            used_idx: base,
            in_flight: Vec::new(),
        };
        let engine = match region.engine(qcfg, start) {
            Ok(e) => e,
            Err(e) => {
                self.queues[q].parked = Some(region);
                return Err(e);
            }
        };
        let backend_kick =
            Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?);
        let backend_call =
            Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?);
        let ring = shadow_vring_config(&engine);
        let shadow_base = engine.shadow_base();
        let res = self.start_backend_ring(
            q,
            shadow_base,
            &ring,
            &backend_call,
            true,
            Some(&backend_kick),
        );
        if let Err(e) = res {
            self.queues[q].parked = Some(region);
            return Err(e);
        }
        let v = &self.queues[q].vmm;
        let guest_kick = v.kick.clone().expect("running ring has a kick fd");
        let guest_call = v.call.clone();
        let worker = match self.spawn_worker(
            q,
            engine,
            guest_kick,
            guest_call,
            &backend_kick,
            &backend_call,
        ) {
            Ok(w) => w,
            Err(e) => {
                self.queues[q].parked = Some(region);
                return Err(ProxyError::Io("spawn worker", e));
            }
        };
        self.queues[q].mode = Mode::Shadow(Box::new(ShadowQueue {
            region,
            worker: Some(worker),
            backend_kick,
            backend_call,
            shadow_size,
            started: Instant::now(),
        }));
        Ok(())
    }

    /// The memory of queue `q`'s shadow ring of `size` entries: the region parked from its last
    /// shadow period when it fits, else a new one, added to the backend's memory table.
    fn shadow_region(&mut self, q: usize, size: u16) -> Result<shadow::ShadowRegion, ProxyError> {
        if let Some(r) = self.queues[q].parked.take() {
            if r.ring_size == size {
                return Ok(r);
            }
            self.drop_region(r)?;
        }
        let mut region = shadow::ShadowRegion::create(q, size)?;
        let (gpa, uva) = self.alloc_shadow_space(region.size, region.host_addr())?;
        region.gpa = gpa;
        region.uva = uva;
        if let Err(e) = self.add_backend_region(&region) {
            self.free_shadow_space(gpa, uva);
            return Err(e);
        }
        Ok(region)
    }

    /// A SET_MEM_TABLE carries [`MAX_TABLE_REGIONS`] regions at most: forget parked regions
    /// until the table about to be sent, plus `extra` regions, fits. The SET_MEM_TABLE that
    /// follows removes them from the backend.
    fn evict_parked_for(&mut self, extra: usize) {
        for q in 0..self.queues.len() {
            if self.backend_table(None).len() + extra <= MAX_TABLE_REGIONS {
                return;
            }
            if let Some(r) = self.queues[q].parked.take() {
                self.free_shadow_space(r.gpa, r.uva);
            }
        }
    }

    /// Remove a region no ring uses from the backend's table and release its addresses (only
    /// once the backend let go of it: they must not be handed out again while it maps them).
    fn drop_region(&mut self, region: shadow::ShadowRegion) -> Result<(), ProxyError> {
        self.remove_backend_region(&region)?;
        self.free_shadow_space(region.gpa, region.uva);
        Ok(())
    }

    /// Drop the parked regions that overlap guest memory the VMM just added (a region above the
    /// ones the shadow address space was derived from), in guest-physical or user addresses.
    fn evict_parked_overlapping(&mut self, gpa: u64, uva: u64, size: u64) {
        let overlaps =
            |a: u64, b: u64, len: u64| a < b.saturating_add(len) && b < a.saturating_add(size);
        for q in 0..self.queues.len() {
            let hit = self.queues[q]
                .parked
                .as_ref()
                .is_some_and(|r| overlaps(gpa, r.gpa, r.size) || overlaps(uva, r.uva, r.size));
            if hit {
                let r = self.queues[q].parked.take().expect("checked");
                tracing::warn!(
                    queue = q,
                    gpa = r.gpa,
                    "guest memory overlaps a parked shadow region; dropping it"
                );
                if let Err(e) = self.drop_region(r) {
                    tracing::error!(queue = q, error = %e, "cannot remove the parked shadow region");
                }
            }
        }
    }

    fn add_backend_region(&mut self, region: &shadow::ShadowRegion) -> Result<(), ProxyError> {
        let mem_slots = self.be()?.mem_slots();
        if mem_slots {
            let be = self.be()?;
            be.fe
                .add_mem_region(&region.info())
                .map_err(|e| ProxyError::Backend("ADD_MEM_REG", e))?;
        } else {
            self.evict_parked_for(1);
            let table = self.backend_table(Some(region));
            if table.len() > MAX_TABLE_REGIONS {
                return Err(ProxyError::NotAllowed(format!(
                    "no free memory-table slot for a shadow ring ({} regions, backend without \
                     CONFIGURE_MEM_SLOTS takes {MAX_TABLE_REGIONS})",
                    table.len() - 1
                )));
            }
            let be = self.be()?;
            be.fe
                .set_mem_table(&table)
                .map_err(|e| ProxyError::Backend("SET_MEM_TABLE", e))?;
        }
        Ok(())
    }

    /// Remove `region` from the backend's table. The caller must have removed the region from
    /// `self.queues` already (SET_MEM_TABLE style rebuilds the table from it).
    fn remove_backend_region(&mut self, region: &shadow::ShadowRegion) -> Result<(), ProxyError> {
        let mem_slots = self.be()?.mem_slots();
        if mem_slots {
            let be = self.be()?;
            be.fe
                .remove_mem_region(&region.info())
                .map_err(|e| ProxyError::Backend("REM_MEM_REG", e))?;
        } else {
            let table = self.backend_table(None);
            if table.is_empty() {
                // Nothing to tell: an empty table cannot be sent, and the backend keeps a region
                // it will never be pointed at again until the VMM sends its own table.
                return Ok(());
            }
            let be = self.be()?;
            be.fe
                .set_mem_table(&table)
                .map_err(|e| ProxyError::Backend("SET_MEM_TABLE", e))?;
        }
        Ok(())
    }

    /// Shadow → passthrough for queue `q`. Returns the guest index the backend resumes from
    /// (last avail = used, nothing in flight). With `stopped` (the VMM's GET_VRING_BASE), the
    /// backend ring is left stopped on the guest ring; otherwise it runs there again with the
    /// VMM's kick and call fds.
    ///
    /// 1. The worker stops forwarding guest buffers (guest kicks wait on the VMM's eventfd) and
    ///    keeps relaying completions.
    /// 2. Quiesce the shadow ring ([`Quiescer`]): until the backend completed everything it took.
    ///    Buffers it never took (a receive queue with no traffic) do not hold the switch up.
    /// 3. GET_VRING_BASE: the shadow index where the backend stopped, verified against the
    ///    shadow ring. What it took and did not complete yet lands in the shadow ring, which
    ///    stays mapped: wait for it (bounded).
    /// 4. Take the engine back and give the chains the backend never took back to the guest
    ///    ring (`reclaim_untaken`): the guest index steps back over them, so the backend finds
    ///    them in the guest ring.
    /// 5. Start the backend on the guest ring at that index; park the shadow region (kept in the
    ///    backend's table for the next switch, see [`QueueSlot::parked`]).
    ///
    /// On a failure in steps 3–4 the queue stays in shadow mode, running again. A failure to
    /// start the backend on the guest ring in step 5 is reported as it is: the buffers are all in
    /// the guest ring by then, and the backend connection is broken.
    pub fn switch_to_passthrough(&mut self, q: usize, stopped: bool) -> Result<u16, ProxyError> {
        let t0 = Instant::now();
        let Mode::Shadow(mut sq) = std::mem::replace(&mut self.queues[q].mode, Mode::Passthrough)
        else {
            return Err(ProxyError::NotAllowed(format!(
                "queue {q} is not in shadow mode"
            )));
        };
        let Some(worker) = sq.worker.take() else {
            self.queues[q].mode = Mode::Shadow(sq);
            return Err(ProxyError::NotAllowed(format!(
                "queue {q} has no shadow worker (it could not be restarted)"
            )));
        };
        worker.hold();
        let size = sq.shadow_size;
        let mut quiet = Quiescer::new(self.event_idx());
        // The worker consumes the backend's calls; completions show in the used index.
        quiet.wait(self.cfg.drain_timeout.min(QUIESCE_LIMIT), || {
            sq.region.indices(size).map(|r| (r, false))
        });
        tracing::debug!(
            queue = q,
            settled = quiet.settled(),
            micros = quiet.elapsed().as_micros() as u64,
            "shadow ring quiesced"
        );
        let base = match self.be().and_then(|be| {
            be.fe
                .get_vring_base(q)
                .map_err(|e| ProxyError::Backend("GET_VRING_BASE", e))
        }) {
            Ok(b) => b as u16,
            Err(e) => {
                // Nothing was stopped: let the worker go on.
                let exit = worker.stop();
                self.respawn_shadow(q, sq, exit);
                return Err(e);
            }
        };
        if let Err(reason) = self.await_shadow_base(q, &sq, base) {
            let exit = worker.stop();
            return Err(self.resume_shadow(q, sq, exit, base, reason));
        }
        let mut exit = worker.stop();
        // The worker tracks fd replacements the VMM made while it ran.
        self.queues[q].vmm.kick = Some(exit.guest_kick.clone());
        self.queues[q].vmm.call = exit.guest_call.clone();
        let mem = self.mem.shared().snapshot();
        let reclaimed = match exit.engine.reclaim_untaken(&*mem, &self.active_log, base) {
            Ok(n) => n,
            Err(e) => return Err(self.resume_shadow(q, sq, exit, base, e.to_string())),
        };
        let state = exit.engine.export_state();
        if !state.in_flight.is_empty() {
            // Chains taken and not relayed, or imported chains waiting to be resubmitted: a
            // device on the guest ring would never see them.
            let reason = format!(
                "{} requests would be lost by the switch",
                state.in_flight.len()
            );
            return Err(self.resume_shadow(q, sq, exit, base, reason));
        }
        let guest_idx = state.last_avail_idx;
        drop(exit);
        tracing::debug!(
            queue = q,
            shadow_base = base,
            reclaimed,
            guest_idx,
            "shadow ring stopped"
        );
        // The backend no longer uses the region; it stays in its table for the next switch.
        self.queues[q].parked = Some(sq.region);
        if stopped {
            let v = &self.queues[q].vmm;
            let addr = v
                .addr
                .ok_or_else(|| ProxyError::NotAllowed("ring has no address".into()))?;
            let ring = guest_vring_config(v.num, &addr);
            self.configure_backend_ring(q, guest_idx, &ring)?;
        } else {
            self.restart_passthrough(q, guest_idx)?;
            self.reannounce_after_switch(q);
        }
        let us = t0.elapsed().as_micros() as u64;
        let st = &self.queues[q].stats;
        QueueStats::add(&st.mode_switches, 1);
        QueueStats::add(&st.reclaimed, reclaimed.into());
        st.last_switch_to_passthrough_us
            .store(us, Ordering::Relaxed);
        tracing::info!(
            queue = q,
            guest_idx,
            reclaimed,
            micros = us,
            "queue switched to passthrough mode"
        );
        Ok(guest_idx)
    }

    /// Step 3 of [`Self::switch_to_passthrough`]: check the backend's stop index against the
    /// shadow ring and wait until everything it took before it is completed there.
    fn await_shadow_base(&mut self, q: usize, sq: &ShadowQueue, base: u16) -> Result<(), String> {
        let size = sq.shadow_size;
        let Some(r) = sq.region.indices(size) else {
            return Err("shadow ring has no valid layout".into());
        };
        let taken = base.wrapping_sub(r.used_idx);
        if taken > r.avail_idx.wrapping_sub(r.used_idx) {
            return Err(format!(
                "backend reports base {base}, shadow ring used {} avail {}",
                r.used_idx, r.avail_idx
            ));
        }
        if taken == 0 {
            return Ok(());
        }
        QueueStats::add(&self.queues[q].stats.late_completions, taken.into());
        // GET_VRING_BASE closed the backend's copy of the call fd: give it one again, so a
        // backend that signals each completion does not hit a closed fd (the worker polls too).
        if let Ok(be) = self.be() {
            let _ = be.fe.set_vring_call(q, &sq.backend_call);
        }
        let timeout = self.cfg.drain_timeout;
        wait_for_used(Instant::now() + timeout, base, || {
            sq.region.indices(size).map(|r| r.used_idx)
        })
        .map_err(|left| format!("{left} requests still in flight in the backend after {timeout:?}"))
    }

    /// A switch to passthrough failed after the backend stopped the shadow ring at `base`:
    /// start the backend on the shadow ring again there and the worker with it. Returns the
    /// error to report.
    fn resume_shadow(
        &mut self,
        q: usize,
        sq: Box<ShadowQueue>,
        exit: WorkerExit,
        base: u16,
        reason: String,
    ) -> ProxyError {
        tracing::error!(queue = q, %reason, ring = %sq.region.ring_indices(sq.shadow_size), "switch to passthrough failed; shadowing again");
        let ring = shadow_vring_config(&exit.engine);
        let (call, kick) = (sq.backend_call.clone(), sq.backend_kick.clone());
        if let Err(e) = self
            .start_backend_ring(q, base, &ring, &call, true, Some(&kick))
            .and_then(|()| self.reannounce_other_rings(q))
        {
            tracing::error!(queue = q, error = %e, "cannot restart the shadow ring");
        }
        self.respawn_shadow(q, sq, exit);
        ProxyError::Switch { queue: q, reason }
    }

    /// The worker thread relaying queue `q` with `engine`, forwarding as the VMM's enable says.
    fn spawn_worker(
        &self,
        q: usize,
        mut engine: Engine,
        guest_kick: Arc<EventFd>,
        guest_call: Option<Arc<EventFd>>,
        backend_kick: &Arc<EventFd>,
        backend_call: &Arc<EventFd>,
    ) -> std::io::Result<Worker> {
        engine.set_forwarding(self.queues[q].vmm.enabled || !be_has_enable(&self.backend));
        Worker::spawn(WorkerSetup {
            index: q,
            engine,
            mem: self.mem.shared(),
            log: self.active_log.clone(),
            guest_kick,
            guest_call,
            backend_kick: backend_kick.clone(),
            backend_call: backend_call.clone(),
            stats: self.queues[q].stats.clone(),
        })
    }

    /// Run queue `q` in shadow mode again with the engine a stopped worker handed back.
    fn respawn_shadow(&mut self, q: usize, mut sq: Box<ShadowQueue>, exit: WorkerExit) {
        let (kick, call) = (sq.backend_kick.clone(), sq.backend_call.clone());
        match self.spawn_worker(
            q,
            exit.engine,
            exit.guest_kick,
            exit.guest_call,
            &kick,
            &call,
        ) {
            Ok(w) => sq.worker = Some(w),
            // Without a thread nothing relays this queue; it stays shadowed (and stalled)
            // until the device is reset, rather than handing the backend a ring in flux.
            Err(e) => tracing::error!(queue = q, error = %e, "cannot restart the shadow worker"),
        }
        self.queues[q].mode = Mode::Shadow(sq);
    }
}

/// The shadow ring's configuration for the backend.
fn shadow_vring_config(engine: &Engine) -> VringConfigData {
    let (desc, avail, used) = engine.device_addrs();
    let size = engine.config().shadow_size;
    VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    }
}

/// The guest ring's configuration as the backend should see it: the VMM's addresses, without the
/// log flag (the backend never logs; svqd does).
fn guest_vring_config(num: u16, a: &VringAddr) -> VringConfigData {
    VringConfigData {
        queue_max_size: num,
        queue_size: num,
        flags: a.flags & !VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
        desc_table_addr: a.desc,
        used_ring_addr: a.used,
        avail_ring_addr: a.avail,
        log_addr: None,
    }
}

fn fail<T>(e: ProxyError) -> VhostResult<T> {
    tracing::warn!(error = %e, "request refused");
    Err(e.into())
}

macro_rules! try_req {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return fail(e),
        }
    };
}

impl VhostUserBackendReqHandlerMut for ProxyState {
    fn set_owner(&mut self) -> VhostResult<()> {
        self.refusable = true;
        let be = try_req!(self.be());
        be.fe
            .set_owner()
            .map_err(|e| ProxyError::Backend("SET_OWNER", e).into())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.forward_reset("RESET_OWNER", |fe| fe.reset_owner())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.forward_reset("RESET_DEVICE", |fe| fe.reset_device())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        let be = try_req!(self.be());
        Ok(features::vmm_virtio_features(be.features))
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        self.refusable = true;
        let policy = self.cfg.shadow;
        let be = try_req!(self.be());
        let offered = features::vmm_virtio_features(be.features);
        if features & !offered != 0 {
            return fail(ProxyError::BadRequest(format!(
                "SET_FEATURES {features:#x} acks features never offered ({offered:#x})"
            )));
        }
        if features & VHOST_F_LOG_ALL != 0 && policy == ShadowPolicy::Never {
            return fail(ProxyError::NotAllowed(
                "dirty logging requested but svqd runs with --shadow never".into(),
            ));
        }
        let fwd = features::backend_virtio_features(features);
        if be.last_features != Some(fwd) {
            try_req!(be
                .fe
                .set_features(fwd)
                .map_err(|e| ProxyError::Backend("SET_FEATURES", e)));
            be.last_features = Some(fwd);
        }
        let was = self.log_all();
        self.acked_features = features;
        let now = self.log_all();
        if was != now {
            tracing::info!(
                log_all = now,
                "VMM {} dirty logging",
                if now { "started" } else { "stopped" }
            );
        }
        // Start logging before switching (completions relayed from now on are logged), stop
        // after switching back.
        if now {
            self.update_active_log();
        }
        let res = self.reconcile();
        if !now {
            self.update_active_log();
        }
        res.map_err(Into::into)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.refusable = true;
        try_req!(self.mem.set(ctx, files));
        let added: Vec<(u64, u64, u64)> = self
            .mem
            .regions()
            .iter()
            .map(|r| (r.gpa, r.uva, r.size))
            .collect();
        for (gpa, uva, size) in added {
            self.evict_parked_overlapping(gpa, uva, size);
        }
        self.evict_parked_for(0);
        let table = self.backend_table(None);
        if table.len() > MAX_TABLE_REGIONS && !try_req!(self.be()).mem_slots() {
            return fail(ProxyError::NotAllowed(format!(
                "memory table of {} regions plus shadow rings exceeds {MAX_TABLE_REGIONS}",
                ctx.len()
            )));
        }
        let be = try_req!(self.be());
        try_req!(be
            .fe
            .set_mem_table(&table)
            .map_err(|e| ProxyError::Backend("SET_MEM_TABLE", e)));
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index));
        if num == 0 || num > 32768 || !num.is_power_of_two() {
            return fail(ProxyError::BadRequest(format!("queue {q} size {num}")));
        }
        try_req!(self.leave_shadow_for_reconfig(q));
        let be = try_req!(self.be());
        try_req!(be
            .fe
            .set_vring_num(q, num as u16)
            .map_err(|e| ProxyError::Backend("SET_VRING_NUM", e)));
        self.queues[q].vmm.num = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index));
        let num = u64::from(self.queues[q].vmm.num.max(1));
        let check = |uva: u64, len: u64, align: u64, what: &str| -> Result<u64, ProxyError> {
            if !uva.is_multiple_of(align) {
                return Err(ProxyError::BadRequest(format!(
                    "queue {q} {what} at {uva:#x} misaligned"
                )));
            }
            self.mem.uva_to_gpa(uva, len).ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "queue {q} {what} at {uva:#x} (+{len:#x}) is outside guest memory"
                ))
            })
        };
        let desc_gpa = try_req!(check(descriptor, 16 * num, 16, "descriptor table"));
        let avail_gpa = try_req!(check(available, 6 + 2 * num, 2, "avail ring"));
        let used_gpa = try_req!(check(used, 6 + 8 * num, 4, "used ring"));
        let addr = VringAddr {
            flags: flags.bits(),
            desc: descriptor,
            used,
            avail: available,
            log,
            desc_gpa,
            used_gpa,
            avail_gpa,
        };
        // Re-sending the same ring with only the log flag changed (migration start/stop) is no
        // reconfiguration: svqd strips the flag, so the backend would get the message it already
        // has, and in shadow mode the engine logs the used ring anyway. Not forwarding it matters:
        // vhost-user-backend re-reads used.idx from memory on SET_VRING_ADDR, and doing that on a
        // running ring races with a completion in progress and loses it.
        let log_flag = VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits();
        let same_ring = self.queues[q].vmm.addr.is_some_and(|a| {
            a.desc == descriptor
                && a.used == used
                && a.avail == available
                && (a.flags & !log_flag) == (flags.bits() & !log_flag)
        });
        if same_ring && self.queues[q].vmm.running() {
            self.queues[q].vmm.addr = Some(addr);
            return Ok(());
        }
        try_req!(self.leave_shadow_for_reconfig(q));
        let num = self.queues[q].vmm.num;
        let be = try_req!(self.be());
        try_req!(be
            .fe
            .set_vring_addr(q, &guest_vring_config(num, &addr))
            .map_err(|e| ProxyError::Backend("SET_VRING_ADDR", e)));
        self.queues[q].vmm.addr = Some(addr);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index));
        if base > u32::from(u16::MAX) {
            return fail(ProxyError::BadRequest(format!("queue {q} base {base}")));
        }
        try_req!(self.leave_shadow_for_reconfig(q));
        let be = try_req!(self.be());
        try_req!(be
            .fe
            .set_vring_base(q, base as u16)
            .map_err(|e| ProxyError::Backend("SET_VRING_BASE", e)));
        self.queues[q].vmm.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let q = try_req!(self.check_queue(index));
        let base = if matches!(self.queues[q].mode, Mode::Shadow(_)) {
            try_req!(self.switch_to_passthrough(q, true))
        } else {
            let be = try_req!(self.be());
            let base = try_req!(be
                .fe
                .get_vring_base(q)
                .map_err(|e| ProxyError::Backend("GET_VRING_BASE", e)))
                as u16;
            // A backend that answers with requests still in flight writes their completions
            // into the guest ring later: wait for them, so the index the VMM migrates is
            // consistent with the guest ring it migrates.
            self.wait_used_reaches(q, base);
            base
        };
        let v = &mut self.queues[q].vmm;
        v.started = false;
        v.kick = None;
        v.base = base;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index.into()));
        let Some(fd) = fd else {
            return fail(ProxyError::BadRequest(format!(
                "queue {q}: SET_VRING_KICK without fd (polling mode) is not supported"
            )));
        };
        let kick = Arc::new(Self::eventfd(fd));
        let was_running = self.queues[q].vmm.running();
        if let Mode::Shadow(sq) = &self.queues[q].mode {
            if let Some(w) = &sq.worker {
                w.set_guest_kick(kick.clone());
            }
        } else if !was_running && self.want_shadow() && self.ring_configured(q) {
            // The ring starts now and should be shadowed: start it in shadow mode directly (see
            // `start_ring_shadowed`); the backend never sees the guest ring running.
            self.record_kick(q, kick);
            return self.start_ring_shadowed(q).map_err(Into::into);
        } else {
            let be = try_req!(self.be());
            try_req!(be
                .fe
                .set_vring_kick(q, &kick)
                .map_err(|e| ProxyError::Backend("SET_VRING_KICK", e)));
        }
        self.record_kick(q, kick);
        self.reconcile().map_err(Into::into)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index.into()));
        let call = fd.map(|f| Arc::new(Self::eventfd(f)));
        if let Mode::Shadow(sq) = &self.queues[q].mode {
            if let Some(w) = &sq.worker {
                w.set_guest_call(call.clone());
            }
        } else {
            let fwd = match &call {
                Some(c) => c.clone(),
                None => try_req!(self.dummy_call()),
            };
            let be = try_req!(self.be());
            try_req!(be
                .fe
                .set_vring_call(q, &fwd)
                .map_err(|e| ProxyError::Backend("SET_VRING_CALL", e)));
        }
        self.queues[q].vmm.call = call;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index.into()));
        // The error fd is the backend's alone in both modes.
        if let Some(fd) = fd {
            let err = Self::eventfd(fd);
            let be = try_req!(self.be());
            try_req!(be
                .fe
                .set_vring_err(q, &err)
                .map_err(|e| ProxyError::Backend("SET_VRING_ERR", e)));
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        let be = try_req!(self.be());
        Ok(features::vmm_protocol_features(be.protocol))
    }

    fn set_protocol_features(&mut self, bits: u64) -> VhostResult<()> {
        self.refusable = true;
        let be = try_req!(self.be());
        let offered =
            features::vmm_protocol_features(be.protocol) | VhostUserProtocolFeatures::REPLY_ACK;
        if bits & !offered.bits() != 0 {
            return fail(ProxyError::BadRequest(format!(
                "SET_PROTOCOL_FEATURES {bits:#x} acks features never offered ({:#x})",
                offered.bits()
            )));
        }
        let acked = VhostUserProtocolFeatures::from_bits_truncate(bits);
        let fwd = features::backend_protocol_features(be.protocol, acked);
        try_req!(be.set_protocol_features(fwd));
        let n = be.num_queues;
        self.acked_protocol = acked;
        if self.queues.len() != n {
            for q in &mut self.queues {
                if let Mode::Shadow(sq) = std::mem::replace(&mut q.mode, Mode::Passthrough) {
                    sq.abandon();
                }
            }
            self.queues = (0..n).map(|_| QueueSlot::new()).collect();
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index));
        if let Mode::Shadow(sq) = &self.queues[q].mode {
            // The backend keeps its shadow ring enabled; the engine holds the guest's buffers.
            if let Some(w) = &sq.worker {
                w.set_forwarding(enable);
            }
        } else {
            let be = try_req!(self.be());
            try_req!(be
                .fe
                .set_vring_enable(q, enable)
                .map_err(|e| ProxyError::Backend("SET_VRING_ENABLE", e)));
        }
        self.queues[q].vmm.enabled = enable;
        self.reconcile().map_err(Into::into)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        self.refusable = true;
        let be = try_req!(self.be());
        let buf = vec![0u8; size as usize];
        let (_, payload) = try_req!(be
            .fe
            .get_config(offset, size, flags, &buf)
            .map_err(|e| ProxyError::Backend("GET_CONFIG", e)));
        Ok(payload)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.refusable = true;
        let be = try_req!(self.be());
        be.fe
            .set_config(offset, flags, buf)
            .map_err(|e| ProxyError::Backend("SET_CONFIG", e).into())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // Never offered (the vhost crate cannot relay CONFIG_CHANGE_MSG): nothing to do.
        tracing::warn!("VMM sent SET_BACKEND_REQ_FD although BACKEND_REQ was not offered; ignored");
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VhostResult<()> {
        self.refusable = true;
        fail(ProxyError::NotAllowed(
            "GPU_SET_SOCKET is not supported".into(),
        ))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        self.refusable = true;
        fail(ProxyError::NotAllowed(
            "GET_SHARED_OBJECT is not supported".into(),
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let be = try_req!(self.be());
        be.fe
            .get_inflight_fd(inflight)
            .map_err(|e| ProxyError::Backend("GET_INFLIGHT_FD", e).into())
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        self.refusable = true;
        use std::os::fd::AsRawFd;
        let be = try_req!(self.be());
        be.fe
            .set_inflight_fd(inflight, file.as_raw_fd())
            .map_err(|e| ProxyError::Backend("SET_INFLIGHT_FD", e).into())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        let reserved = self.reserved_slots();
        let be = try_req!(self.be());
        let slots = be.max_mem_slots.unwrap_or(MAX_TABLE_REGIONS as u64);
        Ok(slots.saturating_sub(reserved).max(1))
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.refusable = true;
        let limit = {
            let reserved = self.reserved_slots();
            let be = try_req!(self.be());
            be.max_mem_slots
                .unwrap_or(MAX_TABLE_REGIONS as u64)
                .saturating_sub(reserved)
                .max(1) as usize
        };
        let r = try_req!(self.mem.add(region, fd, limit));
        self.evict_parked_overlapping(r.gpa, r.uva, r.size);
        if let Some(space) = &self.space {
            let (first, _) = space.gpa.range();
            if r.gpa + r.size > first {
                tracing::warn!(
                    gpa = r.gpa,
                    "new guest region reaches into the shadow ring address range"
                );
            }
        }
        let mem_slots = try_req!(self.be()).mem_slots();
        let res = if mem_slots {
            let be = try_req!(self.be());
            be.fe
                .add_mem_region(&r.info())
                .map(|_| ())
                .map_err(|e| ProxyError::Backend("ADD_MEM_REG", e))
        } else {
            let table = self.backend_table(None);
            let be = try_req!(self.be());
            be.fe
                .set_mem_table(&table)
                .map(|_| ())
                .map_err(|e| ProxyError::Backend("SET_MEM_TABLE", e))
        };
        if let Err(e) = res {
            let _ = self.mem.remove(region);
            return fail(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.refusable = true;
        let r = try_req!(self.mem.remove(region));
        let mem_slots = try_req!(self.be()).mem_slots();
        if mem_slots {
            let be = try_req!(self.be());
            be.fe
                .remove_mem_region(&r.info())
                .map_err(|e| ProxyError::Backend("REM_MEM_REG", e).into())
        } else {
            let table = self.backend_table(None);
            if table.is_empty() {
                return Ok(());
            }
            let be = try_req!(self.be());
            be.fe
                .set_mem_table(&table)
                .map(|_| ())
                .map_err(|e| ProxyError::Backend("SET_MEM_TABLE", e).into())
        }
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VhostResult<Option<File>> {
        self.refusable = true;
        let be = try_req!(self.be());
        be.fe
            .set_device_state_fd(direction, phase, fd.into())
            .map_err(|e| ProxyError::Backend("SET_DEVICE_STATE_FD", e).into())
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        self.refusable = true;
        let be = try_req!(self.be());
        be.fe
            .check_device_state()
            .map_err(|e| ProxyError::Backend("CHECK_DEVICE_STATE", e).into())
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        fail(ProxyError::NotAllowed(
            "GET_SHMEM_CONFIG is not supported".into(),
        ))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        // A region past the end of the file would map, and the first write there would kill
        // svqd with SIGBUS: check it against the file.
        let file_len = try_req!(file
            .metadata()
            .map_err(|e| ProxyError::Io("fstat log region", e)))
        .len();
        let end = log.mmap_offset.checked_add(log.mmap_size);
        if log.mmap_size == 0 || end.is_none_or(|e| e > file_len) {
            return fail(ProxyError::BadRequest(format!(
                "log region of {:#x} bytes at offset {:#x} does not fit its file of {file_len:#x} bytes",
                log.mmap_size, log.mmap_offset
            )));
        }
        let dl = try_req!(
            DirtyLog::from_fd(file.as_fd(), log.mmap_offset, log.mmap_size).map_err(|e| {
                ProxyError::BadRequest(format!(
                    "cannot map log region of {:#x} bytes at offset {:#x}: {e}",
                    log.mmap_size, log.mmap_offset
                ))
            })
        );
        tracing::debug!(bytes = log.mmap_size, "new dirty log region");
        self.vmm_log = Some(Arc::new(dl));
        // Swapped atomically for the workers: after this returns no worker writes the old one.
        self.update_active_log();
        Ok(())
    }
}

fn be_has_enable(b: &Option<BackendConn>) -> bool {
    b.as_ref().is_some_and(|b| b.has_enable())
}

impl ProxyState {
    /// The VMM configured size and addresses of ring `q` (a kick would start it).
    fn ring_configured(&self, q: usize) -> bool {
        let v = &self.queues[q].vmm;
        v.num != 0 && v.addr.is_some()
    }

    /// Record the VMM's kick fd for ring `q`: the ring is started.
    fn record_kick(&mut self, q: usize, kick: Arc<EventFd>) {
        let has_enable = be_has_enable(&self.backend);
        let v = &mut self.queues[q].vmm;
        v.kick = Some(kick);
        v.started = true;
        if !has_enable {
            // Without PROTOCOL_FEATURES a started ring is enabled.
            v.enabled = true;
        }
    }

    /// The VMM starts ring `q` (its kick arrived, size and addresses known) while the policy
    /// wants shadow mode: start the backend on a shadow ring at the VMM's SET_VRING_BASE index
    /// instead of on the guest ring. Nothing ran yet, so there is nothing to drain, and no
    /// message ever reaches a running backend ring (a runtime switch must stop one, which some
    /// backends do not survive; see DESIGN.md). The backend got the guest ring's NUM/BASE/ADDR
    /// and call fd but no kick, so it never started it; `start_shadow` overrides all of them.
    /// If the shadow ring cannot be set up, the ring starts in passthrough as the VMM asked.
    fn start_ring_shadowed(&mut self, q: usize) -> Result<(), ProxyError> {
        let base = self.queues[q].vmm.base;
        let t0 = Instant::now();
        match self.start_shadow(q, base) {
            Ok(()) => {
                tracing::info!(
                    queue = q,
                    base,
                    micros = t0.elapsed().as_micros() as u64,
                    "queue started in shadow mode"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(queue = q, error = %e, "cannot start ring in shadow mode; starting it in passthrough");
                self.restart_passthrough(q, base)?;
                Err(e)
            }
        }
    }

    /// A queue in shadow mode is being reconfigured by the VMM (NUM/BASE/ADDR): give the ring
    /// back first, so the new configuration applies to the guest ring; [`Self::reconcile`]
    /// shadows it again once it runs.
    fn leave_shadow_for_reconfig(&mut self, q: usize) -> Result<(), ProxyError> {
        if matches!(self.queues[q].mode, Mode::Shadow(_)) {
            self.switch_to_passthrough(q, true)?;
            let v = &mut self.queues[q].vmm;
            v.started = false;
        }
        Ok(())
    }

    /// RESET_OWNER / RESET_DEVICE: stop shadowing, forward the reset, then drop the shadow
    /// regions.
    fn forward_reset(
        &mut self,
        what: &'static str,
        send: impl FnOnce(&mut Frontend) -> vhost::Result<()>,
    ) -> VhostResult<()> {
        self.refusable = true;
        let regions = self.reset_rings();
        let be = try_req!(self.be());
        let res = send(&mut be.fe);
        self.drop_regions(regions);
        res.map_err(|e| ProxyError::Backend(what, e).into())
    }

    /// Device reset: the rings' contents are discarded by definition, so stop shadowing without
    /// draining. Returns the shadow regions (in use or parked), to drop once the backend has
    /// reset its rings (it may still be running one on them until then).
    fn reset_rings(&mut self) -> Vec<shadow::ShadowRegion> {
        let mut regions = Vec::new();
        for q in 0..self.queues.len() {
            if let Mode::Shadow(sq) = std::mem::replace(&mut self.queues[q].mode, Mode::Passthrough)
            {
                regions.push(sq.region.clone());
                sq.abandon();
            }
            regions.extend(self.queues[q].parked.take());
            self.queues[q].vmm = VmmVring::default();
        }
        regions
    }

    /// Remove `regions` (no longer in `self.queues`) from the backend: one REM_MEM_REG each, or
    /// one SET_MEM_TABLE for all of them.
    fn drop_regions(&mut self, regions: Vec<shadow::ShadowRegion>) {
        if regions.is_empty() {
            return;
        }
        let table_style = self.backend.as_ref().is_some_and(|b| !b.mem_slots());
        if table_style {
            // `remove_backend_region` sends the table without every region svqd no longer
            // holds: once is enough.
            if let Err(e) = self.remove_backend_region(&regions[0]) {
                tracing::warn!(error = %e, "cannot remove the shadow regions after a reset");
                return;
            }
            for r in regions {
                self.free_shadow_space(r.gpa, r.uva);
            }
            return;
        }
        for r in regions {
            if let Err(e) = self.drop_region(r) {
                tracing::warn!(error = %e, "cannot remove a shadow region after a reset");
            }
        }
    }

    /// After a passthrough GET_VRING_BASE: wait (bounded) until the backend's late completions
    /// reached the guest used ring.
    fn wait_used_reaches(&self, q: usize, base: u16) {
        let num = self.queues[q].vmm.num;
        let Some(used) = self.guest_used_idx(q) else {
            return;
        };
        let behind = base.wrapping_sub(used);
        if behind == 0 || behind > num {
            return;
        }
        QueueStats::add(&self.queues[q].stats.late_completions, behind.into());
        let deadline = Instant::now() + self.cfg.drain_timeout;
        match wait_for_used(deadline, base, || self.guest_used_idx(q)) {
            Ok(()) => self.notify_guest(q),
            Err(left) => tracing::warn!(
                queue = q,
                base,
                left,
                "backend still has requests in flight after GET_VRING_BASE"
            ),
        }
    }
}
