//! Hostile peers: a VMM that sends malformed or lying messages, a backend that resets or stops
//! answering, and signals in every state. Each case asserts a clear error (a nack, or that one
//! connection closed), svqd alive, and a fresh VMM that then does verified I/O. protocol.rs has
//! the older protocol-level cases (bad queue indices, ring addresses, region tables).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Rig, RigOptions};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::Vmm;
use svqd::{Proxy, ProxyConfig};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

const PROTOCOL_FEATURES: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;
const RAM: u64 = 1 << 20;
const UVA: u64 = 0x7f00_0000_0000;

fn memfd(size: u64) -> File {
    svq_testkit::guest::ram::memfd("hostile-vmm", size).unwrap()
}

/// A VMM that negotiates REPLY_ACK (so refusals are nacks) and owns the device.
fn negotiated(socket: &Path) -> Frontend {
    let mut fe = Frontend::connect(socket, 64).unwrap();
    let f = fe.get_features().unwrap();
    let p = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(p & VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    fe.set_features(f & (VERSION_1 | PROTOCOL_FEATURES))
        .unwrap();
    fe
}

fn region(file: &File, size: u64, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: UVA,
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    }
}

fn ring(num: u16, desc: u64, avail: u64, used: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: num,
        queue_size: num,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    }
}

/// A VMM on `rig` running a blk guest (16 MiB of RAM, 256 blocks, `read_pct` reads).
fn blk_vmm(rig: &Rig, read_pct: u8) -> (Arc<GuestRam>, Vmm, GuestRunner<BlkGuest>) {
    common::blk_vmm(
        rig,
        16 << 20,
        BlkGuestOptions {
            blocks: 256,
            read_pct,
            ..Default::default()
        },
    )
}

