//! Scenario tests of the engine: notification suppression both ways, full shadow ring and
//! resume, state export/import, drain, vDPA translation, misbehaving devices, logging off.

mod common;

use common::*;
use std::sync::{Arc, RwLock};
use svq::ring::{ShadowRing, AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY};
use svq::{
    DirtyLog, IdentityTranslation, InFlightChain, IovaTranslation, IovaTree, QueueConfig,
    QueueError, QueueState, ShadowVirtqueue, SharedLog, Translate,
};
use vm_memory::{Bytes, GuestAddress};

struct Q<T: Translate> {
    m: Memories,
    e: ShadowVirtqueue<T>,
    drv: Driver,
    dev: Device,
    log: SharedLog,
    dlog: Arc<DirtyLog>,
}

fn setup_with<T: Translate>(cfg: QueueConfig, xlate: T, start: QueueState) -> Q<T> {
    let m = memories();
    let drv = Driver::new(
        &m.guest,
        cfg.guest_size,
        cfg.event_idx,
        start.last_avail_idx,
    );
    let e = ShadowVirtqueue::new(cfg, shadow_area(&m, 0, cfg.shadow_size), xlate, start).unwrap();
    let dev = Device::new(
        e.device_addrs(),
        cfg.shadow_size,
        cfg.event_idx,
        e.shadow_base(),
    );
    let dlog = Arc::new(DirtyLog::for_memory_end(RAM_SIZE));
    Q {
        m,
        e,
        drv,
        dev,
        log: SharedLog::new(Some(dlog.clone())),
        dlog,
    }
}

fn setup(cfg: QueueConfig) -> Q<IdentityTranslation> {
    setup_with(cfg, IdentityTranslation, QueueState::default())
}

fn wbuf(head: u16, len: u32) -> Buf {
    Buf {
        addr: buf_addr(head, 0),
        len,
        write: true,
    }
}

impl<T: Translate> Q<T> {
    fn post(&mut self, n: usize) -> Vec<u16> {
        let mut heads = Vec::new();
        for _ in 0..n {
            let h = self.drv.peek_head();
            heads.push(
                self.drv
                    .post(&self.m.guest, &[wbuf(h, 256)], false)
                    .unwrap(),
            );
        }
        self.drv.publish(&self.m.guest);
        heads
    }
    fn complete_all(&mut self, len: u32) -> bool {
        self.dev.pop_all(&self.m.device);
        let n = self.dev.popped.len();
        for _ in 0..n {
            self.dev.complete(&self.m.device, 0, len);
        }
        self.dev.publish(&self.m.device)
    }
}

#[test]
fn device_no_notify_suppresses_kicks() {
    let mut q = setup(config(8, 8, false, false));
    q.post(1);
    assert!(q.e.forward_avail(&q.m.guest, &q.log).unwrap().kick_device);
    q.dev.set_no_notify(&q.m.device, true);
    q.post(1);
    let b = q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!((b.chains, b.kick_device), (1, false));
    q.dev.set_no_notify(&q.m.device, false);
    q.post(1);
    assert!(q.e.forward_avail(&q.m.guest, &q.log).unwrap().kick_device);
    assert_eq!(USED_F_NO_NOTIFY, 1);
}

/// Without EVENT_IDX a device that ran the guest ring before the switch may have left
/// `VRING_USED_F_NO_NOTIFY` in the guest's used flags (vhost and rust-vmm backends set it while
/// draining the ring, and GET_VRING_BASE can stop them right there). The guest would then never
/// kick the engine: its first `forward_avail` clears the flag and logs that write, and only it.
#[test]
fn stale_no_notify_left_by_the_previous_device_is_cleared() {
    let mut q = setup(config(8, 8, false, false));
    q.m.guest
        .write_obj(USED_F_NO_NOTIFY | 0x8000, GuestAddress(USED))
        .unwrap();
    // The transport's first call after the switch: nothing posted yet.
    assert_eq!(q.e.forward_avail(&q.m.guest, &q.log).unwrap().chains, 0);
    let flags: u16 = q.m.guest.read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(flags, 0x8000, "only NO_NOTIFY is cleared");
    assert_eq!(
        q.dlog.dirty_pages(),
        vec![USED >> 12],
        "the flags write is logged"
    );
    // The guest kicks for its next chain, and the engine forwards it.
    let h = q.drv.peek_head();
    q.drv.post(&q.m.guest, &[wbuf(h, 64)], false).unwrap();
    assert!(q.drv.publish(&q.m.guest), "guest kicks");
    assert_eq!(q.e.forward_avail(&q.m.guest, &q.log).unwrap().chains, 1);
    // A flags field without NO_NOTIFY is neither written nor logged.
    let mut q = setup(config(8, 8, false, false));
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert!(q.dlog.dirty_pages().is_empty());
}

