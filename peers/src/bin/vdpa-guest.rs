//! `vdpa-guest`: checks that run inside the VDUSE guest (peers/src/vduse.rs) against a real
//! `/dev/vhost-vdpa-N`. Prints `SVQ-VDPA ...` facts, then `SVQ-PASS <check> ...` or
//! `SVQ-FAIL <check>: <why>`; the exit status is 0 only when every check passed.
//!
//! * `device DEV DISK [--requests N]`: svqd's vhost-vdpa device layer (`svqd::backend::vdpa`) driven
//!   directly, with the testkit's virtio driver as the guest: probe and error answers (missing
//!   and busy device, SUSPEND), guest RAM (a shared memfd) mapped at IOVA = GPA in one IOTLB
//!   batch, the status handshake, one split ring, verified block I/O (every read checked against
//!   the guest's disk model, every request completed exactly once), a device reset and restart
//!   at the saved base, more I/O, and the image compared block by block with the model.
//! * `cli SVQD DEV`: the svqd binary with `--backend vdpa:` on a missing and on a busy device.
//! * `scenario DEV DISK --shadow always|auto|never [--switches N]`: the testkit's simulated VMM
//!   and guest, svqd (in-process, `--backend vdpa:DEV`) in between: verified block I/O in
//!   passthrough, in shadow mode, or across N runtime switches under load.
//! * `migrate DEV0 DEV1 DISK [--no-log]`: a live migration by the testkit's oracle from svqd on
//!   DEV0 to svqd on DEV1 (both export DISK); with `--no-log` (svqd's dirty log disabled, the
//!   negative control) the oracle must fail.
//! * `reconnect DEV DISK`: one svqd, two VMM sessions after each other (the first with shadow
//!   round trips), each with verified I/O and the image checked.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::process::Command;
use std::sync::{Arc, Mutex};

use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions, BLOCK};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::scenario::{
    run_migration_external, run_switching_external, ExternalDevice, Proxy as TestProxy,
    ScenarioOptions,
};
use svq_testkit::vmm::{Vmm, VmmOptions};
use svqd::backend::vdpa::{
    backend_feature_names, iotlb::identity_mappings, VdpaDevice, VdpaError,
    VIRTIO_F_ACCESS_PLATFORM,
};
use svqd::features::VIRTIO_F_VERSION_1;
use svqd::report::QueueCounters;
use svqd::{ControlTarget, Proxy, ProxyConfig, ProxyThread, ShadowPolicy};

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

/// An in-process svqd on a vDPA device, as the testkit's scenarios drive a proxy.
struct InProcess {
    thread: ProxyThread,
    control: Arc<dyn ControlTarget>,
}

impl TestProxy for InProcess {
    fn set_shadow(&self, enable: bool) -> Result<(), String> {
        self.control.set_shadow(enable)
    }

    fn stop(self: Box<Self>) {
        if let Err(e) = self.thread.stop() {
            println!("SVQ-VDPA svqd stopped with an error: {e}");
        }
    }
}

/// Starts svqd for the VMM socket `sock` on the vDPA device `dev`; keeps its control handle in
/// `controls` (the scenarios own the proxy).
fn launch(
    dev: &Path,
    sock: &Path,
    shadow: ShadowPolicy,
    log: bool,
    controls: &Controls,
) -> Result<Box<dyn TestProxy>, String> {
    let mut cfg = ProxyConfig::new(sock, format!("vdpa:{}", dev.display()));
    cfg.shadow = shadow;
    cfg.log_enabled = log;
    let proxy = Proxy::new(cfg).map_err(|e| e.to_string())?;
    let control = proxy.control();
    let thread = proxy.spawn().map_err(|e| e.to_string())?;
    controls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(control.clone());
    Ok(Box::new(InProcess { thread, control }))
}

/// A small guest with a 16 MiB working set of the image, I/O for `warmup` before anything
/// happens.
fn scenario_options(warmup: Duration) -> ScenarioOptions {
    ScenarioOptions {
        ram_size: 32 << 20,
        disk_size: 16 << 20,
        depth: 16,
        warmup,
        after: warmup,
        min_phase_ops: 100,
        ..Default::default()
    }
}

type Controls = Arc<Mutex<Vec<Arc<dyn ControlTarget>>>>;

