//! Errors of the proxy.

use std::io;

/// Everything that can go wrong in svqd.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The VMM sent something invalid; the message is refused, the daemon carries on.
    #[error("bad request from the VMM: {0}")]
    BadRequest(String),
    /// A message about a queue the device does not have.
    #[error("queue index {index} out of range (device has {queues} queues)")]
    BadQueue {
        /// The index the VMM sent.
        index: u32,
        /// Queues the backend has.
        queues: usize,
    },
    /// The backend refused a request or the connection to it broke.
    #[error("backend: {0}: {1}")]
    Backend(&'static str, vhost::Error),
    /// The backend did not answer a request in time; its connection was closed.
    #[error("backend did not answer {what} within {after:?}; connection closed")]
    BackendTimeout {
        /// The request.
        what: &'static str,
        /// The time it had.
        after: std::time::Duration,
    },
    /// The backend is not reachable.
    #[error("cannot connect to backend {path}: {source}")]
    BackendConnect {
        /// Backend socket path.
        path: String,
        /// Last connect error.
        source: io::Error,
    },
    /// The VMM socket cannot be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// A mode switch failed.
    #[error("mode switch of queue {queue}: {reason}")]
    Switch {
        /// Queue index.
        queue: usize,
        /// What went wrong.
        reason: String,
    },
    /// The shadow engine refused a queue.
    #[error("shadow engine: {0}")]
    Engine(String),
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(&'static str, io::Error),
    /// The vhost-vdpa device refused a request, or cannot be opened.
    #[error("vDPA device: {0}")]
    Vdpa(#[from] crate::backend::vdpa::VdpaError),
    /// A request that the current configuration does not allow.
    #[error("{0}")]
    NotAllowed(String),
}

impl ProxyError {
    /// Whether the error means the backend connection is gone (and the VMM must be disconnected).
    pub fn backend_gone(&self) -> bool {
        use vhost::vhost_user::Error as E;
        match self {
            ProxyError::BackendTimeout { .. } => true,
            ProxyError::Backend(_, vhost::Error::VhostUserProtocol(e)) => matches!(
                e,
                E::SocketBroken(_) | E::SocketError(_) | E::Disconnected | E::PartialMessage
            ),
            _ => false,
        }
    }
}

impl From<ProxyError> for vhost::vhost_user::Error {
    fn from(e: ProxyError) -> Self {
        match e {
            ProxyError::Backend(_, vhost::Error::VhostUserProtocol(inner)) => inner,
            ProxyError::BadQueue { .. } | ProxyError::BadRequest(_) => {
                vhost::vhost_user::Error::InvalidParam
            }
            other => vhost::vhost_user::Error::ReqHandlerError(io::Error::other(other.to_string())),
        }
    }
}
