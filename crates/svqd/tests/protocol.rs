//! Protocol-level behaviour: what svqd advertises, bad input from the VMM, VMM reconnects, VM stop
//! in shadow mode.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Rig, RigOptions};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::vring::Anomaly;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::{LogStyle, MemTableStyle};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const LOG_ALL: u64 = 1 << 26;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;
const RAM: u64 = 1 << 20;
const UVA: u64 = 0x7f00_0000_0000;

fn memfd(size: u64) -> File {
    svq_testkit::guest::ram::memfd("vmm-test", size).unwrap()
}

/// A hand-driven VMM: negotiates, installs 1 MiB of RAM at GPA 0 / UVA 0x7f00_0000_0000.
fn raw_vmm(rig: &Rig) -> (Frontend, File) {
    let mut fe = Frontend::connect(&rig.socket, 64).unwrap();
    let f = fe.get_features().unwrap();
    assert_ne!(f & LOG_ALL, 0, "svqd always offers LOG_ALL");
    let p = fe.get_protocol_features().unwrap();
    assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    for hidden in [
        VhostUserProtocolFeatures::STATUS,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::HOST_NOTIFIER,
        VhostUserProtocolFeatures::PAGEFAULT,
        VhostUserProtocolFeatures::SHARED_OBJECT,
        VhostUserProtocolFeatures::INBAND_NOTIFICATIONS,
    ] {
        assert!(!p.contains(hidden), "{hidden:?} must not be advertised");
    }
    let want = p
        & (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD);
    fe.set_protocol_features(want).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    fe.set_features(f & (VERSION_1 | PROTOCOL_FEATURES))
        .unwrap();
    let ram = memfd(RAM);
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: UVA,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    }])
    .unwrap();
    (fe, ram)
}

fn ring(desc: u64, avail: u64, used: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    }
}

/// The proxy still serves a fresh VMM after `rig`'s previous one was thrown out.
fn still_serves(rig: &Rig) {
    let (fe, _ram) = raw_vmm(rig);
    fe.set_vring_num(0, 64).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 0);
}

#[test]
fn bad_queue_index_never_reaches_the_backend() {
    let rig = Rig::new(RigOptions::default());
    let (fe, _ram) = raw_vmm(&rig);
    // One queue: index 1 and up are refused (nacked) by svqd itself.
    assert!(fe.set_vring_num(1, 64).is_err());
    assert!(fe.set_vring_base(7, 0).is_err());
    let e = EventFd::new(0).unwrap();
    assert!(fe.set_vring_call(200, &e).is_err());
    fe.set_vring_num(0, 64).unwrap();
    // GET_VRING_BASE has no ack to carry a refusal: svqd drops that VMM (as a backend would)
    // without passing the index on: qemu-storage-daemon aborts on it.
    assert!(fe.get_vring_base(3).is_err());
    drop(fe);
    still_serves(&rig);
    let st = rig.backend.stats();
    assert_eq!(st.popped, 0);
}

#[test]
fn bogus_ring_addresses_are_refused() {
    let rig = Rig::new(RigOptions::default());
    let (fe, _ram) = raw_vmm(&rig);
    fe.set_vring_num(0, 64).unwrap();
    // Outside guest memory.
    assert!(fe
        .set_vring_addr(0, &ring(UVA + RAM, UVA + 0x1000, UVA + 0x2000))
        .is_err());
    // Straddling the end of guest memory.
    assert!(fe
        .set_vring_addr(0, &ring(UVA, UVA + 0x1000, UVA + RAM - 16))
        .is_err());
    // A GPA instead of a user address.
    assert!(fe.set_vring_addr(0, &ring(0, 0x1000, 0x2000)).is_err());
    fe.set_vring_addr(0, &ring(UVA, UVA + 0x1000, UVA + 0x2000))
        .unwrap();
    // Queue sizes.
    assert!(fe.set_vring_num(0, 0).is_err());
    assert!(fe.set_vring_num(0, 100).is_err());
    // A misaligned ring is a malformed message (the vhost crate rejects it before svqd sees it):
    // that VMM connection ends, svqd serves the next one.
    assert!(fe
        .set_vring_addr(0, &ring(UVA + 8, UVA + 0x1000, UVA + 0x2000))
        .is_err());
    drop(fe);
    still_serves(&rig);
}

#[test]
fn oversized_region_table_is_refused() {
    let rig = Rig::new(RigOptions::default());
    let (fe, _ram) = raw_vmm(&rig);
    let files: Vec<File> = (0..9).map(|_| memfd(0x10000)).collect();
    let regions: Vec<VhostUserMemoryRegionInfo> = files
        .iter()
        .enumerate()
        .map(|(i, f)| VhostUserMemoryRegionInfo {
            guest_phys_addr: i as u64 * 0x10000,
            memory_size: 0x10000,
            userspace_addr: UVA + i as u64 * 0x10000,
            mmap_offset: 0,
            mmap_handle: f.as_raw_fd(),
        })
        .collect();
    assert!(fe.set_mem_table(&regions).is_err());
    // Overlapping regions.
    let overlap = [
        regions[0],
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0x8000,
            ..regions[1]
        },
    ];
    assert!(fe.set_mem_table(&overlap).is_err());
    // A valid table still works afterwards.
    fe.set_mem_table(&regions[..2]).unwrap();
}