/// The highest value each of queue 0's counters reached, over every svqd started so far.
/// svqd forgets a session's counters when its VMM disconnects, which the scenarios do before
/// stopping it, so they are sampled while the scenario runs.
struct StatsProbe {
    max: Arc<Mutex<QueueCounters>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatsProbe {
    fn start(controls: Controls) -> Self {
        let max = Arc::new(Mutex::new(QueueCounters::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, st) = (max.clone(), stop.clone());
        let thread = std::thread::spawn(move || loop {
            let done = st.load(std::sync::atomic::Ordering::Acquire);
            let list: Vec<_> = controls.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for c in list {
                if let Some(q) = c.query_stats().queues.first() {
                    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
                    let q = q.counters;
                    m.chains = m.chains.max(q.chains);
                    m.descriptors = m.descriptors.max(q.descriptors);
                    m.dirty_pages = m.dirty_pages.max(q.dirty_pages);
                    m.mode_switches = m.mode_switches.max(q.mode_switches);
                    m.late_completions = m.late_completions.max(q.late_completions);
                    m.reclaimed = m.reclaimed.max(q.reclaimed);
                    m.last_switch_to_shadow_us =
                        m.last_switch_to_shadow_us.max(q.last_switch_to_shadow_us);
                    m.last_switch_to_passthrough_us = m
                        .last_switch_to_passthrough_us
                        .max(q.last_switch_to_passthrough_us);
                }
            }
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        });
        StatsProbe {
            max,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> QueueCounters {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self.max.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Zeroes the first `bytes` of the image: every scenario's guest starts from a model of a
/// zeroed disk.
fn zero_image(disk: &Path, bytes: u64) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for off in (0..bytes).step_by(zeros.len()) {
        let n = zeros.len().min((bytes - off) as usize);
        f.write_all_at(&zeros[..n], off)
            .map_err(|e| format!("zeroing {}: {e}", disk.display()))?;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", disk.display()))
}

fn scenario(dev: &Path, disk: &Path, shadow: ShadowPolicy, switches: u64) -> Check {
    let name = match (shadow, switches) {
        (ShadowPolicy::Always, _) => "shadow",
        (_, 0) => "passthrough",
        _ => "switches",
    };
    let controls: Controls = Arc::default();
    let probe = StatsProbe::start(controls.clone());
    let mut launch_side = |_n: u32, sock: &Path| launch(dev, sock, shadow, true, &controls);
    let mut ext = ExternalDevice {
        disk: disk.to_path_buf(),
        launch: &mut launch_side,
    };
    let opts = scenario_options(Duration::from_millis(if switches > 0 { 300 } else { 1500 }));
    zero_image(disk, opts.disk_size)?;
    let t0 = Instant::now();
    let r = run_switching_external(&opts, &mut ext, switches, &mut |l| {
        println!("SVQ-VDPA {name}: {l}")
    });
    let q = probe.finish();
    let r = r.map_err(|e| format!("scenario failed: {e}"))?;
    println!(
        "SVQ-VDPA {name}: svqd stats chains={} descriptors={} dirty_pages={} mode_switches={} \
         late_completions={} reclaimed={} last_to_shadow_us={} last_to_passthrough_us={}",
        q.chains,
        q.descriptors,
        q.dirty_pages,
        q.mode_switches,
        q.late_completions,
        q.reclaimed,
        q.last_switch_to_shadow_us,
        q.last_switch_to_passthrough_us
    );
    let mut why = r.failures();
    if r.blocks_verified == 0 {
        why.push("no disk block verified".into());
    }
    if r.ledger.completed < 100 {
        why.push(format!("only {} requests completed", r.ledger.completed));
    }
    match (shadow, switches) {
        (ShadowPolicy::Always, _) if q.chains == 0 => {
            why.push("shadow policy, yet no chain went through a shadow ring".into())
        }
        (ShadowPolicy::Never, _) | (ShadowPolicy::Auto, 0) if q.chains != 0 => why.push(format!(
            "passthrough, yet {} chains were shadowed",
            q.chains
        )),
        // The probe samples every 20 ms and svqd forgets the counters when the VMM leaves, so
        // the last switch may fall after the last sample; more than asked, or fewer by more than
        // one, is a miscount.
        (ShadowPolicy::Auto, n) if n > 0 && !(n - 1..=n).contains(&q.mode_switches) => why.push(
            format!("{} mode switches counted, {n} asked for", q.mode_switches),
        ),
        _ => {}
    }
    if !why.is_empty() {
        return Err(why.join("; "));
    }
    Ok(format!(
        "requests={} (issued {}, duplicates {}, lost {}) blocks_verified={} switches={} \
         mean_switch_ms={:.2} max_switch_ms={:.2} switching_iops={:.0} wall={:.1}s",
        r.ledger.completed,
        r.ledger.issued,
        r.ledger.duplicates,
        r.ledger.outstanding,
        r.blocks_verified,
        r.switches,
        r.mean_switch.as_secs_f64() * 1e3,
        r.max_switch.as_secs_f64() * 1e3,
        r.phase.iops(),
        t0.elapsed().as_secs_f64()
    ))
}

fn migrate(devs: [&Path; 2], disk: &Path, log: bool) -> Check {
    let controls: Controls = Arc::default();
    let mut launch_side = |n: u32, sock: &Path| {
        let dev = devs[(n as usize).min(1)];
        launch(dev, sock, ShadowPolicy::Auto, log, &controls)
    };
    let mut ext = ExternalDevice {
        disk: disk.to_path_buf(),
        launch: &mut launch_side,
    };
    let opts = scenario_options(Duration::from_millis(800));
    zero_image(disk, opts.disk_size)?;
    let tag = if log { "migrate" } else { "migrate-no-log" };
    let r = run_migration_external(&opts, &mut ext, &mut |l| println!("SVQ-VDPA {tag}: {l}"))
        .map_err(|e| format!("scenario failed: {e}"))?;
    let m = &r.migration;
    let summary = format!(
        "pages_differing={} of {} requests={} duplicates={} lost={} anomalies={} \
         device_pages_logged={} rounds={} downtime_ms={:.1} total_ms={:.0} blocks_verified={} \
         iops_before={:.0} during={:.0} after={:.0}",
        r.oracle.differing_pages.len(),
        r.oracle.pages,
        r.oracle.ledger.completed,
        r.oracle.ledger.duplicates,
        r.oracle.ledger.outstanding,
        r.oracle.anomalies.len(),
        m.device_pages(),
        m.rounds.len(),
        m.downtime.as_secs_f64() * 1e3,
        m.total.as_secs_f64() * 1e3,
        r.blocks_verified,
        r.phases[0].iops(),
        r.phases[1].iops(),
        r.phases[2].iops()
    );
    if log {
        if !r.oracle.passed() {
            return Err(format!("{summary}; oracle: {:?}", r.oracle.failures()));
        }
        if m.device_pages() == 0 {
            return Err(format!("{summary}; svqd logged no device page"));
        }
        if r.blocks_verified == 0 {
            return Err(format!("{summary}; no block verified"));
        }
        Ok(summary)
    } else {
        // The negative control: the guest believes logging works, nothing is logged, and the
        // oracle must see the device's writes missing on the destination.
        if !m.device_logging {
            return Err(format!("{summary}; the VMM saw no logging offered"));
        }
        if m.device_pages() != 0 {
            return Err(format!(
                "{summary}; pages were logged with the log disabled"
            ));
        }
        if r.oracle.differing_pages.is_empty() || r.oracle.passed() {
            return Err(format!(
                "{summary}; the oracle did not catch the unlogged device writes"
            ));
        }
        Ok(format!(
            "{summary} (oracle failed as it must: {:?})",
            r.oracle.failures()
        ))
    }
}

/// Two VMM sessions, one after the other, on one svqd and one vDPA device: the first does
/// verified I/O across shadow round trips and disconnects (svqd resets and reopens the device for
/// the next VMM), the second connects to the same socket and does verified I/O again. Each
/// session's requests complete exactly once and the image matches its guest's model.
fn reconnect(dev: &Path, disk: &Path) -> Check {
    let controls: Controls = Arc::default();
    let sock = Path::new("/tmp/svqd-reconnect.sock");
    let proxy = launch(dev, sock, ShadowPolicy::Auto, true, &controls)?;
    let control = controls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .first()
        .cloned()
        .ok_or("no control handle")?;
    let mut done = Vec::new();
    let result = (|| -> Check {
        for session in 0..2u64 {
            // Each guest's model starts from a zeroed disk.
            zero_image(disk, 8 << 20)?;
            let ram = GuestRam::new("vdpa-reconnect-ram", 32 << 20).map_err(|e| e.to_string())?;
            let mut vmm = Vmm::connect(sock, ram.clone(), VmmOptions::default())
                .map_err(|e| format!("session {session}: connect: {e}"))?;
            let guest = BlkGuest::new(
                ram,
                BlkGuestOptions {
                    depth: 16,
                    blocks: 2048,
                    event_idx: vmm.event_idx(),
                    indirect: vmm.indirect(),
                    seed: 21 + session,
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            let runner = vmm
                .run_guest(guest)
                .map_err(|e| format!("session {session}: start: {e}"))?;
            runner.pause();
            let mut steps = vec![run_io(&runner, 500, "passthrough")?];
            if session == 0 {
                for on in [true, false, true, false] {
                    control.set_shadow(on)?;
                    steps.push(run_io(
                        &runner,
                        300,
                        if on { "shadow" } else { "passthrough" },
                    )?);
                }
            }
            let guest = runner.stop();
            let guest = guest.lock().unwrap_or_else(|e| e.into_inner());
            let disk_check = check_disk(disk, &guest)?;
            drop(vmm);
            // svqd notices the disconnect and reopens the device for the next VMM.
            std::thread::sleep(Duration::from_millis(300));
            done.push(format!(
                "session {session}: {} | {disk_check}",
                steps.join(" | ")
            ));
        }
        Ok(done.join("; "))
    })();
    proxy.stop();
    result
}

/// The svqd binary refuses a missing and a busy device, with a message saying which.
fn cli(svqd: &Path, dev: &Path) -> Check {
    let run = |backend: &str| -> Result<(bool, String), String> {
        let out = Command::new(svqd)
            .args(["--socket", "/tmp/svqd-cli.sock", "--backend", backend])
            .env("NO_COLOR", "1")
            .output()
            .map_err(|e| format!("{}: {e}", svqd.display()))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (ok, err) = run("vdpa:/dev/vhost-vdpa-99")?;
    let last = err.lines().last().unwrap_or("").to_owned();
    if ok || !last.contains("no such device") {
        return Err(format!("missing device: exit ok={ok}, stderr: {err}"));
    }
    println!("SVQ-VDPA cli missing: {last}");
    let holder = VdpaDevice::open(dev).map_err(|e| e.to_string())?;
    let (ok, err) = run(&format!("vdpa:{}", dev.display()))?;
    drop(holder);
    let last = err.lines().last().unwrap_or("").to_owned();
    if ok || !last.contains("in use") {
        return Err(format!("busy device: exit ok={ok}, stderr: {err}"));
    }
    println!("SVQ-VDPA cli busy: {last}");
    Ok("missing and busy devices refused at start".into())
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: vdpa-guest device DEV DISK [--requests N] | cli SVQD DEV | \
                 scenario DEV DISK --shadow always|auto|never [--switches N] | \
                 migrate DEV0 DEV1 DISK [--no-log] | reconnect DEV DISK";
    let mut rep = Report { failed: false };
    let a = |i: usize| Path::new(args[i].as_str());
    let r = match args.get(1).map(String::as_str) {
        Some("device") if args.len() >= 4 => {
            let requests = flag(&args, "--requests")
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000);
            device(a(2), a(3), requests, &mut rep)
        }
        Some("cli") if args.len() >= 4 => {
            rep.record("vdpa-cli", cli(a(2), a(3)));
            Ok(())
        }
        Some("scenario") if args.len() >= 4 => {
            let shadow = match flag(&args, "--shadow") {
                Some("always") => Some(ShadowPolicy::Always),
                Some("auto") => Some(ShadowPolicy::Auto),
                Some("never") => Some(ShadowPolicy::Never),
                _ => None,
            };
            let switches = flag(&args, "--switches").and_then(|v| v.parse().ok());
            match (shadow, switches.or(Some(0))) {
                (Some(p), Some(n)) => {
                    let name = match (p, n) {
                        (ShadowPolicy::Always, _) => "vdpa-svqd-shadow",
                        (_, 0) => "vdpa-svqd-passthrough",
                        _ => "vdpa-svqd-switches",
                    };
                    rep.record(name, scenario(a(2), a(3), p, n));
                    Ok(())
                }
                _ => Err(usage.into()),
            }
        }
        Some("reconnect") if args.len() >= 4 => {
            rep.record("vdpa-reconnect", reconnect(a(2), a(3)));
            Ok(())
        }
        Some("migrate") if args.len() >= 5 => {
            let log = !args.iter().any(|x| x == "--no-log");
            let name = if log {
                "vdpa-migration"
            } else {
                "vdpa-negative-control"
            };
            rep.record(name, migrate([a(2), a(3)], a(4), log));
            Ok(())
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
