//! The guest net driver against the echo backend directly (no proxy).

use std::time::Duration;

use svq_testkit::backend::net::{serve_net, NetOptions};
use svq_testkit::guest::net::{NetGuest, NetGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::{Vmm, VmmOptions};

fn run(event_idx: bool, pairs: u16) {
    run_with(event_idx, pairs, false)
}

fn run_with(event_idx: bool, pairs: u16, in_order: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let be = serve_net(
        &sock,
        NetOptions {
            queue_pairs: pairs,
            event_idx,
            in_order,
            ..Default::default()
        },
    )
    .unwrap();
    let ram = GuestRam::new("guest", 16 << 20).unwrap();
    let mut vmm = Vmm::connect(
        &sock,
        ram.clone(),
        VmmOptions {
            event_idx,
            in_order,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(vmm.num_queues(), 2 * u64::from(pairs));
    assert!(!vmm.supports_logging());
    assert_eq!(vmm.in_order(), in_order);
    let guest = NetGuest::new(
        ram.clone(),
        NetGuestOptions {
            pairs,
            event_idx: vmm.event_idx(),
            indirect: vmm.indirect(),
            in_order: vmm.in_order(),
            ..Default::default()
        },
    )
    .unwrap();
    let runner = vmm.run_guest(guest).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(runner.drain(Duration::from_secs(5)), 0);
    // Let the last echoes arrive.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while runner.with(|w| w.echoes_missing()) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let w = runner.stop();
    let w = w.lock().unwrap();
    let l = w.ledger();
    assert!(w.anomalies().is_empty(), "{:?}", w.anomalies());
    assert!(w.echoes() > 100, "too little traffic: {}", w.echoes());
    assert_eq!(w.echoes_missing(), 0);
    assert_eq!(l.duplicates, 0);
    assert_eq!(l.outstanding, 0);
    let st = be.stats();
    assert_eq!(st.tx_frames, st.rx_frames);
    assert_eq!(st.dropped, 0);
    assert_eq!(st.errors, 0);
    drop(vmm);
    be.stop();
}

#[test]
fn echo_event_idx_one_pair() {
    run(true, 1);
}

#[test]
fn echo_no_event_idx_two_pairs() {
    run(false, 2);
}

/// The echo device offers VIRTIO_F_IN_ORDER and completes in order: the in-order guest sees no
/// ordering fault.
#[test]
fn echo_in_order_two_pairs() {
    run_with(true, 2, true);
}
