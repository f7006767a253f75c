//! Taking a running ring away from the device without losing, doubling or straying a
//! completion: the drain of a passthrough ring before it is shadowed, and the wait for what the
//! device took before it stopped (on the guest ring at the VMM's GET_VRING_BASE, on the shadow
//! ring at a switch back). Part of [`Switch`]; the quiesce rules are in [`crate::quiesce`].

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{pipelined, ready_now, Await};
use crate::error::ProxyError;
use crate::quiesce::{wait_for_used, Look, Quiescer, QUIESCE_LIMIT};
use crate::shadow::ShadowQueue;
use crate::stats::QueueStats;
use crate::switch::Switch;

/// A passthrough ring being quiesced (see [`Switch::drain_passthrough`]).
struct DrainCtx {
    /// svqd's call fd given to the device.
    drain_call: EventFd,
    /// svqd's kick fd given to the device (kept open until the ring is stopped).
    drain_kick: EventFd,
    /// Whether `drain_kick` went to a device that reads it: its count then shows whether the
    /// device began its scan.
    scan_visible: bool,
    quiet: Quiescer,
}

/// Whether an eventfd's count is non-zero (an unread kick), looked at without reading it.
fn eventfd_unread(fd: &EventFd) -> bool {
    ready_now(fd.as_raw_fd(), libc::POLLIN) & libc::POLLIN != 0
}

/// Wait (bounded by `timeout`) until `used` reaches `base`; the error says how many are left.
fn await_used(
    timeout: Duration,
    base: u16,
    used: impl FnMut() -> Option<u16>,
) -> Result<(), String> {
    wait_for_used(Instant::now() + timeout, base, used)
        .map_err(|left| format!("{left} requests still in flight in the backend after {timeout:?}"))
}

