//! The oracle itself: it must pass a correct migration and fail one that loses device writes.
//! No proxy here: the reference backends cannot log, so a migration under device load must fail.

use std::time::Duration;

use svq_testkit::guest::ram::GuestRam;
use svq_testkit::migration::MigrationOptions;
use svq_testkit::oracle::RamSnapshot;
use svq_testkit::scenario::{run_migration, DeviceKind, ScenarioOptions};
use vm_memory::{Bytes, GuestAddress};

fn opts(device: DeviceKind, idle: bool) -> ScenarioOptions {
    ScenarioOptions {
        device,
        idle_during_migration: idle,
        ram_size: 32 << 20,
        disk_size: 8 << 20,
        warmup: Duration::from_millis(150),
        after: Duration::from_millis(100),
        migration: MigrationOptions {
            require_logging: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn snapshot_finds_exactly_the_changed_pages() {
    let a = GuestRam::new("a", 1 << 20).unwrap();
    let b = GuestRam::new("b", 1 << 20).unwrap();
    a.memory().write_obj(1u8, GuestAddress(0x5000)).unwrap();
    a.copy_all_to(&b).unwrap();
    let snap = RamSnapshot::take(&b).unwrap();
    assert!(snap.differing_pages(&a).unwrap().is_empty());
    a.memory().write_obj(2u8, GuestAddress(0x7fff)).unwrap();
    a.memory().write_obj(3u8, GuestAddress(0xf0000)).unwrap();
    assert_eq!(snap.differing_pages(&a).unwrap(), vec![7, 0xf0]);
    // CPU writes are in the guest's dirty bitmap, page granular.
    a.reset_cpu_dirty();
    a.memory().write_obj(4u8, GuestAddress(0x3001)).unwrap();
    assert_eq!(a.take_cpu_dirty(), vec![3]);
    assert!(a.take_cpu_dirty().is_empty());
}

#[test]
fn idle_device_migration_passes_without_device_logging() {
    for device in [DeviceKind::Blk, DeviceKind::Net] {
        let r = run_migration(&opts(device, true), None, &mut |_| {}).unwrap();
        assert!(r.oracle.passed(), "{device:?}: {:?}", r.oracle.failures());
        assert!(
            r.oracle.ledger.issued > 50,
            "{device:?}: {:?}",
            r.oracle.ledger
        );
        // The guest kept working on the destination.
        assert!(r.phases[2].ops > 0, "{device:?}: no I/O after migration");
    }
}

#[test]
fn oracle_fails_when_device_writes_are_not_logged() {
    for device in [DeviceKind::Blk, DeviceKind::Net] {
        let r = run_migration(&opts(device, false), None, &mut |_| {}).unwrap();
        assert!(!r.migration.device_logging);
        assert!(
            !r.oracle.differing_pages.is_empty(),
            "{device:?}: unlogged device writes went unnoticed: {}",
            r.oracle
        );
        assert!(!r.oracle.passed());
    }
}
