//! `SET_VRING_ENABLE` sent before `SET_FEATURES`, which the vhost crate refuses.
//!
//! QEMU (10, virtio-net) sends `SET_VRING_ENABLE` as soon as the backend *offers*
//! `VHOST_USER_F_PROTOCOL_FEATURES`, before any `SET_FEATURES` (it disables the queue pairs the
//! guest does not use yet). The spec allows it. The vhost 0.18 crate's `BackendReqHandler` checks
//! the bit against the features *acked* with `SET_FEATURES` and fails the request with
//! `InactiveFeature` without answering, which would end the VMM connection. The handler's state is
//! private, so svqd looks at each message before the handler reads it (`MSG_PEEK` on the VMM
//! socket) and answers such a `SET_VRING_ENABLE` itself.
//!
//! The backend side has the same gap (the crate's `Frontend` refuses `SET_VRING_ENABLE` until
//! svqd forwarded `SET_FEATURES`, and a spec-conforming backend starts its rings disabled once
//! PROTOCOL_FEATURES is acked): the state is recorded for the queue and forwarded right after the
//! `SET_FEATURES` that makes it legal, i.e. still before any ring is started.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserU64,
};
use vhost::vhost_user::{Error as VhostError, VhostUserBackendReqHandlerMut};
use vm_memory::ByteValued;

use crate::features::{self, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::session::Session;

/// Size of a vhost-user message header.
const HDR_LEN: usize = 12;
/// Header plus a u64 or a `VhostUserVringState` body.
const MSG8_LEN: usize = HDR_LEN + 8;
/// Header flags: version 1, the only one defined.
const VERSION_MASK: u32 = 0x3;

/// What the vhost crate's handler knows about one VMM connection (mirrored from the messages it
/// reads), plus the enable states svqd still owes the backend.
#[derive(Default)]
pub struct EarlyEnable {
    /// Virtio features the handler saw offered (its `GET_FEATURES` answer).
    offered: u64,
    /// Value of the last `SET_FEATURES` the handler read (it records it even when refused).
    acked: u64,
    /// Value of the last `SET_PROTOCOL_FEATURES` the handler read.
    acked_protocol: u64,
    /// Queues whose enable state was recorded while the backend could not take it.
    pending: Vec<usize>,
    /// Code of the message the handler is about to read (from [`EarlyEnable::intercept`]).
    next: Option<u32>,
}

/// Header fields of a peeked message.
struct Peeked {
    code: u32,
    flags: u32,
    size: u32,
    body: Option<u64>,
}

impl EarlyEnable {
    /// Look at the next message on `vmm`. If it is a `SET_VRING_ENABLE` the vhost crate would
    /// refuse only for want of `SET_FEATURES`, consume and answer it here and return the result
    /// (an error means the request was refused; `state.refusable` says whether it was nacked).
    /// Otherwise return `None`: the caller passes the message to the handler, then calls
    /// [`EarlyEnable::after_request`].
    pub fn intercept(
        &mut self,
        vmm: &UnixStream,
        state: &mut Session,
    ) -> Option<Result<(), VhostError>> {
        self.next = None;
        let p = peek(vmm)?;
        self.next = Some(p.code);
        match p.code {
            c if c == FrontendReq::SET_FEATURES as u32 => {
                if let Some(v) = p.body {
                    self.acked = v;
                }
                None
            }
            c if c == FrontendReq::SET_PROTOCOL_FEATURES as u32 => {
                if let Some(v) = p.body {
                    self.acked_protocol = v;
                }
                None
            }
            c if c == FrontendReq::SET_VRING_ENABLE as u32 => {
                let well_formed = p.flags & VERSION_MASK == 1
                    && p.flags & VhostUserHeaderFlag::REPLY.bits() == 0
                    && p.size == 8
                    && p.body.is_some();
                if !well_formed
                    || self.offered & VHOST_USER_F_PROTOCOL_FEATURES == 0
                    || self.acked & VHOST_USER_F_PROTOCOL_FEATURES != 0
                {
                    // Malformed (the handler rejects it the same way), or the handler takes it.
                    return None;
                }
                Some(self.serve_enable(vmm, state, &p))
            }
            _ => None,
        }
    }

    /// Bookkeeping after the handler served a message: learn what it offered, and forward the
    /// recorded enable states once the backend accepts them.
    pub fn after_request(&mut self, state: &mut Session) {
        if self.next.take() == Some(FrontendReq::GET_FEATURES as u32) {
            if let Some(dev) = state.device.as_ref() {
                self.offered = features::vmm_virtio_features(dev.features());
            }
        }
        self.flush(state);
    }

    fn serve_enable(
        &mut self,
        vmm: &UnixStream,
        state: &mut Session,
        p: &Peeked,
    ) -> Result<(), VhostError> {
        let mut msg = [0u8; MSG8_LEN];
        let mut sock = vmm;
        if let Err(e) = sock.read_exact(&mut msg) {
            return Err(VhostError::SocketError(e));
        }
        let body = p.body.unwrap_or_default();
        let (index, num) = (body as u32, (body >> 32) as u32);
        tracing::debug!(index, num, "SET_VRING_ENABLE before SET_FEATURES");
        let enable = match num {
            0 => false,
            1 => true,
            // As the vhost crate: a malformed request, not answered.
            _ => return Err(VhostError::InvalidParam),
        };
        state.refusable = true;
        let res = self.apply(state, index, enable);
        let reply_ack = self.offered & VHOST_USER_F_PROTOCOL_FEATURES != 0
            && self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        if reply_ack && p.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0 {
            // The wire format of the vhost crate's ack: a REPLY header and a u64, 0 = success.
            // (The crate keeps its header type private.)
            let mut out = [0u8; MSG8_LEN];
            out[0..4].copy_from_slice(&(FrontendReq::SET_VRING_ENABLE as u32).to_le_bytes());
            out[4..8].copy_from_slice(&(VhostUserHeaderFlag::REPLY.bits() | 1).to_le_bytes());
            out[8..12].copy_from_slice(&8u32.to_le_bytes());
            out[HDR_LEN..].copy_from_slice(VhostUserU64::new(u64::from(res.is_err())).as_slice());
            if let Err(e) = sock.write_all(&out) {
                return Err(VhostError::SocketError(e));
            }
        }
        res
    }

    fn apply(&mut self, state: &mut Session, index: u32, enable: bool) -> Result<(), VhostError> {
        let q = match state.check_queue(index) {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(error = %e, "request refused");
                return Err(e.into());
            }
        };
        if state.device_has_enable() || state.queues[q].mode.is_shadow() {
            // The usual path: svqd's handler is happy with it, only the vhost crate's check was
            // in the way.
            return VhostUserBackendReqHandlerMut::set_vring_enable(state, index, enable);
        }
        state.queues[q].vmm.enabled = enable;
        if !self.pending.contains(&q) {
            self.pending.push(q);
        }
        state.reconcile().map_err(Into::into)
    }

    /// Forward the recorded enable states once the backend has PROTOCOL_FEATURES.
    fn flush(&mut self, state: &mut Session) {
        if self.pending.is_empty() || !state.device_has_enable() {
            return;
        }
        for q in std::mem::take(&mut self.pending) {
            let Some(slot) = state.queues.get(q) else {
                continue;
            };
            if slot.mode.is_shadow() {
                // The worker already applies the VMM's enable state to the guest ring.
                continue;
            }
            let enable = slot.vmm.enabled;
            if let Some(dev) = state.device.as_deref_mut() {
                if let Err(e) = dev.set_vring_enable(q, enable) {
                    tracing::error!(queue = q, enable, error = %e, "forwarding an early SET_VRING_ENABLE failed");
                }
            }
        }
    }
}

