//! Mode switches, written once over [`BackendDevice`]: passthrough → shadow, shadow →
//! passthrough, starting a ring directly in shadow mode, and stopping a ring for the VMM (its
//! GET_VRING_BASE) in either mode. Taking a running ring away from the device is in
//! [`crate::drain`]; when a ring is quiet is decided by [`crate::quiesce`].
//!
//! The order of requests in every sequence here is what the backends svqd was tested with
//! survive (qemu-storage-daemon, DPDK, vhost-user-backend daemons); DESIGN.md says why.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use svq::SharedLog;
use vhost::VringConfigData;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{pipelined, Await, BackendDevice};
use crate::config::ProxyConfig;
use crate::error::ProxyError;
use crate::memory::MemoryTable;
use crate::queue::{Mode, QueueSlot, VmmVring};
use crate::quiesce::{Look, Quiescer, QUIESCE_LIMIT};
use crate::shadow::{ShadowQueue, ShadowRegion};
use crate::space::{ShadowSpace, TableCtx};
use crate::stats::QueueStats;
use crate::worker::{Engine, Worker, WorkerExit, WorkerSetup, WorkerThreads};

/// Ring features the VMM negotiated that a shadow ring must honour.
#[derive(Debug, Clone, Copy, Default)]
pub struct RingFeatures {
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub indirect: bool,
    /// VIRTIO_F_IN_ORDER: the device may complete a batch with one used element.
    pub in_order: bool,
}

/// The parts of a session a mode switch works on.
pub struct Switch<'a> {
    /// Configuration (timeouts, shadow ring size).
    pub cfg: &'a ProxyConfig,
    /// The device.
    pub device: &'a mut dyn BackendDevice,
    /// The VMM's memory table.
    pub mem: &'a MemoryTable,
    /// The dirty log the engines write.
    pub log: &'a Arc<SharedLog>,
    /// Where shadow rings live in the device's memory.
    pub space: &'a mut ShadowSpace,
    /// The queues.
    pub queues: &'a mut [QueueSlot],
    /// Negotiated ring features.
    pub features: RingFeatures,
    /// The eventfd the device signals when the VMM wants no interrupts (created on first use).
    pub dummy_call: &'a mut Option<Arc<EventFd>>,
    /// The threads serving shadowed rings.
    pub workers: &'a mut WorkerThreads,
}

fn new_eventfd() -> Result<EventFd, ProxyError> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))
}

fn no_address() -> ProxyError {
    ProxyError::NotAllowed("ring has no address".into())
}

