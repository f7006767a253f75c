//! Passthrough ↔ shadow switches under block I/O against a backend that completes out of order
//! after a random delay and answers GET_VRING_BASE at once (like qemu-storage-daemon): no request
//! lost, doubled or stray; the disk holds what the guest wrote. Prints the switch times.

mod common;

use std::time::{Duration, Instant};

use common::{check_blk_run, Rig, RigOptions};
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
    stress_with(event_idx, queues, switches, trigger, false, None)
}

fn stress_with(
    event_idx: bool,
    queues: u16,
    switches: usize,
    trigger: Trigger,
    qsd_like: bool,
    poll: Option<Duration>,
) {
    let rig = Rig::new(RigOptions {
        queues,
        event_idx,
        qsd_like,
        delay: Some((20, 1500)),
        poll,
        // Without polling, no batch wait either (pure notifications); with a long poll, a long
        // batch wait too (the worker is mostly asleep with notifications off).
        batch_wait: poll.map(|p| p / 5),
        ..Default::default()
    });
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
    let sum = |f: fn(&svqd::report::QueueCounters) -> u64| -> u64 {
        stats.queues.iter().map(|q| f(&q.counters)).sum()
    };
    let (wakeups, poll_us, cpu_us) = (
        sum(|c| c.worker_wakeups),
        sum(|c| c.poll_us),
        sum(|c| c.worker_cpu_us),
    );
    assert!(wakeups > 0 && cpu_us > 0, "workers ran: {stats:?}");
    if poll == Some(Duration::ZERO) {
        assert_eq!(poll_us, 0, "--poll-us 0 never polls");
    }
    eprintln!(
        "shadow workers: {wakeups} wake-ups, {poll_us} µs polling, {cpu_us} µs CPU, {} chains",
        sum(|c| c.chains)
    );
    eprintln!(
        "switch times (event_idx={event_idx}, queues={queues}, poll={poll:?}, {switches} round trips, \
         {} requests, {late} late completions waited for): to shadow p50 {} µs p90 {} µs max {} µs; \
         to passthrough p50 {} µs p90 {} µs max {} µs",
        ledger.issued,
        percentile(&mut to_shadow, 50),
        percentile(&mut to_shadow, 90),
        percentile(&mut to_shadow, 100),
        percentile(&mut to_pass, 50),
        percentile(&mut to_pass, 90),
        percentile(&mut to_pass, 100),
    );
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
    stress_with(true, 1, 40, Trigger::Control, true, None);
}

/// The worker without a poll phase or batch wait (sleeps on notifications as soon as the rings
/// are empty) and with long ones (still polling, or asleep with notifications off, when the
/// switch stops it): nothing lost or doubled either way.
#[test]
fn switches_without_polling_and_with_long_polling() {
    for event_idx in [true, false] {
        stress_with(
            event_idx,
            1,
            15,
            Trigger::Control,
            false,
            Some(Duration::ZERO),
        );
        stress_with(
            event_idx,
            2,
            10,
            Trigger::LogAll,
            false,
            Some(Duration::from_millis(5)),
        );
    }
}
