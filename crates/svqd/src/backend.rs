//! The connection to the real vhost-user backend (svqd is its frontend).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::error::ProxyError;
use crate::features::VHOST_USER_F_PROTOCOL_FEATURES;

/// Queue count assumed when the backend has no MQ protocol feature (then the VMM alone decides how
/// many queues it uses; indices above this are refused).
pub const DEFAULT_MAX_QUEUES: usize = 8;

/// Largest queue index the vhost-user fd messages can carry (bits 0..7).
pub const MAX_QUEUES: usize = 256;

/// A connected backend and what it offered.
pub struct BackendConn {
    /// The vhost crate's frontend endpoint. Cloneable: its inner state is behind a mutex.
    pub fe: Frontend,
    /// Virtio features the backend offers.
    pub features: u64,
    /// Protocol features the backend offers.
    pub protocol: VhostUserProtocolFeatures,
    /// Protocol features svqd acked to the backend (after SET_PROTOCOL_FEATURES).
    pub acked_protocol: VhostUserProtocolFeatures,
    /// Queues the backend has (GET_QUEUE_NUM) or [`DEFAULT_MAX_QUEUES`].
    pub num_queues: usize,
    /// GET_MAX_MEM_SLOTS when CONFIGURE_MEM_SLOTS is acked.
    pub max_mem_slots: Option<u64>,
    /// Features last forwarded with SET_FEATURES.
    pub last_features: Option<u64>,
    stream: UnixStream,
}

impl BackendConn {
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
        Ok(BackendConn {
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

    /// Ack `features` to the backend and learn what depends on them (queue count, memory slots).
    pub fn set_protocol_features(
        &mut self,
        features: VhostUserProtocolFeatures,
    ) -> Result<(), ProxyError> {
        self.fe
            .set_protocol_features(features)
            .map_err(|e| ProxyError::Backend("SET_PROTOCOL_FEATURES", e))?;
        self.acked_protocol = features;
        if features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request then gets an explicit ack, so a refusal shows up where it happens
            // instead of as a dropped connection later.
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if features.contains(VhostUserProtocolFeatures::MQ) {
            let n = self
                .fe
                .get_queue_num()
                .map_err(|e| ProxyError::Backend("GET_QUEUE_NUM", e))?;
            self.num_queues = (n as usize).clamp(1, MAX_QUEUES);
        }
        if features.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let n = self
                .fe
                .get_max_mem_slots()
                .map_err(|e| ProxyError::Backend("GET_MAX_MEM_SLOTS", e))?;
            self.max_mem_slots = Some(n);
        }
        Ok(())
    }

    /// Whether memory regions can be added one by one (ADD_MEM_REG / REM_MEM_REG).
    pub fn mem_slots(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    }

    /// Whether SET_VRING_ENABLE may be sent.
    pub fn has_enable(&self) -> bool {
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
    pub fn ignores_disable(&self) -> bool {
        const LIBVHOST_USER: VhostUserProtocolFeatures = VhostUserProtocolFeatures::LOG_SHMFD
            .union(VhostUserProtocolFeatures::BACKEND_REQ)
            .union(VhostUserProtocolFeatures::HOST_NOTIFIER)
            .union(VhostUserProtocolFeatures::BACKEND_SEND_FD)
            .union(VhostUserProtocolFeatures::REPLY_ACK);
        !self.has_enable() || self.protocol.contains(LIBVHOST_USER)
    }

    /// Start stopped ring `q` with kick fd `kick`, kicked once (the backend scans the ring).
    ///
    /// When to kick depends on the backend. libvhost-user (and anything else that ignores
    /// `SET_VRING_ENABLE 0`): before handing the fd over, as always. vhost-user-backend up to
    /// 0.20 watches a new kick fd *before* it marks the queue ready, so a kick already pending
    /// can be handled on a queue that is not ready yet; the device's pop fails and the daemon's
    /// epoll thread ends for good (measured with vhost-device-rng: the ring never moves again).
    /// So for these backends the fd is handed over empty, a request with a reply (GET_FEATURES)
    /// waits until the backend applied it, and only then is it kicked.
    pub fn hand_over_kick(&mut self, q: usize, kick: &EventFd) -> Result<(), ProxyError> {
        let early = self.ignores_disable();
        if early {
            let _ = kick.write(1);
        }
        self.fe
            .set_vring_kick(q, kick)
            .map_err(|e| ProxyError::Backend("SET_VRING_KICK", e))?;
        if !early {
            self.fe
                .get_features()
                .map_err(|e| ProxyError::Backend("GET_FEATURES", e))?;
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// Raw fd of the connection (to watch for hang-up).
    pub fn raw_fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// Whether the backend closed the connection (checked without consuming anything).
    pub fn hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Close the connection (the backend resets its state on disconnect).
    pub fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
