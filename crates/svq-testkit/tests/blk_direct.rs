//! The guest driver against the reference block backend directly (no proxy).

use std::sync::Arc;
use std::time::Duration;

use svq_testkit::backend::blk::{serve_blk, BlkDisk, BlkOptions, CompletionDelay};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions, BLOCK};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::{MemTableStyle, Vmm, VmmOptions};

fn run(event_idx: bool, queues: u16, delay: bool, mem_style: MemTableStyle) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let disk = BlkDisk::open(&dir.path().join("disk.img"), Some(8 << 20)).unwrap();
    let be = serve_blk(
        &sock,
        disk,
        BlkOptions {
            num_queues: queues,
            event_idx,
            delay: delay.then_some(CompletionDelay {
                min: Duration::from_micros(10),
                max: Duration::from_micros(800),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let ram = GuestRam::new("guest", 32 << 20).unwrap();
    let mut vmm = Vmm::connect(
        &sock,
        ram.clone(),
        VmmOptions {
            event_idx,
            mem_style,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(vmm.num_queues(), u64::from(queues));
    assert!(
        !vmm.supports_logging(),
        "reference backend must not offer logging"
    );
    let cfg = vmm.get_config(0, 36).unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    let guest = BlkGuest::new(
        ram.clone(),
        BlkGuestOptions {
            queues,
            event_idx: vmm.event_idx(),
            indirect: vmm.indirect(),
            blocks: 2048,
            ..Default::default()
        },
    )
    .unwrap();
    let runner = vmm.run_guest(guest).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(runner.drain(Duration::from_secs(5)), 0);
    let w = runner.stop();
    let w = w.lock().unwrap();
    let ledger = w.ledger();
    assert!(ledger.issued > 100, "too little I/O: {ledger:?}");
    assert_eq!(ledger.completed, ledger.issued);
    assert_eq!(ledger.duplicates, 0);
    assert!(w.anomalies().is_empty(), "{:?}", w.anomalies());
    // The disk holds exactly what the guest's model says.
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..2048u64 {
        be.disk().read_at(&mut buf, b * BLOCK).unwrap();
        assert_eq!(buf, w.expected_block(b), "block {b}");
    }
    let st = be.stats();
    assert_eq!(st.popped, ledger.issued);
    assert_eq!(st.completed, ledger.issued);
    assert_eq!(st.in_flight, 0);
    drop(vmm);
    be.stop();
    let _ = Arc::strong_count(&ram);
}

#[test]
fn sync_event_idx_one_queue() {
    run(true, 1, false, MemTableStyle::AddMemReg);
}

#[test]
fn sync_no_event_idx_set_mem_table() {
    run(false, 1, false, MemTableStyle::SetMemTable);
}

#[test]
fn async_delayed_four_queues_event_idx() {
    run(true, 4, true, MemTableStyle::AddMemReg);
}

#[test]
fn async_delayed_four_queues_no_event_idx() {
    run(false, 4, true, MemTableStyle::SetMemTable);
}
