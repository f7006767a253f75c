//! `svqd demo`'s engine, run in-process with a short I/O phase: it must verify and say so.

use svq_e2e::{init_tracing, svqd_launcher, SvqdSettings};
use svq_testkit::demo::{run, DemoDevice, DemoOptions};

#[test]
fn demo_blk_passes_and_reports() {
    init_tracing();
    let opts = DemoOptions {
        seconds: 0.2,
        ram_mib: 32,
        ..Default::default()
    };
    let mut launcher = svqd_launcher(SvqdSettings::default());
    let mut out = Vec::new();
    let r = run(&opts, &mut launcher, &mut out);
    let text = String::from_utf8_lossy(&out);
    let r = r.unwrap_or_else(|e| panic!("demo failed: {e}\n{text}"));
    assert!(r.oracle.passed());
    for needle in [
        "throughput before",
        "throughput during",
        "throughput after",
        "mode switch",
        "pages per round",
        "downtime",
        "0 pages differ",
        "PASS",
    ] {
        assert!(text.contains(needle), "report lacks {needle:?}:\n{text}");
    }
}

#[test]
fn demo_net_passes() {
    init_tracing();
    let opts = DemoOptions {
        device: DemoDevice::Net,
        seconds: 0.2,
        ram_mib: 32,
        ..Default::default()
    };
    let mut launcher = svqd_launcher(SvqdSettings::default());
    let mut out = Vec::new();
    let r = run(&opts, &mut launcher, &mut out);
    let text = String::from_utf8_lossy(&out);
    r.unwrap_or_else(|e| panic!("demo failed: {e}\n{text}"));
    assert!(text.contains("PASS"), "{text}");
}

#[test]
fn demo_reports_failure_with_svqd_logging_disabled() {
    init_tracing();
    let opts = DemoOptions {
        seconds: 0.2,
        ram_mib: 32,
        ..Default::default()
    };
    let mut launcher = svqd_launcher(SvqdSettings {
        log_enabled: false,
        ..Default::default()
    });
    let mut out = Vec::new();
    let r = run(&opts, &mut launcher, &mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(r.is_err(), "demo passed with logging disabled:\n{text}");
    assert!(text.contains("FAIL"), "{text}");
}
