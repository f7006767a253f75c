//! A vhost-vdpa device (`/dev/vhost-vdpa-N`) as a [`BackendDevice`]: the VMM speaks vhost-user
//! to svqd, svqd drives the device through [`device`] (its ioctls) and [`iotlb`] (svqd's mirror of the
//! device's IOTLB).
//!
//! vhost-user and vhost-vdpa differ in what "stopping a ring" means, and this file is where the
//! difference is absorbed:
//!
//! * A vhost-user backend stops a ring on GET_VRING_BASE and takes a new ring configuration at
//!   any time. A vDPA device has one status for all rings: it runs them from DRIVER_OK, and
//!   refuses ring addresses and bases while running (`EINVAL`) unless it is suspended. So
//!   GET_VRING_BASE here takes the device's kick fd away (no guest kick reaches it any more),
//!   SUSPENDs the device where it offers that, and reads the base; the ring counts as stopped.
//!   When a stopped ring is configured again, a device without SUSPEND+RESUME is reset (every
//!   ring stops; the IOTLB stays), the features renegotiated, and all rings restarted at their
//!   bases with DRIVER_OK once every configured ring has its kick. svqd's drain
//!   ([`crate::drain`]) has waited, before that, until everything the device took is completed,
//!   so a reset never drops a request in flight.
//! * The device gets no kick, call or enable changes it cannot take: VDUSE reads a ring's enable
//!   only at DRIVER_OK, so every started ring is enabled then and the VMM's later disables are
//!   not forwarded (svqd treats the device like a backend that ignores disable, and takes its
//!   kick fd away instead, which vhost-vdpa allows on a running ring).
//! * Memory: every region (guest RAM from the VMM's table, shadow rings) is mapped into the
//!   device's IOTLB at IOVA = its GPA, guest RAM read-write, a shadow ring's driver part
//!   read-only. Guest memory outside the device's IOVA range is refused with a clear error.
//! * Features: ACCESS_PLATFORM is acked towards the device when it offers it (its addresses are
//!   IOVAs, which is what the flag means) and never shown to the VMM; VHOST_USER_F_PROTOCOL_FEATURES
//!   never reaches the device.
//!
//! With SUSPEND and RESUME one ring moves while the others wait, suspended, where they are (they
//! are not reconfigured: the resume continues them). Without them, a device whose several rings
//! run at once cannot have one of them stopped and restarted: the reset would stop the others
//! with requests in flight. That is refused (the error names the running rings) unless those
//! rings took nothing since they started — which is how a VMM's ring-by-ring start looks, each
//! later ring restarting the device once. Single-queue devices (virtio-blk with one queue, what
//! VDUSE tests cover) switch freely. `tests.rs` runs both paths on an in-memory device.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::VringConfigData;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BackendDevice, DeviceRegion, DeviceResult, RingAddressSpace};
use crate::error::ProxyError;
use crate::features::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
pub mod device;
#[cfg(test)]
mod fake;
pub mod iotlb;

pub use device::{
    backend_bit, backend_feature_names, status, DeviceInfo, VdpaDevice, VdpaError, VdpaOps,
    VIRTIO_F_ACCESS_PLATFORM,
};
pub use iotlb::{IotlbError, IotlbMap, IotlbOp, Mapping};

/// Where the device is in its status lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Status 0 (after open or reset).
    Reset,
    /// FEATURES_OK: rings may be configured.
    FeaturesOk,
    /// DRIVER_OK: the started rings run.
    Running,
    /// DRIVER_OK, suspended (VHOST_VDPA_SUSPEND): nothing runs, rings may be reconfigured.
    Suspended,
}

/// What svqd configured for one ring of the device.
#[derive(Default)]
struct Ring {
    num: u16,
    base: u16,
    /// Descriptor table, driver area, device area (IOVAs).
    addr: Option<(u64, u64, u64)>,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    /// A kick was handed over: the device runs the ring (or will at DRIVER_OK).
    started: bool,
    /// GET_VRING_BASE answered since: the device must not run the ring again before a restart.
    stopped: bool,
}

impl Ring {
    fn configured(&self) -> bool {
        self.num != 0 && self.addr.is_some()
    }

    fn running(&self) -> bool {
        self.started && !self.stopped
    }
}

