//! Runtime switches of a running ring served by rust-vmm's vhost-device-rng 0.1 (vhost-user-backend
//! 0.10), the real daemon: it does not survive a kick fd replaced on a started ring followed by
//! GET_VRING_BASE (its epoll DEL of the never-registered new fd fails with ENOENT, which ends the
//! daemon), so svqd must stop such a ring with SET_VRING_ENABLE 0 and GET_VRING_BASE only.
//!
//! Needs the peers fixture: `SVQ_VHOST_RNG` (from `scripts/peers/fixtures.sh --print-env`) or
//! `~/.cache/svq-fixtures/cargo/bin/vhost-device-rng`. Skipped, with a message, without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::vring::{Buf, DriverQueue, QueueLayout};
use svq_testkit::vmm::{LogStyle, MemTableStyle, Vmm, VmmOptions};
use svqd::{ControlTarget, Proxy, ProxyConfig, ShadowPolicy};
use vm_memory::{Bytes, GuestAddress};

const RING: u64 = 0x1_0000;
const DATA: u64 = 0x10_0000;
const BUF: u32 = 64;
const PER_ROUND: u64 = 8;

fn rng_binary() -> Option<PathBuf> {
    let from_env = std::env::var_os("SVQ_VHOST_RNG").map(PathBuf::from);
    let cached = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cache/svq-fixtures/cargo/bin/vhost-device-rng"));
    [from_env, cached]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

/// Kills the daemon when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Post `PER_ROUND` device-writable buffers, optionally switch while they are in flight, and
/// wait for all of them to come back filled.
fn round(
    q: &mut DriverQueue,
    ram: &GuestRam,
    token0: u64,
    ctl: &dyn ControlTarget,
    switch: impl FnOnce(),
) {
    let mem = ram.memory();
    for i in 0..PER_ROUND {
        let addr = DATA + i * u64::from(BUF);
        mem.write_slice(&[0u8; BUF as usize], GuestAddress(addr))
            .unwrap();
        q.add(mem, &[Buf::wo(addr, BUF)], false, token0 + i)
            .unwrap();
    }
    q.publish(mem);
    q.kick_if_needed(mem);
    switch();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < PER_ROUND as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {PER_ROUND} buffers came back (tokens from {token0}); {:?}",
            got.len(),
            ctl.query_status()
        );
        got.extend(q.reap(mem));
        std::thread::sleep(Duration::from_micros(200));
    }
    got.sort_by_key(|c| c.token);
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.token, token0 + i as u64, "lost or doubled: {got:?}");
        assert_eq!(c.len, BUF, "short read: {c:?}");
    }
    assert!(q.take_anomalies().is_empty());
}

#[test]
fn vhost_device_rng_survives_runtime_switches() {
    let Some(bin) = rng_binary() else {
        eprintln!("skipped: vhost-device-rng not found (run scripts/peers/fixtures.sh)");
        return;
    };
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rng.sock");
    let mut daemon = Daemon(
        Command::new(&bin)
            .arg("--socket-path")
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The daemon appends the socket index to the path.
    let real = dir.path().join("rng.sock0");
    wait_path(&real);
    let socket = dir.path().join("svqd.sock");
    let mut cfg = ProxyConfig::new(&socket, &real);
    cfg.shadow = ShadowPolicy::Auto;
    cfg.drain_timeout = Duration::from_secs(5);
    let proxy = Proxy::new(cfg).unwrap().spawn().unwrap();
    let ctl = proxy.control();

    let ram = GuestRam::new("guest", 4 << 20).unwrap();
    let mut vmm = Vmm::connect(
        &socket,
        ram.clone(),
        VmmOptions {
            mem_style: MemTableStyle::SetMemTable,
            log_style: LogStyle::Qemu,
            event_idx: true,
            indirect: false,
            ..Default::default()
        },
    )
    .unwrap();
    let layout = QueueLayout::at(RING, 64, 0);
    let mut q = DriverQueue::new(ram.memory(), 0, layout, vmm.event_idx(), false).unwrap();
    vmm.start_queue(0, layout, 0, q.kick_fd(), q.call_fd())
        .unwrap();
    // The simulated VMM sends SET_VRING_ENABLE 1 after the kick fd and the daemon (no REPLY_ACK)
    // does not confirm it; a kick it reads before applying the enable is discarded. Give it time
    // to apply it (svqd itself enables before handing over a kick fd).
    std::thread::sleep(Duration::from_millis(50));

    round(&mut q, &ram, 0, &*ctl, || {});
    const SWITCHES: u64 = 20;
    let mut token = PER_ROUND;
    for s in 0..SWITCHES {
        let shadow = s % 2 == 0;
        round(&mut q, &ram, token, &*ctl, || {
            ctl.set_shadow(shadow)
                .unwrap_or_else(|e| panic!("switch {s} (shadow={shadow}): {e}"))
        });
        token += PER_ROUND;
        let st = ctl.query_status();
        let want = if shadow { "shadow" } else { "passthrough" };
        assert_eq!(st.queues[0].mode, want, "{st:?}");
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "vhost-device-rng exited after switch {s}"
        );
        if shadow {
            // A round wholly in shadow mode: svqd relays all of it. (The buffers of a round
            // that switches may be served on either side of the switch.)
            round(&mut q, &ram, token, &*ctl, || {});
            token += PER_ROUND;
        }
    }
    let stats = ctl.query_stats();
    let q0 = &stats.queues[0].counters;
    assert_eq!(q0.mode_switches, SWITCHES, "{stats:?}");
    assert!(q0.completed >= SWITCHES / 2 * PER_ROUND, "{stats:?}");
    eprintln!("vhost-device-rng: {SWITCHES} runtime switches; {stats:?}");
}