#[test]
fn guest_no_interrupt_suppresses_interrupts() {
    let mut q = setup(config(8, 8, false, false));
    q.post(2);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.drv.set_no_interrupt(&q.m.guest, true);
    q.complete_all(10);
    let b = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!((b.completed, b.notify_guest), (2, false));
    q.drv.set_no_interrupt(&q.m.guest, false);
    q.post(1);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.complete_all(10);
    assert!(q.e.forward_used(&q.m.guest, &q.log).unwrap().notify_guest);
    assert_eq!(AVAIL_F_NO_INTERRUPT, 1);
}

#[test]
fn event_idx_both_directions() {
    let mut q = setup(config(8, 8, true, false));
    // Guest side: avail_event follows what the engine consumed.
    q.post(3);
    let b = q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!(b.chains, 3);
    let avail_event: u16 = q.m.guest.read_obj(GuestAddress(USED + 4 + 8 * 8)).unwrap();
    assert_eq!(avail_event, 3);
    // Its page was logged.
    assert!(q.dlog.is_page_dirty((USED + 4 + 8 * 8) >> 12));
    // Device side: kick decided by the device's avail_event (device popped 3: wants a kick for 4).
    assert!(
        q.complete_all(0),
        "device calls: used_event = 0 armed by the engine"
    );
    // The first interrupt decision with EVENT_IDX always interrupts.
    assert!(q.e.forward_used(&q.m.guest, &q.log).unwrap().notify_guest);
    // Guest asks for an interrupt only after used index 5 (used_event = 5).
    q.m.guest
        .write_obj(5u16, GuestAddress(AVAIL + 4 + 2 * 8))
        .unwrap();
    for (i, want) in [(4, false), (5, false), (6, true)] {
        q.post(1);
        q.e.forward_avail(&q.m.guest, &q.log).unwrap();
        q.complete_all(0);
        let b = q.e.forward_used(&q.m.guest, &q.log).unwrap();
        assert_eq!(b.notify_guest, want, "used idx {i}");
    }
    // Engine re-armed the shadow used_event to what it consumed.
    let (_, avail, _) = q.e.device_addrs();
    let used_event: u16 =
        q.m.device
            .read_obj(GuestAddress(avail + 4 + 2 * 8))
            .unwrap();
    assert_eq!(used_event, 6);
}

#[test]
fn full_shadow_ring_stops_cleanly_and_resumes() {
    let mut q = setup(config(16, 4, false, false));
    q.post(7);
    let b = q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!((b.chains, b.shadow_full), (4, true));
    assert_eq!(q.e.pending_guest(&q.m.guest).unwrap(), 3);
    // A kick while full forwards nothing and does not break anything.
    let b = q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!((b.chains, b.shadow_full, b.kick_device), (0, true, false));
    q.dev.pop_all(&q.m.device);
    q.dev.complete(&q.m.device, 0, 1);
    q.dev.complete(&q.m.device, 0, 1);
    q.dev.publish(&q.m.device);
    let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!((u.completed, u.retry_avail), (2, true));
    let b = q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!((b.chains, b.shadow_full), (2, true));
    assert_eq!(q.e.in_flight(), 4);
    // Drain everything.
    for _ in 0..4 {
        q.complete_all(1);
        let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
        if u.retry_avail {
            q.e.forward_avail(&q.m.guest, &q.log).unwrap();
        }
    }
    assert_eq!(q.e.in_flight(), 0);
    assert_eq!(q.drv.reap(&q.m.guest).len(), 7);
}