/// A vhost-vdpa device behind svqd. See the module docs.
pub struct VdpaBackend<D: VdpaOps = VdpaDevice> {
    dev: D,
    /// Features as the proxy acked them (what [`BackendDevice::acked_features`] reports).
    acked: Option<u64>,
    /// Features set on the device.
    device_features: Option<u64>,
    phase: Phase,
    rings: Vec<Ring>,
    /// The IOTLB mappings of each region svqd was given, by GPA.
    regions: BTreeMap<u64, (u64, Vec<Mapping>)>,
    /// A kick fd nobody writes: what a stopped ring's device side watches.
    idle_kick: EventFd,
    /// Device resets done to restart rings (for logs).
    restarts: u64,
}

fn dup(fd: &EventFd) -> Result<EventFd, ProxyError> {
    fd.try_clone().map_err(|e| ProxyError::Io("dup eventfd", e))
}

impl VdpaBackend<VdpaDevice> {
    /// Opens the device (a clear error when it is missing or in use) and probes it.
    pub fn open(path: &Path) -> Result<Self, ProxyError> {
        let dev = VdpaDevice::open(path)?;
        tracing::info!(
            device = %path.display(),
            device_id = dev.info().device_id,
            features = format_args!("{:#x}", dev.info().features),
            backend_features = %backend_feature_names(dev.info().backend_features).join("|"),
            queues = dev.info().num_queues,
            iova_first = format_args!("{:#x}", dev.info().iova_first),
            iova_last = format_args!("{:#x}", dev.info().iova_last),
            suspend = dev.can_suspend(),
            "opened vDPA device"
        );
        Self::with_device(dev)
    }
}

