//! Interop without migration: rust-vmm's vhost-device-rng and vhost-device-vsock (which offer no
//! dirty logging and only a few protocol features) behind svqd, with a QEMU 10 guest using the
//! device, in passthrough (`--shadow never`), in forced shadow mode (`--shadow always`), and for
//! vsock switched at runtime with svqctl between transfers (its receive ring holds idle buffers
//! that go back to the guest ring at each switch back, and its three rings are re-announced to a
//! vhost-user-backend 0.20, which discards kicks on a disabled ring).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use svq_peers::guest;
use svq_peers::proc::{connect_retry, Proc};
use svq_peers::vm::{stats_sum, Svqd, SvqdOpts, Vm, VmSpec};
use svq_peers::{Setup, TestDir};

const MEM_MIB: u64 = 256;

fn opts(shadow: &str) -> SvqdOpts {
    SvqdOpts {
        shadow: shadow.into(),
        ..SvqdOpts::default()
    }
}

/// The queue mode svqd must report for a `--shadow` policy (no migration here).
fn mode_of(shadow: &str) -> &'static str {
    if shadow == "always" {
        "shadow"
    } else {
        "passthrough"
    }
}

fn fail(what: String, d: &Svqd, backend: &Proc) -> ! {
    panic!(
        "{what}\n--- svqd:\n{}\n--- {}:\n{}",
        d.proc.log_tail(40),
        backend.name,
        backend.log_tail(20)
    )
}