#[test]
fn forwarding_off_drains_and_exports_state() {
    let mut q = setup(config(8, 8, false, false));
    let heads = q.post(3);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    let st = q.e.export_state();
    assert_eq!((st.last_avail_idx, st.used_idx), (3, 0));
    let mut got: Vec<u16> = st.in_flight.iter().map(|c| c.head).collect();
    got.sort_unstable();
    assert_eq!(got, heads);
    assert_eq!(st.in_flight[0].writable.len(), 1);
    q.e.set_forwarding(false);
    q.post(2);
    let b = q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!(b.chains, 0, "forwarding off");
    q.complete_all(5);
    let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!(u.completed, 3, "used entries still flow back");
    assert_eq!(q.e.in_flight(), 0);
    let st = q.e.export_state();
    assert_eq!(
        (st.last_avail_idx, st.used_idx, st.in_flight.len()),
        (3, 3, 0)
    );
    assert_eq!(q.e.pending_guest(&q.m.guest).unwrap(), 2);
}

#[test]
fn imported_in_flight_chains_are_forwarded_first() {
    // A previous instance took heads 0 and 1 (avail 0..2) and no device will complete them.
    let cfg = config(8, 8, false, false);
    let m = memories();
    let mut drv = Driver::new(&m.guest, 8, false, 0);
    drv.post(&m.guest, &[wbuf(0, 100)], false).unwrap();
    drv.post(&m.guest, &[wbuf(1, 100)], false).unwrap();
    drv.post(&m.guest, &[wbuf(2, 100)], false).unwrap();
    drv.publish(&m.guest);
    let st = QueueState {
        last_avail_idx: 2,
        used_idx: 0,
        in_flight: vec![
            InFlightChain {
                head: 1,
                writable: vec![],
            },
            InFlightChain {
                head: 0,
                writable: vec![],
            },
        ],
    };
    let mut e = ShadowVirtqueue::new(cfg, shadow_area(&m, 0, 8), IdentityTranslation, st).unwrap();
    assert_eq!(e.pending_guest(&m.guest).unwrap(), 3);
    assert_eq!(e.export_state().in_flight.len(), 2);
    let log = SharedLog::default();
    let b = e.forward_avail(&m.guest, &log).unwrap();
    assert_eq!(b.chains, 3);
    let mut dev = Device::new(e.device_addrs(), 8, false, 0);
    dev.pop_all(&m.device);
    let order: Vec<u64> = dev.popped.iter().map(|(_, b)| b[0].addr).collect();
    assert_eq!(order, vec![buf_addr(1, 0), buf_addr(0, 0), buf_addr(2, 0)]);
    // Bad imports are refused.
    let bad = QueueState {
        in_flight: vec![InFlightChain {
            head: 8,
            writable: vec![],
        }],
        ..QueueState::default()
    };
    assert!(
        ShadowVirtqueue::new(cfg, shadow_area(&m, 0x8_0000, 8), IdentityTranslation, bad).is_err()
    );
}

#[test]
fn starts_from_vring_base_at_any_index() {
    let cfg = config(8, 4, true, false);
    let m = memories();
    let mut drv = Driver::new(&m.guest, 8, true, 0xfffe);
    drv.post(&m.guest, &[wbuf(7, 64)], false).unwrap();
    drv.post(&m.guest, &[wbuf(6, 64)], false).unwrap();
    drv.publish(&m.guest);
    let st = QueueState::from_vring_base(&m.guest, &cfg, 0xfffe).unwrap();
    assert_eq!(st.used_idx, 0xfffe);
    let mut e =
        ShadowVirtqueue::new_with_base(cfg, shadow_area(&m, 0, 4), IdentityTranslation, st, 0xfffd)
            .unwrap();
    assert_eq!(e.shadow_base(), 0xfffd);
    let log = SharedLog::default();
    assert_eq!(e.forward_avail(&m.guest, &log).unwrap().chains, 2);
    let mut dev = Device::new(e.device_addrs(), 4, true, 0xfffd);
    dev.pop_all(&m.device);
    dev.complete(&m.device, 1, 3);
    dev.complete(&m.device, 0, 4);
    dev.publish(&m.device);
    assert_eq!(e.forward_used(&m.guest, &log).unwrap().completed, 2);
    let got = drv.reap(&m.guest);
    assert_eq!(got.len(), 2);
    assert_eq!(e.export_state().used_idx, 0);
    assert_eq!(e.export_state().last_avail_idx, 0);
}