impl<D: VdpaOps> VdpaBackend<D> {
    /// A backend over an opened device (refused without VERSION_1).
    pub fn with_device(dev: D) -> Result<Self, ProxyError> {
        let info = *dev.info();
        if info.features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ProxyError::NotAllowed(format!(
                "the vDPA device does not offer VERSION_1 (features {:#x})",
                info.features
            )));
        }
        Ok(VdpaBackend {
            rings: (0..info.num_queues).map(|_| Ring::default()).collect(),
            dev,
            acked: None,
            device_features: None,
            phase: Phase::Reset,
            regions: BTreeMap::new(),
            idle_kick: EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?,
            restarts: 0,
        })
    }

    /// The device layer underneath.
    pub fn device(&self) -> &D {
        &self.dev
    }

    fn ring(&mut self, q: usize) -> Result<&mut Ring, ProxyError> {
        let n = self.rings.len();
        self.rings.get_mut(q).ok_or(ProxyError::BadQueue {
            index: q as u32,
            queues: n,
        })
    }

    fn running_rings(&self) -> Vec<usize> {
        (0..self.rings.len())
            .filter(|&i| self.rings[i].running())
            .collect()
    }

    /// Status 0, then FEATURES_OK again with the features last set (if any).
    fn reset_and_negotiate(&mut self) -> Result<(), ProxyError> {
        self.dev.reset()?;
        self.phase = Phase::Reset;
        if !self.dev.iotlb_persists() {
            // A parent may drop its copy of the mappings on reset; vhost-vdpa keeps its own, so
            // they are sent again (VDUSE 6.12 keeps them either way).
            self.dev.remap_all()?;
        }
        for r in &mut self.rings {
            r.started = false;
            r.stopped = false;
        }
        if let Some(f) = self.device_features {
            self.dev.negotiate(f)?;
            self.phase = Phase::FeaturesOk;
        }
        Ok(())
    }

    /// Ring `q` is about to be (re)configured: make sure the device takes it. A running device
    /// must have stopped every ring first; it is then reset (or, suspended with RESUME, kept).
    fn make_configurable(&mut self, q: usize) -> Result<(), ProxyError> {
        match self.phase {
            Phase::Reset | Phase::FeaturesOk => Ok(()),
            Phase::Suspended if self.dev.can_resume() => Ok(()),
            Phase::Running | Phase::Suspended => {
                // Rings that took nothing since they started (a VMM starting its rings one by
                // one, the device already started with the first) restart harmlessly.
                let running: Vec<usize> = self
                    .running_rings()
                    .into_iter()
                    .filter(|&r| {
                        self.dev
                            .vring_base(r)
                            .map_or(true, |now| now != self.rings[r].base)
                    })
                    .collect();
                if !running.is_empty() {
                    return Err(ProxyError::NotAllowed(format!(
                        "vDPA device: queue {q} cannot be reconfigured while queue(s) {running:?} \
                         run (without SUSPEND and RESUME the device restarts all rings at once; \
                         stop them first)"
                    )));
                }
                self.restarts += 1;
                tracing::debug!(
                    queue = q,
                    restarts = self.restarts,
                    "resetting the vDPA device to restart its rings"
                );
                self.reset_and_negotiate()
            }
        }
    }

    /// DRIVER_OK once the features are set and every configured ring has its kick; or RESUME of
    /// a suspended device.
    fn try_start(&mut self) -> Result<(), ProxyError> {
        let Some(features) = self.device_features else {
            tracing::debug!("vDPA device: a ring was kicked before SET_FEATURES; not started yet");
            return Ok(());
        };
        if self
            .rings
            .iter()
            .any(|r| r.configured() && !r.started && r.kick.is_none())
        {
            // Another ring is configured but not kicked yet: start them together.
            return Ok(());
        }
        match self.phase {
            Phase::Running => return Ok(()),
            Phase::Suspended => {
                // Only reached with RESUME (make_configurable resets otherwise). The rings that
                // were stopped get their (new) configuration again; the others resume where the
                // device holds them (their bases here are stale: pushing one would rewind it).
                for q in 0..self.rings.len() {
                    if self.rings[q].started && self.rings[q].stopped {
                        self.push_ring(q)?;
                        self.rings[q].stopped = false;
                    }
                }
                self.dev.resume()?;
                self.phase = Phase::Running;
                return Ok(());
            }
            Phase::Reset => {
                self.dev.negotiate(features)?;
                self.phase = Phase::FeaturesOk;
            }
            Phase::FeaturesOk => {}
        }
        for q in 0..self.rings.len() {
            if self.rings[q].configured() && self.rings[q].kick.is_some() {
                self.rings[q].started = true;
                self.push_ring(q)?;
                self.dev.set_vring_enable(q, true)?;
            }
        }
        self.dev.driver_ok()?;
        self.phase = Phase::Running;
        for r in &mut self.rings {
            r.stopped = false;
        }
        tracing::debug!(running = ?self.running_rings(), "vDPA device started (DRIVER_OK)");
        Ok(())
    }

    /// Send ring `q`'s whole configuration to the (not running) device.
    fn push_ring(&mut self, q: usize) -> Result<(), ProxyError> {
        let r = &self.rings[q];
        let Some((desc, avail, used)) = r.addr else {
            return Ok(());
        };
        self.dev.set_vring_num(q, r.num)?;
        self.dev.set_vring_addr(q, r.num, desc, avail, used)?;
        self.dev.set_vring_base(q, r.base)?;
        if let Some(k) = &r.kick {
            self.dev.set_vring_kick(q, k)?;
        }
        if let Some(c) = &r.call {
            self.dev.set_vring_call(q, c)?;
        }
        Ok(())
    }

    /// The IOTLB mappings for `region` at IOVA = GPA: its read-only prefix (a shadow ring's
    /// driver part) and the rest read-write.
    fn mappings(region: &DeviceRegion) -> Vec<Mapping> {
        let ro = region.device_readonly.min(region.size);
        let mut v = Vec::new();
        if ro > 0 {
            v.push(Mapping {
                iova: region.gpa,
                size: ro,
                uaddr: region.host_addr,
                readonly: true,
            });
        }
        if region.size > ro {
            v.push(Mapping {
                iova: region.gpa + ro,
                size: region.size - ro,
                uaddr: region.host_addr + ro,
                readonly: false,
            });
        }
        v
    }

    fn unmap_ops(maps: &[Mapping]) -> impl Iterator<Item = IotlbOp> + '_ {
        maps.iter().map(|m| IotlbOp::Unmap {
            iova: m.iova,
            size: m.size,
        })
    }
}

