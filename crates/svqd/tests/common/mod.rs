//! Shared setup of the integration tests: reference block backend ← svqd ← simulated VMM.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use svq_testkit::backend::blk::{
    serve_blk, BlkDisk, BlkHandle, BlkOptions, CompletionDelay, LibvhostUserLike,
};
use svq_testkit::guest::blk::{BlkGuest, BlkGuestOptions, BLOCK};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::runner::GuestRunner;
use svq_testkit::guest::{GuestWorkload, Ledger};
use svq_testkit::vmm::{LogStyle, MemTableStyle, Vmm, VmmOptions};
use svqd::{Proxy, ProxyConfig, ProxyThread, ShadowPolicy};

/// A backend and svqd in front of it, on temporary sockets.
pub struct Rig {
    // Dropped in this order: svqd, then the backend, then the directory.
    pub proxy: ProxyThread,
    pub backend: BlkHandle,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Options of a [`Rig`].
#[derive(Clone)]
pub struct RigOptions {
    pub queues: u16,
    pub event_idx: bool,
    pub delay: Option<(u64, u64)>,
    pub policy: ShadowPolicy,
    pub log_enabled: bool,
    pub disk_mib: u64,
    pub backend_mem_slots: bool,
    /// Drop the connection when a completion must signal a closed call fd (qemu-storage-daemon).
    pub qsd_like: bool,
    /// Look and drain like libvhost-user, reading a replaced kick fd this late.
    pub libvhost_user_kick_lag: Option<Duration>,
    /// svqd's --drain-timeout.
    pub drain_timeout: Duration,
    /// svqd's --poll-us.
    pub poll: Duration,
    /// svqd's --worker-cpus.
    pub worker_cpus: Vec<usize>,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            queues: 1,
            event_idx: true,
            delay: None,
            policy: ShadowPolicy::Auto,
            log_enabled: true,
            disk_mib: 8,
            backend_mem_slots: true,
            qsd_like: false,
            libvhost_user_kick_lag: None,
            drain_timeout: Duration::from_secs(5),
            poll: Duration::ZERO,
            worker_cpus: Vec::new(),
        }
    }
}

pub use svq_testkit::init_test_tracing as init_tracing;

impl Rig {
    pub fn new(o: RigOptions) -> Rig {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let bsock = dir.path().join("blk.sock");
        let disk = BlkDisk::open(&dir.path().join("disk.img"), Some(o.disk_mib << 20)).unwrap();
        let backend = serve_blk(
            &bsock,
            disk,
            BlkOptions {
                num_queues: o.queues,
                event_idx: o.event_idx,
                delay: o.delay.map(|(min, max)| CompletionDelay {
                    min: Duration::from_micros(min),
                    max: Duration::from_micros(max),
                }),
                disconnect_on_closed_call: o.qsd_like,
                libvhost_user: o
                    .libvhost_user_kick_lag
                    .map(|kick_lag| LibvhostUserLike { kick_lag }),
                ..Default::default()
            },
        )
        .unwrap();
        let socket = dir.path().join("svqd.sock");
        let mut cfg = ProxyConfig::new(&socket, &bsock);
        cfg.shadow = o.policy;
        cfg.log_enabled = o.log_enabled;
        cfg.backend_mem_slots = o.backend_mem_slots;
        cfg.drain_timeout = o.drain_timeout;
        cfg.poll = o.poll;
        cfg.worker_cpus = o.worker_cpus.clone();
        let proxy = Proxy::new(cfg).unwrap().spawn().unwrap();
        Rig {
            dir,
            backend,
            proxy,
            socket,
        }
    }

    pub fn vmm(
        &self,
        ram: Arc<GuestRam>,
        mem_style: MemTableStyle,
        log_style: LogStyle,
        event_idx: bool,
    ) -> Vmm {
        Vmm::connect(
            &self.socket,
            ram,
            VmmOptions {
                mem_style,
                log_style,
                event_idx,
                ..Default::default()
            },
        )
        .unwrap()
    }

    pub fn modes(&self) -> Vec<String> {
        let st = self.proxy.control().query_status();
        st.queues.iter().map(|q| q.mode.clone()).collect()
    }
}

/// A VMM on `rig` (ADD_MEM_REG, QEMU-style log, EVENT_IDX offered) with `ram_bytes` of guest RAM,
/// running the block workload `opts` with the ring features the VMM negotiated.
pub fn blk_vmm(
    rig: &Rig,
    ram_bytes: u64,
    opts: BlkGuestOptions,
) -> (Arc<GuestRam>, Vmm, GuestRunner<BlkGuest>) {
    let ram = GuestRam::new("guest", ram_bytes).unwrap();
    let mut vmm = rig.vmm(ram.clone(), MemTableStyle::AddMemReg, LogStyle::Qemu, true);
    let guest = BlkGuest::new(
        ram.clone(),
        BlkGuestOptions {
            event_idx: vmm.event_idx(),
            indirect: vmm.indirect(),
            ..opts
        },
    )
    .unwrap();
    let runner = vmm.run_guest(guest).unwrap();
    (ram, vmm, runner)
}

/// End of a block run: drain the guest (nothing may stay in flight), then check that every
/// request completed exactly once, the backend saw each once on one connection, and the disk
/// holds what the guest wrote. Returns the guest's ledger.
pub fn check_blk_run(rig: &Rig, runner: GuestRunner<BlkGuest>) -> Ledger {
    assert_eq!(
        runner.drain(Duration::from_secs(10)),
        0,
        "requests left in flight"
    );
    let w = runner.stop();
    let w = w.lock().unwrap();
    let ledger = w.ledger();
    assert!(w.anomalies().is_empty(), "{:?}", w.anomalies());
    assert_eq!(ledger.duplicates, 0);
    assert_eq!(ledger.completed, ledger.issued, "{ledger:?}");
    let st = rig.backend.stats();
    assert_eq!(st.in_flight, 0);
    assert_eq!(
        rig.backend.connections(),
        1,
        "the backend connection survived every switch"
    );
    assert_eq!(
        st.popped, ledger.issued,
        "backend saw every request exactly once"
    );
    assert_eq!(st.completed, ledger.issued);
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..1024u64 {
        rig.backend.disk().read_at(&mut buf, b * BLOCK).unwrap();
        assert_eq!(buf, w.expected_block(b), "block {b}");
    }
    ledger
}
