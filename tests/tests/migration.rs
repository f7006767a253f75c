//! The migration oracle through svqd: blk and net, event-idx on and off, 1 and 4 queues, under
//! load, with both VMM logging styles and both memory-table styles.

use std::time::Duration;

use svq_e2e::{
    assert_oracle_passed, init_tracing, migrate_through_svqd, small_scenario, SvqdSettings,
};
use svq_testkit::scenario::{DeviceKind, ScenarioOptions};
use svq_testkit::vmm::{LogStyle, MemTableStyle, VmmOptions};

fn migrate(device: DeviceKind, queues: u16, event_idx: bool, log: LogStyle, mem: MemTableStyle) {
    init_tracing();
    let opts = ScenarioOptions {
        device,
        queues,
        event_idx,
        vmm: VmmOptions {
            log_style: log,
            mem_style: mem,
            ..Default::default()
        },
        seed: u64::from(queues) * 31 + u64::from(event_idx),
        ..small_scenario(Duration::from_millis(150))
    };
    let tag = format!("{device:?} queues={queues} event_idx={event_idx} {log:?} {mem:?}");
    let (r, lines) = migrate_through_svqd(&opts, SvqdSettings::default(), &tag);
    assert!(r.migration.device_logging, "{tag}: svqd must offer logging");
    assert_oracle_passed(&r, &tag, &lines);
    assert!(r.phases[0].ops > 20, "{tag}: no load before migration");
    assert!(r.phases[1].ops > 0, "{tag}: no load during migration");
    assert!(
        r.phases[2].ops > 20,
        "{tag}: guest did not run on the destination"
    );
    assert!(
        r.migration.device_pages() > 0,
        "{tag}: svqd logged no device page under load"
    );
}

#[test]
fn blk_1q_event_idx() {
    migrate(
        DeviceKind::Blk,
        1,
        true,
        LogStyle::Qemu,
        MemTableStyle::AddMemReg,
    );
}

#[test]
fn blk_1q_no_event_idx() {
    migrate(
        DeviceKind::Blk,
        1,
        false,
        LogStyle::CloudHypervisor,
        MemTableStyle::SetMemTable,
    );
}

#[test]
fn blk_4q_event_idx() {
    migrate(
        DeviceKind::Blk,
        4,
        true,
        LogStyle::CloudHypervisor,
        MemTableStyle::AddMemReg,
    );
}

#[test]
fn blk_4q_no_event_idx() {
    migrate(
        DeviceKind::Blk,
        4,
        false,
        LogStyle::Qemu,
        MemTableStyle::SetMemTable,
    );
}

#[test]
fn net_1q_event_idx() {
    migrate(
        DeviceKind::Net,
        1,
        true,
        LogStyle::Qemu,
        MemTableStyle::AddMemReg,
    );
}

#[test]
fn net_1q_no_event_idx() {
    migrate(
        DeviceKind::Net,
        1,
        false,
        LogStyle::CloudHypervisor,
        MemTableStyle::AddMemReg,
    );
}

#[test]
fn net_4q_event_idx() {
    migrate(
        DeviceKind::Net,
        4,
        true,
        LogStyle::Qemu,
        MemTableStyle::SetMemTable,
    );
}

#[test]
fn net_4q_no_event_idx() {
    migrate(
        DeviceKind::Net,
        4,
        false,
        LogStyle::CloudHypervisor,
        MemTableStyle::SetMemTable,
    );
}

/// svqd shadowing from the first request (policy always), then migrating.
#[test]
fn blk_2q_shadow_always() {
    init_tracing();
    let opts = ScenarioOptions {
        queues: 2,
        ..small_scenario(Duration::from_millis(150))
    };
    let settings = SvqdSettings {
        shadow: svqd::ShadowPolicy::Always,
        ..Default::default()
    };
    let (r, lines) = migrate_through_svqd(&opts, settings, "shadow always");
    assert_oracle_passed(&r, "shadow always", &lines);
}

/// svqd adding its shadow rings with SET_MEM_TABLE (a backend without CONFIGURE_MEM_SLOTS),
/// and a backend that hangs up like qemu-storage-daemon when a late completion finds its call
/// fd closed.
#[test]
fn blk_4q_backend_set_mem_table_strict_call() {
    init_tracing();
    let opts = ScenarioOptions {
        queues: 4,
        blk_strict_call: true,
        ..small_scenario(Duration::from_millis(150))
    };
    let settings = SvqdSettings {
        backend_mem_slots: false,
        ..Default::default()
    };
    let tag = "backend SET_MEM_TABLE, strict call";
    let (r, lines) = migrate_through_svqd(&opts, settings, tag);
    assert_oracle_passed(&r, tag, &lines);
}

/// Ping-pong: four migrations in a row under load, each destination svqd (started in
/// passthrough, resuming from the previous side's ring bases) becoming the next source.
#[test]
fn ping_pong_four_hops() {
    init_tracing();
    for device in [DeviceKind::Blk, DeviceKind::Net] {
        let opts = ScenarioOptions {
            device,
            queues: 2,
            hops: 4,
            ..small_scenario(Duration::from_millis(100))
        };
        let tag = format!("{device:?}");
        let (r, lines) = migrate_through_svqd(&opts, SvqdSettings::default(), &tag);
        assert_oracle_passed(&r, &tag, &lines);
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("guest running on the destination"))
                .count(),
            4
        );
    }
}

/// A migration cancelled after a few rounds (LOG_ALL on, then off: svqd to shadow and back under
/// load), then a real one.
#[test]
fn cancelled_then_completed() {
    init_tracing();
    for device in [DeviceKind::Blk, DeviceKind::Net] {
        let opts = ScenarioOptions {
            device,
            queues: 2,
            cancel_first: true,
            ..small_scenario(Duration::from_millis(100))
        };
        let tag = format!("{device:?}");
        let (r, lines) = migrate_through_svqd(&opts, SvqdSettings::default(), &tag);
        let cancel = lines
            .iter()
            .find(|l| l.contains("migration cancelled"))
            .unwrap_or_else(|| panic!("no cancelled migration:\n{}", lines.join("\n")));
        // svqd did switch to shadow mode: the backend's writes were logged while it lasted.
        assert!(!cancel.contains("(0 device pages"), "{cancel}");
        assert_oracle_passed(&r, &tag, &lines);
    }
}