/// Waits (5 s at most) until svqd's SIGBUS guard counted a fault beyond `before`.
fn await_sigbus(before: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while svqd::sigbus::fault_count() == before {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// svqd is alive and a fresh VMM moves verified blocks through it (in shadow mode and back).
fn serves_verified_io(rig: &Rig) {
    let (_ram, _vmm, runner) = blk_vmm(rig, BlkGuestOptions::default().read_pct);
    std::thread::sleep(Duration::from_millis(100));
    let ctl = rig.proxy.control();
    if ctl.query_status().policy == "auto" {
        ctl.set_shadow(true).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        ctl.set_shadow(false).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    // The earlier, hostile VMMs each cost svqd its backend connection (a backend resets its
    // state with its frontend), so `check_blk_run`'s one-connection count does not apply.
    assert_eq!(
        runner.drain(Duration::from_secs(10)),
        0,
        "requests left in flight"
    );
    let w = runner.stop();
    let w = w.lock().unwrap();
    let ledger = w.ledger();
    assert!(w.anomalies().is_empty(), "{:?}", w.anomalies());
    assert_eq!(ledger.duplicates, 0, "{ledger:?}");
    assert_eq!(ledger.completed, ledger.issued, "{ledger:?}");
    assert!(ledger.issued > 0, "{ledger:?}");
}

/// Raw bytes on a fresh connection; returns whether svqd closed it (reads EOF) within `wait`.
fn closes_after(socket: &Path, bytes: &[u8], wait: Duration) -> bool {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    // Closed with our bytes unread, the connection is reset rather than shut down.
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    [code, flags, size]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

#[test]
fn ring_extent_is_checked_when_the_size_comes_after_the_address() {
    let rig = Rig::new(RigOptions::default());
    let fe = negotiated(&rig.socket);
    let ram = memfd(RAM);
    fe.set_mem_table(&[region(&ram, RAM, 0)]).unwrap();
    // The used ring 0x1000 bytes before the end of RAM fits one entry, not 1024 (8 KiB).
    let used = UVA + RAM - 0x1000;
    fe.set_vring_addr(0, &ring(1, UVA, UVA + 0x4000, used))
        .unwrap();
    let err = fe.set_vring_num(0, 1024).unwrap_err();
    assert!(err.to_string().contains("error"), "{err}");
    // A size that fits is taken.
    fe.set_vring_num(0, 256).unwrap();
    // And the address is checked against the size now known.
    assert!(fe
        .set_vring_addr(0, &ring(256, UVA, UVA + 0x4000, UVA + RAM - 0x100))
        .is_err());
    drop(fe);
    serves_verified_io(&rig);
}

#[test]
fn memory_regions_past_their_file_are_refused() {
    let rig = Rig::new(RigOptions::default());
    let mut fe = negotiated(&rig.socket);
    let small = memfd(RAM / 2);
    // Larger than the file, and inside the size but past the end through its offset.
    assert!(fe.set_mem_table(&[region(&small, RAM, 0)]).is_err());
    assert!(fe
        .set_mem_table(&[region(&small, RAM / 2, 0x1000)])
        .is_err());
    assert!(fe.add_mem_region(&region(&small, RAM, 0)).is_err());
    // Sizes of 0 and ring sizes out of range.
    assert!(fe.set_mem_table(&[region(&small, 0, 0)]).is_err());
    fe.set_mem_table(&[region(&small, RAM / 2, 0)]).unwrap();
    for bad in [0, 3, 65535] {
        assert!(fe.set_vring_num(0, bad).is_err(), "size {bad}");
    }
    drop(fe);
    serves_verified_io(&rig);
}

#[test]
fn malformed_messages_close_only_their_connection() {
    let rig = Rig::new(RigOptions::default());
    let wait = Duration::from_secs(5);
    // SET_FEATURES (2) whose payload is 4 bytes instead of 8.
    let mut m = header(2, 1, 4);
    m.extend_from_slice(&[0; 4]);
    assert!(closes_after(&rig.socket, &m, wait), "short payload");
    // A header announcing more payload than any message has.
    assert!(
        closes_after(&rig.socket, &header(2, 1, 0x10_0000), wait),
        "huge payload"
    );
    // A header whose payload never comes: svqd must not wait forever (2 s limit).
    let t = Instant::now();
    assert!(
        closes_after(&rig.socket, &header(2, 1, 8), wait),
        "missing payload"
    );
    assert!(t.elapsed() < wait);
    // SET_VRING_KICK (12) without an fd and without the no-fd flag.
    let mut m = header(12, 1, 8);
    m.extend_from_slice(&0u64.to_le_bytes());
    assert!(closes_after(&rig.socket, &m, wait), "kick without fd");
    // A version other than 1.
    assert!(
        closes_after(&rig.socket, &header(1, 2, 0), wait),
        "bad version"
    );
    serves_verified_io(&rig);
}

#[test]
fn wrong_fd_counts_are_refused() {
    let rig = Rig::new(RigOptions::default());
    let fe = negotiated(&rig.socket);
    // Two regions described, one fd: sent by hand (the vhost crate attaches one fd per region).
    let ram = memfd(RAM);
    let mut payload = Vec::new();
    payload.extend_from_slice(&2u32.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    for i in 0..2u64 {
        for v in [i * RAM, RAM, UVA + i * RAM, 0] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut msg = header(5, 1, payload.len() as u32);
    msg.extend_from_slice(&payload);
    let s = UnixStream::connect(&rig.socket).unwrap();
    send_with_fds(&s, &msg, &[ram.as_raw_fd()]);
    let mut s2 = &s;
    s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(s2.read(&mut buf), Ok(0) | Err(_)), "refused");
    drop(s);
    drop(fe);
    serves_verified_io(&rig);
}

fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[i32]) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = space;
    // SAFETY: the control buffer holds one header of CMSG_SPACE(fds) bytes, filled in here.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        assert_eq!(libc::sendmsg(s.as_raw_fd(), &mh, 0), bytes.len() as isize);
    }
}

/// A vhost-user backend of our own that answers the handshake, then behaves as `mode` says.
#[derive(Clone, Copy, PartialEq)]
enum FakeMode {
    /// Accepts and resets the first `n` connections right away, then answers the handshake.
    ResetFirst(usize),
    /// Answers the handshake, then never answers anything else.
    HangAfterHandshake,
}

struct FakeBackend {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
    }
}

fn fake_backend(path: PathBuf, mode: FakeMode) -> FakeBackend {
    let listener = UnixListener::bind(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (st, acc) = (stop.clone(), accepted.clone());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            if st.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut c) = conn else { continue };
            let n = acc.fetch_add(1, Ordering::SeqCst);
            if let FakeMode::ResetFirst(k) = mode {
                if n < k {
                    drop(c);
                    continue;
                }
            }
            let stop = st.clone();
            held.push(std::thread::spawn(move || serve_fake(&mut c, &stop)));
        }
    });
    FakeBackend {
        path,
        stop,
        accepted,
    }
}