#[test]
fn vdpa_iova_translation() {
    let mut tree = IovaTree::new(0x1000, (1 << 48) - 1).unwrap();
    let iova = tree.alloc(RAM_SPLIT, 0x1000, 0).unwrap(); // only the first RAM region mapped
    let xlate = IovaTranslation::new(Arc::new(RwLock::new(tree)));
    let mut q = setup_with(config(8, 8, false, false), xlate, QueueState::default());
    let h = q.drv.peek_head();
    q.drv.post(&q.m.guest, &[wbuf(h, 128)], false).unwrap();
    q.drv.publish(&q.m.guest);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.dev.pop_all(&q.m.device);
    assert_eq!(q.dev.popped[0].1[0].addr, iova + buf_addr(h, 0));
    // A buffer in the unmapped second region cannot be translated.
    let far = Buf {
        addr: RAM_SPLIT + 0x1000,
        len: 16,
        write: false,
    };
    q.drv.post(&q.m.guest, &[far], false).unwrap();
    q.drv.publish(&q.m.guest);
    assert_eq!(
        q.e.forward_avail(&q.m.guest, &q.log),
        Err(QueueError::Untranslatable {
            addr: RAM_SPLIT + 0x1000,
            len: 16
        })
    );
}

#[test]
fn bogus_device_ids_and_index_jumps_break_the_queue() {
    let mut q = setup(config(8, 8, false, false));
    q.post(1);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.dev.raw_used(&q.m.device, 5, 0);
    q.dev.publish(&q.m.device);
    assert_eq!(
        q.e.forward_used(&q.m.guest, &q.log),
        Err(QueueError::BogusUsedId { id: 5 })
    );
    assert!(q.e.forward_avail(&q.m.guest, &q.log).is_err());

    let mut q = setup(config(8, 8, false, false));
    q.post(2);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.dev.pop_all(&q.m.device);
    // Completes the first chain twice.
    let id = q.dev.popped[0].0;
    q.dev.raw_used(&q.m.device, u32::from(id), 0);
    q.dev.raw_used(&q.m.device, u32::from(id), 0);
    q.dev.publish(&q.m.device);
    let r = q.e.forward_used(&q.m.guest, &q.log);
    assert_eq!(r, Err(QueueError::BogusUsedId { id: u32::from(id) }));
    // The valid first completion still reached the guest before the queue broke.
    assert_eq!(q.drv.reap(&q.m.guest).len(), 1);

    let mut q = setup(config(8, 8, false, false));
    q.post(1);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    let (_, _, used) = q.e.device_addrs();
    q.m.device.write_obj(7u16, GuestAddress(used + 2)).unwrap();
    assert!(matches!(
        q.e.forward_used(&q.m.guest, &q.log),
        Err(QueueError::UsedIndexJump { last: 0, new: 7 })
    ));
}

#[test]
fn logging_off_marks_nothing_and_log_can_be_replaced() {
    let mut q = setup(config(8, 8, false, false));
    let old = q.log.replace(None).unwrap();
    q.post(1);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.complete_all(256);
    let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!((u.completed, u.pages_logged, u.bytes_written), (1, 0, 256));
    assert!(old.dirty_pages().is_empty());
    let new = Arc::new(DirtyLog::for_memory_end(RAM_SIZE));
    q.log.replace(Some(new.clone()));
    q.post(1);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.complete_all(100);
    let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert!(u.pages_logged >= 2);
    let h = q.dev.popped.len(); // 0: all completed
    assert_eq!(h, 0);
    assert!(new.is_page_dirty(buf_addr(1, 0) >> 12));
    assert!(new.is_page_dirty((USED + 2) >> 12));
    assert!(
        !new.is_page_dirty(buf_addr(0, 0) >> 12),
        "written while logging was off"
    );
}

/// A shadow ring whose device completes one more chain exactly in the race window: after the
/// engine drained the used ring and before it re-arms used_event.
struct RacyRing {
    inner: svq::SplitShadowRing,
    m: Arc<Memories>,
    dev: Device,
    race: bool,
    device_called: Option<bool>,
    /// Returned by the next `next_used` instead of the ring's own element.
    inject: Option<svq::UsedElem>,
}