impl<D: VdpaOps> BackendDevice for VdpaBackend<D> {
    fn kind(&self) -> &'static str {
        "vhost-vdpa"
    }

    fn features(&self) -> u64 {
        self.dev.info().features
    }

    /// What svqd implements towards the VMM on the device's behalf: a queue count, a config
    /// space, per-region memory updates, device reset, acks.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn set_protocol_features(&mut self, _features: VhostUserProtocolFeatures) -> DeviceResult<()> {
        Ok(())
    }

    fn num_queues(&self) -> usize {
        self.rings.len()
    }

    /// The IOTLB has no slot limit of its own; this bounds what svqd keeps track of.
    fn max_mem_slots(&self) -> Option<u64> {
        Some(256)
    }

    /// svqd took ownership when it opened the device.
    fn set_owner(&mut self) -> DeviceResult<()> {
        Ok(())
    }

    fn set_features(&mut self, features: u64) -> DeviceResult<()> {
        let offered = self.dev.info().features;
        let dev_features =
            (features & !VHOST_USER_F_PROTOCOL_FEATURES) | (offered & VIRTIO_F_ACCESS_PLATFORM);
        if dev_features & !offered != 0 {
            return Err(ProxyError::BadRequest(format!(
                "features {features:#x} include bits the vDPA device does not offer ({offered:#x})"
            )));
        }
        if self.device_features == Some(dev_features) {
            self.acked = Some(features);
            return Ok(());
        }
        match self.phase {
            Phase::Running | Phase::Suspended => {
                return Err(ProxyError::NotAllowed(format!(
                    "vDPA device: features cannot change from {:#x} to {dev_features:#x} while \
                     it runs",
                    self.device_features.unwrap_or(0)
                )))
            }
            Phase::FeaturesOk => {
                self.dev.reset()?;
                self.phase = Phase::Reset;
            }
            Phase::Reset => {}
        }
        self.dev.negotiate(dev_features)?;
        self.phase = Phase::FeaturesOk;
        self.device_features = Some(dev_features);
        self.acked = Some(features);
        Ok(())
    }

    fn acked_features(&self) -> Option<u64> {
        self.acked
    }

    /// VDUSE reads a ring's enable only at DRIVER_OK: enables are svqd's business.
    fn has_enable(&self) -> bool {
        false
    }

    /// The device runs every started ring; only taking its kick fd away stops guest kicks.
    fn ignores_disable(&self) -> bool {
        true
    }

    /// The kernel only polls a kick eventfd (vhost_poll); its count is never read back.
    fn reads_kick_fd(&self) -> bool {
        false
    }

    fn ring_address_space(&self) -> RingAddressSpace {
        RingAddressSpace::GuestPhysical
    }

    fn address_range(&self) -> Option<(u64, u64)> {
        let i = self.dev.info();
        Some((i.iova_first, i.iova_last))
    }

    fn incremental_memory(&self) -> bool {
        true
    }

    /// The table's regions mapped, the others' unmapped, in one IOTLB batch.
    fn set_mem_table(&mut self, regions: &[DeviceRegion]) -> DeviceResult<()> {
        let wanted: BTreeMap<u64, (u64, Vec<Mapping>)> = regions
            .iter()
            .map(|r| (r.gpa, (r.size, Self::mappings(r))))
            .collect();
        if wanted.len() != regions.len() {
            return Err(ProxyError::BadRequest(
                "two memory regions at the same guest address".into(),
            ));
        }
        let mut ops: Vec<IotlbOp> = Vec::new();
        for (gpa, (_, maps)) in &self.regions {
            if wanted.get(gpa).map(|w| &w.1) != Some(maps) {
                ops.extend(Self::unmap_ops(maps));
            }
        }
        for (gpa, (_, maps)) in &wanted {
            if self.regions.get(gpa).map(|w| &w.1) != Some(maps) {
                ops.extend(maps.iter().map(|&m| IotlbOp::Map(m)));
            }
        }
        self.dev.update_iotlb(&ops)?;
        self.regions = wanted;
        Ok(())
    }

    fn add_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()> {
        if self.regions.contains_key(&region.gpa) {
            return Err(ProxyError::BadRequest(format!(
                "a memory region at {:#x} is already mapped",
                region.gpa
            )));
        }
        let maps = Self::mappings(region);
        let ops: Vec<IotlbOp> = maps.iter().map(|&m| IotlbOp::Map(m)).collect();
        self.dev.update_iotlb(&ops)?;
        self.regions.insert(region.gpa, (region.size, maps));
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()> {
        match self.regions.get(&region.gpa) {
            Some((size, maps)) if *size == region.size => {
                let ops: Vec<IotlbOp> = Self::unmap_ops(maps).collect();
                self.dev.update_iotlb(&ops)?;
                self.regions.remove(&region.gpa);
                Ok(())
            }
            _ => Err(ProxyError::BadRequest(format!(
                "no memory region of {:#x} bytes at {:#x} to remove",
                region.size, region.gpa
            ))),
        }
    }

    fn set_vring_num(&mut self, q: usize, num: u16) -> DeviceResult<()> {
        self.ring(q)?;
        self.make_configurable(q)?;
        self.dev.set_vring_num(q, num)?;
        self.ring(q)?.num = num;
        Ok(())
    }

    fn set_vring_base(&mut self, q: usize, base: u16) -> DeviceResult<()> {
        self.ring(q)?;
        self.make_configurable(q)?;
        self.dev.set_vring_base(q, base)?;
        self.ring(q)?.base = base;
        Ok(())
    }

    fn set_vring_addr(&mut self, q: usize, ring: &VringConfigData) -> DeviceResult<()> {
        self.ring(q)?;
        self.make_configurable(q)?;
        let (desc, avail, used) = (
            ring.desc_table_addr,
            ring.avail_ring_addr,
            ring.used_ring_addr,
        );
        self.dev
            .set_vring_addr(q, ring.queue_size, desc, avail, used)?;
        let r = self.ring(q)?;
        r.addr = Some((desc, avail, used));
        r.num = ring.queue_size;
        Ok(())
    }

    /// On a running ring the fd is swapped (vhost-vdpa allows it); otherwise the kick starts the
    /// ring, and the device once every configured ring has one.
    fn set_vring_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()> {
        let fd = dup(kick)?;
        let r = self.ring(q)?;
        if r.running() && matches!(self.phase, Phase::Running | Phase::Suspended) {
            self.dev.set_vring_kick(q, &fd)?;
            self.ring(q)?.kick = Some(fd);
            return Ok(());
        }
        if matches!(self.phase, Phase::Running | Phase::Suspended) {
            // A stopped ring restarted as it is, or a ring the running device never had.
            self.make_configurable(q)?;
        }
        let r = self.ring(q)?;
        r.kick = Some(fd);
        r.started = true;
        self.try_start()
    }

    fn set_vring_call(&mut self, q: usize, call: &EventFd) -> DeviceResult<()> {
        let fd = dup(call)?;
        self.dev.set_vring_call(q, &fd)?;
        self.ring(q)?.call = Some(fd);
        Ok(())
    }

    /// vhost-vdpa devices signal no ring errors svqd could relay.
    fn set_vring_err(&mut self, q: usize, _err: &EventFd) -> DeviceResult<()> {
        self.ring(q)?;
        Ok(())
    }

    /// Not forwarded (see [`BackendDevice::has_enable`]); the proxy never sends it.
    fn set_vring_enable(&mut self, q: usize, enable: bool) -> DeviceResult<()> {
        self.ring(q)?;
        tracing::debug!(
            queue = q,
            enable,
            "ring enable kept by svqd (vDPA rings run from DRIVER_OK)"
        );
        Ok(())
    }

    /// Takes the device's kick fd away (guest kicks no longer reach it), SUSPENDs the device
    /// where it can, and reads where it stopped taking buffers. Without SUSPEND the device may
    /// still complete what it took (and pops nothing more: it gets no kick); svqd waits for
    /// those completions before the ring moves.
    fn get_vring_base(&mut self, q: usize) -> DeviceResult<u16> {
        self.ring(q)?;
        if self.rings[q].running() && matches!(self.phase, Phase::Running | Phase::Suspended) {
            self.dev.set_vring_kick(q, &self.idle_kick)?;
            if self.dev.can_suspend() && self.phase == Phase::Running {
                self.dev.suspend()?;
                self.phase = Phase::Suspended;
            }
            let base = self.dev.vring_base(q)?;
            let r = self.ring(q)?;
            r.stopped = true;
            r.base = base;
            return Ok(base);
        }
        if matches!(self.phase, Phase::Running | Phase::Suspended) && self.rings[q].started {
            // Stopped before: the device's answer is still the place it stopped.
            let base = self.dev.vring_base(q)?;
            self.ring(q)?.base = base;
            return Ok(base);
        }
        Ok(self.rings[q].base)
    }

    fn hand_over_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()> {
        self.set_vring_kick(q, kick)?;
        let _ = kick.write(1);
        Ok(())
    }

    /// ioctls are synchronous.
    fn sync(&mut self) -> DeviceResult<()> {
        Ok(())
    }

    fn reset_device(&mut self) -> DeviceResult<()> {
        self.dev.reset()?;
        self.phase = Phase::Reset;
        for r in &mut self.rings {
            *r = Ring::default();
        }
        self.device_features = None;
        self.acked = None;
        if !self.dev.iotlb_persists() {
            self.dev.remap_all()?;
        }
        Ok(())
    }

    fn reset_owner(&mut self) -> DeviceResult<()> {
        self.reset_device()
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> DeviceResult<Vec<u8>> {
        Ok(self.dev.config(offset, size)?)
    }

    fn set_config(
        &mut self,
        offset: u32,
        data: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> DeviceResult<()> {
        Ok(self.dev.set_config(offset, data)?)
    }

    fn watch_fd(&self) -> Option<RawFd> {
        None
    }

    /// A device that was removed answers no ioctl.
    fn hung_up(&self) -> bool {
        self.dev.status().is_err()
    }

    /// Nothing to shut down: dropping the device closes it, which resets it in the kernel.
    fn close(&self) {}
}

#[cfg(test)]
mod tests;
