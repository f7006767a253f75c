//! `vdpa-guest`: checks that run inside the VDUSE guest (peers/src/vduse.rs) against a real
//! `/dev/vhost-vdpa-N`. Prints `SVQ-VDPA ...` facts, then `SVQ-PASS <check>` or
//! `SVQ-FAIL <check>: <why>`; the exit status is 0 only when every check passed.
//!
//! `vdpa-guest device DEV DISK [--requests N]` drives svqd's vhost-vdpa device layer
//! (`svqd::vdpa`) directly, with the testkit's virtio driver as the guest: probe and error
//! answers (missing and busy device, SUSPEND), guest RAM (a shared memfd) mapped at IOVA = GPA in
//! one IOTLB batch, the status handshake, one split ring, then verified block I/O (every read
//! checked against the guest's disk model, every request completed exactly once), a device reset
//! and restart at the saved base, more verified I/O, and finally the image file compared block by
//! block with the model.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions, BLOCK};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::GuestWorkload;
use svqd::vdpa::{
    backend_feature_names, iotlb::identity_mappings, VdpaDevice, VdpaError,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};

const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_ID_BLOCK: u32 = 2;

/// Outcome of one check.
type Check = Result<String, String>;

struct Report {
    failed: bool,
}

impl Report {
    fn record(&mut self, name: &str, r: Check) -> bool {
        match r {
            Ok(detail) => {
                println!("SVQ-PASS {name} {detail}");
                true
            }
            Err(why) => {
                println!("SVQ-FAIL {name}: {why}");
                self.failed = true;
                false
            }
        }
    }
}

fn errno_name(e: &VdpaError) -> String {
    match e.errno() {
        Some(n) => format!(
            "errno {n} ({})",
            std::io::Error::from_raw_os_error(n)
                .to_string()
                .split(" (os error")
                .next()
                .unwrap_or("")
        ),
        None => e.to_string(),
    }
}

/// The device answers svqd relies on for clear errors at start.
fn check_open_errors(dev_path: &Path, dev: &VdpaDevice) -> Check {
    let missing = PathBuf::from("/dev/vhost-vdpa-99");
    let e = match VdpaDevice::open(&missing) {
        Ok(_) => return Err(format!("{} opened", missing.display())),
        Err(e) => e,
    };
    if e.errno() != Some(libc::ENOENT) {
        return Err(format!("missing device: {e}"));
    }
    println!("SVQ-VDPA open-missing {e}");
    let e = match VdpaDevice::open(dev_path) {
        Ok(_) => return Err("a second open succeeded".into()),
        Err(e) => e,
    };
    if e.errno() != Some(libc::EBUSY) {
        return Err(format!("second open: {e}"));
    }
    println!("SVQ-VDPA open-busy {e}");
    let info = dev.info();
    if info.device_id != VIRTIO_ID_BLOCK {
        return Err(format!("device id {} is not virtio-blk", info.device_id));
    }
    Ok(format!(
        "missing=ENOENT busy=EBUSY device_id={}",
        info.device_id
    ))
}

struct Ring {
    queue_size: u16,
}

/// Hands the guest's queue 0 to the device (status must be FEATURES_OK) and sets DRIVER_OK.
fn start_ring(dev: &VdpaDevice, guest: &BlkGuest, ring: &Ring, base: u16) -> Result<(), String> {
    let q = &guest.queues()[0];
    let l = q.layout();
    let e = |e: VdpaError| e.to_string();
    dev.set_vring_num(0, ring.queue_size).map_err(e)?;
    dev.set_vring_addr(0, l.size, l.desc, l.avail, l.used)
        .map_err(e)?;
    dev.set_vring_base(0, base).map_err(e)?;
    dev.set_vring_kick(0, q.kick_fd()).map_err(e)?;
    dev.set_vring_call(0, q.call_fd()).map_err(e)?;
    dev.set_vring_enable(0, true).map_err(e)?;
    dev.driver_ok().map_err(e)?;
    Ok(())
}