impl svq::ShadowRing for RacyRing {
    fn size(&self) -> u16 {
        self.inner.size()
    }
    fn num_free(&self) -> u16 {
        self.inner.num_free()
    }
    fn in_flight(&self) -> u16 {
        self.inner.in_flight()
    }
    fn begin_chain(&mut self) -> u16 {
        self.inner.begin_chain()
    }
    fn push_desc(&mut self, d: svq::ShadowDesc) -> bool {
        self.inner.push_desc(d)
    }
    fn commit_chain(&mut self) -> u16 {
        self.inner.commit_chain()
    }
    fn abort_chain(&mut self) {
        self.inner.abort_chain()
    }
    fn take_back(&mut self, device_avail_idx: u16) -> Result<Vec<u16>, QueueError> {
        self.inner.take_back(device_avail_idx)
    }
    fn publish(&mut self) -> bool {
        self.inner.publish()
    }
    fn next_used(&mut self) -> Result<Option<svq::UsedElem>, QueueError> {
        match self.inject.take() {
            Some(e) => Ok(Some(e)),
            None => self.inner.next_used(),
        }
    }
    fn enable_used_notify(&mut self) -> bool {
        if std::mem::take(&mut self.race) {
            self.dev.complete(&self.m.device, 0, 7);
            self.device_called = Some(self.dev.publish(&self.m.device));
        }
        self.inner.enable_used_notify()
    }
    fn device_addrs(&self) -> (u64, u64, u64) {
        self.inner.device_addrs()
    }
    fn base(&self) -> u16 {
        self.inner.base()
    }
    fn avail_idx(&self) -> u16 {
        self.inner.avail_idx()
    }
    fn used_idx(&self) -> u16 {
        self.inner.used_idx()
    }
}

/// An engine over a [`RacyRing`] of 8 (guest ring of 8) and the guest driver of its ring.
fn racy_engine(
    m: &Arc<Memories>,
    event_idx: bool,
) -> (ShadowVirtqueue<IdentityTranslation, RacyRing>, Driver) {
    let cfg = config(8, 8, event_idx, false);
    let drv = Driver::new(&m.guest, 8, event_idx, 0);
    let ring = svq::SplitShadowRing::new(shadow_area(m, 0, 8), 8, event_idx, 0).unwrap();
    let dev = Device::new(svq::ShadowRing::device_addrs(&ring), 8, event_idx, 0);
    let racy = RacyRing {
        inner: ring,
        m: m.clone(),
        dev,
        race: false,
        device_called: None,
        inject: None,
    };
    let e =
        ShadowVirtqueue::with_ring(cfg, racy, IdentityTranslation, QueueState::default()).unwrap();
    (e, drv)
}

#[test]
fn completion_racing_the_used_event_rearm_is_not_lost() {
    let m = Arc::new(memories());
    let (mut e, mut drv) = racy_engine(&m, true);
    let log = SharedLog::default();
    for h in 0..2 {
        drv.post(&m.guest, &[wbuf(h, 64)], false).unwrap();
    }
    drv.publish(&m.guest);
    e.forward_avail(&m.guest, &log).unwrap();
    // Device pops both, completes one (and calls); the second completes inside the window.
    let ring = e.ring_mut();
    ring.dev.pop_all(&m.device);
    ring.dev.complete(&m.device, 0, 5);
    assert!(ring.dev.publish(&m.device));
    ring.race = true;
    let u = e.forward_used(&m.guest, &log).unwrap();
    assert_eq!(
        e.ring().device_called,
        Some(false),
        "the racing completion is one the device does not call for"
    );
    assert_eq!(u.completed, 2, "the re-check after re-arming picked it up");
}

/// A translation that makes the guest post one more chain while the engine is forwarding:
/// after it read the avail index and before it re-arms avail_event.
struct RacyGuest {
    m: Arc<Memories>,
    drv: std::sync::Mutex<(Driver, bool, Option<bool>)>,
}

