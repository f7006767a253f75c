//! `svq-demo`'s engine, run in-process with a short I/O phase: it must verify and say so.

use svq_e2e::{init_tracing, svqd_launcher, SvqdSettings};
use svq_testkit::demo::{run, DemoDevice, DemoError, DemoOptions};
use svq_testkit::scenario::MigrationScenarioReport;

/// Runs the demo for 0.2 s of I/O per phase on a 32 MiB guest of `device`, through svqd
/// configured by `settings`; returns its result and the report it printed.
fn run_demo(
    device: DemoDevice,
    settings: SvqdSettings,
) -> (Result<MigrationScenarioReport, DemoError>, String) {
    init_tracing();
    let opts = DemoOptions {
        device,
        seconds: 0.2,
        ram_mib: 32,
        ..Default::default()
    };
    let mut launcher = svqd_launcher(settings);
    let mut out = Vec::new();
    let r = run(&opts, &mut launcher, &mut out);
    (r, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn demo_blk_passes_and_reports() {
    let (r, text) = run_demo(DemoDevice::Blk, SvqdSettings::default());
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
    let (r, text) = run_demo(DemoDevice::Net, SvqdSettings::default());
    r.unwrap_or_else(|e| panic!("demo failed: {e}\n{text}"));
    assert!(text.contains("PASS"), "{text}");
}

#[test]
fn demo_reports_failure_with_svqd_logging_disabled() {
    let settings = SvqdSettings {
        log_enabled: false,
        ..Default::default()
    };
    let (r, text) = run_demo(DemoDevice::Blk, settings);
    assert!(r.is_err(), "demo passed with logging disabled:\n{text}");
    assert!(text.contains("FAIL"), "{text}");
}
