//! A vhost-user backend as a [`BackendDevice`]: svqd is its frontend, through the vhost crate's
//! `Frontend`, and works around the quirks of the backends it meets (libvhost-user,
//! vhost-user-backend, DPDK).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::{BackendDevice, DeviceRegion, DeviceResult};
use crate::error::ProxyError;
use crate::features::VHOST_USER_F_PROTOCOL_FEATURES;

/// Queue count assumed when the backend has no MQ protocol feature (then the VMM alone decides how
/// many queues it uses; indices above this are refused).
pub const DEFAULT_MAX_QUEUES: usize = 8;

/// Largest queue index the vhost-user fd messages can carry (bits 0..7).
pub const MAX_QUEUES: usize = 256;

/// A connected vhost-user backend and what it offered.
pub struct VhostUserDevice {
    /// The vhost crate's frontend endpoint.
    fe: Frontend,
    /// Virtio features the backend offers.
    features: u64,
    /// Protocol features the backend offers.
    protocol: VhostUserProtocolFeatures,
    /// Protocol features svqd acked to the backend (after SET_PROTOCOL_FEATURES).
    acked_protocol: VhostUserProtocolFeatures,
    /// Queues the backend has (GET_QUEUE_NUM) or [`DEFAULT_MAX_QUEUES`].
    num_queues: usize,
    /// GET_MAX_MEM_SLOTS when CONFIGURE_MEM_SLOTS is acked.
    max_mem_slots: Option<u64>,
    /// Features last forwarded with SET_FEATURES.
    last_features: Option<u64>,
    stream: UnixStream,
}

impl VhostUserDevice {
    /// Connect to `path`, retrying for `timeout` while the socket is absent or refusing (the backend
    /// may still be starting), then read its features.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ProxyError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(ProxyError::BackendConnect {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
            }
        };
        // A backend that accepts but never answers (busy with another frontend) must not hang
        // svqd: bound the handshake.
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_secs(1))))
            .map_err(|e| ProxyError::Io("backend socket timeout", e))?;
        let keep = stream
            .try_clone()
            .map_err(|e| ProxyError::Io("clone backend socket", e))?;
        let mut fe = Frontend::from_stream(stream, MAX_QUEUES as u64);
        let features = fe
            .get_features()
            .map_err(|e| ProxyError::Backend("GET_FEATURES", e))?;
        if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(ProxyError::NotAllowed(format!(
                "backend {} does not offer VHOST_USER_F_PROTOCOL_FEATURES (features {features:#x}); \
                 svqd needs it to offer dirty logging",
                path.display()
            )));
        }
        let protocol = fe
            .get_protocol_features()
            .map_err(|e| ProxyError::Backend("GET_PROTOCOL_FEATURES", e))?;
        keep.set_read_timeout(None)
            .map_err(|e| ProxyError::Io("backend socket timeout", e))?;
        tracing::info!(
            backend = %path.display(),
            features = format_args!("{features:#x}"),
            protocol = format_args!("{:#x}", protocol.bits()),
            "connected to backend"
        );
        Ok(VhostUserDevice {
            fe,
            features,
            protocol,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            num_queues: DEFAULT_MAX_QUEUES,
            max_mem_slots: None,
            last_features: None,
            stream: keep,
        })
    }

    /// Treat the backend as one without CONFIGURE_MEM_SLOTS, towards both sides (tests use this
    /// to cover the whole-table path with one backend).
    pub fn without_mem_slots(mut self) -> Self {
        self.protocol
            .remove(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        self
    }
}

/// A vhost crate error as a [`ProxyError`] naming the request.
fn req(what: &'static str) -> impl FnOnce(vhost::Error) -> ProxyError {
    move |e| ProxyError::Backend(what, e)
}