impl Translate for RacyGuest {
    fn to_device(&self, gpa: u64, _len: u32) -> Result<u64, QueueError> {
        let mut g = self.drv.lock().unwrap();
        if std::mem::take(&mut g.1) {
            let h = g.0.peek_head();
            g.0.post(&self.m.guest, &[wbuf(h, 64)], false).unwrap();
            g.2 = Some(g.0.publish(&self.m.guest));
        }
        Ok(gpa)
    }
}

#[test]
fn chain_racing_the_avail_event_rearm_is_not_lost() {
    let cfg = config(8, 8, true, false);
    let m = Arc::new(memories());
    let mut drv = Driver::new(&m.guest, 8, true, 0);
    drv.post(&m.guest, &[wbuf(0, 64)], false).unwrap();
    assert!(drv.publish(&m.guest));
    let xlate = RacyGuest {
        m: m.clone(),
        drv: std::sync::Mutex::new((drv, true, None)),
    };
    let mut e =
        ShadowVirtqueue::new(cfg, shadow_area(&m, 0, 8), xlate, QueueState::default()).unwrap();
    let log = SharedLog::default();
    let b = e.forward_avail(&m.guest, &log).unwrap();
    assert_eq!(
        e.translation().drv.lock().unwrap().2,
        Some(false),
        "the racing chain is one the guest does not kick for"
    );
    let avail_event: u16 = m.guest.read_obj(GuestAddress(USED + 4 + 8 * 8)).unwrap();
    assert_eq!(
        b.chains, 2,
        "the re-check after re-arming avail_event forwarded it"
    );
    assert_eq!(avail_event, 2);
}

/// The `ShadowRing` seam is trusted to validate used ids, but a ring implementation that returns
/// an id outside the ring, or one that is not in flight, must still break only the queue: no
/// panic, no stale guest head in the guest's used ring.
#[test]
fn ring_returning_an_id_not_in_flight_breaks_the_queue() {
    for id in [200u16, 5] {
        let m = Arc::new(memories());
        let (mut e, mut drv) = racy_engine(&m, false);
        let log = SharedLog::default();
        drv.post(&m.guest, &[wbuf(0, 64)], false).unwrap();
        drv.publish(&m.guest);
        assert_eq!(e.forward_avail(&m.guest, &log).unwrap().chains, 1);
        e.ring_mut().inject = Some(svq::UsedElem { id, len: 9 });
        assert_eq!(
            e.forward_used(&m.guest, &log),
            Err(QueueError::BogusUsedId { id: u32::from(id) })
        );
        let used_idx: u16 = m.guest.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 0, "nothing reached the guest used ring");
    }
}

#[test]
fn untaken_chains_go_back_to_the_guest_ring() {
    // Receive-queue shape: the device took 2 of 5 buffers when it was stopped.
    let mut q = setup(config(8, 8, true, false));
    let first = q.post(2);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.dev.pop_all(&q.m.device);
    let rest = q.post(3);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.e.set_forwarding(false);
    assert_eq!(q.e.in_flight(), 5);
    let base = q.dev.last_avail; // GET_VRING_BASE of the stopped device
    assert_eq!(base, 2);

    // A base outside what was published is refused and changes nothing.
    for bogus in [6u16, 0xffff, 1u16.wrapping_sub(8)] {
        assert!(matches!(
            q.e.reclaim_untaken(&q.m.guest, &q.log, bogus),
            Err(QueueError::BogusVringBase { .. })
        ));
    }
    assert_eq!(q.e.in_flight(), 5);

    assert_eq!(q.e.reclaim_untaken(&q.m.guest, &q.log, base).unwrap(), 3);
    assert_eq!(q.e.in_flight(), 2);
    let st = q.e.export_state();
    assert_eq!(st.last_avail_idx, 2, "guest avail index stepped back");
    let avail_event: u16 = q.m.guest.read_obj(GuestAddress(USED + 4 + 8 * 8)).unwrap();
    assert_eq!(
        avail_event, 2,
        "the guest's avail_event points at the first chain not taken"
    );
    let mut held: Vec<u16> = st.in_flight.iter().map(|c| c.head).collect();
    held.sort_unstable();
    assert_eq!(held, first);
    assert_eq!(q.e.pending_guest(&q.m.guest).unwrap(), 3);

    // The taken ones complete late into the shadow ring and reach the guest.
    q.complete_all(10);
    assert_eq!(q.e.forward_used(&q.m.guest, &q.log).unwrap().completed, 2);
    assert_eq!(q.e.in_flight(), 0);
    let st = q.e.export_state();
    assert_eq!((st.last_avail_idx, st.used_idx), (2, 2));

    // A device restarted on the guest ring at that base finds exactly the other three.
    let mut pt = Device::with_used((DESC, AVAIL, USED), 8, true, st.last_avail_idx, st.used_idx);
    assert_eq!(pt.pop_all(&q.m.guest), 3);
    let got: Vec<u64> = pt.popped.iter().map(|(_, b)| b[0].addr).collect();
    let want: Vec<u64> = rest.iter().map(|&h| buf_addr(h, 0)).collect();
    assert_eq!(got, want);
    for _ in 0..3 {
        pt.complete(&q.m.guest, 0, 1);
    }
    pt.publish(&q.m.guest);
    assert_eq!(q.drv.reap(&q.m.guest).len(), 5, "each buffer exactly once");
}

