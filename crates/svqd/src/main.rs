//! `svqd`: the vhost-user proxy daemon. See the library documentation.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::Parser;
use svqd::cli::{Cli, LogFormat, Policy};
use svqd::{Proxy, ProxyConfig, ShadowPolicy};

static SHUTDOWN_FD: AtomicI32 = AtomicI32::new(-1);
static DEADLINE_FD: AtomicI32 = AtomicI32::new(-1);

/// How long svqd may take to stop after SIGTERM/SIGINT before it exits regardless (a peer that
/// does not answer must not keep it alive).
const STOP_GRACE: Duration = Duration::from_millis(500);

extern "C" fn on_signal(_sig: libc::c_int) {
    for fd in [&SHUTDOWN_FD, &DEADLINE_FD] {
        let fd = fd.load(Ordering::Relaxed);
        if fd >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; the buffer is 8 valid bytes.
            unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

/// After a stop signal, give the orderly shutdown [`STOP_GRACE`], then exit: the proxy thread
/// may be blocked on a peer (a VMM that sent half a message, a backend mid-request).
fn arm_stop_deadline(sockets: Vec<PathBuf>) -> std::io::Result<()> {
    let evt = vmm_sys_util::eventfd::EventFd::new(0)?;
    DEADLINE_FD.store(evt.as_raw_fd(), Ordering::Relaxed);
    std::thread::Builder::new()
        .name("svqd-stop-deadline".into())
        .spawn(move || {
            if evt.read().is_ok() {
                std::thread::sleep(STOP_GRACE);
                tracing::warn!(
                    "svqd did not stop within {STOP_GRACE:?} (a peer is not answering); exiting"
                );
                for s in &sockets {
                    let _ = std::fs::remove_file(s);
                }
                std::process::exit(0);
            }
        })?;
    Ok(())
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

/// `0`, `2-3,6`: a CPU list as taskset and cgroups write it.
fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("--worker-cpus {list:?}: expected CPUs like 0 or 2-3,6");
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
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
    cfg.backend_request_timeout = secs(cli.backend_request_timeout, "backend-request-timeout")?;
    if cli.poll_us > 1_000_000 {
        return Err(format!("--poll-us is at most 1000000, not {}", cli.poll_us));
    }
    cfg.poll = Duration::from_micros(cli.poll_us.into());
    if let Some(list) = &cli.worker_cpus {
        cfg.worker_cpus = parse_cpu_list(list)?;
    }
    if cli.batch_wait_us > svqd::config::MAX_POLL_US {
        return Err(format!(
            "--batch-wait-us must be at most {}, not {}",
            svqd::config::MAX_POLL_US,
            cli.batch_wait_us
        ));
    }
    cfg.batch_wait = Duration::from_micros(cli.batch_wait_us);
    if let Some(n) = cli.shadow_size {
        if n == 0 || !n.is_power_of_two() {
            return Err(format!("--shadow-size must be a power of two, not {n}"));
        }
        cfg.shadow_size = n;
    }
    if cli.no_log {
        tracing::warn!("--x-test-no-log: the dirty log is NOT written; migrations will lose pages");
        cfg.log_enabled = false;
    }
    if cli.control.as_deref() == Some(cli.socket.as_path()) {
        return Err("--control and --socket must be different paths".into());
    }
    let proxy = Proxy::new(cfg).map_err(|e| e.to_string())?;
    let sockets = std::iter::once(cli.socket.clone())
        .chain(cli.control.clone())
        .collect();
    arm_stop_deadline(sockets).map_err(|e| format!("cannot arm the stop deadline: {e}"))?;
    install_signals(proxy.shutdown_handle().raw_fd());
    let _control = match &cli.control {
        Some(path) => Some(
            svqd::control::serve(path, proxy.control())
                .map_err(|e| format!("control socket {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let _metrics = match &cli.metrics {
        Some(addr) => Some(
            svqd::metrics::serve(addr, proxy.control())
                .map_err(|e| format!("metrics endpoint {addr}: {e}"))?,
        ),
        None => None,
    };
    // The VMM socket (and the control socket) listen: a VMM started after us can connect.
    // Under systemd's Type=notify this releases the units ordered after svqd (QEMU, libvirt).
    notify(&[sd_notify::NotifyState::Ready]);
    let res = proxy.run().map_err(|e| e.to_string());
    notify(&[sd_notify::NotifyState::Stopping]);
    res
}

/// Tell systemd (if it started us with NOTIFY_SOCKET) how we are.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Log lines on stderr: text for people, one JSON object per line for log shippers (every
/// event carries the device it concerns, from the `device` span).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svqd: {e}");
            ExitCode::FAILURE
        }
    }
}
