//! Passthrough ↔ shadow switches under block I/O against a backend that completes out of order
//! after a random delay and answers GET_VRING_BASE at once (like qemu-storage-daemon): no request
//! lost, doubled or stray; the disk holds what the guest wrote. Prints the switch times.

mod common;

use std::time::{Duration, Instant};

use common::{check_blk_run, Rig, RigOptions};
use svq_testkit::backend::blk::BlkStatsSnapshot;
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::vmm::{LogStyle, MemTableStyle};

#[derive(Clone, Copy, PartialEq)]
enum Trigger {
    /// The control plane's set-shadow.
    Control,
    /// The VMM starting and stopping dirty logging.
    LogAll,
}

fn percentile(v: &mut [u128], p: usize) -> u128 {
    v.sort_unstable();
    v[(v.len() - 1) * p / 100]
}

fn stress(event_idx: bool, queues: u16, switches: usize, trigger: Trigger) {
    stress_with(event_idx, queues, switches, trigger, false)
}

fn stress_with(event_idx: bool, queues: u16, switches: usize, trigger: Trigger, qsd_like: bool) {
    stress_rig(
        RigOptions {
            queues,
            event_idx,
            qsd_like,
            delay: Some((20, 1500)),
            ..Default::default()
        },
        switches,
        trigger,
    );
}

/// Runs the switches; returns the backend's counters.
fn stress_rig(opts: RigOptions, switches: usize, trigger: Trigger) -> BlkStatsSnapshot {
    let (queues, event_idx) = (opts.queues, opts.event_idx);
    let rig = Rig::new(opts);
    let ram = GuestRam::new("guest", 32 << 20).unwrap();
    let mut vmm = rig.vmm(
        ram.clone(),
        MemTableStyle::AddMemReg,
        LogStyle::Qemu,
        event_idx,
    );
    let guest = BlkGuest::new(
        ram.clone(),
        BlkGuestOptions {
            queues,
            event_idx: vmm.event_idx(),
            indirect: vmm.indirect(),
            blocks: 1024,
            depth: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let runner = vmm.run_guest(guest).unwrap();
    let ctl = rig.proxy.control();
    let mut to_shadow = Vec::new();
    let mut to_pass = Vec::new();
    std::thread::sleep(Duration::from_millis(20));
    for i in 0..switches {
        let t = Instant::now();
        let r = match trigger {
            Trigger::Control => ctl.set_shadow(true).map_err(|e| e.to_string()),
            Trigger::LogAll => vmm.start_dirty_log().map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            panic!(
                "switch {i} to shadow: {e}; backend {:?}; svqd {:?}",
                rig.backend.stats(),
                ctl.query_status()
            );
        }
        to_shadow.push(t.elapsed().as_micros());
        assert!(rig.modes().iter().all(|m| m == "shadow"), "switch {i}");
        std::thread::sleep(Duration::from_millis(1 + (i % 5) as u64));
        let t = Instant::now();
        let r = match trigger {
            Trigger::Control => ctl.set_shadow(false).map_err(|e| e.to_string()),
            Trigger::LogAll => vmm.stop_dirty_log().map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            panic!(
                "switch {i} to passthrough: {e}; backend {:?}; svqd {:?}",
                rig.backend.stats(),
                ctl.query_status()
            );
        }
        to_pass.push(t.elapsed().as_micros());
        assert!(rig.modes().iter().all(|m| m == "passthrough"), "switch {i}");
        std::thread::sleep(Duration::from_millis(1 + (i % 3) as u64));
    }
    let ledger = check_blk_run(&rig, runner);
    assert!(ledger.issued > 50, "too little I/O: {ledger:?}");
    let stats = ctl.query_stats();
    let late: u64 = stats
        .queues
        .iter()
        .map(|q| q.counters.late_completions)
        .sum();
    eprintln!(
        "switch times (event_idx={event_idx}, queues={queues}, {switches} round trips, {} requests, \
         {late} late completions waited for): to shadow p50 {} µs p90 {} µs max {} µs; \
         to passthrough p50 {} µs p90 {} µs max {} µs",
        ledger.issued,
        percentile(&mut to_shadow, 50),
        percentile(&mut to_shadow, 90),
        percentile(&mut to_shadow, 100),
        percentile(&mut to_pass, 50),
        percentile(&mut to_pass, 90),
        percentile(&mut to_pass, 100),
    );
    rig.backend.stats()
}

#[test]
fn control_switches_event_idx_one_queue() {
    stress(true, 1, 40, Trigger::Control);
}

#[test]
fn control_switches_no_event_idx_one_queue() {
    stress(false, 1, 40, Trigger::Control);
}

#[test]
fn log_all_switches_event_idx_two_queues() {
    stress(true, 2, 20, Trigger::LogAll);
}

#[test]
fn log_all_switches_no_event_idx_two_queues() {
    stress(false, 2, 20, Trigger::LogAll);
}

/// qemu-storage-daemon drops the connection when a late completion must signal a closed call fd:
/// with EVENT_IDX the drain waits until the backend has nothing in flight before GET_VRING_BASE.
#[test]
fn qsd_like_backend_event_idx_survives_switches() {
    stress_with(true, 1, 40, Trigger::Control, true);
}

/// A fast device (requests complete in 5–50 µs, as a RAM-backed or NVMe disk) behind a
/// qemu-storage-daemon-like backend with EVENT_IDX: many switches, the same ledger checks; the
/// printed times are the switch cost itself rather than the wait for a slow request in flight.
#[test]
fn fast_device_qsd_like_switches() {
    stress_rig(
        RigOptions {
            queues: 1,
            event_idx: true,
            qsd_like: true,
            delay: Some((5, 50)),
            ..Default::default()
        },
        100,
        Trigger::Control,
    );
}

/// A libvhost-user backend (qemu-storage-daemon) that reads svqd's drain kick late, as a starved
/// single-threaded daemon does: svqd must not send GET_VRING_BASE before the device read it, or
/// the scan that follows the read can take requests that are then in flight at GET_VRING_BASE
/// (qsd dropped the connection in CI when one of them completed before svqd re-armed the call
/// fd). The lag is well inside the 5 ms quiet period, after which svqd goes on regardless (a
/// device that polls never reads a kick).
#[test]
fn drain_waits_for_the_late_kick_read_of_a_libvhost_user_backend() {
    let stats = stress_rig(
        RigOptions {
            queues: 1,
            event_idx: true,
            libvhost_user_kick_lag: Some(Duration::from_micros(1500)),
            delay: Some((5, 50)),
            ..Default::default()
        },
        30,
        Trigger::Control,
    );
    assert_eq!(
        stats.stops_before_scan, 0,
        "GET_VRING_BASE came before the device read the drain kick: {stats:?}"
    );
}

/// The poll phase (`--poll-us`) and pinned workers (`--worker-cpus`) under traffic and switches:
/// polling must never strand a chain nor complete one twice (the same ledger checks as above).
#[test]
fn poll_phase_and_pinned_workers_lose_nothing() {
    for (event_idx, poll_us) in [(true, 200), (false, 50)] {
        stress_rig(
            RigOptions {
                queues: 2,
                event_idx,
                delay: Some((20, 1500)),
                poll: Duration::from_micros(poll_us),
                worker_cpus: vec![0],
                ..Default::default()
            },
            20,
            Trigger::Control,
        );
    }
}
