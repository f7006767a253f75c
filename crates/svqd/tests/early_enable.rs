//! SET_VRING_ENABLE before SET_FEATURES (what QEMU 10's virtio-net sends): the vhost crate's
//! handler refuses it, svqd answers it itself and forwards it once the backend can take it.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Rig, RigOptions};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::GuestWorkload;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

const SET_VRING_ENABLE: u32 = 18;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;

/// Send SET_VRING_ENABLE by hand (the crate's `Frontend` refuses to before SET_FEATURES, like
/// the handler does) with NEED_REPLY, and return the ack's value (0 = success).
fn raw_enable(s: &mut UnixStream, index: u32, num: u32) -> std::io::Result<u64> {
    let mut msg = [0u8; 20];
    msg[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
    msg[4..8].copy_from_slice(&(1 | VhostUserHeaderFlag::NEED_REPLY.bits()).to_le_bytes());
    msg[8..12].copy_from_slice(&8u32.to_le_bytes());
    msg[12..16].copy_from_slice(&index.to_le_bytes());
    msg[16..20].copy_from_slice(&num.to_le_bytes());
    s.write_all(&msg)?;
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)?;
    let word = |i: usize| u32::from_le_bytes(reply[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(word(0), SET_VRING_ENABLE, "reply to the request");
    assert_eq!(
        word(1),
        1 | VhostUserHeaderFlag::REPLY.bits(),
        "version 1, REPLY"
    );
    assert_eq!(word(2), 8, "u64 payload");
    Ok(u64::from_le_bytes(reply[12..20].try_into().unwrap()))
}

#[test]
fn enable_before_set_features_is_answered_and_reaches_the_backend() {
    let rig = Rig::new(RigOptions {
        event_idx: false,
        ..Default::default()
    });
    let mut sock = UnixStream::connect(&rig.socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut fe = Frontend::from_stream(sock.try_clone().unwrap(), 64);
    let f = fe.get_features().unwrap();
    assert_ne!(f & PROTOCOL_FEATURES, 0);
    let p = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        p & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();

    // QEMU's order: enable states first. A bad index is nacked and the connection stays.
    assert_eq!(raw_enable(&mut sock, 0, 0).unwrap(), 0);
    assert_eq!(
        raw_enable(&mut sock, 5, 1).unwrap(),
        1,
        "queue 5 does not exist"
    );
    assert_eq!(raw_enable(&mut sock, 0, 1).unwrap(), 0);
    let st = rig.proxy.control().query_status();
    assert!(st.queues[0].enabled, "{st:?}");

    // Then features, memory and the ring, with no SET_VRING_ENABLE after them: the ring is only
    // served if svqd forwarded the early enable (the backend starts rings disabled once
    // PROTOCOL_FEATURES is acked).
    fe.set_features(f & (VERSION_1 | PROTOCOL_FEATURES))
        .unwrap();
    let ram = GuestRam::new("guest", 16 << 20).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_addr(),
        mmap_offset: 0,
        mmap_handle: ram.file().as_raw_fd(),
    }])
    .unwrap();
    let guest = BlkGuest::new(
        ram.clone(),
        BlkGuestOptions {
            event_idx: false,
            indirect: false,
            indirect_pct: 0,
            blocks: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let q = &guest.queues()[0];
    let l = q.layout();
    let uva = |gpa: u64| ram.host_addr() + gpa;
    fe.set_vring_num(0, l.size).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: l.size,
            queue_size: l.size,
            flags: 0,
            desc_table_addr: uva(l.desc),
            used_ring_addr: uva(l.used),
            avail_ring_addr: uva(l.avail),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_kick(0, q.kick_fd()).unwrap();
    fe.set_vring_call(0, q.call_fd()).unwrap();
    let runner = GuestRunner::spawn(guest).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        runner.drain(Duration::from_secs(10)),
        0,
        "requests left unserved"
    );
    let w = runner.stop();
    let w = w.lock().unwrap();
    assert!(w.anomalies().is_empty(), "{:?}", w.anomalies());
    let l = w.ledger();
    assert!(l.issued > 0);
    assert_eq!(l.completed, l.issued);

    // A malformed enable (num 2) ends that VMM connection, as the vhost crate would; svqd serves
    // the next VMM.
    drop(fe);
    drop(sock);
    let mut sock = UnixStream::connect(&rig.socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut fe = Frontend::from_stream(sock.try_clone().unwrap(), 64);
    fe.get_features().unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    assert!(raw_enable(&mut sock, 0, 2).is_err(), "connection closed");
    drop(fe);
    let fe = Frontend::connect(&rig.socket, 64).unwrap();
    assert_ne!(fe.get_features().unwrap() & PROTOCOL_FEATURES, 0);
}