impl BackendDevice for VhostUserDevice {
    fn kind(&self) -> &'static str {
        "vhost-user"
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Also learns what depends on the features: queue count, memory slots.
    fn set_protocol_features(&mut self, features: VhostUserProtocolFeatures) -> DeviceResult<()> {
        self.fe
            .set_protocol_features(features)
            .map_err(req("SET_PROTOCOL_FEATURES"))?;
        self.acked_protocol = features;
        if features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request then gets an explicit ack, so a refusal shows up where it happens
            // instead of as a dropped connection later.
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if features.contains(VhostUserProtocolFeatures::MQ) {
            let n = self.fe.get_queue_num().map_err(req("GET_QUEUE_NUM"))?;
            self.num_queues = (n as usize).clamp(1, MAX_QUEUES);
        }
        if features.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let n = self
                .fe
                .get_max_mem_slots()
                .map_err(req("GET_MAX_MEM_SLOTS"))?;
            self.max_mem_slots = Some(n);
        }
        Ok(())
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_mem_slots(&self) -> Option<u64> {
        self.max_mem_slots
    }

    fn set_owner(&mut self) -> DeviceResult<()> {
        self.fe.set_owner().map_err(req("SET_OWNER"))
    }

    fn set_features(&mut self, features: u64) -> DeviceResult<()> {
        self.fe
            .set_features(features)
            .map_err(req("SET_FEATURES"))?;
        self.last_features = Some(features);
        Ok(())
    }

    fn acked_features(&self) -> Option<u64> {
        self.last_features
    }

    /// SET_VRING_ENABLE exists once PROTOCOL_FEATURES is acked.
    fn has_enable(&self) -> bool {
        self.last_features
            .is_some_and(|f| f & VHOST_USER_F_PROTOCOL_FEATURES != 0)
    }

    /// Whether the backend keeps serving a ring after `SET_VRING_ENABLE 0`, so that only a new
    /// kick fd keeps guest kicks from it while svqd drains the ring: true without
    /// PROTOCOL_FEATURES (no enable at all) and for libvhost-user (qemu-storage-daemon and the
    /// other QEMU-side daemons), recognised by the protocol features it offers unconditionally
    /// (`vu_get_protocol_features_exec`: LOG_SHMFD, BACKEND_REQ, HOST_NOTIFIER, BACKEND_SEND_FD,
    /// REPLY_ACK). vhost-user-backend (rust-vmm) honours the enable, and must *not* get a new kick
    /// fd on a running ring: up to 0.20 its next GET_VRING_BASE then fails with ENOENT, which
    /// ends the daemon (see DESIGN.md).
    fn ignores_disable(&self) -> bool {
        const LIBVHOST_USER: VhostUserProtocolFeatures = VhostUserProtocolFeatures::LOG_SHMFD
            .union(VhostUserProtocolFeatures::BACKEND_REQ)
            .union(VhostUserProtocolFeatures::HOST_NOTIFIER)
            .union(VhostUserProtocolFeatures::BACKEND_SEND_FD)
            .union(VhostUserProtocolFeatures::REPLY_ACK);
        !self.has_enable() || self.protocol.contains(LIBVHOST_USER)
    }

    /// ADD_MEM_REG / REM_MEM_REG once CONFIGURE_MEM_SLOTS is acked.
    fn incremental_memory(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    }

    fn set_mem_table(&mut self, regions: &[DeviceRegion]) -> DeviceResult<()> {
        let table: Vec<_> = regions.iter().map(DeviceRegion::vhost_user_info).collect();
        self.fe
            .set_mem_table(&table)
            .map_err(req("SET_MEM_TABLE"))?;
        Ok(())
    }

