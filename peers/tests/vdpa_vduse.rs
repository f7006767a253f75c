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
    let Some((s, vfx)) = setup("vdpa_device_layer_verified_blk_io") else {
        return;
    };
    let dir = TestDir::new("vdpa-device");
    let spec = GuestSpec::new(
        "vdpa-device",
        "vdpa-guest device ${SVQ_VDPA_DEVS%% *} $SVQ_DISK --requests 3000",
    )
    .file(Path::new(env!("CARGO_BIN_EXE_vdpa-guest")), "vdpa-guest");
    let out = run_guest(&s.fx, &vfx, dir.path(), &spec).unwrap_or_else(|e| panic!("{e}"));
    for l in out.lines("SVQ-VDPA ").chain(out.lines("SVQ-PASS ")) {
        eprintln!("  {l}");
    }
    eprintln!("guest wall time {:?}", out.wall);
    let failures = out.failures();
    assert!(
        failures.is_empty(),
        "failures: {failures:#?}\n{}",
        out.tail(30)
    );
    let passed = out.passed();
    for check in [
        "vdpa-open-errors",
        "vdpa-config",
        "vdpa-io",
        "vdpa-restart",
        "vdpa-disk",
        "vdpa-unmap",
    ] {
        assert!(
            passed.iter().any(|p| p == check),
            "{check} not reported as passed:\n{}",
            out.tail(40)
        );
    }
}
