//! The oracle can fail: through `vu-relay --drop-log` (dirty logging hidden from
//! qemu-storage-daemon, still advertised to QEMU) a live migration must leave differing pages,
//! while the same relay in passthrough leaves none. Independent of svqd.

use svq_peers::scenario::{BlkRig, Via};

fn one_migration(name: &str, drop_log: bool) -> usize {
    let Some(s) = svq_peers::setup(name) else {
        return usize::MAX;
    };
    let rig = BlkRig::new(&s, name, Via::Relay { drop_log }).unwrap_or_else(|e| panic!("{e}"));
    let (side, _) = rig.boot(&s).unwrap_or_else(|e| panic!("{e}"));
    let (dst, rec) = rig
        .migrate(&s, side, 1, 0)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{name}: {rec}");
    assert_eq!(rec.stats.status, "completed");
    dst.shutdown().unwrap_or_else(|e| panic!("{e}"));
    rec.differing.len()
}

#[test]
fn relay_passthrough_zero_pages_differ() {
    let n = one_migration("relay_passthrough", false);
    if n != usize::MAX {
        assert_eq!(n, 0, "a faithful relay must not lose dirty pages");
    }
}

#[test]
fn relay_drop_log_pages_differ() {
    let n = one_migration("relay_drop_log", true);
    if n != usize::MAX {
        assert!(
            n > 0,
            "with logging hidden from the backend the oracle must see differing pages"
        );
    }
}
