//! Proves the harness and the oracle with no svqd in the path: QEMU 10 ↔ qemu-storage-daemon
//! directly (qsd logs dirty pages itself), one live migration under device-writes-RAM I/O.

use svq_peers::scenario::{ping_pong, Via};

#[test]
fn qsd_direct_migration_zero_pages_differ() {
    let Some(s) = svq_peers::setup("qsd_direct_migration_zero_pages_differ") else {
        return;
    };
    let (boot, recs) = ping_pong(&s, "qsd-direct", Via::Direct, 2, 2, |g, r| {
        eprintln!("qsd direct, migration {g}: {r}")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("qsd direct: boot {boot:?}");
    assert_eq!(recs.len(), 2);
    assert!(recs
        .iter()
        .all(|r| r.differing.is_empty() && r.stats.status == "completed"));
}