/// Answers GET_FEATURES and GET_PROTOCOL_FEATURES; reads and ignores everything else.
fn serve_fake(c: &mut UnixStream, stop: &AtomicBool) {
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut hdr = [0u8; 12];
    while !stop.load(Ordering::SeqCst) {
        match c.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        if c.read_exact(&mut body).is_err() {
            return;
        }
        let answer = match code {
            1 => Some(VERSION_1 | PROTOCOL_FEATURES),
            15 => Some(VhostUserProtocolFeatures::REPLY_ACK.bits()),
            _ => None,
        };
        if let Some(v) = answer {
            let mut r = header(code, 1 | 4, 8);
            r.extend_from_slice(&v.to_le_bytes());
            if c.write_all(&r).is_err() {
                return;
            }
        }
    }
}

#[test]
fn a_backend_resetting_the_handshake_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let be = fake_backend(dir.path().join("be.sock"), FakeMode::ResetFirst(3));
    let mut cfg = ProxyConfig::new(dir.path().join("vmm.sock"), &be.path);
    cfg.backend_connect_timeout = Duration::from_secs(5);
    let proxy = Proxy::new(cfg).expect("retried until the backend answered");
    assert!(be.accepted.load(Ordering::SeqCst) >= 4);
    drop(proxy);
    // Within the time limit only: a backend that always resets is an error.
    let dir2 = tempfile::tempdir().unwrap();
    let be2 = fake_backend(
        dir2.path().join("be.sock"),
        FakeMode::ResetFirst(usize::MAX),
    );
    let mut cfg = ProxyConfig::new(dir2.path().join("vmm.sock"), &be2.path);
    cfg.backend_connect_timeout = Duration::from_millis(300);
    assert!(Proxy::new(cfg).is_err());
}

#[test]
fn a_hung_backend_is_a_timely_error_and_the_control_plane_answers() {
    let dir = tempfile::tempdir().unwrap();
    let be = fake_backend(dir.path().join("be.sock"), FakeMode::HangAfterHandshake);
    let mut cfg = ProxyConfig::new(dir.path().join("vmm.sock"), &be.path);
    cfg.backend_request_timeout = Duration::from_millis(1500);
    cfg.backend_connect_timeout = Duration::from_millis(500);
    let socket = cfg.socket.clone();
    let proxy = Proxy::new(cfg).unwrap();
    let ctl = proxy.control();
    let thread = proxy.spawn().unwrap();
    let vmm = std::thread::spawn(move || {
        let mut fe = Frontend::connect(&socket, 64).unwrap();
        fe.get_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let t = Instant::now();
        // Forwarded to the backend, which never answers.
        let res = fe.set_owner();
        (res.is_err(), t.elapsed())
    });
    // While the VMM's request hangs on the backend, queries still answer at once.
    std::thread::sleep(Duration::from_millis(400));
    let t = Instant::now();
    let st = ctl.query_status();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "query-status took {took:?}"
    );
    assert!(st.busy.is_some(), "{st:?}");
    let _ = ctl.query_stats();
    let (failed, after) = vmm.join().unwrap();
    assert!(failed, "the VMM got an error");
    assert!(after < Duration::from_secs(5), "after {after:?}");
    // svqd dropped the hung backend; it stops cleanly (reconnecting fails: the fake backend
    // hangs again, an error but no hang).
    let t = Instant::now();
    let _ = thread.stop();
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(be);
}

