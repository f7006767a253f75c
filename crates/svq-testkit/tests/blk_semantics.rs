//! The block backend's qemu-storage-daemon semantics, and the running-ring kick replacement.

use std::time::{Duration, Instant};

use svq_testkit::backend::blk::{serve_blk, BlkDisk, BlkHandle, BlkOptions, CompletionDelay};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::vring::{Buf, DriverQueue, QueueLayout};
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::{Vmm, VmmOptions};
use vm_memory::{Bytes, GuestAddress};

fn backend(dir: &std::path::Path, opts: BlkOptions) -> BlkHandle {
    let disk = BlkDisk::open(&dir.join("disk.img"), Some(1 << 20)).unwrap();
    serve_blk(&dir.join("blk.sock"), disk, opts).unwrap()
}

/// Posts `n` 4 KiB reads on a raw driver queue and kicks.
fn post_reads(ram: &GuestRam, q: &mut DriverQueue, n: u64) {
    let mem = ram.memory();
    for i in 0..n {
        let hdr = 0x20_0000 + i * 64;
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&(i * 8).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let bufs = [
            Buf::ro(hdr, 16),
            Buf::wo(0x30_0000 + i * 4096, 4096),
            Buf::wo(hdr + 32, 1),
        ];
        q.add(mem, &bufs, false, i).unwrap();
    }
    q.publish(mem);
    assert!(q.kick_if_needed(mem));
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn started(
    dir: &std::path::Path,
    opts: BlkOptions,
) -> (BlkHandle, std::sync::Arc<GuestRam>, Vmm, DriverQueue) {
    let be = backend(dir, opts);
    let ram = GuestRam::new("g", 8 << 20).unwrap();
    let mut vmm = Vmm::connect(be.socket_path(), ram.clone(), VmmOptions::default()).unwrap();
    let layout = QueueLayout::at(0x10_0000, 64, 4);
    let q = DriverQueue::new(ram.memory(), 0, layout, vmm.event_idx(), false).unwrap();
    vmm.start_queue(0, layout, 0, q.kick_fd(), q.call_fd())
        .unwrap();
    (be, ram, vmm, q)
}

#[test]
fn get_vring_base_replies_at_once_and_late_completions_still_land() {
    let dir = tempfile::tempdir().unwrap();
    let delay = Duration::from_millis(150);
    let (be, ram, mut vmm, mut q) = started(
        dir.path(),
        BlkOptions {
            delay: Some(CompletionDelay::fixed(delay)),
            ..Default::default()
        },
    );
    post_reads(&ram, &mut q, 4);
    wait_for("4 popped", || be.stats().popped == 4);
    let t = Instant::now();
    let base = vmm.stop_queue(0).unwrap();
    let took = t.elapsed();
    // qsd: the base counts popped requests, including those still in flight, at once.
    assert_eq!(base, 4);
    assert!(took < delay / 2, "GET_VRING_BASE waited {took:?}");
    assert_eq!(be.stats().in_flight, 4);
    // The completions arrive later, into the ring that is still configured.
    wait_for("late completions", || be.stats().late_completions == 4);
    assert_eq!(q.device_used_idx(ram.memory()), 4);
    let done = q.reap(ram.memory());
    assert_eq!(done.len(), 4);
    assert!(done.iter().all(|c| c.len == 4097));
    assert!(q.take_anomalies().is_empty());
    // No call fd after GET_VRING_BASE: the notifications had nowhere to go.
    assert!(be.stats().unsignalled >= 1);
    drop(vmm);
    be.stop();
}

#[test]
fn draining_backend_waits_in_get_vring_base() {
    let dir = tempfile::tempdir().unwrap();
    let delay = Duration::from_millis(80);
    let (be, ram, mut vmm, mut q) = started(
        dir.path(),
        BlkOptions {
            delay: Some(CompletionDelay::fixed(delay)),
            stop_drains: true,
            ..Default::default()
        },
    );
    post_reads(&ram, &mut q, 3);
    wait_for("3 popped", || be.stats().popped == 3);
    let base = vmm.stop_queue(0).unwrap();
    assert_eq!(base, 3);
    let s = be.stats();
    assert_eq!((s.in_flight, s.completed, s.late_completions), (0, 3, 0));
    drop(vmm);
    be.stop();
}

#[test]
fn closed_call_fd_drops_the_connection_like_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let delay = Duration::from_millis(100);
    let (be, ram, mut vmm, mut q) = started(
        dir.path(),
        BlkOptions {
            delay: Some(CompletionDelay::fixed(delay)),
            disconnect_on_closed_call: true,
            ..Default::default()
        },
    );
    post_reads(&ram, &mut q, 2);
    wait_for("2 popped", || be.stats().popped == 2);
    vmm.stop_queue(0).unwrap();
    wait_for("late completions", || be.stats().completed == 2);
    // The backend hung up: the next request fails.
    wait_for("disconnect", || vmm.get_config(0, 8).is_err());
    be.stop();
}

