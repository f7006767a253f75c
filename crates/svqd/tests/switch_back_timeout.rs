//! A switch back to passthrough whose backend does not complete the requests it took within
//! --drain-timeout (after GET_VRING_BASE stopped the shadow ring) must leave the queue in shadow
//! mode, running: nothing lost or doubled, and a later switch back succeeds.

mod common;

use std::time::{Duration, Instant};

use common::{check_blk_run, Rig, RigOptions};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions};
use svq_testkit::guest::runner::GuestRunner;

/// Pause the guest and wait until the backend holds no request.
fn quiet(rig: &Rig, runner: &GuestRunner<BlkGuest>) {
    runner.pause();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.backend.stats().in_flight > 0 {
        assert!(Instant::now() < deadline, "backend never went idle");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn slow_requests_keep_the_queue_in_shadow_mode_and_lose_nothing() {
    let rig = Rig::new(RigOptions {
        // Every request takes 150-250 ms in the backend; svqd waits 40 ms at most.
        delay: Some((150_000, 250_000)),
        drain_timeout: Duration::from_millis(40),
        ..Default::default()
    });
    let (_ram, _vmm, runner) = common::blk_vmm(&rig, 32 << 20, BlkGuestOptions::default());
    let ctl = rig.proxy.control();

    // Into shadow mode while nothing is in flight (a passthrough drain would time out too).
    std::thread::sleep(Duration::from_millis(300));
    quiet(&rig, &runner);
    ctl.set_shadow(true).unwrap();
    assert_eq!(rig.modes(), ["shadow"]);
    runner.resume();

    // Requests in flight for longer than the drain timeout: the switch back must fail cleanly.
    std::thread::sleep(Duration::from_millis(100));
    assert!(rig.backend.stats().in_flight > 0);
    let err = ctl
        .set_shadow(false)
        .expect_err("the backend cannot complete its requests within 40 ms");
    assert!(err.contains("in flight"), "{err}");
    assert_eq!(rig.modes(), ["shadow"], "the queue keeps shadowing");
    let late = ctl.query_stats().queues[0].counters.late_completions;
    assert!(late > 0, "the stop found taken requests");

    // The guest keeps going through the shadow ring, then the switch back succeeds.
    std::thread::sleep(Duration::from_millis(500));
    quiet(&rig, &runner);
    ctl.set_shadow(false).unwrap();
    assert_eq!(rig.modes(), ["passthrough"]);
    runner.resume();
    std::thread::sleep(Duration::from_millis(300));
    check_blk_run(&rig, runner);
}
