//! VIRTIO_F_IN_ORDER end to end with real DPDK on both sides: testpmd's virtio-user driver
//! (`in_order=1`, flowgen: it sends all the time and drains what comes back) → svqd → testpmd's
//! net_vhost (macswap: every frame comes back). DPDK's in-order paths trust the device: transmit
//! cleanup frees descriptors in ring order, and the mergeable receive path takes each used
//! element's length in ring position, so a completion out of order, batched towards the driver,
//! or lost hangs or corrupts it. Traffic must flow both ways in passthrough, in shadow mode and
//! after quick shadow on/off round trips under traffic, with IN_ORDER acked by the driver.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use svq_peers::proc::Proc;
use svq_peers::vm::{start_testpmd, stats_sum, Svqd, SvqdOpts};
use svq_peers::{Fixtures, TestDir};

const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
/// Shadow on/off round trips under traffic.
const TOGGLES: usize = 10;

/// testpmd with one virtio-user port on `sock` (the driver side; it connects to svqd), in
/// flowgen mode, its forwarding lcore pinned to CPU 0 (the vhost testpmd forwards on CPU 1).
fn start_virtio_user(fx: &Fixtures, dir: &Path, sock: &Path) -> Result<Proc, String> {
    let bin = fx
        .testpmd
        .as_ref()
        .ok_or("dpdk-testpmd missing: re-run scripts/peers/fixtures.sh (package dpdk-dev)")?;
    let mut c = Command::new(bin);
    c.args(["--lcores", "0@1,1@0", "--no-pci", "--no-huge", "-m", "256"])
        .arg(format!("--file-prefix=svqvu{}", std::process::id()))
        .args([
            "--vdev",
            &format!(
                "net_virtio_user0,path={},queues=1,queue_size=256,in_order=1",
                sock.display()
            ),
        ])
        .args([
            "--",
            "--total-num-mbufs=8192",
            "--nb-cores=1",
            "--forward-mode=flowgen",
            "--stats-period",
            "1",
        ]);
    Ok(Proc::spawn("virtio-user", c, &dir.join("virtio-user.log")))
}

/// The last `RX-packets` and `TX-packets` testpmd printed for its port 0.
fn port_counters(log: &str) -> Option<(u64, u64)> {
    let value = |key: &str| {
        log.rfind(key).and_then(|i| {
            log[i + key.len()..]
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
    };
    Some((value("RX-packets:")?, value("TX-packets:")?))
}

/// Waits until the virtio-user port received and sent `more` packets beyond `base` (both
/// directions move). Panics with the logs otherwise.
fn wait_traffic(vu: &Proc, d: &Svqd, base: (u64, u64), more: u64, what: &str) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = port_counters(&vu.log_text()).unwrap_or((0, 0));
        if now.0 >= base.0 + more && now.1 >= base.1 + more {
            return now;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: virtio-user counters {now:?}, wanted {more} more than {base:?}\n\
                 --- virtio-user:\n{}\n--- svqd:\n{}",
                vu.log_tail(30),
                d.proc.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status(d: &Svqd) -> serde_json::Value {
    let out = d
        .ctl(&["--json", "query-status"])
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("query-status: {e}: {out}"))
}

fn hex(v: &serde_json::Value) -> u64 {
    v.as_str()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0)
}

#[test]
fn net_dpdk_virtio_user_in_order_through_svqd() {
    let name = "net_dpdk_virtio_user_in_order_through_svqd";
    let Some(s) = svq_peers::setup(name) else {
        return;
    };
    if s.fx.testpmd.is_none() {
        eprintln!("skipping {name}: dpdk-testpmd missing (scripts/peers/fixtures.sh installs it)");
        return;
    }
    let dir = TestDir::new(name);
    let port = dir.join("vhost0.sock");
    let _vhost = start_testpmd(&s.fx, dir.path(), std::slice::from_ref(&port))
        .unwrap_or_else(|e| panic!("{e}"));
    let d = Svqd::start(dir.path(), "svqd0", &port, &SvqdOpts::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut vu = start_virtio_user(&s.fx, dir.path(), &d.socket).unwrap_or_else(|e| panic!("{e}"));

    let c = wait_traffic(&vu, &d, (0, 0), 10_000, "traffic in passthrough");
    let st = status(&d);
    let offered = hex(&st["features"]["offered"]);
    let acked = hex(&st["features"]["acked"]);
    eprintln!("features offered {offered:#x}, acked {acked:#x}; passthrough {c:?}");
    assert_ne!(offered & VIRTIO_F_IN_ORDER, 0, "svqd hides IN_ORDER: {st}");
    assert_ne!(
        acked & VIRTIO_F_IN_ORDER,
        0,
        "virtio-user did not ack IN_ORDER: {st}"
    );

    d.ctl(&["set-shadow", "on"])
        .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.log_tail(30)));
    let c = wait_traffic(&vu, &d, c, 10_000, "traffic in shadow mode");
    let stats = d.expect_mode("shadow").unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "shadow {c:?}; {} descriptors through the shadow rings",
        stats_sum(&stats, "descriptors")
    );

    for i in 0..TOGGLES {
        for on in ["off", "on"] {
            d.ctl(&["set-shadow", on])
                .unwrap_or_else(|e| panic!("toggle {i} {on}: {e}\n{}", d.proc.log_tail(30)));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let c = wait_traffic(&vu, &d, c, 10_000, "traffic after the toggles (shadow)");
    d.expect_mode("shadow").unwrap_or_else(|e| panic!("{e}"));
    d.ctl(&["set-shadow", "off"])
        .unwrap_or_else(|e| panic!("{e}\n{}", d.proc.log_tail(30)));
    let c = wait_traffic(&vu, &d, c, 10_000, "traffic back in passthrough");
    let stats: serde_json::Value =
        serde_json::from_str(&d.ctl(&["--json", "query-stats"]).unwrap_or_default())
            .unwrap_or_default();
    let switches = stats_sum(&stats, "mode_switches");
    eprintln!("{TOGGLES} round trips, then passthrough {c:?}; mode switches {switches}");
    // Both rings: on, TOGGLES x (off, on), off.
    assert_eq!(switches, 2 * (2 + 2 * TOGGLES as u64));
    let log = d.proc.log_text();
    assert!(
        !log.contains("virtqueue broken") && !log.contains("closing the VMM connection"),
        "svqd broke a queue or the connection:\n{}",
        d.proc.log_tail(40)
    );
    vu.stop(Duration::from_secs(5));
}
