//! Shadow mode writes exactly the right pages into the VMM's dirty log, switching on LOG_ALL and
//! back, with both memory-table styles and both log styles (QEMU's single region, Cloud
//! Hypervisor's fresh region per read).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Rig, RigOptions};
use svq_testkit::guest::ram::GuestRam;
use svq_testkit::guest::vring::{Buf, DriverQueue, QueueLayout};
use svq_testkit::vmm::{LogStyle, MemTableStyle};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;
const RING: u64 = 0x1_0000;
const HDR: u64 = 0x10_0000; // read-only request header page
const DATA: u64 = 0x10_1000; // read destination (device-written)
const STATUS: u64 = 0x10_3000; // status byte page (device-written)
const WDATA: u64 = 0x10_5000; // write source (device-read only)
const UNTOUCHED: u64 = 0x10_7000;

struct Driver {
    q: DriverQueue,
    ram: std::sync::Arc<GuestRam>,
}

impl Driver {
    /// One virtio-blk request (type 0 = read, 1 = write) of one 4 KiB block; waits for it.
    fn request(&mut self, write: bool, sector: u64, data: u64) -> (u8, u32) {
        let mem = self.ram.memory();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&(write as u32).to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let bufs = [
            Buf::ro(HDR, 16),
            if write {
                Buf::ro(data, 4096)
            } else {
                Buf::wo(data, 4096)
            },
            Buf::wo(STATUS, 1),
        ];
        self.q.add(mem, &bufs, false, 1).unwrap();
        self.q.publish(mem);
        self.q.kick_now();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let done = self.q.reap(mem);
            if let Some(c) = done.first() {
                let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
                assert!(self.q.take_anomalies().is_empty());
                return (status, c.len);
            }
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn run(mem_style: MemTableStyle, log_style: LogStyle, event_idx: bool) {
    // A VMM sending SET_MEM_TABLE gets a proxy whose backend lacks CONFIGURE_MEM_SLOTS, so the
    // shadow ring goes in with a full SET_MEM_TABLE too; ADD_MEM_REG otherwise.
    let rig = Rig::new(RigOptions {
        event_idx,
        backend_mem_slots: mem_style == MemTableStyle::AddMemReg,
        ..Default::default()
    });
    let ram = GuestRam::new("guest", 4 << 20).unwrap();
    let mut vmm = rig.vmm(ram.clone(), mem_style, log_style, event_idx);
    assert!(
        vmm.supports_logging(),
        "svqd must offer LOG_ALL + LOG_SHMFD"
    );
    let layout = QueueLayout::at(RING, 64, 0);
    let q = DriverQueue::new(ram.memory(), 0, layout, vmm.event_idx(), false).unwrap();
    vmm.start_queue(0, layout, 0, q.kick_fd(), q.call_fd())
        .unwrap();
    let mut d = Driver {
        q,
        ram: ram.clone(),
    };

    // Passthrough: put recognisable data on the disk.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.memory()
        .write_slice(&pattern, GuestAddress(WDATA))
        .unwrap();
    assert_eq!(d.request(true, 8, WDATA), (0, 1));
    assert_eq!(rig.modes(), ["passthrough"]);
    let st = rig.proxy.control().query_stats();
    assert_eq!(
        st.queues[0].counters.kicks, 0,
        "passthrough must not relay kicks"
    );

    // Migration starts: svqd switches the queue to shadow mode.
    vmm.start_dirty_log().unwrap();
    assert_eq!(rig.modes(), ["shadow"]);
    let _ = vmm.sync_dirty_log().unwrap();

    // A read: the backend writes DATA and STATUS, svqd the used ring.
    assert_eq!(d.request(false, 8, DATA), (0, 4097));
    let mut back = vec![0u8; 4096];
    ram.memory()
        .read_slice(&mut back, GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        back, pattern,
        "read through the shadow ring returns the disk data"
    );
    let logged: BTreeSet<u64> = vmm.sync_dirty_log().unwrap().into_iter().collect();
    let used_page = layout.used / PAGE;
    let expected: BTreeSet<u64> = [DATA / PAGE, STATUS / PAGE, used_page]
        .into_iter()
        .collect();
    assert_eq!(
        logged, expected,
        "exactly the device-written pages and the used ring"
    );
    for never in [HDR, WDATA, UNTOUCHED, RING] {
        assert!(
            !logged.contains(&(never / PAGE)),
            "page {never:#x} was not written"
        );
    }

    // A write: the backend only reads WDATA; only STATUS and the used ring are written.
    assert_eq!(d.request(true, 16, WDATA), (0, 1));
    let logged: BTreeSet<u64> = vmm.sync_dirty_log().unwrap().into_iter().collect();
    let expected: BTreeSet<u64> = [STATUS / PAGE, used_page].into_iter().collect();
    assert_eq!(logged, expected);

    // Nothing happens: nothing is logged.
    assert!(vmm.sync_dirty_log().unwrap().is_empty());

    // Migration cancelled: back to passthrough, still working, nothing logged.
    vmm.stop_dirty_log().unwrap();
    assert_eq!(rig.modes(), ["passthrough"]);
    assert_eq!(d.request(false, 16, DATA), (0, 4097));
    let st = rig.proxy.control().query_stats();
    assert_eq!(st.queues[0].counters.mode_switches, 2);
    assert_eq!(
        st.queues[0].counters.completed, 2,
        "two requests went through the shadow ring"
    );
    assert!(st.queues[0].counters.dirty_pages >= 5);
}

#[test]
fn add_mem_reg_qemu_log_event_idx() {
    run(MemTableStyle::AddMemReg, LogStyle::Qemu, true);
}

#[test]
fn set_mem_table_cloud_hypervisor_log_no_event_idx() {
    run(MemTableStyle::SetMemTable, LogStyle::CloudHypervisor, false);
}

#[test]
fn add_mem_reg_cloud_hypervisor_log_no_event_idx() {
    run(MemTableStyle::AddMemReg, LogStyle::CloudHypervisor, false);
}

#[test]
fn set_mem_table_qemu_log_event_idx() {
    run(MemTableStyle::SetMemTable, LogStyle::Qemu, true);
}

/// The hidden test switch (`--x-test-no-log`): shadow mode still relays, nothing is logged. The
/// testkit's migration oracle uses it as its negative control.
#[test]
fn logging_disabled_logs_nothing() {
    let rig = Rig::new(RigOptions {
        log_enabled: false,
        ..Default::default()
    });
    let ram = GuestRam::new("guest", 4 << 20).unwrap();
    let mut vmm = rig.vmm(ram.clone(), MemTableStyle::AddMemReg, LogStyle::Qemu, true);
    let layout = QueueLayout::at(RING, 64, 0);
    let q = DriverQueue::new(ram.memory(), 0, layout, vmm.event_idx(), false).unwrap();
    vmm.start_queue(0, layout, 0, q.kick_fd(), q.call_fd())
        .unwrap();
    let mut d = Driver {
        q,
        ram: ram.clone(),
    };
    vmm.start_dirty_log().unwrap();
    assert_eq!(rig.modes(), ["shadow"]);
    assert_eq!(d.request(false, 8, DATA), (0, 4097));
    assert!(vmm.sync_dirty_log().unwrap().is_empty());
    assert!(!rig.proxy.control().query_status().logging);
}

/// Forcing shadow mode through the control socket, with no migration: relayed, not logged.
#[test]
fn control_socket_forces_shadow_mode_and_back() {
    let rig = Rig::new(RigOptions::default());
    let ctl_path = rig.dir.path().join("svqd.ctl");
    let _server = svqd::control::serve(&ctl_path, rig.proxy.control()).unwrap();
    let mut ctl = svqd::control::ControlClient::connect(&ctl_path).unwrap();
    let ram = GuestRam::new("guest", 4 << 20).unwrap();
    let mut vmm = rig.vmm(ram.clone(), MemTableStyle::AddMemReg, LogStyle::Qemu, true);
    let layout = QueueLayout::at(RING, 64, 0);
    let q = DriverQueue::new(ram.memory(), 0, layout, vmm.event_idx(), false).unwrap();
    vmm.start_queue(0, layout, 0, q.kick_fd(), q.call_fd())
        .unwrap();
    let mut d = Driver {
        q,
        ram: ram.clone(),
    };
    let on = serde_json::json!({ "enable": true });
    assert_eq!(
        ctl.execute("set-shadow", Some(on)).unwrap(),
        serde_json::json!({ "return": {} })
    );
    let st = ctl.execute("query-status", None).unwrap();
    assert_eq!(st["return"]["queues"][0]["mode"], "shadow");
    assert_eq!(st["return"]["forced"], true);
    for i in 0..8 {
        assert_eq!(
            d.request(i % 2 == 0, 8 * i, DATA),
            (0, if i % 2 == 0 { 1 } else { 4097 })
        );
    }
    let stats = ctl.execute("query-stats", None).unwrap();
    let q0 = &stats["return"]["queues"][0];
    assert_eq!(q0["completed"], 8);
    assert_eq!(q0["chains"], 8);
    assert!(q0["kicks"].as_u64().unwrap() >= 1);
    assert!(q0["calls"].as_u64().unwrap() >= 1);
    assert_eq!(q0["dirty_pages"], 0, "no migration, no log");
    let off = serde_json::json!({ "enable": false });
    ctl.execute("set-shadow", Some(off)).unwrap();
    let st = ctl.execute("query-status", None).unwrap();
    assert_eq!(st["return"]["queues"][0]["mode"], "passthrough");
    assert_eq!(d.request(false, 8, DATA), (0, 4097));
    let stats = ctl.execute("query-stats", None).unwrap();
    assert_eq!(
        stats["return"]["queues"][0]["completed"], 8,
        "passthrough bypasses svqd"
    );
    assert_eq!(stats["return"]["queues"][0]["mode_switches"], 2);
}