fn rng(s: &Setup, name: &str, shadow: &str) {
    let dir = TestDir::new(name);
    let bin =
        s.fx.vhost_rng
            .as_ref()
            .expect("vhost-device-rng missing: re-run scripts/peers/fixtures.sh");
    let sock = dir.join("rng.sock");
    let mut c = Command::new(bin);
    c.arg("--socket-path").arg(&sock);
    let mut be = Proc::spawn("vhost-device-rng", c, &dir.join("rng.log"));
    // The daemon appends the socket index to the path.
    let real = dir.join("rng.sock0");
    be.wait_socket(&real, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let d = Svqd::start(dir.path(), "svqd", &real, &opts(shadow)).unwrap_or_else(|e| panic!("{e}"));
    let spec = VmSpec::new("vm", MEM_MIB, &guest::append("rng", "none")).raw(&[
        "-chardev",
        &format!("socket,id=rng0,path={}", d.socket.display()),
        "-device",
        "vhost-user-rng-pci,chardev=rng0",
    ]);
    let mut vm = Vm::start(&s.fx, dir.path(), spec).unwrap_or_else(|e| fail(e, &d, &be));
    let t = vm
        .wait_console("SVQ-DONE", Duration::from_secs(150), |t| {
            t.contains("SVQ-DONE")
        })
        .unwrap_or_else(|e| fail(e, &d, &be));
    let reads: Vec<&str> = t.lines().filter(|l| l.contains("SVQ-RNG ok")).collect();
    assert_eq!(reads.len(), 5, "{t}");
    assert!(
        reads.iter().all(|l| l.ends_with("bytes=1024")),
        "short hwrng reads: {reads:?}"
    );
    assert!(
        t.contains("current=virtio_rng"),
        "guest hwrng is not virtio: {t}"
    );
    let stats = d
        .expect_mode(mode_of(shadow))
        .unwrap_or_else(|e| fail(e, &d, &be));
    eprintln!("{name}: 5 x 1024 bytes from virtio-rng through svqd --shadow {shadow}; {stats}");
    vm.quit();
}

/// `toggles`: svqctl set-shadow on/off round trips, each followed by an echo round.
fn vsock(s: &Setup, name: &str, shadow: &str, toggles: usize) {
    let dir = TestDir::new(name);
    let bin =
        s.fx.vhost_vsock
            .as_ref()
            .expect("vhost-device-vsock missing: re-run scripts/peers/fixtures.sh");
    let sock = dir.join("vsock.sock");
    let uds = dir.join("vsock.uds");
    let mut c = Command::new(bin);
    c.args(["--guest-cid", "3"])
        .arg("--socket")
        .arg(&sock)
        .arg("--uds-path")
        .arg(&uds);
    let mut be = Proc::spawn("vhost-device-vsock", c, &dir.join("vsock.log"));
    be.wait_socket(&sock, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let d = Svqd::start(dir.path(), "svqd", &sock, &opts(shadow)).unwrap_or_else(|e| panic!("{e}"));
    let spec = VmSpec::new("vm", MEM_MIB, &guest::append("vsock", "none")).raw(&[
        "-chardev",
        &format!("socket,id=vs0,path={}", d.socket.display()),
        "-device",
        "vhost-user-vsock-pci,chardev=vs0",
    ]);
    let mut vm = Vm::start(&s.fx, dir.path(), spec).unwrap_or_else(|e| fail(e, &d, &be));
    vm.wait_console("SVQ-VSOCK-READY", Duration::from_secs(150), |t| {
        t.contains("SVQ-VSOCK-READY")
    })
    .unwrap_or_else(|e| fail(e, &d, &be));
    let mut total = 0;
    for round in 0..3 {
        match echo_round(&uds, round) {
            Ok(n) => total += n,
            Err(e) => fail(format!("vsock round {round}: {e}"), &d, &be),
        }
    }
    for i in 0..toggles {
        for on in ["on", "off"] {
            if let Err(e) = d.ctl(&["set-shadow", on]) {
                fail(format!("toggle {i} {on}: {e}"), &d, &be);
            }
            match echo_round(&uds, i as u8) {
                Ok(n) => total += n,
                Err(e) => fail(format!("vsock after toggle {i} {on}: {e}"), &d, &be),
            }
        }
    }
    let stats = d
        .expect_mode(mode_of(shadow))
        .unwrap_or_else(|e| fail(e, &d, &be));
    if toggles > 0 {
        let sum = |key: &str| stats_sum(&stats, key);
        // rx and tx: QEMU keeps the event queue to itself.
        let started = 2;
        assert_eq!(
            sum("mode_switches"),
            2 * toggles as u64 * started,
            "{stats}"
        );
        // The guest keeps receive (and event) buffers posted that the backend had not taken.
        assert!(
            sum("reclaimed") > 0,
            "no idle buffer was handed back: {stats}"
        );
    }
    eprintln!("{name}: {total} bytes echoed over vsock through svqd --shadow {shadow}; {stats}");
    vm.quit();
}

/// Host → guest vsock connection through vhost-device-vsock's unix socket ("CONNECT port"),
/// sends 64 KiB and expects them back unchanged.
fn echo_round(uds: &Path, round: u8) -> Result<usize, String> {
    let s: UnixStream = connect_retry(uds, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    w.write_all(b"CONNECT 1234\n").map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("CONNECT reply: {e}"))?;
    if !line.starts_with("OK ") {
        return Err(format!("CONNECT refused: {line:?}"));
    }
    let data: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ round)
        .collect();
    let writer = std::thread::spawn(move || w.write_all(&data).map(|_| data));
    let mut back = vec![0u8; 65536];
    r.read_exact(&mut back)
        .map_err(|e| format!("echo read: {e}"))?;
    let data = writer
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| e.to_string())?;
    if back != data {
        return Err("echoed data differs".into());
    }
    Ok(back.len())
}

#[test]
fn rng_through_svqd_passthrough() {
    if let Some(s) = svq_peers::setup("rng_through_svqd_passthrough") {
        rng(&s, "rng-never", "never");
    }
}

#[test]
fn rng_through_svqd_forced_shadow() {
    if let Some(s) = svq_peers::setup("rng_through_svqd_forced_shadow") {
        rng(&s, "rng-always", "always");
    }
}

#[test]
fn vsock_through_svqd_passthrough() {
    if let Some(s) = svq_peers::setup("vsock_through_svqd_passthrough") {
        vsock(&s, "vsock-never", "never", 0);
    }
}

#[test]
fn vsock_through_svqd_forced_shadow() {
    if let Some(s) = svq_peers::setup("vsock_through_svqd_forced_shadow") {
        vsock(&s, "vsock-always", "always", 0);
    }
}

#[test]
fn vsock_through_svqd_runtime_switches() {
    if let Some(s) = svq_peers::setup("vsock_through_svqd_runtime_switches") {
        vsock(&s, "vsock-toggle", "auto", 10);
    }
}
