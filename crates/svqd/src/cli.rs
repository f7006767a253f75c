//! The command lines of `svqd` and `svqctl` (clap definitions), in the library so that the
//! binaries, the man pages and the shell completions (packaging/gen-assets) share one source.

#![allow(missing_docs)] // clap's doc comments are the documentation

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// vhost-user proxy that makes backends without dirty logging live-migratable.
///
/// svqd listens on --socket for the VMM and drives the device at --backend (a vhost-user
/// backend, or a vhost-vdpa device). Queues run in
/// passthrough (no data-path overhead) until the VMM starts dirty logging for a migration (or
/// `svqctl set-shadow on`); then they run through a shadow virtqueue that logs every page the
/// backend writes.
#[derive(Debug, Parser)]
#[command(name = "svqd", version)]
pub struct Cli {
    /// vhost-user socket to create for the VMM (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The device: a vhost-user backend's socket (retried for a few seconds while it starts),
    /// or vdpa:/dev/vhost-vdpa-N for a vhost-vdpa device (opened at start; a missing or busy
    /// device is an error).
    #[arg(long, value_name = "PATH|vdpa:DEV")]
    pub backend: PathBuf,
    /// Control socket for svqctl (QMP-style JSON lines, mode 0600).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// When to use the shadow virtqueue.
    #[arg(long, value_enum, default_value_t = Policy::Auto)]
    pub shadow: Policy,
    /// Seconds to retry connecting to the backend.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub backend_timeout: f64,
    /// Seconds a request to the backend may wait for its reply before the backend is considered
    /// hung and disconnected (0: wait forever).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub backend_request_timeout: f64,
    /// Seconds a mode switch may wait for the backend to complete requests in flight.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Microseconds a shadow worker keeps polling the rings after work before it sleeps (0:
    /// never), only while no other thread wants its CPU. Polling trades CPU for fewer wake-ups
    /// under load; query-stats shows its cost.
    #[arg(long, value_name = "US", default_value_t = crate::config::DEFAULT_POLL_US as u32)]
    pub poll_us: u32,
    /// CPUs for the shadow data path, e.g. 0 or 2-3,6: one worker thread pinned to each, queue
    /// q served on the (q mod n)-th. Default: one unpinned thread serves all shadowed queues.
    #[arg(long, value_name = "LIST")]
    pub worker_cpus: Option<String>,
    /// Shadow ring size (power of two); default: the guest's queue size.
    #[arg(long, value_name = "N")]
    pub shadow_size: Option<u16>,
    /// While traffic flows, microseconds a shadow worker sleeps with notifications off between
    /// work phases so that a wake moves a ring rather than a burst (0: re-arm notifications
    /// after every phase). Only while other threads want its CPU; on a CPU of its own it goes
    /// straight on. Bounds the latency it adds under load. Shorter is not faster on shared
    /// CPUs: each wake has a fixed cost, and a shorter wait moves fewer chains per wake
    /// (docs/PERFORMANCE.md, tables 22 and 37).
    #[arg(long, value_name = "N", default_value_t = crate::config::DEFAULT_BATCH_WAIT_US)]
    pub batch_wait_us: u64,
    /// Serve Prometheus metrics over HTTP at ADDR (e.g. 127.0.0.1:9710; GET /metrics).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Test only: never write the dirty log (makes migrations lose pages; the negative control).
    #[arg(long = "x-test-no-log", hide = true)]
    pub no_log: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for journald/Loki/Elasticsearch shippers).
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Policy {
    /// Every running queue is shadowed.
    Always,
    /// Shadow while the VMM logs dirty pages (migration) or when forced by svqctl.
    Auto,
    /// Pure passthrough; dirty logging requests are refused.
    Never,
}

#[derive(Parser)]
#[command(name = "svqctl", version, about = "Control a running svqd")]
pub struct SvqctlCli {
    /// svqd's control socket (svqd --control PATH).
    #[arg(long, short = 'c')]
    pub control: PathBuf,
    /// Print the control API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Mode of every queue, negotiated features, backend, logging.
    #[command(alias = "query-status")]
    Status,
    /// Per-queue counters: descriptors, bytes, kicks, calls, dirty pages, mode switches.
    #[command(alias = "query-stats")]
    Stats,
    /// Force shadow mode on, or off (back to automatic: shadow only while the VMM logs).
    SetShadow {
        /// on or off
        state: OnOff,
    },
    /// Status and counters, refreshed every second until interrupted.
    Watch {
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Prometheus exposition (for node-exporter's textfile collector).
    Metrics,
    /// Send any command: NAME with optional JSON arguments.
    Execute {
        /// Command name, e.g. query-status.
        name: String,
        /// Arguments as a JSON object.
        arguments: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}
