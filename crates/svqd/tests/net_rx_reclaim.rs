//! A receive queue with buffers posted and no traffic: the backend never takes them, so they can
//! never "complete". Switching back to passthrough, and the VMM stopping the ring in shadow mode,
//! must hand them back to the guest ring (reclaimed) instead of waiting for packets, and the
//! backend must then fill exactly those buffers once traffic resumes.

mod common;

use std::time::{Duration, Instant};

use svq_testkit::backend::net::{serve_net, NetOptions};
use svq_testkit::guest::net::{NetGuest, NetGuestOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::GuestWorkload;
use svq_testkit::vmm::{LogStyle, MemTableStyle, Vmm, VmmOptions};
use svqd::{ControlTarget, Proxy, ProxyConfig};

/// Receive buffers the guest keeps posted (and frames in flight).
const DEPTH: u16 = 32;

/// Run traffic for a moment, then stop transmitting and wait until every echo came back and the
/// guest posted its receive buffers again: what is left outstanding is receive buffers only.
fn go_idle(runner: &GuestRunner<NetGuest>) -> usize {
    runner.with(|w| w.set_posting(true));
    std::thread::sleep(Duration::from_millis(50));
    runner.with(|w| w.set_posting(false));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (missing, tx_in_flight, rx) =
            runner.with(|w| (w.echoes_missing(), w.queues()[1].in_flight(), w.rx_posted()));
        if missing == 0 && tx_in_flight == 0 && rx == usize::from(DEPTH) {
            return rx;
        }
        assert!(
            Instant::now() < deadline,
            "echoes did not come back: {missing} missing, {tx_in_flight} sent in flight, {rx} \
             receive buffers posted"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn reclaimed(ctl: &dyn ControlTarget, queue: usize) -> u64 {
    ctl.query_stats().queues[queue].counters.reclaimed
}

/// Switch to shadow mode and wait until the worker forwarded the `rx` idle receive buffers to the
/// shadow ring: the switch returns once the worker is attached, and its first pass over the guest
/// ring may come later on a loaded machine (a switch back before it finds them still in the
/// guest ring, where nothing needs reclaiming).
fn shadow_with_buffers_forwarded(ctl: &dyn ControlTarget, rx: usize) {
    let chains = |ctl: &dyn ControlTarget| ctl.query_stats().queues[0].counters.chains;
    let before = chains(ctl);
    ctl.set_shadow(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while chains(ctl) - before < rx as u64 {
        assert!(
            Instant::now() < deadline,
            "the worker did not forward the {rx} receive buffers"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn check_guest(runner: &GuestRunner<NetGuest>) {
    let anomalies = runner.with(|w| w.anomalies());
    assert!(anomalies.is_empty(), "{anomalies:?}");
}

fn run(event_idx: bool) {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let bsock = dir.path().join("net.sock");
    let backend = serve_net(
        &bsock,
        NetOptions {
            queue_pairs: 1,
            event_idx,
            ..Default::default()
        },
    )
    .unwrap();
    let socket = dir.path().join("svqd.sock");
    let mut cfg = ProxyConfig::new(&socket, &bsock);
    // Far above any switch that does not wait for packets.
    cfg.drain_timeout = Duration::from_secs(20);
    let proxy = Proxy::new(cfg).unwrap().spawn().unwrap();
    let ctl = proxy.control();
    let ram = GuestRam::new("guest", 32 << 20).unwrap();
    let mut vmm = Vmm::connect(
        &socket,
        ram.clone(),
        VmmOptions {
            mem_style: MemTableStyle::AddMemReg,
            log_style: LogStyle::Qemu,
            event_idx,
            ..Default::default()
        },
    )
    .unwrap();
    let guest = NetGuest::new(
        ram.clone(),
        NetGuestOptions {
            depth: DEPTH,
            event_idx: vmm.event_idx(),
            indirect: vmm.indirect(),
            ..Default::default()
        },
    )
    .unwrap();
    let runner = vmm.run_guest(guest).unwrap();

    // 1. Shadow and back with the receive ring idle.
    let rx = go_idle(&runner);
    shadow_with_buffers_forwarded(&*ctl, rx);
    let before = reclaimed(&*ctl, 0);
    let t = Instant::now();
    ctl.set_shadow(false)
        .expect("switch back must not wait for packets");
    let took = t.elapsed();
    assert_eq!(
        reclaimed(&*ctl, 0) - before,
        rx as u64,
        "every idle receive buffer went back to the guest ring"
    );
    assert_eq!(reclaimed(&*ctl, 1), 0, "the transmit ring had nothing left");
    // The shadow regions stay in the backend's table, and the next shadow period reuses them.
    let parked = |ctl: &dyn ControlTarget| -> Vec<String> {
        ctl.query_status()
            .queues
            .iter()
            .map(|q| q.parked_region.clone().unwrap_or_else(|| "none".into()))
            .collect()
    };
    let regions = parked(&*ctl);
    assert!(regions.iter().all(|r| r != "none"), "{regions:?}");
    eprintln!("switch back with {rx} idle receive buffers: {took:?}");

    // 2. The backend fills exactly those buffers in passthrough: every echo arrives, once.
    let echoes = runner.with(|w| w.echoes());
    let rx = go_idle(&runner);
    assert!(runner.with(|w| w.echoes()) > echoes);
    check_guest(&runner);

    // 3. VM stop in shadow mode: GET_VRING_BASE answers the guest index before the idle
    //    buffers, which a destination device takes from the guest ring.
    shadow_with_buffers_forwarded(&*ctl, rx);
    let status = ctl.query_status();
    for (q, region) in regions.iter().enumerate() {
        assert_eq!(
            status.queues[q].shadow.as_ref().map(|s| s.gpa.as_str()),
            Some(region.as_str())
        );
    }
    runner.pause();
    let (used, avail) = runner.with(|w| {
        let q = &w.queues()[0];
        (q.last_used(), q.next_avail())
    });
    assert_eq!(avail.wrapping_sub(used) as usize, rx);
    let before = reclaimed(&*ctl, 0);
    let base = vmm.stop_queue(0).unwrap();
    assert_eq!(
        base, used,
        "stopped at the first buffer the backend never took"
    );
    assert_eq!(reclaimed(&*ctl, 0) - before, rx as u64);
    let base_tx = vmm.stop_queue(1).unwrap();
    let tx_used = runner.with(|w| w.queues()[1].last_used());
    assert_eq!(base_tx, tx_used);
    check_guest(&runner);
    drop(runner);
    drop(vmm);
    drop(proxy);
    drop(backend);
}

#[test]
fn idle_rx_buffers_are_reclaimed_event_idx() {
    run(true);
}

#[test]
fn idle_rx_buffers_are_reclaimed_no_event_idx() {
    run(false);
}
