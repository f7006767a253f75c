//! The negative control: svqd with its dirty log disabled (the hidden test-only switch) must make
//! the oracle fail. Proves the oracle can fail on exactly the bug svqd exists to prevent.

use std::time::Duration;

use svq_e2e::{init_tracing, svqd_launcher, SvqdSettings};
use svq_testkit::scenario::{run_migration, DeviceKind, ScenarioOptions};

#[test]
fn svqd_without_logging_fails_the_oracle() {
    init_tracing();
    for device in [DeviceKind::Blk, DeviceKind::Net] {
        let opts = ScenarioOptions {
            device,
            ram_size: 32 << 20,
            disk_size: 8 << 20,
            warmup: Duration::from_millis(150),
            after: Duration::from_millis(100),
            ..Default::default()
        };
        let mut launcher = svqd_launcher(SvqdSettings {
            log_enabled: false,
            ..Default::default()
        });
        let r = run_migration(&opts, Some(&mut launcher), &mut |_| {}).expect("scenario runs");
        // The VMM believes logging works (svqd offers it)...
        assert!(r.migration.device_logging);
        // ...but nothing was logged for the device, and the oracle sees the lost writes.
        let logged: u64 = r
            .migration
            .rounds
            .iter()
            .map(|s| s.device_pages)
            .sum::<u64>()
            + r.migration.final_round.device_pages;
        assert_eq!(logged, 0, "{device:?}: log disabled but pages were logged");
        assert!(
            !r.oracle.differing_pages.is_empty(),
            "{device:?}: the oracle missed unlogged device writes: {}",
            r.oracle
        );
        assert!(!r.oracle.passed());
    }
}
