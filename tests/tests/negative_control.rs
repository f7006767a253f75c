//! The negative control: svqd with its dirty log disabled (the hidden test-only switch) must make
//! the oracle fail. Proves the oracle can fail on exactly the bug svqd exists to prevent.

use std::time::Duration;

use svq_e2e::{init_tracing, migrate_through_svqd, small_scenario, SvqdSettings};
use svq_testkit::scenario::{DeviceKind, ScenarioOptions};

#[test]
fn svqd_without_logging_fails_the_oracle() {
    init_tracing();
    for device in [DeviceKind::Blk, DeviceKind::Net] {
        let opts = ScenarioOptions {
            device,
            warmup: Duration::from_millis(150),
            ..small_scenario(Duration::from_millis(100))
        };
        let settings = SvqdSettings {
            log_enabled: false,
            ..Default::default()
        };
        let (r, _) = migrate_through_svqd(&opts, settings, &format!("{device:?}"));
        // The VMM believes logging works (svqd offers it)...
        assert!(r.migration.device_logging);
        // ...but nothing was logged for the device, and the oracle sees the lost writes.
        let logged = r.migration.device_pages();
        assert_eq!(logged, 0, "{device:?}: log disabled but pages were logged");
        assert!(
            !r.oracle.differing_pages.is_empty(),
            "{device:?}: the oracle missed unlogged device writes: {}",
            r.oracle
        );
        assert!(!r.oracle.passed());
    }
}