impl Switch<'_> {
    /// The guest used ring's idx of queue `q`.
    fn guest_used_idx(&self, q: usize) -> Option<u16> {
        self.queues[q]
            .vmm
            .guest_used_idx(&self.mem.shared().snapshot())
    }

    /// Take the guest ring away from the device without losing, doubling or straying a
    /// completion. Returns the guest index where the device stopped (= guest used idx).
    ///
    /// 1. SET_VRING_CALL with svqd's eventfd: completions from now on notify svqd, which relays
    ///    them to the guest (the VMM's call fd stays open on svqd's side whatever the device does
    ///    with its copy).
    /// 2. SET_VRING_ENABLE 0: a device honouring it (vhost-user-backend) stops taking buffers
    ///    and unregisters the guest kick fd while that fd is still open.
    /// 3. Only for a device ignoring enable (libvhost-user, qemu-storage-daemon; see
    ///    `BackendDevice::ignores_disable`): SET_VRING_KICK with svqd's eventfd, so it no longer
    ///    sees guest kicks; svqd kicks once so it scans the ring and publishes its position.
    ///    Others keep their kick fd (vhost-user-backend up to 0.20 dies on the GET_VRING_BASE
    ///    after a kick swap).
    /// 4. Quiesce ([`Quiescer`]): until everything published is completed, or with EVENT_IDX
    ///    until the guest used idx equals the avail_event the device writes on every pop
    ///    (everything popped is completed); otherwise until the used idx and calls stay still
    ///    for a quiet period. A device kicked in step 3 must first have read that kick, and its
    ///    avail_event reached what was published when the kick was last seen unread: until then
    ///    its scan may take more, and qemu-storage-daemon drops the connection when a request
    ///    taken then completes after GET_VRING_BASE closed its call fd.
    /// 5. GET_VRING_BASE, then verify its answer against the guest used idx: any difference is
    ///    requests still in flight (qemu-storage-daemon answers at once). Those complete into the
    ///    guest ring, which stays mapped in the device, so wait for the used idx to reach the
    ///    base before the ring moves. Only then is the device's state fully in guest memory.
    pub(crate) fn drain_passthrough(&mut self, q: usize) -> Result<u16, ProxyError> {
        let mut ctx = self.drain_begin(q)?;
        // Step 4: relay each completion signal to the guest while observing.
        let DrainCtx {
            drain_call,
            drain_kick,
            scan_visible,
            quiet,
        } = &mut ctx;
        let vmm = &self.queues[q].vmm;
        let mem = self.mem.shared();
        quiet.wait(self.cfg.drain_timeout.min(QUIESCE_LIMIT), || {
            // Read before the ring: a scan that began after this look still shows as pending.
            let scan_pending = *scan_visible && eventfd_unread(drain_kick);
            let signalled = drain_call.read().is_ok();
            if signalled {
                vmm.notify_guest();
            }
            vmm.guest_indices(&mem.snapshot()).map(|ring| Look {
                ring,
                signalled,
                scan_pending,
            })
        });
        self.drain_finish(q, ctx)
    }

    /// Steps 1-3 of [`Self::drain_passthrough`]: svqd's call and kick fds, ring disabled.
    fn drain_begin(&mut self, q: usize) -> Result<DrainCtx, ProxyError> {
        let drain_call = EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?;
        let drain_kick = EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?;
        let dev = &mut *self.device;
        // Kicked in step 3 by a kick whose reading shows; its scan then takes at least what is
        // published now.
        let scan_visible = dev.ignores_disable() && dev.reads_kick_fd();
        let scan_floor = if scan_visible {
            let mem = self.mem.shared().snapshot();
            self.queues[q].vmm.guest_indices(&mem).map(|r| r.avail_idx)
        } else {
            None
        };
        // One round trip for the three: the quiesce starts once all of them are applied.
        let res = pipelined(dev, Await::Applied, |dev| {
            dev.set_vring_call(q, &drain_call)?;
            if dev.has_enable() {
                dev.set_vring_enable(q, false)?;
            }
            if !dev.ignores_disable() {
                // The disable stops it. Its kick fd must stay: vhost-user-backend does not
                // register a kick fd replaced on a started ring, and up to 0.20 the
                // GET_VRING_BASE that follows fails to unregister it (ENOENT), which ends the
                // daemon (vhost-device-rng/-vsock); the old fd's epoll entry also outlives the
                // swap. See DESIGN.md.
                return Ok(());
            }
            // Kick once, *before* handing the fd over: a device thread may still hold an event
            // of the old kick fd and consume the new one for it; an empty eventfd can make that
            // read fail and end its event loop.
            let _ = drain_kick.write(1);
            dev.set_vring_kick(q, &drain_kick)
        });
        if let Err(e) = res {
            // Hand the running ring its own fds back rather than leave it signalling ours.
            let v = &self.queues[q].vmm;
            if let Some(c) = &v.call {
                let _ = dev.set_vring_call(q, c);
            }
            if let Some(k) = &v.kick {
                let _ = k.write(1);
                let _ = dev.set_vring_kick(q, k);
            }
            if dev.has_enable() {
                let _ = dev.set_vring_enable(q, v.enabled);
            }
            return Err(e);
        }
        let event_idx = self.features.event_idx;
        let quiet = match scan_floor {
            Some(floor) => Quiescer::after_drain_kick(event_idx, floor),
            None => Quiescer::new(event_idx),
        };
        Ok(DrainCtx {
            drain_call,
            drain_kick,
            scan_visible,
            quiet,
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
        let num = self.queues[q].vmm.num;
        let base = self.device.get_vring_base(q)?;
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
            // GET_VRING_BASE closed the device's call fd; give it one again so the late
            // completions can signal instead of hitting a closed fd (which makes
            // qemu-storage-daemon drop the connection). Narrows the window, cannot close it.
            self.device.set_vring_call(q, &c.drain_call)?;
            tracing::debug!(
                queue = q,
                in_flight,
                "waiting for late completions after GET_VRING_BASE"
            );
            if let Err(reason) = await_used(self.cfg.drain_timeout, base, || self.guest_used_idx(q))
            {
                let _ = self.restart_stopped_ring(q, base);
                return Err(ProxyError::Switch { queue: q, reason });
            }
        }
        // Notifications of late completions went to a closed fd: interrupt the guest ourselves
        // (a spurious interrupt is harmless, a lost one hangs the guest).
        self.queues[q].vmm.notify_guest();
        Ok(base)
    }

    /// Step 3 of [`Switch::to_passthrough`]: check the device's stop index against the shadow
    /// ring and wait until everything it took before it is completed there.
    pub(crate) fn await_shadow_base(
        &mut self,
        q: usize,
        sq: &ShadowQueue,
        base: u16,
    ) -> Result<(), String> {
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
        // GET_VRING_BASE closed the device's copy of the call fd: give it one again, so a
        // device that signals each completion does not hit a closed fd (the worker polls too).
        let _ = self.device.set_vring_call(q, &sq.backend_call);
        await_used(self.cfg.drain_timeout, base, || {
            sq.region.indices(size).map(|r| r.used_idx)
        })
    }

    /// After a passthrough GET_VRING_BASE: wait (bounded) until the device's late completions
    /// reached the guest used ring.
    pub(crate) fn wait_used_reaches(&self, q: usize, base: u16) {
        let num = self.queues[q].vmm.num;
        let Some(used) = self.guest_used_idx(q) else {
            return;
        };
        let behind = base.wrapping_sub(used);
        if behind == 0 || behind > num {
            return;
        }
        QueueStats::add(&self.queues[q].stats.late_completions, behind.into());
        match await_used(self.cfg.drain_timeout, base, || self.guest_used_idx(q)) {
            Ok(()) => self.queues[q].vmm.notify_guest(),
            Err(left) => tracing::warn!(
                queue = q,
                base,
                %left,
                "backend still has requests in flight after GET_VRING_BASE"
            ),
        }
    }
}
