//! svqd against a real vhost-vdpa device: qemu-storage-daemon's VDUSE blk export inside a TCG
//! guest running a 6.12 kernel (peers/src/vduse.rs). Skips, saying why, without the VDUSE fixture.

use std::path::Path;

use svq_peers::vduse::{run_guest, setup, GuestSpec};
use svq_peers::TestDir;

/// svqd's device layer alone (no VMM, no proxy): probe, clear open errors, IOTLB batch at
/// IOVA = GPA, status handshake, verified block I/O, reset and restart at the base, the image
/// compared with the guest's model.
#[test]
fn vdpa_device_layer_verified_blk_io() {
    run_checks(
        "vdpa_device_layer_verified_blk_io",
        1,
        "vdpa-guest device ${SVQ_VDPA_DEVS%% *} $SVQ_DISK --requests 3000",
        &[
            "vdpa-open-errors",
            "vdpa-config",
            "vdpa-io",
            "vdpa-restart",
            "vdpa-disk",
            "vdpa-unmap",
        ],
    );
}

/// Runs `script` in a VDUSE guest with `disks` devices and the vdpa-guest and svqd binaries;
/// fails on any `SVQ-FAIL` line or a missing `SVQ-PASS` for one of `checks`.
fn run_checks(test: &str, disks: u32, script: &str, checks: &[&str]) {
    let Some((s, vfx)) = setup(test) else {
        return;
    };
    let dir = TestDir::new(test);
    let mut spec = GuestSpec::new(test, script)
        .file(Path::new(env!("CARGO_BIN_EXE_vdpa-guest")), "vdpa-guest")
        .file(&svq_peers::workspace_bin("svqd"), "svqd");
    spec.disks = disks;
    let out = run_guest(&s.fx, &vfx, dir.path(), &spec).unwrap_or_else(|e| panic!("{e}"));
    for l in out.lines("SVQ-VDPA ").chain(out.lines("SVQ-PASS ")) {
        eprintln!("  {l}");
    }
    eprintln!("guest wall time {:?}", out.wall);
    let failures = out.failures();
    assert!(
        failures.is_empty(),
        "failures: {failures:#?}\n{}",
        out.tail(40)
    );
    let passed = out.passed();
    for check in checks {
        assert!(
            passed.iter().any(|p| p == check),
            "{check} not reported as passed:\n{}",
            out.tail(40)
        );
    }
}

/// svqd with `--backend vdpa:DEV` between the testkit's VMM and guest and a VDUSE blk device:
/// clear errors for a missing or busy device, verified block I/O in passthrough, in shadow mode,
/// and across 1000 runtime switches under load (the device has no SUSPEND: every switch drains
/// the ring, resets the device and restarts it at the right index); a second VMM on the same
/// svqd after the first disconnected.
#[test]
fn svqd_vdpa_passthrough_shadow_and_switches() {
    run_checks(
        "svqd_vdpa_passthrough_shadow_and_switches",
        1,
        "D=${SVQ_VDPA_DEVS%% *}\n\
         vdpa-guest cli /svq/svqd $D\n\
         vdpa-guest scenario $D $SVQ_DISK --shadow never\n\
         vdpa-guest scenario $D $SVQ_DISK --shadow always\n\
         vdpa-guest scenario $D $SVQ_DISK --shadow auto --switches 1000\n\
         vdpa-guest reconnect $D $SVQ_DISK",
        &[
            "vdpa-cli",
            "vdpa-reconnect",
            "vdpa-svqd-passthrough",
            "vdpa-svqd-shadow",
            "vdpa-svqd-switches",
        ],
    );
}

/// A live migration judged by the testkit's oracle: svqd on one VDUSE device (source), svqd on
/// a second one exporting the same image (destination): no page differs, every request
/// completes exactly once, the image holds what the guest wrote. Then the negative control, svqd
/// with its dirty log disabled, which the oracle must fail.
#[test]
fn svqd_vdpa_migration_and_negative_control() {
    run_checks(
        "svqd_vdpa_migration_and_negative_control",
        2,
        "set -- $SVQ_VDPA_DEVS\n\
         vdpa-guest migrate $1 $2 $SVQ_DISK\n\
         vdpa-guest migrate $1 $2 $SVQ_DISK --no-log",
        &["vdpa-migration", "vdpa-negative-control"],
    );
}
