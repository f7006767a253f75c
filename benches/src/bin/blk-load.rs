//! blk-load: the block load generator of `scripts/bench/run.py --workload blk`. Connects as the VMM
//! to a vhost-user-blk socket (a backend, or svqd in front of one), runs the testkit's guest
//! driver at a fixed queue depth with 4 KiB requests, and prints one JSON line: IOPS, latency
//! percentiles, requests and errors. Every read is checked against the driver's model of the
//! disk, and `--verify-image` compares the backend's image with the model at the end, so a broken
//! path cannot pass for a fast one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions, BLOCK};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::{Vmm, VmmOptions};

/// Drive a vhost-user-blk socket with the testkit guest driver and report IOPS and latency.
#[derive(Debug, Parser)]
#[command(name = "blk-load")]
struct Args {
    /// vhost-user-blk socket to connect to (as the VMM).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Queues to drive (the backend must offer as many).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 16)]
    depth: u16,
    /// Ring size.
    #[arg(long, default_value_t = 128)]
    queue_size: u16,
    /// Percentage of reads (the rest are writes).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_pct: u8,
    /// Percentage of requests posted through an indirect table (when the device offers them).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    indirect_pct: u8,
    /// 4 KiB blocks of the disk the requests spread over (capped at the disk's capacity).
    #[arg(long, default_value_t = 16384)]
    blocks: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 32)]
    ram_mib: u64,
    /// Seed of the request generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The backend's raw disk image (fresh: all zeros at start): after the run, every block the
    /// load used is compared with the driver's model.
    #[arg(long, value_name = "PATH")]
    verify_image: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok((report, errors)) => {
            println!("{report}");
            if errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("blk-load: {e}");
            ExitCode::from(2)
        }
    }
}

fn seconds(s: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|e| format!("--{what} {s}: {e}"))
}

fn run(a: &Args) -> Result<(serde_json::Value, u64), String> {
    let warmup = seconds(a.warmup, "warmup")?;
    let window = seconds(a.seconds, "seconds")?;
    if window.is_zero() {
        return Err("--seconds must be positive".into());
    }
    let ram = GuestRam::new("blk-load", a.ram_mib << 20).map_err(|e| format!("guest RAM: {e}"))?;
    let mut vmm = Vmm::connect(&a.socket, ram.clone(), VmmOptions::default())
        .map_err(|e| format!("{}: {e}", a.socket.display()))?;
    if vmm.num_queues() < u64::from(a.queues) {
        return Err(format!(
            "the device offers {} queue(s), --queues {} asked",
            vmm.num_queues(),
            a.queues
        ));
    }
    let capacity = vmm
        .get_config(0, 8)
        .map_err(|e| format!("reading the capacity: {e}"))?;
    let sectors = u64::from_le_bytes(capacity[..8].try_into().map_err(|_| "short config")?);
    let blocks = a.blocks.min(sectors * 512 / BLOCK);
    let guest = BlkGuest::new(
        ram,
        BlkGuestOptions {
            queues: a.queues,
            queue_size: a.queue_size,
            depth: a.depth,
            blocks,
            max_blocks: 1,
            read_pct: a.read_pct,
            admin_pct: 0,
            split: false,
            indirect_pct: a.indirect_pct,
            event_idx: vmm.event_idx(),
            indirect: vmm.indirect(),
            seed: a.seed,
            record_latency: true,
        },
    )
    .map_err(|e| format!("guest driver ({blocks} blocks on the disk): {e}"))?;
    let runner = vmm
        .run_guest(guest)
        .map_err(|e| format!("starting the queues: {e}"))?;

    std::thread::sleep(warmup);
    let (done0, t0) = runner.with(|w| {
        w.reset_latency();
        (w.ledger().completed, Instant::now())
    });
    std::thread::sleep(window);
    let (done1, t1, latency) =
        runner.with(|w| (w.ledger().completed, Instant::now(), w.latency().clone()));
    let stuck = runner.drain(Duration::from_secs(10));
    let workload = runner.stop();
    let w = workload.lock().unwrap_or_else(|e| e.into_inner());
    let ledger = w.ledger();
    let anomalies = w.anomalies();
    let (_, bytes_read, bytes_written) = w.progress().get();

    let mut image_mismatches = 0u64;
    let mut image_checked = 0u64;
    let mut first_error = anomalies.first().map(|a| a.to_string());
    if stuck > 0 && first_error.is_none() {
        first_error = Some(format!("{stuck} request(s) never completed"));
    }
    if let Some(path) = &a.verify_image {
        let img = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..blocks {
            img.read_exact_at(&mut buf, b * BLOCK)
                .map_err(|e| format!("{} block {b}: {e}", path.display()))?;
            image_checked += 1;
            if buf != w.expected_block(b) {
                image_mismatches += 1;
                first_error.get_or_insert_with(|| {
                    format!("image block {b} does not hold what the driver wrote last")
                });
            }
        }
    }
    let errors = anomalies.len() as u64 + ledger.duplicates + stuck + image_mismatches;
    let elapsed = (t1 - t0).as_secs_f64();
    let requests = done1 - done0;
    let us = |ns: Option<u64>| ns.map(|v| v as f64 / 1000.0);
    let report = json!({
        "iops": requests as f64 / elapsed,
        "p50_us": us(latency.percentile(50.0)),
        "p99_us": us(latency.percentile(99.0)),
        "mean_us": latency.mean().map(|v| v / 1000.0),
        "max_us": us(latency.max()),
        "requests": requests,
        "seconds": elapsed,
        "errors": errors,
        "first_error": first_error,
        "issued_total": ledger.issued,
        "completed_total": ledger.completed,
        "reads_verified": bytes_read / BLOCK,
        "writes": bytes_written / BLOCK,
        "image_blocks_verified": image_checked,
        "queues": a.queues,
        "depth": a.depth,
        "read_pct": a.read_pct,
        "blocks": blocks,
    });
    drop(w);
    drop(vmm);
    Ok((report, errors))
}
