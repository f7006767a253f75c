//! svqd's VMM side against arbitrary message sequences with fds: one in-process proxy (with the
//! testkit's block backend behind it) serves a fresh connection per input. Whatever arrives,
//! svqd refuses or closes that connection and keeps serving: the next input must connect and
//! get GET_FEATURES answered.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use svq_testkit::backend::blk::{serve_blk, BlkDisk, BlkHandle, BlkOptions};
use svqd::{Proxy, ProxyConfig, ProxyThread};

struct World {
    socket: PathBuf,
    _proxy: ProxyThread,
    _backend: BlkHandle,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let disk = BlkDisk::open(&dir.path().join("disk.img"), Some(1 << 20)).unwrap();
        let bsock = dir.path().join("be.sock");
        let backend = serve_blk(&bsock, disk, BlkOptions::default()).unwrap();
        let socket = dir.path().join("svqd.sock");
        let mut cfg = ProxyConfig::new(&socket, &bsock);
        cfg.drain_timeout = Duration::from_millis(100);
        let proxy = Proxy::new(cfg).unwrap().spawn().unwrap();
        World {
            socket,
            _proxy: proxy,
            _backend: backend,
            _dir: dir,
        }
    })
}

fn memfd(size: u64) -> std::fs::File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the File owns the fd.
    let f = unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(libc::memfd_create(
            c"fuzz-vmm".as_ptr(),
            libc::MFD_CLOEXEC,
        ))
    };
    f.set_len(size).unwrap();
    f
}

fn send(s: &UnixStream, bytes: &[u8], fds: &[i32]) -> bool {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    if !fds.is_empty() {
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = space;
        // SAFETY: the control buffer has room for one header with `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        }
    }
    // SAFETY: a valid msghdr over live buffers.
    unsafe { libc::sendmsg(s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) >= 0 }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let s = UnixStream::connect(&w.socket).expect("svqd still accepts VMMs");
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let ram = memfd(1 << 16);
    let mut rest = data;
    // Each message: code, flags (version bits forced right half the time), payload size, fd
    // count, payload.
    while rest.len() >= 4 {
        let (h, tail) = rest.split_at(4);
        let code = u32::from(h[0] % 48);
        let flags = if h[1] & 0x80 != 0 {
            u32::from(h[1])
        } else {
            1 | (u32::from(h[1]) & 0x8)
        };
        let size = usize::from(h[2]).min(tail.len());
        let nfds = usize::from(h[3] % 3);
        let (payload, tail) = tail.split_at(size);
        rest = tail;
        let mut msg = Vec::with_capacity(12 + size);
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(size as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        let fds = vec![ram.as_raw_fd(); nfds];
        if !send(&s, &msg, &fds) {
            break;
        }
        // Take whatever reply there is, so the next message is not read as part of this one.
        let mut buf = [0u8; 512];
        let _ = (&s).read(&mut buf);
    }
    let _ = (&s).flush();
    drop(s);
    // The proxy is alive: a new VMM gets its features.
    let fe = vhost::vhost_user::Frontend::connect(&w.socket, 8).expect("svqd alive");
    use vhost::VhostBackend;
    fe.get_features().expect("svqd answers");
});
