//! The seam between the proxy and the real device: [`BackendDevice`], what svqd needs from a
//! device, whatever transport reaches it. The switch and drain logic ([`crate::switch`]) is
//! written once over it; [`vhost_user`] is the vhost-user implementation.

use std::os::fd::RawFd;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserProtocolFeatures,
};
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::error::ProxyError;

#[cfg(test)]
pub mod recording;
pub mod vdpa;
pub mod vhost_user;
pub mod watchdog;

pub use vdpa::VdpaBackend;
pub use vhost_user::VhostUserDevice;

/// Result of a request to the device.
pub type DeviceResult<T> = Result<T, ProxyError>;

/// One region of memory the device must be able to reach: guest RAM from the VMM's table, or a
/// shadow ring svqd owns.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRegion {
    /// Guest-physical address (vhost-user) or IOVA (vhost-vdpa) the device knows the region at.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Address in the VMM's user address space (vhost-user ring addresses are expressed in it).
    pub uva: u64,
    /// Offset of the region in `fd`.
    pub mmap_offset: u64,
    /// The region's file (borrowed: valid while the owner of the region lives).
    pub fd: RawFd,
    /// Where svqd itself maps the region (what a kernel device is told to translate to).
    pub host_addr: u64,
    /// Bytes at the start of the region that the device only reads (a shadow ring's descriptor
    /// table and driver area; a whole number of pages); 0 for guest RAM. A device behind an
    /// IOMMU (vhost-vdpa) gets this part mapped read-only.
    pub device_readonly: u64,
}

impl DeviceRegion {
    /// The region as the vhost crate's frontend wants it.
    pub fn vhost_user_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.uva,
            mmap_offset: self.mmap_offset,
            mmap_handle: self.fd,
        }
    }
}

/// Which addresses a device expects in SET_VRING_ADDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingAddressSpace {
    /// The VMM's user addresses, translated by the device through the memory table (vhost-user).
    VmmUser,
    /// Guest-physical addresses / IOVAs (vhost-vdpa).
    GuestPhysical,
}

/// What the proxy needs from a device. Ring indices are the device's queue indices; the VMM's
/// indices were validated against [`BackendDevice::num_queues`] before they get here.
///
/// Requests fail with [`ProxyError`]; [`ProxyError::backend_gone`] tells a broken connection.
pub trait BackendDevice: Send {
    /// Transport name for logs and `query-status` ("vhost-user", "vhost-vdpa").
    fn kind(&self) -> &'static str;

    // -- negotiation ---------------------------------------------------------------------

    /// Virtio features the device offers.
    fn features(&self) -> u64;
    /// vhost-user protocol features the device offers (what svqd may offer the VMM on top).
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// Ack protocol features (and learn what depends on them: queue count, memory slots).
    fn set_protocol_features(&mut self, features: VhostUserProtocolFeatures) -> DeviceResult<()>;
    /// Queues the device has.
    fn num_queues(&self) -> usize;
    /// Memory slots the device takes (GET_MAX_MEM_SLOTS), when it has a limit of its own.
    fn max_mem_slots(&self) -> Option<u64>;
    /// Take ownership of the device for this session (SET_OWNER).
    fn set_owner(&mut self) -> DeviceResult<()>;
    /// Ack virtio features (what the VMM acked, minus what svqd implements itself).
    fn set_features(&mut self, features: u64) -> DeviceResult<()>;
    /// Features last acked with [`BackendDevice::set_features`].
    fn acked_features(&self) -> Option<u64>;
    /// Whether ring enable/disable can be sent (vhost-user: PROTOCOL_FEATURES acked).
    fn has_enable(&self) -> bool;
    /// Whether the device keeps serving a ring after it was disabled, so that a drain must also
    /// take its kick fd away (see `VhostUserDevice::ignores_disable`).
    fn ignores_disable(&self) -> bool;
    /// Whether the device reads its kick eventfd when a kick wakes it, so that a kick svqd wrote
    /// and still finds unread means the device has not scanned the ring since (`quiesce.rs`).
    fn reads_kick_fd(&self) -> bool;
    /// Whether a disabled ring is one the device does not serve: it has an enable and does not
    /// ignore it. Such a ring is disabled around a stop and restart (`switch.rs`).
    fn honours_enable(&self) -> bool {
        self.has_enable() && !self.ignores_disable()
    }
    /// Which addresses SET_VRING_ADDR carries.
    fn ring_address_space(&self) -> RingAddressSpace {
        RingAddressSpace::VmmUser
    }
    /// The addresses the device can reach (`first..=last`), when it is limited (a vhost-vdpa
    /// device's IOVA range): shadow rings are placed inside it.
    fn address_range(&self) -> Option<(u64, u64)> {
        None
    }

    // -- memory table ----------------------------------------------------------------------

    /// Whether regions can be added and removed one by one; otherwise every change re-sends the
    /// whole table with [`BackendDevice::set_mem_table`].
    fn incremental_memory(&self) -> bool;
    /// Replace the whole memory table.
    fn set_mem_table(&mut self, regions: &[DeviceRegion]) -> DeviceResult<()>;
    /// Add one region.
    fn add_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()>;
    /// Remove one region (matched by address and size).
    fn remove_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()>;

    // -- rings -----------------------------------------------------------------------------

