//! Configuration of one proxy instance.

use std::path::PathBuf;
use std::time::Duration;

/// When queues run through the shadow virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShadowPolicy {
    /// Always shadow (every started queue).
    Always,
    /// Shadow while the VMM logs dirty pages (VHOST_F_LOG_ALL) or when forced by the control
    /// socket; passthrough otherwise.
    #[default]
    Auto,
    /// Never shadow: a pure passthrough proxy. The VMM still sees LOG_ALL offered, but an attempt
    /// to turn dirty logging on is refused, so a migration fails loudly instead of silently
    /// missing the backend's writes.
    Never,
}

impl ShadowPolicy {
    /// Name as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowPolicy::Always => "always",
            ShadowPolicy::Auto => "auto",
            ShadowPolicy::Never => "never",
        }
    }
}

/// Configuration of a [`crate::Proxy`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// vhost-user socket svqd listens on for the VMM.
    pub socket: PathBuf,
    /// vhost-user socket of the real backend.
    pub backend: PathBuf,
    /// Shadow policy.
    pub shadow: ShadowPolicy,
    /// Write the VMM's dirty log. Only the negative-control test turns this off (hidden flag).
    pub log_enabled: bool,
    /// How long to retry connecting to the backend.
    pub backend_connect_timeout: Duration,
    /// How long a request to the backend may wait for its reply (zero: no limit). A backend that
    /// does not answer in time is disconnected and the VMM's request fails.
    pub backend_request_timeout: Duration,
    /// How long a mode switch may wait for the backend to complete requests in flight.
    pub drain_timeout: Duration,
    /// How long a shadow worker polls the rings after work before it sleeps (zero: never).
    pub poll: Duration,
    /// CPUs the shadow workers run on (empty: any).
    pub worker_cpus: Vec<usize>,
    /// Shadow ring size; 0 = the guest's queue size.
    pub shadow_size: u16,
    /// Add shadow rings with ADD_MEM_REG when the backend has CONFIGURE_MEM_SLOTS. Off: always
    /// re-send the whole table with SET_MEM_TABLE (what a backend without the feature gets;
    /// tests use this to cover both paths with one backend).
    pub backend_mem_slots: bool,
}

impl ProxyConfig {
    /// A configuration with the defaults for everything but the two sockets.
    pub fn new(socket: impl Into<PathBuf>, backend: impl Into<PathBuf>) -> Self {
        ProxyConfig {
            socket: socket.into(),
            backend: backend.into(),
            shadow: ShadowPolicy::Auto,
            log_enabled: true,
            backend_connect_timeout: Duration::from_secs(5),
            backend_request_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            poll: Duration::ZERO,
            worker_cpus: Vec::new(),
            shadow_size: 0,
            backend_mem_slots: true,
        }
    }
}
