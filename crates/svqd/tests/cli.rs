//! The `svqd` binary: arguments, errors, socket permissions, the control socket, clean shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use svq_testkit::backend::blk::{serve_blk, BlkDisk, BlkOptions};
use svqd::control::ControlClient;

fn svqd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_svqd"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    svqd().args(args).output().unwrap()
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

/// Kills the child if the test fails before stopping it (an orphan svqd would outlive the test).
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stop(mut child: Child) -> Output {
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        assert!(Instant::now() < deadline, "svqd ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn help_hides_the_test_switch_and_bad_arguments_are_refused() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--socket") && help.contains("--shadow"));
    assert!(
        !help.contains("x-test"),
        "test-only switch must stay hidden"
    );

    let out = run(&["--socket", "/tmp/x.sock"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backend"));

    let out = run(&["--socket", "a", "--backend", "b", "--shadow", "sometimes"]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["--socket", "a", "--backend", "b", "--shadow-size", "3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));

    for cpus in ["x", "3-1", "0,", "99999"] {
        let out = run(&["--socket", "a", "--backend", "b", "--worker-cpus", cpus]);
        assert_eq!(out.status.code(), Some(1), "--worker-cpus {cpus}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--worker-cpus"));
    }
    let out = run(&["--socket", "a", "--backend", "b", "--poll-us", "2000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--poll-us"));
}

#[test]
fn missing_backend_is_a_clear_error_after_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("svqd.sock");
    let backend = dir.path().join("nobody.sock");
    let t = Instant::now();
    let out = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--backend",
        backend.to_str().unwrap(),
        "--backend-timeout",
        "0.3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "retried for the timeout"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to backend"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn sockets_are_private_in_use_is_refused_control_works_sigterm_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let bsock = dir.path().join("blk.sock");
    let disk = BlkDisk::open(&dir.path().join("disk.img"), Some(1 << 20)).unwrap();
    let be = serve_blk(&bsock, disk, BlkOptions::default()).unwrap();
    let sock = dir.path().join("svqd.sock");
    let ctl = dir.path().join("svqd.ctl");
    let child = svqd()
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--backend",
            bsock.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reaper = Reaper(Some(child));
    wait_for(&ctl);
    for p in [&sock, &ctl] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }

    // A second svqd on the same socket is refused.
    let out = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--backend",
        bsock.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");

    // The control socket answers.
    let mut c = ControlClient::connect(&ctl).unwrap();
    let st = c.execute("query-status", None).unwrap();
    assert_eq!(st["return"]["policy"], "auto");
    assert_eq!(st["return"]["backend_connected"], true);
    assert_eq!(st["return"]["vmm_connected"], false);
    let r = c
        .execute("set-shadow", Some(json!({ "enable": true })))
        .unwrap();
    assert_eq!(
        r,
        json!({ "return": {} }),
        "no queue running yet: nothing to switch"
    );
    let stats = c.execute("query-stats", None).unwrap();
    assert!(stats["return"]["queues"].is_array());
    drop(c);

    let out = stop(reaper.0.take().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists(), "vhost-user socket removed on shutdown");
    assert!(!ctl.exists(), "control socket removed on shutdown");
    be.stop();
}