/// The svqd binary, reaped if a test fails.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_svqd(args: &[&str]) -> Daemon {
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_svqd"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM stops svqd within a second whatever its peers are doing.
fn stops_within_a_second(d: &mut Daemon) {
    let t = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) }, 0);
    loop {
        if d.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "svqd still running {:?} after SIGTERM",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn sigterm_stops_svqd_with_a_half_sent_vmm_message() {
    let dir = tempfile::tempdir().unwrap();
    let be = fake_backend(dir.path().join("be.sock"), FakeMode::HangAfterHandshake);
    let sock = dir.path().join("vmm.sock");
    let mut d = spawn_svqd(&[
        "--socket",
        sock.to_str().unwrap(),
        "--backend",
        be.path.to_str().unwrap(),
    ]);
    wait_for(&sock);
    let mut s = UnixStream::connect(&sock).unwrap();
    // A header, never its payload.
    s.write_all(&header(2, 1, 8)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stops_within_a_second(&mut d);
    assert!(!sock.exists(), "the socket is removed");
}

#[test]
fn sigterm_stops_svqd_waiting_on_a_hung_backend() {
    let dir = tempfile::tempdir().unwrap();
    let be = fake_backend(dir.path().join("be.sock"), FakeMode::HangAfterHandshake);
    let sock = dir.path().join("vmm.sock");
    let mut d = spawn_svqd(&[
        "--socket",
        sock.to_str().unwrap(),
        "--backend",
        be.path.to_str().unwrap(),
        "--backend-request-timeout",
        "30",
    ]);
    wait_for(&sock);
    let s2 = sock.clone();
    let _vmm = std::thread::spawn(move || {
        let mut fe = Frontend::connect(&s2, 64).unwrap();
        let _ = fe.get_features();
        let _ = fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let _ = fe.set_owner();
    });
    std::thread::sleep(Duration::from_millis(300));
    stops_within_a_second(&mut d);
}

#[test]
fn existing_files_at_the_socket_paths_are_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let be = fake_backend(dir.path().join("be.sock"), FakeMode::HangAfterHandshake);
    let file = dir.path().join("precious");
    std::fs::write(&file, b"data").unwrap();
    for flag in ["--socket", "--control"] {
        let sock = dir.path().join("vmm.sock");
        let mut args = vec!["--backend", be.path.to_str().unwrap()];
        let f = file.to_str().unwrap();
        let s = sock.to_str().unwrap();
        if flag == "--socket" {
            args.extend(["--socket", f]);
        } else {
            args.extend(["--socket", s, "--control", f]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_svqd"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a socket"), "{flag}: {err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data", "{flag}");
    }
}

/// Guest RAM the VMM truncates under a running shadow queue: that queue stops with a clear
/// error, svqd lives on and serves the next VMM.
#[test]
fn truncated_guest_memory_stops_only_the_queue_that_touched_it() {
    let rig = Rig::new(RigOptions {
        policy: svqd::ShadowPolicy::Always,
        ..Default::default()
    });
    // Reads only: the disk stays as the next VMM's guest expects it (all zeros).
    let (ram, vmm, runner) = blk_vmm(&rig, 100);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(runner.drain(Duration::from_secs(10)), 0);
    runner.pause();
    let before = svqd::sigbus::fault_count();
    // From here on nothing in this process may touch the guest RAM but svqd.
    ram.file().set_len(0).unwrap();
    runner.with(|w| {
        let _ = w.queues()[0].kick_fd().write(1);
    });
    await_sigbus(before, "svqd never touched the truncated memory");
    // svqd is alive and answers; the VMM that lied goes away.
    let st = rig.proxy.control().query_status();
    assert_eq!(st.queues[0].mode, "shadow");
    drop(vmm);
    // The paused vCPU must not run again on the truncated RAM.
    std::mem::forget(runner);
    serves_verified_io(&rig);
}

/// A dirty log the VMM shrinks after SET_LOG_BASE: svqd survives the first logged completion.
#[test]
fn a_dirty_log_shrunk_under_svqd_is_survived() {
    let rig = Rig::new(RigOptions::default());
    // Reads only: the disk stays as the next VMM's guest expects it (all zeros).
    let (_ram, mut vmm, runner) = blk_vmm(&rig, 100);
    std::thread::sleep(Duration::from_millis(100));
    let before = svqd::sigbus::fault_count();
    vmm.start_dirty_log().unwrap();
    assert_eq!(rig.modes(), ["shadow"]);
    vmm.log_file().unwrap().set_len(0).unwrap();
    await_sigbus(before, "no completion was logged");
    let _ = rig.proxy.control().query_stats();
    runner.pause();
    drop(vmm);
    drop(runner);
    serves_verified_io(&rig);
}
