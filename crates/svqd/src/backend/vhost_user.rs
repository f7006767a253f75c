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

use super::watchdog::RequestWatchdog;
use super::{ready_now, Await, BackendDevice, DeviceRegion, DeviceResult};
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
    /// Shuts the connection down when a request goes unanswered for `request_timeout` (a late
    /// reply would be taken for the next request's, so the connection is as good as gone).
    watchdog: RequestWatchdog,
    /// How long a request may wait for its reply.
    request_timeout: Duration,
    /// Inside a pipeline (see [`BackendDevice::begin_pipeline`]).
    pipelining: bool,
}

impl VhostUserDevice {
    /// Connect to `path` and read its features, retrying for `timeout` while the socket is absent
    /// or refusing, or the backend drops the connection during the handshake (it may still be
    /// starting, or busy with a frontend that is going away). Every request afterwards waits at
    /// most `request_timeout` for its reply: a backend that does not answer by then is treated
    /// as gone (the connection cannot be resynchronised), which the VMM sees as an error.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, ProxyError> {
        let deadline = Instant::now() + timeout;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match Self::handshake(path, timeout, request_timeout) {
                Ok(d) => return Ok(d),
                Err(e) if Instant::now() < deadline && retryable(&e) => {
                    if attempts == 1 {
                        tracing::info!(backend = %path.display(), error = %e, "backend not ready; retrying");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One connection attempt: connect, GET_FEATURES, GET_PROTOCOL_FEATURES.
    fn handshake(
        path: &Path,
        timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, ProxyError> {
        let stream = UnixStream::connect(path).map_err(|e| ProxyError::BackendConnect {
            path: path.display().to_string(),
            source: e,
        })?;
        let keep = stream
            .try_clone()
            .map_err(|e| ProxyError::Io("clone backend socket", e))?;
        let watchdog = RequestWatchdog::new(
            stream
                .try_clone()
                .map_err(|e| ProxyError::Io("clone backend socket", e))?,
        )
        .map_err(|e| ProxyError::Io("spawn the request watchdog", e))?;
        let mut fe = Frontend::from_stream(stream, MAX_QUEUES as u64);
        // A backend that accepts but never answers (busy with another frontend) must not hang
        // svqd: bound the handshake.
        let limit = timeout.max(Duration::from_secs(1));
        let timed_out = |what: &'static str, e: vhost::Error| match watchdog.fired() {
            Some(_) => ProxyError::BackendTimeout { what, after: limit },
            None => ProxyError::Backend(what, e),
        };
        let features = watchdog
            .run("GET_FEATURES", limit, || fe.get_features())
            .map_err(|e| timed_out("GET_FEATURES", e))?;
        if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(ProxyError::NotAllowed(format!(
                "backend {} does not offer VHOST_USER_F_PROTOCOL_FEATURES (features {features:#x}); \
                 svqd needs it to offer dirty logging",
                path.display()
            )));
        }
        let protocol = watchdog
            .run("GET_PROTOCOL_FEATURES", limit, || {
                fe.get_protocol_features()
            })
            .map_err(|e| timed_out("GET_PROTOCOL_FEATURES", e))?;
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
            watchdog,
            request_timeout,
            pipelining: false,
        })
    }

