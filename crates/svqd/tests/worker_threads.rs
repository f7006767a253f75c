//! The threads of the shadow data path (src/worker.rs): one thread serves all of a device's
//! shadowed rings, `--worker-cpus` gives one pinned thread per CPU, no thread runs while every
//! ring is in passthrough, and a ring its guest breaks stops alone while the other rings of its
//! thread go on.
//!
//! The tests count this process's `svqd-shadow*` threads, so they take turns (a lock) instead of
//! running side by side.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{check_blk_run, Rig, RigOptions};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::Vmm;
use svqd::ShadowPolicy;
use vm_memory::{Bytes, GuestAddress};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Wait (bounded) until no worker thread is left: one ends by itself once its last ring left,
/// shortly after the switch or the test that detached it returned.
fn await_no_worker_thread() {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !worker_threads().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The shadow worker threads of this process: (name, CPUs it may run on).
fn worker_threads() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("svqd-shadow") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((comm.to_string(), cpus));
    }
    out.sort();
    out
}

/// A guest driving two queues; `read_pct` 100 leaves the disk as the next guest expects it.
fn two_queue_guest(rig: &Rig, read_pct: u8) -> (Arc<GuestRam>, Vmm, GuestRunner<BlkGuest>) {
    common::blk_vmm(
        rig,
        32 << 20,
        BlkGuestOptions {
            queues: 2,
            blocks: 1024,
            read_pct,
            ..Default::default()
        },
    )
}

/// Requests completed per queue so far.
fn completed(rig: &Rig) -> Vec<u64> {
    let st = rig.proxy.control().query_stats();
    st.queues.iter().map(|q| q.counters.completed).collect()
}

/// Waits (5 s at most) until queue `q` completed more than `than` requests in shadow mode.
fn await_progress(rig: &Rig, q: usize, than: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while completed(rig)[q] <= than {
        assert!(Instant::now() < deadline, "queue {q} made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn one_thread_serves_every_shadowed_ring_and_none_runs_in_passthrough() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    await_no_worker_thread();
    let rig = Rig::new(RigOptions {
        queues: 2,
        ..Default::default()
    });
    let (_ram, _vmm, runner) = two_queue_guest(&rig, 50);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rig.modes(), ["passthrough", "passthrough"]);
    assert_eq!(worker_threads(), [], "passthrough runs no data-path thread");

    let ctl = rig.proxy.control();
    for _ in 0..3 {
        ctl.set_shadow(true).unwrap();
        assert_eq!(rig.modes(), ["shadow", "shadow"]);
        let threads = worker_threads();
        assert_eq!(threads.len(), 1, "{threads:?}");
        assert_eq!(threads[0].0, "svqd-shadow0");
        let before = completed(&rig);
        await_progress(&rig, 0, before[0]);
        await_progress(&rig, 1, before[1]);
        ctl.set_shadow(false).unwrap();
        // It ends by itself, after the switch returned (nobody waits for its exit).
        await_no_worker_thread();
        assert_eq!(worker_threads(), [], "the thread ends with its last ring");
    }
    check_blk_run(&rig, runner);
}

#[test]
fn worker_cpus_give_each_listed_cpu_its_own_pinned_thread() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    await_no_worker_thread();
    let cpus: Vec<usize> = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        vec![0, 1]
    } else {
        vec![0]
    };
    let rig = Rig::new(RigOptions {
        queues: 2,
        policy: ShadowPolicy::Always,
        worker_cpus: cpus.clone(),
        ..Default::default()
    });
    let (_ram, _vmm, runner) = two_queue_guest(&rig, 50);
    await_progress(&rig, 0, 0);
    await_progress(&rig, 1, 0);
    let expected: Vec<(String, String)> = cpus
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("svqd-shadow{i}"), c.to_string()))
        .collect();
    assert_eq!(worker_threads(), expected);
    check_blk_run(&rig, runner);
}

#[test]
fn a_ring_its_guest_breaks_stops_alone_and_the_thread_serves_the_others() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    await_no_worker_thread();
    let rig = Rig::new(RigOptions {
        queues: 2,
        policy: ShadowPolicy::Always,
        ..Default::default()
    });
    let (ram, vmm, runner) = two_queue_guest(&rig, 100);
    await_progress(&rig, 0, 0);
    await_progress(&rig, 1, 0);
    assert_eq!(worker_threads().len(), 1);

    // The guest claims 0x8000 more buffers on queue 0 than its ring holds.
    runner.pause();
    let avail_idx = runner.with(|w| w.queues()[0].layout().avail + 2);
    let idx: u16 = ram.memory().read_obj(GuestAddress(avail_idx)).unwrap();
    ram.memory()
        .write_obj(idx.wrapping_add(0x8000), GuestAddress(avail_idx))
        .unwrap();
    runner.with(|w| w.queues()[0].kick_fd().write(1).unwrap());
    // svqd must read it before the guest publishes its next index over it.
    std::thread::sleep(Duration::from_millis(100));
    runner.resume();

    let deadline = Instant::now() + Duration::from_secs(5);
    let broken = loop {
        let stuck = completed(&rig)[0];
        std::thread::sleep(Duration::from_millis(50));
        if completed(&rig)[0] == stuck {
            break stuck;
        }
        assert!(Instant::now() < deadline, "queue 0 never stopped");
    };
    // Queue 1 goes on on the same thread, queue 0 does not.
    let before = completed(&rig)[1];
    await_progress(&rig, 1, before + 100);
    assert_eq!(completed(&rig)[0], broken);
    assert_eq!(worker_threads().len(), 1);
    assert_eq!(rig.modes(), ["shadow", "shadow"]);

    // The VMM that lied goes away; the next one is served on both queues.
    drop(vmm);
    drop(runner);
    let (_ram, _vmm, runner) = two_queue_guest(&rig, 50);
    let now = completed(&rig);
    await_progress(&rig, 0, now[0]);
    await_progress(&rig, 1, now[1]);
    assert_eq!(runner.drain(Duration::from_secs(10)), 0);
    let w = runner.stop();
    let w = w.lock().unwrap();
    assert_eq!(w.ledger().completed, w.ledger().issued);
    assert!(w.anomalies().is_empty(), "{:?}", w.anomalies());
}
