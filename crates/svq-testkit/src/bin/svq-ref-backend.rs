//! `svq-ref-backend`: run a reference vhost-user backend (no dirty logging) by hand, e.g. behind
//! svqd with a real QEMU, or to poke at svqd with a VMM of your own. Stops on SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use svq_testkit::backend::blk::{serve_blk, BlkDisk, BlkOptions, CompletionDelay};
use svq_testkit::backend::net::{serve_net, NetOptions};

/// Reference vhost-user backends that offer no dirty logging (svq-testkit).
#[derive(Debug, Parser)]
#[command(name = "svq-ref-backend", version)]
struct Cli {
    #[command(subcommand)]
    device: Device,
}

#[derive(Debug, Subcommand)]
enum Device {
    /// virtio-blk on a file.
    Blk {
        /// vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Disk image (created if missing).
        #[arg(long)]
        image: PathBuf,
        /// Resize the image to this many MiB.
        #[arg(long)]
        size_mib: Option<u64>,
        /// Request queues.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Do not offer VIRTIO_RING_F_EVENT_IDX.
        #[arg(long)]
        no_event_idx: bool,
        /// Complete asynchronously after a random delay in MIN..=MAX microseconds ("MIN,MAX").
        #[arg(long, value_name = "MIN,MAX")]
        delay_us: Option<String>,
        /// Make GET_VRING_BASE wait for requests in flight (default: reply at once, like qsd).
        #[arg(long)]
        drain_on_stop: bool,
        /// Drop the connection when a completion must signal a closed call fd (like qsd).
        #[arg(long)]
        strict_call: bool,
    },
    /// virtio-net that echoes every transmitted frame back.
    Net {
        /// vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Queue pairs.
        #[arg(long, default_value_t = 1)]
        pairs: u16,
        /// Do not offer VIRTIO_RING_F_EVENT_IDX.
        #[arg(long)]
        no_event_idx: bool,
    },
}

fn parse_delay(s: &str) -> Result<CompletionDelay, String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("--delay-us wants MIN,MAX, not {s:?}"))?;
    let p = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|e| format!("--delay-us {v:?}: {e}"))
    };
    Ok(CompletionDelay {
        min: Duration::from_micros(p(a)?),
        max: Duration::from_micros(p(b)?),
    })
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, initialised sigset; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// Blocks SIGINT/SIGTERM in the calling thread; threads spawned afterwards inherit the mask, so
/// only [`wait_for_signal`] ever sees them and the backend stops cleanly (socket removed).
fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: valid sigset, null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_for_signal() {
    let set = stop_signals();
    let mut sig = 0;
    // SAFETY: valid sigset and out pointer; the signals are blocked in every thread.
    unsafe { libc::sigwait(&set, &mut sig) };
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.device {
        Device::Blk {
            socket,
            image,
            size_mib,
            queues,
            no_event_idx,
            delay_us,
            drain_on_stop,
            strict_call,
        } => {
            let disk =
                BlkDisk::open(&image, size_mib.map(|m| m << 20)).map_err(|e| e.to_string())?;
            let opts = BlkOptions {
                num_queues: queues,
                event_idx: !no_event_idx,
                delay: delay_us.as_deref().map(parse_delay).transpose()?,
                stop_drains: drain_on_stop,
                disconnect_on_closed_call: strict_call,
                ..Default::default()
            };
            let h = serve_blk(&socket, disk, opts).map_err(|e| e.to_string())?;
            eprintln!(
                "svq-ref-backend: virtio-blk on {} at {}",
                image.display(),
                socket.display()
            );
            wait_for_signal();
            eprintln!("svq-ref-backend: stopping ({:?})", h.stats());
            h.stop();
        }
        Device::Net {
            socket,
            pairs,
            no_event_idx,
        } => {
            let h = serve_net(
                &socket,
                NetOptions {
                    queue_pairs: pairs,
                    event_idx: !no_event_idx,
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            eprintln!("svq-ref-backend: virtio-net echo at {}", socket.display());
            wait_for_signal();
            eprintln!("svq-ref-backend: stopping ({:?})", h.stats());
            h.stop();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    block_stop_signals();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svq-ref-backend: {e}");
            ExitCode::FAILURE
        }
    }
}