    /// Send request `what` with `f`, bounded by the request timeout.
    fn call<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> DeviceResult<T> {
        let fe = &mut self.fe;
        let res = self.watchdog.run(what, self.request_timeout, || f(fe));
        res.map_err(|e| match self.watchdog.fired() {
            Some(_) => ProxyError::BackendTimeout {
                what,
                after: self.request_timeout,
            },
            None => ProxyError::Backend(what, e),
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

/// Whether a failed connection attempt is worth another: nobody listening yet, or the backend
/// dropped the connection (or did not answer) during the handshake.
fn retryable(e: &ProxyError) -> bool {
    match e {
        ProxyError::BackendConnect { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ),
        e => e.backend_gone(),
    }
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
        self.call("SET_PROTOCOL_FEATURES", |fe| {
            fe.set_protocol_features(features)
        })?;
        self.acked_protocol = features;
        if features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request then gets an explicit ack, so a refusal shows up where it happens
            // instead of as a dropped connection later.
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if features.contains(VhostUserProtocolFeatures::MQ) {
            let n = self.call("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
            self.num_queues = (n as usize).clamp(1, MAX_QUEUES);
        }
        if features.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let n = self.call("GET_MAX_MEM_SLOTS", |fe| fe.get_max_mem_slots())?;
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
        self.call("SET_OWNER", |fe| fe.set_owner())
    }

    fn set_features(&mut self, features: u64) -> DeviceResult<()> {
        self.call("SET_FEATURES", |fe| fe.set_features(features))?;
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

    /// A vhost-user device reads the kick eventfd it watches (libvhost-user, vhost-user-backend;
    /// a device that polls its rings, such as DPDK, never does: its drain is then judged by the
    /// quiet period).
    fn reads_kick_fd(&self) -> bool {
        true
    }

    /// ADD_MEM_REG / REM_MEM_REG once CONFIGURE_MEM_SLOTS is acked.
    fn incremental_memory(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    }

    fn set_mem_table(&mut self, regions: &[DeviceRegion]) -> DeviceResult<()> {
        let table: Vec<_> = regions.iter().map(DeviceRegion::vhost_user_info).collect();
        self.call("SET_MEM_TABLE", |fe| fe.set_mem_table(&table))?;
        Ok(())
    }

    fn add_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()> {
        self.call("ADD_MEM_REG", |fe| {
            fe.add_mem_region(&region.vhost_user_info())
        })?;
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &DeviceRegion) -> DeviceResult<()> {
        self.call("REM_MEM_REG", |fe| {
            fe.remove_mem_region(&region.vhost_user_info())
        })
    }

    fn set_vring_num(&mut self, q: usize, num: u16) -> DeviceResult<()> {
        self.call("SET_VRING_NUM", |fe| fe.set_vring_num(q, num))
    }

    fn set_vring_base(&mut self, q: usize, base: u16) -> DeviceResult<()> {
        self.call("SET_VRING_BASE", |fe| fe.set_vring_base(q, base))
    }

    fn set_vring_addr(&mut self, q: usize, ring: &VringConfigData) -> DeviceResult<()> {
        self.call("SET_VRING_ADDR", |fe| fe.set_vring_addr(q, ring))
    }

    fn set_vring_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()> {
        self.call("SET_VRING_KICK", |fe| fe.set_vring_kick(q, kick))
    }

    fn set_vring_call(&mut self, q: usize, call: &EventFd) -> DeviceResult<()> {
        self.call("SET_VRING_CALL", |fe| fe.set_vring_call(q, call))
    }

    fn set_vring_err(&mut self, q: usize, err: &EventFd) -> DeviceResult<()> {
        self.call("SET_VRING_ERR", |fe| fe.set_vring_err(q, err))
    }

    fn set_vring_enable(&mut self, q: usize, enable: bool) -> DeviceResult<()> {
        self.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(q, enable))
    }

    fn get_vring_base(&mut self, q: usize) -> DeviceResult<u16> {
        let base = self.call("GET_VRING_BASE", |fe| fe.get_vring_base(q))?;
        Ok(base as u16)
    }

    /// Kicked *before* the fd is handed over: libvhost-user (and anything else that ignores
    /// `SET_VRING_ENABLE 0`) picks the pending kick up once it watches the fd. A backend that
    /// honours the enable is never started this way: up to vhost-user-backend 0.20 it watches a
    /// new kick fd before it marks the queue ready, and a pending kick then ends its event loop;
    /// `switch.rs` (`start_device_ring`) hands it the fd empty and kicks once a reply shows the
    /// ring enabled.
    fn hand_over_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()> {
        debug_assert!(self.ignores_disable(), "see switch.rs start_device_ring");
        let _ = kick.write(1);
        self.set_vring_kick(q, kick)
    }

    /// GET_FEATURES: answered only after every earlier message was handled.
    fn sync(&mut self) -> DeviceResult<()> {
        self.call("GET_FEATURES", |fe| fe.get_features())?;
        Ok(())
    }

    /// Requests go out without NEED_REPLY until the pipeline ends (as QEMU sends its ring
    /// requests); without REPLY_ACK they are never acknowledged anyway.
    fn begin_pipeline(&mut self) {
        self.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        self.pipelining = true;
    }

    /// One GET_FEATURES answers for the whole pipeline (with or without REPLY_ACK).
    fn end_pipeline(&mut self, until: Await) -> DeviceResult<()> {
        if !std::mem::take(&mut self.pipelining) {
            return Ok(());
        }
        if self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        match until {
            Await::Applied => self.sync(),
            Await::Sent => Ok(()),
        }
    }

    fn reset_device(&mut self) -> DeviceResult<()> {
        self.call("RESET_DEVICE", |fe| fe.reset_device())
    }

    fn reset_owner(&mut self) -> DeviceResult<()> {
        self.call("RESET_OWNER", |fe| fe.reset_owner())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> DeviceResult<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) =
            self.call("GET_CONFIG", |fe| fe.get_config(offset, size, flags, &buf))?;
        Ok(payload)
    }

    fn set_config(
        &mut self,
        offset: u32,
        data: &[u8],
        flags: VhostUserConfigFlags,
    ) -> DeviceResult<()> {
        self.call("SET_CONFIG", |fe| fe.set_config(offset, flags, data))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> DeviceResult<(VhostUserInflight, std::fs::File)> {
        self.call("GET_INFLIGHT_FD", |fe| fe.get_inflight_fd(inflight))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, fd: RawFd) -> DeviceResult<()> {
        self.call("SET_INFLIGHT_FD", |fe| fe.set_inflight_fd(inflight, fd))
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: std::fs::File,
    ) -> DeviceResult<Option<std::fs::File>> {
        self.call("SET_DEVICE_STATE_FD", |fe| {
            fe.set_device_state_fd(direction, phase, fd.into())
        })
    }

    fn check_device_state(&mut self) -> DeviceResult<()> {
        self.call("CHECK_DEVICE_STATE", |fe| fe.check_device_state())
    }

    fn watch_fd(&self) -> Option<RawFd> {
        Some(self.stream.as_raw_fd())
    }

    fn hung_up(&self) -> bool {
        let revents = ready_now(self.stream.as_raw_fd(), libc::POLLRDHUP);
        let closed = revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
        closed || self.watchdog.fired().is_some()
    }

    fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{pipelined, Await};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    use vhost::vhost_user::message::FrontendReq;

    const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;
    const SET_VRING_NUM: u32 = FrontendReq::SET_VRING_NUM as u32;
    const SET_VRING_BASE: u32 = FrontendReq::SET_VRING_BASE as u32;
    const GET_PROTOCOL_FEATURES: u32 = FrontendReq::GET_PROTOCOL_FEATURES as u32;
    const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
    /// Protocol version 1, the only one.
    const VERSION: u32 = 0x1;
    const REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
    const NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

    /// (request code, header flags) of every request, in arrival order.
    type Seen = Arc<Mutex<Vec<(u32, u32)>>>;

    /// A backend that speaks just enough vhost-user on the wire: it records every request's code
    /// and header flags, answers GET_* and acks what asks for an ack. With `refuse`, it closes
    /// the connection at that request (what a backend does with a failed request nobody waits
    /// for).
    fn wire_backend(refuse: Option<u32>) -> (tempfile::TempDir, Seen) {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("b.sock")).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            loop {
                let mut hdr = [0u8; 12];
                if s.read_exact(&mut hdr).is_err() {
                    return;
                }
                let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
                let (code, flags, size) = (word(0), word(4), word(8));
                let mut body = vec![0u8; size as usize];
                s.read_exact(&mut body).unwrap();
                log.lock().unwrap().push((code, flags));
                if Some(code) == refuse {
                    return;
                }
                let value: u64 = match code {
                    GET_FEATURES => VHOST_USER_F_PROTOCOL_FEATURES | 1 << 32,
                    GET_PROTOCOL_FEATURES => VhostUserProtocolFeatures::REPLY_ACK.bits(),
                    _ if flags & NEED_REPLY != 0 => 0,
                    _ => continue,
                };
                let mut reply = Vec::new();
                for w in [code, VERSION | REPLY, 8] {
                    reply.extend_from_slice(&w.to_le_bytes());
                }
                reply.extend_from_slice(&value.to_le_bytes());
                s.write_all(&reply).unwrap();
            }
        });
        (dir, seen)
    }

    fn connected(dir: &tempfile::TempDir) -> VhostUserDevice {
        let mut dev = VhostUserDevice::connect(
            &dir.path().join("b.sock"),
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .unwrap();
        dev.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        dev.set_features(VHOST_USER_F_PROTOCOL_FEATURES | 1 << 32)
            .unwrap();
        dev
    }

    #[test]
    fn a_pipeline_sends_its_requests_without_acks_and_waits_at_most_once() {
        let (dir, seen) = wire_backend(None);
        let mut dev = connected(&dir);
        seen.lock().unwrap().clear();
        dev.set_vring_num(0, 256).unwrap();
        pipelined(&mut dev, Await::Applied, |d| {
            d.set_vring_num(0, 128)?;
            d.set_vring_base(0, 7)?;
            d.set_vring_enable(0, true)
        })
        .unwrap();
        dev.set_vring_base(0, 9).unwrap();
        pipelined(&mut dev, Await::Sent, |d| d.set_vring_enable(0, false)).unwrap();
        dev.set_vring_num(0, 64).unwrap();
        let seen = seen.lock().unwrap().clone();
        let acked = |(code, flags): (u32, u32)| (code, flags & NEED_REPLY != 0);
        assert_eq!(
            seen.into_iter().map(acked).collect::<Vec<_>>(),
            [
                (SET_VRING_NUM, true),
                (SET_VRING_NUM, false),
                (SET_VRING_BASE, false),
                (SET_VRING_ENABLE, false),
                (GET_FEATURES, true),
                (SET_VRING_BASE, true),
                (SET_VRING_ENABLE, false),
                (SET_VRING_NUM, true),
            ],
            "acks are off inside a pipeline only; one reply ends it when it must be applied, \
             none when sent is enough"
        );
    }

    #[test]
    fn a_request_refused_inside_a_pipeline_fails_its_end() {
        let (dir, seen) = wire_backend(Some(SET_VRING_BASE));
        let mut dev = connected(&dir);
        let res = pipelined(&mut dev, Await::Applied, |d| {
            d.set_vring_num(0, 128)?;
            d.set_vring_base(0, 7)
        });
        assert!(res.is_err(), "the closed connection shows at the end");
        assert!(seen.lock().unwrap().contains(&(SET_VRING_BASE, VERSION)));
        assert!(dev.set_vring_num(0, 64).is_err(), "the connection is gone");
    }
}