#[test]
fn unknown_message_closes_only_that_connection() {
    let rig = Rig::new(RigOptions::default());
    let mut s = UnixStream::connect(&rig.socket).unwrap();
    // request 250, version 1, no payload.
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&250u32.to_le_bytes());
    hdr[4..8].copy_from_slice(&1u32.to_le_bytes());
    s.write_all(&hdr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "svqd closes the connection");
    still_serves(&rig);
}

#[test]
fn log_regions_past_their_file_are_refused() {
    let rig = Rig::new(RigOptions::default());
    // A log region larger than its file would fault on the first write: refused. SET_LOG_BASE
    // has no nack (its reply echoes the region), so that VMM connection ends.
    let (fe, _ram) = raw_vmm(&rig);
    let log = memfd(4096);
    let region = |size| vhost::VhostUserDirtyLogRegion {
        mmap_size: size,
        mmap_offset: 0,
        mmap_handle: log.as_raw_fd(),
    };
    assert!(fe.set_log_base(0, Some(region(8192))).is_err());
    drop(fe);
    let (fe, _ram) = raw_vmm(&rig);
    fe.set_log_base(0, Some(region(4096))).unwrap();
    let st = rig.proxy.control().query_status();
    assert_eq!(st.log_bytes, Some(4096));
    // Replaced at any time (Cloud Hypervisor installs a fresh one per read).
    let log2 = memfd(8192);
    fe.set_log_base(
        0,
        Some(vhost::VhostUserDirtyLogRegion {
            mmap_size: 8192,
            mmap_offset: 0,
            mmap_handle: log2.as_raw_fd(),
        }),
    )
    .unwrap();
    let st = rig.proxy.control().query_status();
    assert_eq!(st.log_bytes, Some(8192));
}

#[test]
fn vmm_reconnects_and_vm_stop_in_shadow_mode_hands_over_a_consistent_index() {
    let rig = Rig::new(RigOptions {
        delay: Some((20, 800)),
        ..Default::default()
    });
    for round in 0..2 {
        let ram = GuestRam::new("guest", 16 << 20).unwrap();
        let mut vmm = rig.vmm(ram.clone(), MemTableStyle::AddMemReg, LogStyle::Qemu, true);
        let guest = BlkGuest::new(
            ram.clone(),
            BlkGuestOptions {
                event_idx: vmm.event_idx(),
                indirect: vmm.indirect(),
                blocks: 512,
                ..Default::default()
            },
        )
        .unwrap();
        let q = &guest.queues()[0];
        vmm.start_queue(0, q.layout(), 0, q.kick_fd(), q.call_fd())
            .unwrap();
        let runner = GuestRunner::spawn(guest).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        vmm.start_dirty_log().unwrap();
        assert_eq!(rig.modes(), ["shadow"], "round {round}");
        std::thread::sleep(Duration::from_millis(30));
        // VM stop: the guest is paused, the ring stopped. The index must have everything before it
        // completed in the guest ring (nothing in flight anywhere).
        runner.pause();
        let base = vmm.stop_queue(0).unwrap();
        let used = runner.with(|w| w.queues()[0].device_used_idx(ram.memory()));
        assert_eq!(
            base, used,
            "GET_VRING_BASE = guest used idx after the drain"
        );
        assert_eq!(rig.backend.stats().in_flight, 0);
        assert_eq!(rig.modes(), ["passthrough"]);
        // Resume (migration failed): the ring restarts from that index, still logging, and the
        // requests the guest posted meanwhile are served exactly once.
        let (layout, kick, call) = runner.with(|w| {
            let q = &w.queues()[0];
            (
                q.layout(),
                q.kick_fd().try_clone().unwrap(),
                q.call_fd().try_clone().unwrap(),
            )
        });
        vmm.start_queue(0, layout, base, &kick, &call).unwrap();
        assert_eq!(rig.modes(), ["shadow"]);
        runner.resume();
        std::thread::sleep(Duration::from_millis(30));
        vmm.stop_dirty_log().unwrap();
        assert_eq!(rig.modes(), ["passthrough"]);
        assert_eq!(runner.drain(Duration::from_secs(10)), 0);
        let w = runner.stop();
        let w = w.lock().unwrap();
        // The second guest starts on the disk the first one wrote: its reads of those blocks
        // differ from its fresh model by design; every other anomaly is a failure.
        let anomalies: Vec<_> = w
            .anomalies()
            .into_iter()
            .filter(|a| round == 0 || !matches!(a, Anomaly::Data(_)))
            .collect();
        assert!(anomalies.is_empty(), "{anomalies:?}");
        let l = w.ledger();
        assert_eq!(l.completed, l.issued);
        assert_eq!(l.duplicates, 0);
        // Next round: a new VMM on the same svqd (the previous one disconnects here).
        drop(vmm);
    }
    assert!(
        rig.backend.connections() >= 2,
        "backend connection reset per VMM"
    );
}

#[test]
fn backend_disconnect_closes_the_vmm_and_svqd_recovers() {
    let rig = Rig::new(RigOptions::default());
    let (fe, _ram) = raw_vmm(&rig);
    fe.set_vring_num(0, 64).unwrap();
    let before = rig.backend.connections();
    rig.backend.disconnect_current();
    // svqd notices the hang-up, closes the VMM connection (the VMM sees an error, not a hang) and
    // connects to the backend again for the next VMM.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if fe.set_vring_num(0, 64).is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VMM connection not closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(fe);
    still_serves(&rig);
    assert!(rig.backend.connections() > before);
}
