//! The VMM side: svqd's answer to each vhost-user message (the vhost crate's
//! `VhostUserBackendReqHandlerMut`). Each handler validates the request, records what the VMM
//! configured in the [`Session`] (svqd must know the rings to shadow them later) and forwards it
//! to the device, except what svqd implements itself: LOG_ALL, SET_LOG_BASE, and, for queues in
//! shadow mode, the ring's kick/call/enable, which then belong to the worker. Mode switches are
//! delegated to [`crate::switch`], shadow-region bookkeeping to [`crate::space`].

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use svq::DirtyLog;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vmm_sys_util::eventfd::EventFd;

use crate::config::ShadowPolicy;
use crate::error::ProxyError;
use crate::features::{self, VHOST_F_LOG_ALL};
use crate::memory::MAX_TABLE_REGIONS;
use crate::queue::{Mode, QueueSlot, VringAddr};
use crate::session::{no_device, Session};
use crate::space::reserved_slots;

type VhostResult<T> = vhost::vhost_user::Result<T>;

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

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VhostResult<()> {
        self.refusable = true;
        try_req!(try_req!(self.device()).set_owner());
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.forward_reset(|d| d.reset_owner())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.forward_reset(|d| d.reset_device())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        let dev = try_req!(self.device());
        Ok(features::vmm_virtio_features(dev.features()))
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        self.refusable = true;
        let policy = self.cfg.shadow;
        let dev = try_req!(self.device());
        let offered = features::vmm_virtio_features(dev.features());
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
        if dev.acked_features() != Some(fwd) {
            try_req!(dev.set_features(fwd));
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
        let (space, table) = try_req!(self.table());
        try_req!(space.vmm_table_replaced(table));
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index));
        if num == 0 || num > 32768 || !num.is_power_of_two() {
            return fail(ProxyError::BadRequest(format!("queue {q} size {num}")));
        }
        if let Some(a) = self.queues[q].vmm.addr {
            // The ring's extent changes with its size: it must still lie in guest memory.
            try_req!(self.ring_extent(q, a.desc, a.avail, a.used, num as u16));
        }
        try_req!(try_req!(self.switch()).leave_shadow_for_reconfig(q));
        try_req!(try_req!(self.device()).set_vring_num(q, num as u16));
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
        // Without a size yet, as if the ring had one entry; SET_VRING_NUM checks it again.
        let num = self.queues[q].vmm.num.max(1);
        let (desc_gpa, avail_gpa, used_gpa) =
            try_req!(self.ring_extent(q, descriptor, available, used, num));
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
        // reconfiguration: svqd strips the flag, so the device would get the message it already
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
        try_req!(try_req!(self.switch()).leave_shadow_for_reconfig(q));
        let num = self.queues[q].vmm.num;
        let dev = try_req!(self.device());
        let ring = addr.device_config(num, dev.ring_address_space());
        try_req!(dev.set_vring_addr(q, &ring));
        self.queues[q].vmm.addr = Some(addr);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index));
        if base > u32::from(u16::MAX) {
            return fail(ProxyError::BadRequest(format!("queue {q} base {base}")));
        }
        try_req!(try_req!(self.switch()).leave_shadow_for_reconfig(q));
        try_req!(try_req!(self.device()).set_vring_base(q, base as u16));
        self.queues[q].vmm.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let q = try_req!(self.check_queue(index));
        let base = try_req!(try_req!(self.switch()).stop_ring(q));
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
        let kick = Arc::new(Session::eventfd(fd));
        let was_running = self.queues[q].vmm.running();
        if let Mode::Shadow(sq) = &self.queues[q].mode {
            if let Some(w) = &sq.worker {
                w.set_guest_kick(kick.clone());
            }
        } else if !was_running && self.want_shadow() && self.queues[q].vmm.configured() {
            // The ring starts now and should be shadowed: start it in shadow mode directly
            // (`Switch::start_ring_shadowed`); the device never sees the guest ring running.
            self.record_kick(q, kick);
            return try_req!(self.switch())
                .start_ring_shadowed(q)
                .map_err(Into::into);
        } else {
            try_req!(try_req!(self.device()).set_vring_kick(q, &kick));
        }
        self.record_kick(q, kick);
        self.reconcile().map_err(Into::into)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index.into()));
        let call = fd.map(|f| Arc::new(Session::eventfd(f)));
        if let Mode::Shadow(sq) = &self.queues[q].mode {
            if let Some(w) = &sq.worker {
                w.set_guest_call(call.clone());
            }
        } else {
            let fwd = match &call {
                Some(c) => c.clone(),
                None => try_req!(try_req!(self.switch()).dummy_call()),
            };
            try_req!(try_req!(self.device()).set_vring_call(q, &fwd));
        }
        self.queues[q].vmm.call = call;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.refusable = true;
        let q = try_req!(self.check_queue(index.into()));
        // The error fd is the device's alone in both modes.
        if let Some(fd) = fd {
            let err: EventFd = Session::eventfd(fd);
            try_req!(try_req!(self.device()).set_vring_err(q, &err));
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        let dev = try_req!(self.device());
        Ok(features::vmm_protocol_features(dev.protocol_features()))
    }

    fn set_protocol_features(&mut self, bits: u64) -> VhostResult<()> {
        self.refusable = true;
        let dev = try_req!(self.device());
        let offered = features::vmm_protocol_features(dev.protocol_features())
            | VhostUserProtocolFeatures::REPLY_ACK;
        if bits & !offered.bits() != 0 {
            return fail(ProxyError::BadRequest(format!(
                "SET_PROTOCOL_FEATURES {bits:#x} acks features never offered ({:#x})",
                offered.bits()
            )));
        }
        let acked = VhostUserProtocolFeatures::from_bits_truncate(bits);
        let fwd = features::backend_protocol_features(dev.protocol_features(), acked);
        try_req!(dev.set_protocol_features(fwd));
        let n = dev.num_queues();
        self.acked_protocol = acked;
        if self.queues.len() != n {
            for (i, q) in self.queues.iter_mut().enumerate() {
                q.abandon_shadow(i);
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
            // The device keeps its shadow ring enabled; the engine holds the guest's buffers.
            if let Some(w) = &sq.worker {
                w.set_forwarding(enable);
            }
        } else {
            try_req!(try_req!(self.device()).set_vring_enable(q, enable));
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
        Ok(try_req!(
            try_req!(self.device()).get_config(offset, size, flags)
        ))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.refusable = true;
        try_req!(try_req!(self.device()).set_config(offset, buf, flags));
        Ok(())
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
        Ok(try_req!(try_req!(self.device()).get_inflight_fd(inflight)))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        self.refusable = true;
        try_req!(try_req!(self.device()).set_inflight_fd(inflight, file.as_raw_fd()));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        let reserved = reserved_slots(self.queues.len());
        let dev = try_req!(self.device());
        let slots = dev.max_mem_slots().unwrap_or(MAX_TABLE_REGIONS as u64);
        Ok(slots.saturating_sub(reserved).max(1))
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.refusable = true;
        let limit = try_req!(self.get_max_mem_slots().map_err(|_| no_device())) as usize;
        let r = try_req!(self.mem.add(region, fd, limit));
        let (space, table) = try_req!(self.table());
        if let Err(e) = space.vmm_region_added(table, &r) {
            let _ = self.mem.remove(region);
            return fail(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.refusable = true;
        let r = try_req!(self.mem.remove(region));
        let (space, table) = try_req!(self.table());
        try_req!(space.vmm_region_removed(table, &r));
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VhostResult<Option<File>> {
        self.refusable = true;
        Ok(try_req!(
            try_req!(self.device()).set_device_state_fd(direction, phase, fd)
        ))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        self.refusable = true;
        try_req!(try_req!(self.device()).check_device_state());
        Ok(())
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
        let (start, len) = dl.host_range();
        let guard = crate::sigbus::guard(start, len);
        self.vmm_log = Some(Arc::new(dl));
        // Swapped atomically for the workers: after this returns no worker writes the old one.
        self.update_active_log();
        self.vmm_log_guard = Some(guard);
        Ok(())
    }
}

impl Session {
    /// The guest-physical addresses of ring `q`'s descriptor table, avail ring and used ring at
    /// the VMM's user addresses, for a ring of `num` entries: each part aligned and wholly
    /// inside one region of guest memory.
    fn ring_extent(
        &self,
        q: usize,
        desc: u64,
        avail: u64,
        used: u64,
        num: u16,
    ) -> Result<(u64, u64, u64), ProxyError> {
        let num = u64::from(num);
        let check = |uva: u64, len: u64, align: u64, what: &str| -> Result<u64, ProxyError> {
            if !uva.is_multiple_of(align) {
                return Err(ProxyError::BadRequest(format!(
                    "queue {q} {what} at {uva:#x} misaligned"
                )));
            }
            self.mem.uva_to_gpa(uva, len).ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "queue {q} {what} at {uva:#x} (+{len:#x}, {num} entries) is outside guest memory"
                ))
            })
        };
        Ok((
            check(desc, 16 * num, 16, "descriptor table")?,
            check(avail, 6 + 2 * num, 2, "avail ring")?,
            check(used, 6 + 8 * num, 4, "used ring")?,
        ))
    }

    /// Record the VMM's kick fd for ring `q`: the ring is started.
    fn record_kick(&mut self, q: usize, kick: Arc<EventFd>) {
        let has_enable = self.device_has_enable();
        let v = &mut self.queues[q].vmm;
        v.kick = Some(kick);
        v.started = true;
        if !has_enable {
            // Without PROTOCOL_FEATURES a started ring is enabled.
            v.enabled = true;
        }
    }

    /// RESET_OWNER / RESET_DEVICE: stop shadowing, forward the reset, then drop the shadow
    /// regions (the device may run a ring on them until it has reset).
    fn forward_reset(
        &mut self,
        send: impl FnOnce(&mut dyn crate::backend::BackendDevice) -> Result<(), ProxyError>,
    ) -> VhostResult<()> {
        self.refusable = true;
        let regions = try_req!(self.switch()).reset_rings();
        let (space, mut table) = try_req!(self.table());
        let res = send(&mut *table.device);
        space.drop_regions(table.reborrow(), regions);
        res.map_err(Into::into)
    }
}
