//! Configuration of one proxy instance.

use std::path::{Path, PathBuf};
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
    /// The real device: a vhost-user socket, or `vdpa:PATH` for a vhost-vdpa device node (see
    /// [`ProxyConfig::backend_target`]).
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
    /// Shadow ring size; 0 = the guest's queue size.
    pub shadow_size: u16,
    /// Add shadow rings with ADD_MEM_REG when the backend has CONFIGURE_MEM_SLOTS. Off: always
    /// re-send the whole table with SET_MEM_TABLE (what a backend without the feature gets;
    /// tests use this to cover both paths with one backend).
    pub backend_mem_slots: bool,
    /// How long a shadow worker keeps polling its rings after the last work before it re-arms
    /// notifications and sleeps; zero: never poll (sleep as soon as the rings are empty).
    pub poll: Duration,
    /// While traffic flows, how long a shadow worker sleeps with notifications off between
    /// work phases, letting a ring's worth of buffers accumulate (zero: re-arm notifications
    /// after every phase).
    pub batch_wait: Duration,
    /// One shadow worker thread pinned to each of these CPUs (sched_setaffinity), queue `q` served
    /// by the `q mod n`-th; empty: one thread, wherever the scheduler likes.
    pub worker_cpus: Vec<usize>,
}

/// Default of [`ProxyConfig::poll`]. The pacer polls only while the worker has its CPU to itself
/// (where busy peers want it, a poll phase only takes CPU from them: DESIGN.md, "The shadow data
/// path"); there, 50 µs measured 0.946 of direct against 0.708 without (docs/PERFORMANCE.md,
/// tables 15 and 17), and the contended layout did not change.
pub const DEFAULT_POLL: Duration = Duration::from_micros(DEFAULT_POLL_US);
/// [`DEFAULT_POLL`] in microseconds (the `--poll-us` default).
pub const DEFAULT_POLL_US: u64 = 50;
/// Default of `--batch-wait-us` ([`ProxyConfig::batch_wait`]), by measurement: 25 µs was the
/// best of 0/25/50/100/300; a finer sweep in the contended layout (docs/PERFORMANCE.md, table
/// 22) put 21 µs at 0.34–0.35 of direct against 0.29–0.30 for 25 µs, with 15 µs at 0.25 (each
/// wake then moves too few chains for its fixed cost of ~7 µs of CPU). On the nested-PVM
/// machine of table 37 the fixed cost is 12–17 µs and 15 µs falls to half of 21 µs's rate.
pub const DEFAULT_BATCH_WAIT_US: u64 = 21;
/// Longest `--poll-us`: a worker polling longer would hold a CPU for nothing.
pub const MAX_POLL_US: u64 = 100_000;

/// How svqd reaches the device named by [`ProxyConfig::backend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTarget<'a> {
    /// A vhost-user backend listening on this socket.
    VhostUser(&'a Path),
    /// A vhost-vdpa device node (`/dev/vhost-vdpa-N`).
    Vdpa(&'a Path),
}

/// Prefix of [`ProxyConfig::backend`] that names a vhost-vdpa device.
pub const VDPA_PREFIX: &str = "vdpa:";

impl ProxyConfig {
    /// The device to drive: `vdpa:PATH` is a vhost-vdpa device node, anything else a vhost-user
    /// socket (a socket whose name starts with `vdpa:` is written `./vdpa:...`).
    pub fn backend_target(&self) -> BackendTarget<'_> {
        match self
            .backend
            .to_str()
            .and_then(|s| s.strip_prefix(VDPA_PREFIX))
        {
            Some(dev) => BackendTarget::Vdpa(Path::new(dev)),
            None => BackendTarget::VhostUser(&self.backend),
        }
    }

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
            shadow_size: 0,
            backend_mem_slots: true,
            poll: DEFAULT_POLL,
            batch_wait: Duration::from_micros(DEFAULT_BATCH_WAIT_US),
            worker_cpus: Vec::new(),
        }
    }
}