/// Runs the guest until `n` more requests completed, then drains; checks the ledger.
fn run_io(runner: &GuestRunner<BlkGuest>, n: u64, what: &str) -> Check {
    let t0 = Instant::now();
    let start = runner.with(|g| g.ledger().completed);
    runner.with(|g| g.set_posting(true));
    runner.resume();
    let deadline = t0 + Duration::from_secs(120);
    while runner.with(|g| g.ledger().completed) < start + n {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = runner.drain(Duration::from_secs(30));
    runner.pause();
    let dt = t0.elapsed();
    let (ledger, anomalies) = runner.with(|g| (g.ledger(), g.anomalies()));
    let done = ledger.completed - start;
    let mut why = Vec::new();
    if left > 0 || ledger.outstanding > 0 {
        why.push(format!("{} requests never completed", ledger.outstanding));
    }
    if ledger.duplicates > 0 {
        why.push(format!("{} duplicate completions", ledger.duplicates));
    }
    if done < n {
        why.push(format!("only {done} of {n} requests completed in {dt:?}"));
    }
    why.extend(anomalies.iter().take(5).map(|a| a.to_string()));
    if !why.is_empty() {
        return Err(format!("{what}: {}", why.join("; ")));
    }
    Ok(format!(
        "requests={done} in {:.2}s ({:.0}/s) issued={} completed={}",
        dt.as_secs_f64(),
        done as f64 / dt.as_secs_f64().max(1e-9),
        ledger.issued,
        ledger.completed
    ))
}

/// Compares the image file with the guest's model, block by block.
fn check_disk(disk: &Path, guest: &BlkGuest) -> Check {
    let f = std::fs::File::open(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    let mut buf = vec![0u8; BLOCK as usize];
    let (mut written, mut bad) = (0u64, Vec::new());
    for (blk, gen) in guest.model().iter().enumerate() {
        f.read_exact_at(&mut buf, blk as u64 * BLOCK)
            .map_err(|e| format!("read block {blk}: {e}"))?;
        if buf != guest.expected_block(blk as u64) {
            bad.push(blk);
        }
        written += u64::from(*gen != 0);
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} blocks differ from the model (first: {:?})",
            bad.len(),
            &bad[..bad.len().min(8)]
        ));
    }
    if written == 0 {
        return Err("the workload wrote nothing".into());
    }
    Ok(format!("blocks={} written={written}", guest.model().len()))
}