    fn add_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()> {
        self.fe
            .add_mem_region(&region.vhost_user_info())
            .map_err(req("ADD_MEM_REG"))?;
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()> {
        self.fe
            .remove_mem_region(&region.vhost_user_info())
            .map_err(req("REM_MEM_REG"))
    }

    fn set_vring_num(&mut self, q: usize, num: u16) -> DeviceResult<()> {
        self.fe.set_vring_num(q, num).map_err(req("SET_VRING_NUM"))
    }

    fn set_vring_base(&mut self, q: usize, base: u16) -> DeviceResult<()> {
        self.fe
            .set_vring_base(q, base)
            .map_err(req("SET_VRING_BASE"))
    }

    fn set_vring_addr(&mut self, q: usize, ring: &VringConfigData) -> DeviceResult<()> {
        self.fe
            .set_vring_addr(q, ring)
            .map_err(req("SET_VRING_ADDR"))
    }

    fn set_vring_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()> {
        self.fe
            .set_vring_kick(q, kick)
            .map_err(req("SET_VRING_KICK"))
    }

    fn set_vring_call(&mut self, q: usize, call: &EventFd) -> DeviceResult<()> {
        self.fe
            .set_vring_call(q, call)
            .map_err(req("SET_VRING_CALL"))
    }

    fn set_vring_err(&mut self, q: usize, err: &EventFd) -> DeviceResult<()> {
        self.fe.set_vring_err(q, err).map_err(req("SET_VRING_ERR"))
    }

    fn set_vring_enable(&mut self, q: usize, enable: bool) -> DeviceResult<()> {
        self.fe
            .set_vring_enable(q, enable)
            .map_err(req("SET_VRING_ENABLE"))
    }

    fn get_vring_base(&mut self, q: usize) -> DeviceResult<u16> {
        let base = self.fe.get_vring_base(q).map_err(req("GET_VRING_BASE"))?;
        Ok(base as u16)
    }

    /// When to kick depends on the backend. libvhost-user (and anything else that ignores
    /// `SET_VRING_ENABLE 0`): before handing the fd over, as always. vhost-user-backend up to
    /// 0.20 watches a new kick fd *before* it marks the queue ready, so a kick already pending
    /// can be handled on a queue that is not ready yet; the device's pop fails and the daemon's
    /// epoll thread ends for good (measured with vhost-device-rng: the ring never moves again).
    /// So for these backends the fd is handed over empty, a request with a reply (GET_FEATURES)
    /// waits until the backend applied it, and only then is it kicked.
    fn hand_over_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()> {
        let early = self.ignores_disable();
        if early {
            let _ = kick.write(1);
        }
        self.set_vring_kick(q, kick)?;
        if !early {
            self.sync()?;
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// GET_FEATURES: answered only after every earlier message was handled.
    fn sync(&mut self) -> DeviceResult<()> {
        self.fe.get_features().map_err(req("GET_FEATURES"))?;
        Ok(())
    }

    fn reset_device(&mut self) -> DeviceResult<()> {
        self.fe.reset_device().map_err(req("RESET_DEVICE"))
    }

    fn reset_owner(&mut self) -> DeviceResult<()> {
        self.fe.reset_owner().map_err(req("RESET_OWNER"))
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> DeviceResult<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .fe
            .get_config(offset, size, flags, &buf)
            .map_err(req("GET_CONFIG"))?;
        Ok(payload)
    }

    fn set_config(
        &mut self,
        offset: u32,
        data: &[u8],
        flags: VhostUserConfigFlags,
    ) -> DeviceResult<()> {
        self.fe
            .set_config(offset, flags, data)
            .map_err(req("SET_CONFIG"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> DeviceResult<(VhostUserInflight, std::fs::File)> {
        self.fe
            .get_inflight_fd(inflight)
            .map_err(req("GET_INFLIGHT_FD"))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, fd: RawFd) -> DeviceResult<()> {
        self.fe
            .set_inflight_fd(inflight, fd)
            .map_err(req("SET_INFLIGHT_FD"))
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: std::fs::File,
    ) -> DeviceResult<Option<std::fs::File>> {
        self.fe
            .set_device_state_fd(direction, phase, fd.into())
            .map_err(req("SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> DeviceResult<()> {
        self.fe
            .check_device_state()
            .map_err(req("CHECK_DEVICE_STATE"))
    }

    fn watch_fd(&self) -> Option<RawFd> {
        Some(self.stream.as_raw_fd())
    }

    fn hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