#[test]
fn kick_fd_replaced_on_a_running_ring_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(
        dir.path(),
        BlkOptions {
            delay: Some(CompletionDelay {
                min: Duration::from_micros(10),
                max: Duration::from_micros(300),
            }),
            ..Default::default()
        },
    );
    let ram = GuestRam::new("g", 16 << 20).unwrap();
    let mut vmm = Vmm::connect(be.socket_path(), ram.clone(), VmmOptions::default()).unwrap();
    let guest = BlkGuest::new(
        ram.clone(),
        BlkGuestOptions {
            blocks: 256,
            event_idx: vmm.event_idx(),
            indirect: vmm.indirect(),
            ..Default::default()
        },
    )
    .unwrap();
    let runner = vmm.run_guest(guest).unwrap();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(10));
        runner.pause();
        runner.with(|w| {
            for q in w.queues_mut() {
                q.replace_eventfds().unwrap();
                vmm.replace_notifiers(q.index(), q.kick_fd(), q.call_fd())
                    .unwrap();
                q.kick_now();
            }
        });
        runner.resume();
    }
    let before = runner.with(|w| w.ledger().completed);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        runner.with(|w| w.ledger().completed) > before,
        "I/O stalled"
    );
    assert_eq!(runner.drain(Duration::from_secs(5)), 0);
    let w = runner.stop();
    let w = w.lock().unwrap();
    assert!(w.anomalies().is_empty(), "{:?}", w.anomalies());
    assert_eq!(w.ledger().issued, w.ledger().completed);
    drop(vmm);
    be.stop();
}

#[test]
fn malicious_ring_breaks_only_its_own_queue() {
    let dir = tempfile::tempdir().unwrap();
    let be = backend(
        dir.path(),
        BlkOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    let ram = GuestRam::new("g", 8 << 20).unwrap();
    let mut vmm = Vmm::connect(be.socket_path(), ram.clone(), VmmOptions::default()).unwrap();
    let l0 = QueueLayout::at(0x10_0000, 64, 4);
    let l1 = QueueLayout::at(0x14_0000, 64, 4);
    let mut q0 = DriverQueue::new(ram.memory(), 0, l0, vmm.event_idx(), false).unwrap();
    let mut q1 = DriverQueue::new(ram.memory(), 1, l1, vmm.event_idx(), false).unwrap();
    vmm.start_queue(0, l0, 0, q0.kick_fd(), q0.call_fd())
        .unwrap();
    vmm.start_queue(1, l1, 0, q1.kick_fd(), q1.call_fd())
        .unwrap();
    // Queue 0: an avail entry naming descriptor 999 of a 64-entry queue.
    let mem = ram.memory();
    mem.write_obj(999u16, GuestAddress(l0.avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(l0.avail + 2)).unwrap();
    q0.kick_now();
    // Queue 1: a read whose data buffer lies outside guest RAM, then ordinary reads.
    let hdr = 0x20_0000u64;
    mem.write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
    q1.add(
        mem,
        &[
            Buf::ro(hdr, 16),
            Buf::wo(ram.size() - 512, 4096),
            Buf::wo(hdr + 32, 1),
        ],
        false,
        100,
    )
    .unwrap();
    q1.publish(mem);
    q1.kick_now();
    wait_for("the bad read", || q1.has_used(mem));
    let c = q1.reap(mem);
    assert_eq!(c.len(), 1);
    let status: u8 = mem.read_obj(GuestAddress(hdr + 32)).unwrap();
    assert_eq!(status, 1, "IOERR for a buffer outside guest RAM");
    post_reads(&ram, &mut q1, 4);
    wait_for("queue 1 still serves", || {
        q1.device_used_idx(ram.memory()) == 5
    });
    // The bogus queue never completed anything, and the backend is alive.
    assert_eq!(q0.device_used_idx(ram.memory()), 0);
    assert!(vmm.get_config(0, 8).is_ok());
    drop(vmm);
    be.stop();
}