impl Switch<'_> {
    /// Bring every queue to shadow mode (`want`) or passthrough. Returns the first error; keeps
    /// going with the other queues.
    pub fn reconcile(&mut self, want: bool) -> Result<(), ProxyError> {
        let mut first = None;
        // One queue after the other, never all rings stopped at once: queues of one device
        // depend on each other (a net backend completes a TX chain by filling an RX buffer), so
        // quiescing them together can stall every one of them until the deadline.
        for q in 0..self.queues.len() {
            let res = match (&self.queues[q].mode, want) {
                (Mode::Passthrough, true) if self.queues[q].vmm.running() => self.to_shadow(q),
                (Mode::Shadow(_), false) => self.to_passthrough(q, false).map(|_| ()),
                _ => Ok(()),
            };
            if let Err(e) = res {
                tracing::error!(queue = q, error = %e, "mode switch failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The VMM stops ring `q` (GET_VRING_BASE): whatever its mode, leave the device stopped on
    /// the guest ring with nothing in flight, and return the guest index to resume from.
    pub fn stop_ring(&mut self, q: usize) -> Result<u16, ProxyError> {
        if self.queues[q].mode.is_shadow() {
            return self.to_passthrough(q, true);
        }
        let base = self.device.get_vring_base(q)?;
        // A device that answers with requests still in flight writes their completions into
        // the guest ring later: wait for them, so the index the VMM migrates is consistent with
        // the guest ring it migrates.
        self.wait_used_reaches(q, base);
        Ok(base)
    }

    /// A queue in shadow mode is being reconfigured by the VMM (NUM/BASE/ADDR): give the ring
    /// back first, so the new configuration applies to the guest ring; [`Self::reconcile`]
    /// shadows it again once it runs.
    pub fn leave_shadow_for_reconfig(&mut self, q: usize) -> Result<(), ProxyError> {
        if self.queues[q].mode.is_shadow() {
            self.to_passthrough(q, true)?;
            self.queues[q].vmm.started = false;
        }
        Ok(())
    }

    /// Device reset: the rings' contents are discarded by definition, so stop shadowing without
    /// draining. Returns the shadow regions (in use or parked), to drop once the device has
    /// reset its rings (it may still be running one on them until then).
    pub fn reset_rings(&mut self) -> Vec<ShadowRegion> {
        let mut regions = self.space.take_parked();
        for (q, slot) in self.queues.iter_mut().enumerate() {
            if let Some(sq) = slot.abandon_shadow(q) {
                regions.push(sq.region.clone());
            }
            slot.vmm = VmmVring::default();
        }
        regions
    }

    /// Passthrough → shadow for queue `q` (which the device is running on the guest ring).
    pub fn to_shadow(&mut self, q: usize) -> Result<(), ProxyError> {
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

    /// The VMM starts ring `q` (its kick arrived, size and addresses known) while the policy
    /// wants shadow mode: start the device on a shadow ring at the VMM's SET_VRING_BASE index
    /// instead of on the guest ring. Nothing ran yet, so there is nothing to drain, and no
    /// message ever reaches a running device ring (a runtime switch must stop one, which some
    /// backends do not survive; see DESIGN.md). The device got the guest ring's NUM/BASE/ADDR
    /// and call fd but no kick, so it never started it; `start_shadow` overrides all of them.
    /// If the shadow ring cannot be set up, the ring starts in passthrough as the VMM asked.
    pub fn start_ring_shadowed(&mut self, q: usize) -> Result<(), ProxyError> {
        let base = self.queues[q].vmm.base;
        let t0 = Instant::now();
        match self.start_shadow(q, base) {
            Ok(()) => {
                // Adding the shadow region changed the device's memory table, which DPDK treats
                // as the device stopping (see `reannounce_other_rings`): the rings already
                // running would stay disabled in its driver.
                self.reannounce_after_switch(q);
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

    /// Shadow → passthrough for queue `q`. Returns the guest index the device resumes from
    /// (last avail = used, nothing in flight). With `stopped` (the VMM's GET_VRING_BASE), the
    /// device ring is left stopped on the guest ring; otherwise it runs there again with the
    /// VMM's kick and call fds.
    ///
    /// 1. The worker stops forwarding guest buffers (guest kicks wait on the VMM's eventfd) and
    ///    keeps relaying completions.
    /// 2. Quiesce the shadow ring ([`Quiescer`]): until the device completed everything it took.
    ///    Buffers it never took (a receive queue with no traffic) do not hold the switch up.
    /// 3. GET_VRING_BASE: the shadow index where the device stopped, verified against the
    ///    shadow ring. What it took and did not complete yet lands in the shadow ring, which
    ///    stays mapped: wait for it (bounded; [`Self::await_shadow_base`]).
    /// 4. Take the engine back and give the chains the device never took back to the guest
    ///    ring (`reclaim_untaken`): the guest index steps back over them, so the device finds
    ///    them in the guest ring.
    /// 5. Start the device on the guest ring at that index; park the shadow region (kept in the
    ///    device's table for the next switch, see [`crate::space`]).
    ///
    /// On a failure in steps 3–4 the queue stays in shadow mode, running again. A failure to
    /// start the device on the guest ring in step 5 is reported as it is: the buffers are all in
    /// the guest ring by then, and the device connection is broken.
    pub fn to_passthrough(&mut self, q: usize, stopped: bool) -> Result<u16, ProxyError> {
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
        // Disabled first, as on the way in (drain.rs): a vhost-user-backend up to 0.20 handles a
        // kick event still queued in its thread even after GET_VRING_BASE, when the ring is no
        // longer ready; its queue iteration then fails and its event loop ends for good
        // (vhost-device-vsock, DESIGN.md). A disabled ring's events are dropped instead.
        if self.device.honours_enable() {
            if let Err(e) = self.device.set_vring_enable(q, false) {
                let exit = worker.stop();
                self.respawn_shadow(q, sq, exit);
                return Err(e);
            }
        }
        let size = sq.shadow_size;
        // svqd is the ring's only driver and the worker holds it: its avail index is final.
        let mut quiet = Quiescer::with_frozen_avail(self.features.event_idx);
        // The worker consumes the device's calls; completions show in the used index.
        quiet.wait(self.cfg.drain_timeout.min(QUIESCE_LIMIT), || {
            sq.region.indices(size).map(|r| Look::at(r, false))
        });
        tracing::debug!(
            queue = q,
            settled = quiet.settled(),
            micros = quiet.elapsed().as_micros() as u64,
            "shadow ring quiesced"
        );
        let base = match self.device.get_vring_base(q) {
            Ok(b) => b,
            Err(e) => {
                // Nothing was stopped: let the worker go on, on the ring enabled again.
                if self.device.honours_enable() {
                    let _ = self.device.set_vring_enable(q, true);
                }
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
        let reclaimed = match exit.engine.reclaim_untaken(&*mem, self.log, base) {
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
        // The device no longer uses the region; it stays in its table for the next switch.
        self.space.park(q, sq.region);
        if stopped {
            let ring = self.guest_ring_config(q)?;
            // The VMM restarts the ring with its kick and may not send its enable again. Its
            // own requests follow these on the same connection, so none needs an answer first.
            let enable = self.device.honours_enable() && self.queues[q].vmm.enabled;
            pipelined(&mut *self.device, Await::Sent, |dev| {
                configure_device_ring(dev, q, guest_idx, &ring)?;
                if enable {
                    dev.set_vring_enable(q, true)?;
                }
                Ok(())
            })?;
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

    /// The guest ring of queue `q` as the device should see it.
    fn guest_ring_config(&self, q: usize) -> Result<VringConfigData, ProxyError> {
        self.queues[q]
            .vmm
            .device_config(self.device.ring_address_space())
            .ok_or_else(no_address)
    }

    /// An eventfd nobody reads, for a device whose VMM asked for no interrupts.
    pub fn dummy_call(&mut self) -> Result<Arc<EventFd>, ProxyError> {
        if let Some(fd) = self.dummy_call {
            return Ok(fd.clone());
        }
        Ok(self.dummy_call.insert(Arc::new(new_eventfd()?)).clone())
    }

    /// The device's memory-table context.
    fn table(&mut self) -> (&mut ShadowSpace, TableCtx<'_>) {
        (
            &mut *self.space,
            TableCtx {
                device: &mut *self.device,
                mem: self.mem,
                queues: &*self.queues,
            },
        )
    }

    /// Put the device back on the guest ring at `base` after svqd stopped it (a failed switch),
    /// and re-announce the other rings (see [`Self::reannounce_other_rings`]).
    pub(crate) fn restart_stopped_ring(&mut self, q: usize, base: u16) -> Result<(), ProxyError> {
        self.restart_passthrough(q, base)?;
        self.reannounce_other_rings(q)
    }

    /// Put the device back on the guest ring at `base`, as the VMM configured it.
    pub fn restart_passthrough(&mut self, q: usize, base: u16) -> Result<(), ProxyError> {
        let dummy = self.dummy_call()?;
        let ring = self.guest_ring_config(q)?;
        let v = &self.queues[q].vmm;
        let kick = v.kick.clone();
        let call = v.call.clone().unwrap_or(dummy);
        let enabled = v.enabled;
        // The kick covers guest kicks svqd consumed or that arrived while the ring was stopped.
        self.start_device_ring(q, base, &ring, &call, enabled, kick.as_deref())
    }

    /// Start the stopped device ring `q` on `ring` at index `base`, with `call` and `kick`
    /// (kicked once), enabled as `enabled` says. The order is what every backend survives:
    ///
    /// * call before kick: the ring starts at the kick, and its first completion must find a
    ///   call fd (qemu-storage-daemon drops the connection otherwise);
    /// * kick fd before enable: a vhost-user-backend up to 0.20 handles any event of an enabled
    ///   ring, also one queued in its thread from before GET_VRING_BASE, and the ring is ready
    ///   again only with its kick fd; an event handled while it is enabled but not ready fails
    ///   its queue iteration and ends its event loop for good (vhost-device-vsock, DESIGN.md).
    ///   The stop (`to_passthrough`, `drain_begin`) disables the ring first, so it stays
    ///   disabled until it is ready;
    /// * the kick after the enable was applied (a reply): up to 0.20 a kick that arrives while
    ///   the ring is disabled is read and *discarded*; 0.24 keeps it pending until the enable
    ///   registers the fd.
    ///
    /// A device that serves a disabled ring anyway (libvhost-user) or has no enable (vDPA) gets
    /// the enable first and the kick fd last, without the extra round trip.
    fn start_device_ring(
        &mut self,
        q: usize,
        base: u16,
        ring: &VringConfigData,
        call: &EventFd,
        enabled: bool,
        kick: Option<&EventFd>,
    ) -> Result<(), ProxyError> {
        let honours_enable = self.device.honours_enable();
        // One pipeline for the whole sequence. With an honoured enable and a kick, its end is
        // the reply that shows the enable applied before the kick; otherwise nothing here waits
        // (the device handles the requests in order, and the ring runs once it has them).
        let until = match (honours_enable, kick) {
            (true, Some(_)) => Await::Applied,
            _ => Await::Sent,
        };
        pipelined(&mut *self.device, until, |dev| {
            configure_device_ring(dev, q, base, ring)?;
            dev.set_vring_call(q, call)?;
            if !honours_enable {
                // The enable changes nothing for these (libvhost-user serves a disabled ring,
                // vDPA rings run from DRIVER_OK): the kick fd alone starts the ring.
                if dev.has_enable() {
                    dev.set_vring_enable(q, enabled)?;
                }
                if let Some(kick) = kick {
                    dev.hand_over_kick(q, kick)?;
                }
                return Ok(());
            }
            if let Some(kick) = kick {
                dev.set_vring_kick(q, kick)?;
            }
            dev.set_vring_enable(q, enabled)
        })?;
        if let (true, Some(kick)) = (honours_enable, kick) {
            let _ = kick.write(1);
        }
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
        if !self.device.has_enable() {
            return Ok(());
        }
        let others: Vec<(usize, Arc<EventFd>)> = (0..self.queues.len())
            .filter(|&i| i != q && self.queues[i].vmm.running())
            .filter_map(|i| match &self.queues[i].mode {
                // A shadow ring is always enabled towards the device; the worker holds it.
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
        // The end of the pipeline is the reply that shows the enables applied.
        pipelined(&mut *self.device, Await::Applied, |dev| {
            for &(i, _) in &others {
                for enable in [false, true] {
                    dev.set_vring_enable(i, enable)?;
                }
            }
            Ok(())
        })?;
        for (_, kick) in &others {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// [`Self::reannounce_other_rings`] after a switch that succeeded: a failure there does not
    /// undo the switch (the device connection is broken then, which the proxy notices).
    fn reannounce_after_switch(&mut self, q: usize) {
        if let Err(e) = self.reannounce_other_rings(q) {
            tracing::error!(queue = q, error = %e, "re-announcing the other rings failed");
        }
    }

    /// Build the shadow ring for queue `q` at guest index `base` and start the device and the
    /// worker on it.
    fn start_shadow(&mut self, q: usize, base: u16) -> Result<(), ProxyError> {
        let v = &self.queues[q].vmm;
        let addr = v.addr.ok_or_else(no_address)?;
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
            event_idx: self.features.event_idx,
            indirect: self.features.indirect,
            in_order: self.features.in_order,
        };
        let (space, ctx) = self.table();
        let region = space.region_for(ctx, q, shadow_size)?;
        let start = svq::QueueState {
            last_avail_idx: base,
            used_idx: base,
            in_flight: Vec::new(),
        };
        let engine = match region.engine(qcfg, start, self.device.ring_address_space()) {
            Ok(e) => e,
            Err(e) => {
                self.space.park(q, region);
                return Err(e);
            }
        };
        let started = (|| {
            let backend_kick = Arc::new(new_eventfd()?);
            let backend_call = Arc::new(new_eventfd()?);
            let ring = shadow_vring_config(&engine);
            let shadow_base = engine.shadow_base();
            self.start_device_ring(
                q,
                shadow_base,
                &ring,
                &backend_call,
                true,
                Some(&backend_kick),
            )?;
            let v = &self.queues[q].vmm;
            let guest_kick = v.kick.clone().expect("running ring has a kick fd");
            let guest_call = v.call.clone();
            let worker = self
                .attach_worker(
                    q,
                    engine,
                    guest_kick,
                    guest_call,
                    &backend_kick,
                    &backend_call,
                )
                .map_err(|e| ProxyError::Io("spawn worker", e))?;
            Ok((worker, backend_kick, backend_call))
        })();
        match started {
            Ok((worker, backend_kick, backend_call)) => {
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
            Err(e) => {
                self.space.park(q, region);
                Err(e)
            }
        }
    }

    /// A switch to passthrough failed after the device stopped the shadow ring at `base`:
    /// start the device on the shadow ring again there and the worker with it. Returns the
    /// error to report.
    fn resume_shadow(
        &mut self,
        q: usize,
        sq: Box<ShadowQueue>,
        exit: WorkerExit,
        base: u16,
        reason: String,
    ) -> ProxyError {
        tracing::error!(queue = q, %reason, ring = ?sq.region.ring_state(sq.shadow_size), "switch to passthrough failed; shadowing again");
        let ring = shadow_vring_config(&exit.engine);
        let (call, kick) = (sq.backend_call.clone(), sq.backend_kick.clone());
        if let Err(e) = self
            .start_device_ring(q, base, &ring, &call, true, Some(&kick))
            .and_then(|()| self.reannounce_other_rings(q))
        {
            tracing::error!(queue = q, error = %e, "cannot restart the shadow ring");
        }
        self.respawn_shadow(q, sq, exit);
        ProxyError::Switch { queue: q, reason }
    }

    /// Have a worker thread relay queue `q` with `engine`, forwarding as the VMM's enable says.
    fn attach_worker(
        &mut self,
        q: usize,
        mut engine: Engine,
        guest_kick: Arc<EventFd>,
        guest_call: Option<Arc<EventFd>>,
        backend_kick: &Arc<EventFd>,
        backend_call: &Arc<EventFd>,
    ) -> std::io::Result<Worker> {
        engine.set_forwarding(self.queues[q].vmm.enabled || !self.device.has_enable());
        self.workers.attach(WorkerSetup {
            index: q,
            engine,
            mem: self.mem.shared(),
            log: self.log.clone(),
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
        match self.attach_worker(
            q,
            exit.engine,
            exit.guest_kick,
            exit.guest_call,
            &kick,
            &call,
        ) {
            Ok(w) => sq.worker = Some(w),
            // Without a thread nothing relays this queue; it stays shadowed (and stalled)
            // until the device is reset, rather than handing the device a ring in flux.
            Err(e) => tracing::error!(queue = q, error = %e, "cannot restart the shadow worker"),
        }
        self.queues[q].mode = Mode::Shadow(sq);
    }
}

/// Point the stopped device ring `q` at `ring`, index `base` (the ring does not start).
fn configure_device_ring(
    dev: &mut dyn BackendDevice,
    q: usize,
    base: u16,
    ring: &VringConfigData,
) -> Result<(), ProxyError> {
    dev.set_vring_num(q, ring.queue_size)?;
    dev.set_vring_base(q, base)?;
    dev.set_vring_addr(q, ring)
}

/// The shadow ring's configuration for the device.
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