/// Peek at the next message's header (and its 8-byte body for the requests that have one and
/// matter here), without consuming anything: the vhost crate's handler reads it afterwards,
/// attached fds included. `None` when no full header is there (the handler reports it).
fn peek(vmm: &UnixStream) -> Option<Peeked> {
    let mut buf = [0u8; MSG8_LEN];
    let n = recv_peek(vmm, &mut buf[..HDR_LEN])?;
    if n < HDR_LEN {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes(buf[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    let (code, flags, size) = (word(0), word(1), word(2));
    let wants_body = code == FrontendReq::SET_FEATURES as u32
        || code == FrontendReq::SET_PROTOCOL_FEATURES as u32
        || code == FrontendReq::SET_VRING_ENABLE as u32;
    let mut body = None;
    if wants_body && size == 8 && recv_peek(vmm, &mut buf)? == MSG8_LEN {
        body = Some(u64::from_le_bytes(
            buf[HDR_LEN..].try_into().expect("8 bytes"),
        ));
    }
    Some(Peeked {
        code,
        flags,
        size,
        body,
    })
}

/// `recv(MSG_PEEK | MSG_WAITALL)`: waits for `buf.len()` bytes (the VMM sends a message in one
/// piece; the handler would block on a partial one just the same). Returns fewer at EOF, `None` on
/// error or when fds are attached (MSG_CTRUNC: such a message is the handler's to reject).
fn recv_peek(vmm: &UnixStream, buf: &mut [u8]) -> Option<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no control buffer).
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    loop {
        // SAFETY: `mh` points to one iovec over `buf`, valid for the call. Without a control
        // buffer no fd is installed; MSG_PEEK leaves the message and its fds queued.
        let n =
            unsafe { libc::recvmsg(vmm.as_raw_fd(), &mut mh, libc::MSG_PEEK | libc::MSG_WAITALL) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        if mh.msg_flags & libc::MSG_CTRUNC != 0 {
            return None;
        }
        return Some(n as usize);
    }
}