    /// Ring size.
    fn set_vring_num(&mut self, q: usize, num: u16) -> DeviceResult<()>;
    /// Index the ring starts at.
    fn set_vring_base(&mut self, q: usize, base: u16) -> DeviceResult<()>;
    /// Ring addresses (in [`BackendDevice::ring_address_space`]).
    fn set_vring_addr(&mut self, q: usize, ring: &VringConfigData) -> DeviceResult<()>;
    /// Eventfd the device watches for kicks (no kick is implied).
    fn set_vring_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()>;
    /// Eventfd the device signals completions on.
    fn set_vring_call(&mut self, q: usize, call: &EventFd) -> DeviceResult<()>;
    /// Eventfd the device signals ring errors on.
    fn set_vring_err(&mut self, q: usize, err: &EventFd) -> DeviceResult<()>;
    /// Enable or disable the ring.
    fn set_vring_enable(&mut self, q: usize, enable: bool) -> DeviceResult<()>;
    /// Stop the ring and return the index where the device stopped taking buffers. What it took
    /// and did not complete may still complete afterwards (vhost-user backends answer at once).
    fn get_vring_base(&mut self, q: usize) -> DeviceResult<u16>;
    /// Hand `kick` to the stopped ring `q` so that it starts, and kick it once (it scans the ring).
    /// Only for a device that does not honour the enable (`honours_enable()` false): the others
    /// are started in the order `switch.rs` (`start_device_ring`) gives them.
    fn hand_over_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()>;
    /// Return once the device applied every earlier request (a request with a reply).
    fn sync(&mut self) -> DeviceResult<()>;
    /// Send the requests that follow back to back, without waiting for each one's
    /// acknowledgement, until [`BackendDevice::end_pipeline`]. A device handles requests in
    /// order, so one reply at the end covers them all; a request it refuses then shows as the
    /// connection closing (what libvhost-user, DPDK and vhost-user-backend do with a failed
    /// request nobody waits for): at the end of the pipeline, or at the next request when the
    /// end does not wait. Use [`pipelined`].
    fn begin_pipeline(&mut self) {}
    /// End what [`BackendDevice::begin_pipeline`] started; with [`Await::Applied`], return once
    /// the device applied every request sent since (one round trip instead of one per request).
    fn end_pipeline(&mut self, _until: Await) -> DeviceResult<()> {
        Ok(())
    }

    // -- device ----------------------------------------------------------------------------

    /// Reset the device (RESET_DEVICE): every ring stops, contents discarded.
    fn reset_device(&mut self) -> DeviceResult<()>;
    /// Give up ownership (RESET_OWNER).
    fn reset_owner(&mut self) -> DeviceResult<()>;
    /// Read device configuration space.
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> DeviceResult<Vec<u8>>;
    /// Write device configuration space.
    fn set_config(
        &mut self,
        offset: u32,
        data: &[u8],
        flags: VhostUserConfigFlags,
    ) -> DeviceResult<()>;

    // -- vhost-user extras the VMM may use (refused by devices without them) --------------

    /// GET_INFLIGHT_FD.
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> DeviceResult<(VhostUserInflight, std::fs::File)> {
        Err(unsupported(self.kind(), "GET_INFLIGHT_FD"))
    }
    /// SET_INFLIGHT_FD.
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _fd: RawFd) -> DeviceResult<()> {
        Err(unsupported(self.kind(), "SET_INFLIGHT_FD"))
    }
    /// SET_DEVICE_STATE_FD.
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: std::fs::File,
    ) -> DeviceResult<Option<std::fs::File>> {
        Err(unsupported(self.kind(), "SET_DEVICE_STATE_FD"))
    }
    /// CHECK_DEVICE_STATE.
    fn check_device_state(&mut self) -> DeviceResult<()> {
        Err(unsupported(self.kind(), "CHECK_DEVICE_STATE"))
    }

    // -- connection ------------------------------------------------------------------------

    /// An fd that reports POLLRDHUP/POLLHUP when the device goes away, if there is one.
    fn watch_fd(&self) -> Option<RawFd>;
    /// Whether the device is gone (checked without consuming anything).
    fn hung_up(&self) -> bool;
    /// Close the connection (a vhost-user backend resets its state on disconnect).
    fn close(&self);
}

/// How long the end of a pipeline waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Await {
    /// Until the device applied every request of the pipeline: what follows depends on it (a
    /// quiesce, a kick that must find the ring enabled).
    Applied,
    /// Only until the requests are sent: nothing svqd does next depends on them having been
    /// applied, and the device handles requests in order. A backend busy with I/O answers a
    /// reply-bearing request only after the I/O the restarted ring's kick started (~0.2 ms with
    /// qemu-storage-daemon at QD16). A refusal shows later, as the connection closing.
    Sent,
}

/// Send `f`'s requests to `dev` as one pipeline (see [`BackendDevice::begin_pipeline`]): a
/// sequence of ring requests to a backend busy with I/O costs one round trip, not one each, or
/// none with [`Await::Sent`]. The first error wins; the pipeline is ended either way.
pub fn pipelined<T>(
    dev: &mut dyn BackendDevice,
    until: Await,
    f: impl FnOnce(&mut dyn BackendDevice) -> DeviceResult<T>,
) -> DeviceResult<T> {
    dev.begin_pipeline();
    let res = f(dev);
    let ended = dev.end_pipeline(until);
    let v = res?;
    ended?;
    Ok(v)
}

/// The `events` (POLLIN, POLLRDHUP, ...) that `fd` has right now, looked at without waiting or
/// reading anything; none when the poll fails.
pub(crate) fn ready_now(fd: RawFd, events: i16) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, owned by this frame, for the duration of the call; a zero
    // timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n > 0 {
        p.revents
    } else {
        0
    }
}

fn unsupported(kind: &str, what: &str) -> ProxyError {
    ProxyError::NotAllowed(format!("{what} is not supported by a {kind} device"))
}