fn device(dev_path: &Path, disk: &Path, requests: u64, rep: &mut Report) -> Result<(), String> {
    let mut dev = VdpaDevice::open(dev_path).map_err(|e| e.to_string())?;
    let info = *dev.info();
    println!(
        "SVQ-VDPA info device_id={} features={:#x} backend_features={:#x} ({}) acked={:#x} \
         iova={:#x}..={:#x} config_size={} queues={} max_queue_size={} groups={} address_spaces={}",
        info.device_id,
        info.features,
        info.backend_features,
        backend_feature_names(info.backend_features).join(" "),
        dev.acked_backend_features(),
        info.iova_first,
        info.iova_last,
        info.config_size,
        info.num_queues,
        info.max_queue_size,
        info.groups,
        info.address_spaces
    );
    rep.record("vdpa-open-errors", check_open_errors(dev_path, &dev));

    // Guest RAM: a shared memfd (VDUSE cannot reach anonymous memory), at IOVA = GPA.
    let ram = GuestRam::new("vdpa-guest-ram", 32 << 20).map_err(|e| e.to_string())?;
    let maps = identity_mappings(dev.iotlb(), &[(0, ram.size(), ram.host_addr())])
        .map_err(|e| e.to_string())?;
    dev.map(&maps).map_err(|e| e.to_string())?;
    println!(
        "SVQ-VDPA iotlb mapped {:#x} bytes at IOVA 0 (batching acked: {})",
        ram.size(),
        dev.batches_iotlb()
    );
    // A second map of the same range is refused by svqd itself, before the kernel's opaque EFAULT.
    match dev.map(&maps) {
        Err(VdpaError::Iotlb(e)) => println!("SVQ-VDPA iotlb duplicate refused: {e}"),
        other => {
            rep.record(
                "vdpa-iotlb-duplicate",
                Err(format!("duplicate map: {other:?}")),
            );
        }
    }

    let want = VIRTIO_F_VERSION_1
        | VIRTIO_F_ACCESS_PLATFORM
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC;
    let features = want & info.features;
    dev.negotiate(features).map_err(|e| e.to_string())?;
    let cfg = dev.config(0, 8).map_err(|e| e.to_string())?;
    let capacity = u64::from_le_bytes(cfg[..8].try_into().expect("8 bytes"));
    let disk_len = std::fs::metadata(disk).map_err(|e| e.to_string())?.len();
    rep.record(
        "vdpa-config",
        if capacity * 512 == disk_len {
            Ok(format!("capacity={capacity} sectors"))
        } else {
            Err(format!(
                "config capacity {capacity} sectors, image is {disk_len} bytes"
            ))
        },
    );

    let ring = Ring {
        queue_size: 128.min(info.max_queue_size),
    };
    let guest = BlkGuest::new(
        ram.clone(),
        BlkGuestOptions {
            queue_size: ring.queue_size,
            depth: 16,
            blocks: (capacity * 512 / BLOCK).min(2048),
            event_idx: features & VIRTIO_RING_F_EVENT_IDX != 0,
            indirect: features & VIRTIO_RING_F_INDIRECT_DESC != 0,
            seed: 13,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    start_ring(&dev, &guest, &ring, 0)?;
    let runner = GuestRunner::spawn(guest).map_err(|e| e.to_string())?;
    runner.pause();

    // SUSPEND at DRIVER_OK: the kernel's answer is what the docs record.
    let suspend = if dev.can_suspend() {
        match dev.suspend().and_then(|()| dev.resume()) {
            Ok(()) => "offered: suspend+resume ok".to_string(),
            Err(e) => format!("offered, but failed: {e}"),
        }
    } else {
        match dev.suspend() {
            Ok(()) => "not offered, yet the ioctl returned 0".into(),
            Err(e) => format!(
                "not offered: VHOST_VDPA_SUSPEND at DRIVER_OK -> {}",
                errno_name(&e)
            ),
        }
    };
    println!("SVQ-VDPA suspend {suspend}");

    rep.record("vdpa-io", run_io(&runner, requests, "first run"));

    // Stop the ring the way svqd must without SUSPEND: drained (no request in flight), read the
    // base, reset, renegotiate, restart at the base.
    let base = dev.vring_base(0).map_err(|e| e.to_string())?;
    let next_avail = runner.with(|g| g.queues()[0].next_avail());
    dev.reset().map_err(|e| e.to_string())?;
    let after_reset = dev.vring_base(0).map_err(|e| e.to_string())?;
    println!("SVQ-VDPA restart base={base} driver_next_avail={next_avail} base_after_reset={after_reset}");
    let restart = (|| -> Check {
        if base != next_avail {
            return Err(format!(
                "GET_VRING_BASE {base} after a drain, the driver published {next_avail}"
            ));
        }
        dev.negotiate(features).map_err(|e| e.to_string())?;
        runner.with(|g| start_ring(&dev, g, &ring, base))?;
        run_io(&runner, requests / 2, "after restart")
    })();
    rep.record("vdpa-restart", restart);

    let guest = runner.stop();
    let guest = guest.lock().unwrap_or_else(|e| e.into_inner());
    dev.reset().map_err(|e| e.to_string())?;
    rep.record("vdpa-disk", check_disk(disk, &guest));
    let unmap: Vec<u64> = maps.iter().map(|m| m.iova).collect();
    rep.record(
        "vdpa-unmap",
        dev.unmap(&unmap)
            .map(|()| format!("{} mappings left", dev.iotlb().mappings().count()))
            .map_err(|e| e.to_string()),
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: vdpa-guest device DEV DISK [--requests N]";
    let mut rep = Report { failed: false };
    let r = match args.get(1).map(String::as_str) {
        Some("device") if args.len() >= 4 => {
            let requests = args
                .iter()
                .position(|a| a == "--requests")
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000);
            device(Path::new(&args[2]), Path::new(&args[3]), requests, &mut rep)
        }
        _ => Err(usage.into()),
    };
    if let Err(e) = r {
        println!("SVQ-FAIL vdpa-guest: {e}");
        return ExitCode::FAILURE;
    }
    if rep.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
