//! `svqd`: the vhost-user proxy daemon. See the library documentation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use svqd::{Proxy, ProxyConfig, ShadowPolicy};

/// vhost-user proxy that makes backends without dirty logging live-migratable.
///
/// svqd listens on --socket for the VMM and connects to the backend at --backend. Queues run in
/// passthrough (no data-path overhead) until the VMM starts dirty logging for a migration (or
/// `svqctl set-shadow on`); then they run through a shadow virtqueue that logs every page the
/// backend writes.
#[derive(Debug, Parser)]
#[command(name = "svqd", version)]
struct Cli {
    /// vhost-user socket to create for the VMM (mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// vhost-user socket of the backend (retried for a few seconds while it starts).
    #[arg(long, value_name = "PATH")]
    backend: PathBuf,
    /// Control socket for svqctl (QMP-style JSON lines, mode 0600).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// When to use the shadow virtqueue.
    #[arg(long, value_enum, default_value_t = Policy::Auto)]
    shadow: Policy,
    /// Seconds to retry connecting to the backend.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    backend_timeout: f64,
    /// Seconds a mode switch may wait for the backend to complete requests in flight.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    drain_timeout: f64,
    /// Shadow ring size (power of two); default: the guest's queue size.
    #[arg(long, value_name = "N")]
    shadow_size: Option<u16>,
    /// Microseconds a shadow worker keeps polling its rings after the last work before it sleeps
    /// (0: never poll; sleep on notifications at once). Polling saves wake-ups under load at the
    /// price of CPU time (shown as poll_us and worker_cpu_us in query-stats).
    #[arg(long, value_name = "N", default_value_t = svqd::config::DEFAULT_POLL_US)]
    poll_us: u64,
    /// While traffic flows, microseconds a shadow worker sleeps with notifications off between
    /// work phases so that a wake moves a ring rather than a burst (0: re-arm notifications
    /// after every phase). Bounds the latency it adds under load.
    #[arg(long, value_name = "N", default_value_t = svqd::config::DEFAULT_BATCH_WAIT_US)]
    batch_wait_us: u64,
    /// CPUs the shadow workers may run on, as in `taskset -c` (e.g. `1` or `0,2-3`).
    #[arg(long, value_name = "LIST")]
    worker_cpus: Option<String>,
    /// Test only: never write the dirty log (makes migrations lose pages; the negative control).
    #[arg(long = "x-test-no-log", hide = true)]
    no_log: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Policy {
    /// Every running queue is shadowed.
    Always,
    /// Shadow while the VMM logs dirty pages (migration) or when forced by svqctl.
    Auto,
    /// Pure passthrough; dirty logging requests are refused.
    Never,
}

static SHUTDOWN_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SHUTDOWN_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is 8 valid bytes.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

fn install_signals(fd: i32) {
    SHUTDOWN_FD.store(fd, Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // A VMM or backend vanishing mid-write must be an error return, not a dead daemon.
    // SAFETY: ignoring SIGPIPE is always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

fn secs(v: f64, what: &str) -> Result<Duration, String> {
    if v.is_finite() && (0.0..=3600.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "--{what} must be between 0 and 3600 seconds, not {v}"
        ))
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it for pid 0 (us).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let mut cfg = ProxyConfig::new(&cli.socket, &cli.backend);
    cfg.shadow = match cli.shadow {
        Policy::Always => ShadowPolicy::Always,
        Policy::Auto => ShadowPolicy::Auto,
        Policy::Never => ShadowPolicy::Never,
    };
    cfg.backend_connect_timeout = secs(cli.backend_timeout, "backend-timeout")?;
    cfg.drain_timeout = secs(cli.drain_timeout, "drain-timeout")?;
    if let Some(n) = cli.shadow_size {
        if n == 0 || !n.is_power_of_two() {
            return Err(format!("--shadow-size must be a power of two, not {n}"));
        }
        cfg.shadow_size = n;
    }
    if cli.poll_us > svqd::config::MAX_POLL_US {
        return Err(format!(
            "--poll-us must be at most {}, not {}",
            svqd::config::MAX_POLL_US,
            cli.poll_us
        ));
    }
    cfg.poll = Duration::from_micros(cli.poll_us);
    if cli.batch_wait_us > svqd::config::MAX_POLL_US {
        return Err(format!(
            "--batch-wait-us must be at most {}, not {}",
            svqd::config::MAX_POLL_US,
            cli.batch_wait_us
        ));
    }
    cfg.batch_wait = Duration::from_micros(cli.batch_wait_us);
    if let Some(list) = &cli.worker_cpus {
        let cpus = svqd::config::parse_cpu_list(list).map_err(|e| format!("--worker-cpus: {e}"))?;
        let allowed = allowed_cpus();
        if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(format!(
                "--worker-cpus: CPU {c} is not available to svqd (allowed: {allowed:?})"
            ));
        }
        cfg.worker_cpus = cpus;
    }
    if cli.no_log {
        tracing::warn!("--x-test-no-log: the dirty log is NOT written; migrations will lose pages");
        cfg.log_enabled = false;
    }
    if cli.control.as_deref() == Some(cli.socket.as_path()) {
        return Err("--control and --socket must be different paths".into());
    }
    let proxy = Proxy::new(cfg).map_err(|e| e.to_string())?;
    install_signals(proxy.shutdown_handle().raw_fd());
    let _control = match &cli.control {
        Some(path) => Some(
            svqd::control::serve(path, proxy.control())
                .map_err(|e| format!("control socket {}: {e}", path.display()))?,
        ),
        None => None,
    };
    proxy.run().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svqd: {e}");
            ExitCode::FAILURE
        }
    }
}