#[test]
fn reclaimed_shadow_descriptors_are_reused_and_forwarding_resumes() {
    // The engine can also keep going after a reclaim (a switch that failed later).
    let mut q = setup(config(8, 4, false, false));
    q.post(4);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!(q.e.ring().num_free(), 0);
    assert_eq!(
        q.e.reclaim_untaken(&q.m.guest, &q.log, q.dev.last_avail)
            .unwrap(),
        4
    );
    assert_eq!(q.e.ring().num_free(), 4);
    q.e.set_forwarding(true);
    let b = q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!(b.chains, 4, "the same chains are forwarded again");
    assert_eq!(q.dev.pop_all(&q.m.device), 4);
    q.complete_all(3);
    assert_eq!(q.e.forward_used(&q.m.guest, &q.log).unwrap().completed, 4);
    assert_eq!(q.drv.reap(&q.m.guest).len(), 4);
}

#[test]
fn reclaimed_imported_chains_go_back_to_the_resubmit_list() {
    let cfg = config(8, 8, false, false);
    let m = memories();
    let mut drv = Driver::new(&m.guest, 8, false, 0);
    for h in 0..3 {
        drv.post(&m.guest, &[wbuf(h, 100)], false).unwrap();
    }
    drv.publish(&m.guest);
    let st = QueueState {
        last_avail_idx: 1,
        used_idx: 0,
        in_flight: vec![InFlightChain {
            head: 0,
            writable: vec![],
        }],
    };
    let mut e = ShadowVirtqueue::new(cfg, shadow_area(&m, 0, 8), IdentityTranslation, st).unwrap();
    let log = SharedLog::default();
    assert_eq!(e.forward_avail(&m.guest, &log).unwrap().chains, 3);
    e.set_forwarding(false);
    assert_eq!(
        e.reclaim_untaken(&m.guest, &log, e.shadow_base()).unwrap(),
        3
    );
    let st = e.export_state();
    assert_eq!(st.last_avail_idx, 1);
    assert_eq!(st.in_flight.len(), 1);
    assert_eq!(st.in_flight[0].head, 0);
    assert!(
        st.in_flight[0].writable.is_empty(),
        "waiting to be resubmitted"
    );
    assert_eq!(e.pending_guest(&m.guest).unwrap(), 3);
}

#[test]
fn used_lengths_beyond_the_chain_are_clipped_for_the_log_and_reported() {
    let mut q = setup(config(8, 8, false, false));
    let h = q.drv.peek_head();
    q.drv.post(&q.m.guest, &[wbuf(h, 128)], false).unwrap();
    q.drv.publish(&q.m.guest);
    q.e.forward_avail(&q.m.guest, &q.log).unwrap();
    q.dev.pop_all(&q.m.device);
    let id = q.dev.popped[0].0;
    q.dev.raw_used(&q.m.device, u32::from(id), 1 << 20);
    q.dev.publish(&q.m.device);
    let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!((u.completed, u.bytes_written, u.overlong), (1, 128, 1));
    // The guest gets the length as the device reported it.
    let got = q.drv.reap(&q.m.guest);
    assert_eq!(got[0].1, 1 << 20);
}
