//! `vu-relay`: a message-level vhost-user relay between one frontend (QEMU) and one backend, for
//! the real-peer tests. It exists to prove that the migration oracle can fail independently of
//! svqd: with `--drop-log` it hides dirty logging from the backend the way a broken proxy would
//! (answers SET_LOG_BASE itself, strips VHOST_F_LOG_ALL from SET_FEATURES and the log flag from
//! SET_VRING_ADDR) while still advertising logging to QEMU, so QEMU migrates and pages written by
//! the device go unlogged. Without the flag it is a faithful passthrough relay.
//!
//! Usage: `vu-relay --socket PATH --backend PATH [--drop-log] [--trace]`. Serves one frontend
//! connection, then exits when either side closes.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread;

const HDR: usize = 12;
const MAX_FDS: usize = 32;
const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_LOG_BASE: u32 = 6;
const REQ_SET_VRING_ADDR: u32 = 9;
const FLAG_REPLY: u32 = 0x4;
const VERSION: u32 = 0x1;
const LOG_ALL: u64 = 1 << 26;

struct Msg {
    req: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<RawFd>,
}

/// Reads one message: the header with recvmsg (fds ride with the first bytes), then the payload.
fn read_msg(s: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HDR {
        let mut iov = libc::iovec {
            iov_base: hdr[got..].as_mut_ptr().cast(),
            iov_len: HDR - got,
        };
        let mut cbuf = [0u64; (MAX_FDS * 4 + 64) / 8];
        // SAFETY: msghdr is plain data; zeroed is a valid initial state.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = size_of::<[u64; (MAX_FDS * 4 + 64) / 8]>();
        // SAFETY: the iovec and control buffers are valid for the lengths given.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: walking the control messages the kernel just wrote into cbuf.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let cnt =
                        ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                    for i in 0..cnt {
                        fds.push(std::ptr::read_unaligned(data.add(i)));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        got += n as usize;
    }
    let u = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
    let (req, flags, size) = (u(0), u(4), u(8) as usize);
    let mut payload = vec![0u8; size];
    io::Read::read_exact(&mut &*s, &mut payload)?;
    Ok(Some(Msg {
        req,
        flags,
        payload,
        fds,
    }))
}

/// Writes one message, its fds attached to the first byte; closes our copies of the fds.
fn write_msg(s: &UnixStream, m: &Msg) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HDR + m.payload.len());
    buf.extend_from_slice(&m.req.to_le_bytes());
    buf.extend_from_slice(&m.flags.to_le_bytes());
    buf.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&m.payload);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; (MAX_FDS * 4 + 64) / 8];
    // SAFETY: as in read_msg.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !m.fds.is_empty() {
        let bytes = m.fds.len() * size_of::<RawFd>();
        // SAFETY: cbuf is large enough for MAX_FDS fds; we fill exactly one SCM_RIGHTS cmsg.
        unsafe {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = libc::CMSG_SPACE(bytes as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                m.fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                m.fds.len(),
            );
        }
    }
    // SAFETY: buffers valid for the lengths given.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    let r = if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        if (n as usize) < buf.len() {
            io::Write::write_all(&mut &*s, &buf[n as usize..])?;
        }
        Ok(())
    };
    for &fd in &m.fds {
        // SAFETY: these fds were received by us and are owned by this message.
        unsafe { libc::close(fd) };
    }
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(sock), Some(backend)) = (get("--socket"), get("--backend")) else {
        eprintln!("usage: vu-relay --socket PATH --backend PATH [--drop-log] [--trace]");
        std::process::exit(2);
    };
    let drop_log = args.iter().any(|a| a == "--drop-log");
    let trace = args.iter().any(|a| a == "--trace");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap_or_else(|e| panic!("bind {sock}: {e}"));
    let (front, _) = listener.accept().expect("accept");
    let back = UnixStream::connect(&backend).unwrap_or_else(|e| panic!("connect {backend}: {e}"));
    eprintln!("vu-relay: connected (drop_log={drop_log})");
    let front_w = Arc::new(Mutex::new(front.try_clone().expect("dup")));
    let back_r = back.try_clone().expect("dup");
    let fw = front_w.clone();
    let up = thread::spawn(move || {
        // backend → frontend: replies, passed through unchanged.
        while let Ok(Some(m)) = read_msg(&back_r) {
            if trace {
                eprintln!(
                    "vu-relay: <- reply req={} size={} fds={}",
                    m.req,
                    m.payload.len(),
                    m.fds.len()
                );
            }
            if write_msg(&fw.lock().unwrap(), &m).is_err() {
                break;
            }
        }
        eprintln!("vu-relay: backend side closed");
        std::process::exit(0);
    });
    // frontend → backend requests.
    while let Ok(Some(mut m)) = read_msg(&front) {
        if trace {
            eprintln!(
                "vu-relay: -> req={} flags={:#x} size={} fds={}",
                m.req,
                m.flags,
                m.payload.len(),
                m.fds.len()
            );
        }
        if drop_log {
            match m.req {
                REQ_SET_LOG_BASE => {
                    eprintln!("vu-relay: dropping SET_LOG_BASE (answering it ourselves)");
                    for &fd in &m.fds {
                        // SAFETY: received fd owned by this message, not forwarded.
                        unsafe { libc::close(fd) };
                    }
                    let reply = Msg {
                        req: REQ_SET_LOG_BASE,
                        flags: VERSION | FLAG_REPLY,
                        payload: 0u64.to_le_bytes().to_vec(),
                        fds: Vec::new(),
                    };
                    if write_msg(&front_w.lock().unwrap(), &reply).is_err() {
                        break;
                    }
                    continue;
                }
                REQ_SET_FEATURES if m.payload.len() >= 8 => {
                    let f = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                    if f & LOG_ALL != 0 {
                        eprintln!("vu-relay: stripping LOG_ALL from SET_FEATURES");
                    }
                    m.payload[..8].copy_from_slice(&(f & !LOG_ALL).to_le_bytes());
                }
                REQ_SET_VRING_ADDR if m.payload.len() >= 8 => {
                    let fl = u32::from_le_bytes(m.payload[4..8].try_into().unwrap());
                    m.payload[4..8].copy_from_slice(&(fl & !1).to_le_bytes());
                }
                _ => {}
            }
        }
        if write_msg(&back, &m).is_err() {
            break;
        }
    }
    eprintln!("vu-relay: frontend side closed");
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
}
