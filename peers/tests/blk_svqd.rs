//! Unmodified QEMU 10 live migration through svqd: QEMU → svqd → qemu-storage-daemon, with the
//! guest making the device write guest RAM (O_DIRECT and page-cache reads, init_on_alloc=0).
//! svqd hides qsd's own logging and must log every page itself (shadow mode on LOG_ALL).
//! Oracle: paused destination, pmemsave on both sides, 0 differing 4 KiB pages; then the
//! destination runs on and the guest verifies its disk data. Negative control: svqd with its
//! hidden no-logging switch must leave differing pages.

use std::time::{Duration, Instant};

use svq_peers::guest::iterations;
use svq_peers::scenario::{ping_pong, BlkRig, Via};
use svq_peers::vm::SvqdOpts;

/// svqd's hidden test-only switch that disables writing the VMM's dirty log.
const NO_LOG_FLAG: &str = "--x-test-no-log";

fn svqd(shadow: &str) -> Via {
    Via::Svqd(SvqdOpts {
        shadow: shadow.into(),
        ..SvqdOpts::default()
    })
}

#[test]
fn svqd_auto_migration_zero_pages_differ() {
    let Some(s) = svq_peers::setup("svqd_auto_migration_zero_pages_differ") else {
        return;
    };
    let (boot, recs) = ping_pong(&s, "svqd-auto", svqd("auto"), 2, 2, |g, r| {
        eprintln!("svqd auto, migration {g}: {r}")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("svqd auto: boot {boot:?}");
    assert_eq!(recs.len(), 2);
}

#[test]
fn svqd_always_shadow_migration_zero_pages_differ() {
    let Some(s) = svq_peers::setup("svqd_always_shadow_migration_zero_pages_differ") else {
        return;
    };
    let (_, recs) = ping_pong(&s, "svqd-always", svqd("always"), 1, 2, |g, r| {
        eprintln!("svqd always, migration {g}: {r}")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recs.len(), 1);
}

#[test]
fn svqd_ping_pong_20_migrations() {
    let Some(s) = svq_peers::setup("svqd_ping_pong_20_migrations") else {
        return;
    };
    let n = 20;
    let (_, recs) = ping_pong(&s, "svqd-pingpong", svqd("auto"), n, 1, |g, r| {
        eprintln!("svqd ping-pong {g}/{n}: {r}")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recs.len(), n);
    let max_down = recs.iter().map(|r| r.stats.downtime_ms).max().unwrap_or(0);
    let avg_total = recs.iter().map(|r| r.stats.total_ms).sum::<u64>() / n as u64;
    eprintln!("svqd ping-pong: {n} migrations, 0 pages differ, avg total {avg_total} ms, max downtime {max_down} ms");
}

/// The negative control: the same migration with svqd's dirty logging switched off must show
/// differing pages, or the oracle above proves nothing.
#[test]
fn svqd_without_logging_pages_differ() {
    let Some(s) = svq_peers::setup("svqd_without_logging_pages_differ") else {
        return;
    };
    let via = Via::Svqd(SvqdOpts {
        shadow: "auto".into(),
        extra: vec![NO_LOG_FLAG.into()],
        control: true,
    });
    let rig = BlkRig::new(&s, "svqd-nolog", via).unwrap_or_else(|e| panic!("{e}"));
    let (side, _) = rig.boot(&s).unwrap_or_else(|e| panic!("{e}"));
    let (dst, rec) = rig
        .migrate(&s, side, 1, 0)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("svqd without logging: {rec}");
    assert_eq!(rec.stats.status, "completed");
    assert!(
        !rec.differing.is_empty(),
        "svqd with logging disabled left 0 differing pages: the oracle cannot fail"
    );
    drop(dst);
}

/// `svqctl set-shadow on/off` 100 times while the guest reads and writes its disk; the guest's
/// own checks must keep passing, and the data region must be intact on the host afterwards.
#[test]
fn svqd_set_shadow_toggle_100_under_io() {
    let Some(s) = svq_peers::setup("svqd_set_shadow_toggle_100_under_io") else {
        return;
    };
    let rig = BlkRig::new(&s, "svqd-toggle", svqd("auto")).unwrap_or_else(|e| panic!("{e}"));
    let (mut side, _) = rig.boot(&s).unwrap_or_else(|e| panic!("{e}"));
    let d = side.svqd.as_ref().expect("svqd");
    let t0 = Instant::now();
    for i in 0..100 {
        for st in ["on", "off"] {
            if let Err(e) = d.ctl(&["set-shadow", st]) {
                let ctx = rig.context(&side, format!("toggle {i} {st}: {e}"));
                panic!("{ctx}");
            }
        }
        // Spread the 200 switches over several guest I/O iterations.
        std::thread::sleep(Duration::from_millis(40));
    }
    let toggles = t0.elapsed();
    let status = d
        .ctl(&["--json", "query-stats"])
        .unwrap_or_else(|e| panic!("{}", rig.context(&side, e)));
    let stats: serde_json::Value = serde_json::from_str(&status).expect("query-stats JSON");
    let q0 = &stats["queues"][0];
    // Counters start again at a reconnection (a backend that dropped the connection shows as
    // a queue with none): the logs say why.
    let check = |ok: bool, what: &str| {
        if !ok {
            panic!("{}", rig.context(&side, format!("{what}: {q0}")));
        }
    };
    check(q0["mode"] == "passthrough", "queue not back in passthrough");
    check(
        q0["mode_switches"].as_u64().unwrap_or(0) >= 200,
        "svqd counted fewer than 200 mode switches",
    );
    check(
        q0["descriptors"].as_u64().unwrap_or(0) > 0,
        "no request went through the shadow ring during the toggles",
    );
    let before = iterations(&side.vm.console_text()).0;
    side.vm
        .wait_iterations(before, 2, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{}", rig.context(&side, e)));
    eprintln!(
        "200 mode switches in {toggles:?}, guest at iteration {}; stats: {status}",
        before + 2
    );
    side.shutdown().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(svq_peers::guest::data_md5(&rig.disk), rig.data_md5);
}

/// The 100-migration soak (scripts/peers/soak.sh): `SVQ_SOAK_N` migrations, `SVQ_SOAK_VIA`
/// svqd (default) or direct.
#[test]
#[ignore = "long: run by scripts/peers/soak.sh"]
fn soak() {
    let Some(s) = svq_peers::setup("soak") else {
        return;
    };
    let n: usize = std::env::var("SVQ_SOAK_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let via = match std::env::var("SVQ_SOAK_VIA").as_deref() {
        Ok("direct") => Via::Direct,
        _ => svqd("auto"),
    };
    let t0 = Instant::now();
    let (boot, recs) = ping_pong(&s, "soak", via, n, 1, |g, r| eprintln!("SOAK {g}/{n}: {r}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let tot: Vec<u64> = recs.iter().map(|r| r.stats.total_ms).collect();
    let down: Vec<u64> = recs.iter().map(|r| r.stats.downtime_ms).collect();
    eprintln!(
        "SOAK RESULT: {n} migrations, 0 pages differ in all, boot {boot:?}, total-time ms min/avg/max {}/{}/{}, downtime ms min/avg/max {}/{}/{}, wall {:?}",
        tot.iter().min().unwrap(),
        tot.iter().sum::<u64>() / n as u64,
        tot.iter().max().unwrap(),
        down.iter().min().unwrap(),
        down.iter().sum::<u64>() / n as u64,
        down.iter().max().unwrap(),
        t0.elapsed()
    );
}
