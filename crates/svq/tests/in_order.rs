//! VIRTIO_F_IN_ORDER scenarios: a device batch reaches the guest as one used element per chain
//! in avail order with the skipped chains logged whole; a device breaking the in-order rules
//! breaks only its queue; exported in-flight chains keep avail order through import, the
//! resubmit list and reclaim (also when the guest's heads wrap around its table).

mod common;

use common::*;
use std::sync::Arc;
use svq::{
    DirtyLog, IdentityTranslation, QueueConfig, QueueError, QueueState, ShadowVirtqueue, SharedLog,
};

fn cfg(guest_size: u16, shadow_size: u16, event_idx: bool) -> QueueConfig {
    QueueConfig {
        in_order: true,
        ..config(guest_size, shadow_size, event_idx, true)
    }
}

struct Q {
    m: Memories,
    e: ShadowVirtqueue<IdentityTranslation>,
    drv: Driver,
    dev: Device,
    log: SharedLog,
    dlog: Arc<DirtyLog>,
}

fn setup(cfg: QueueConfig) -> Q {
    let m = memories();
    let drv = Driver::new(&m.guest, cfg.guest_size, cfg.event_idx, 0).in_order(true);
    let e = ShadowVirtqueue::new(
        cfg,
        shadow_area(&m, 0, cfg.shadow_size),
        IdentityTranslation,
        QueueState::default(),
    )
    .unwrap();
    let mut dev = Device::new(e.device_addrs(), cfg.shadow_size, cfg.event_idx, 0);
    dev.ring_order = Some(0);
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

impl Q {
    /// Post `n` chains of one device-writable buffer of `len` bytes and forward them.
    fn post(&mut self, n: usize, len: u32) -> Vec<u16> {
        let mut heads = Vec::new();
        for _ in 0..n {
            let h = self.drv.peek_head();
            let b = Buf {
                addr: buf_addr(h, 0),
                len,
                write: true,
            };
            heads.push(self.drv.post(&self.m.guest, &[b], false).unwrap());
        }
        self.drv.publish(&self.m.guest);
        self.e.forward_avail(&self.m.guest, &self.log).unwrap();
        heads
    }
}

#[test]
fn a_device_batch_reaches_the_guest_as_one_element_per_chain_in_order() {
    let mut q = setup(cfg(8, 8, true));
    // A mixed chain (read header, indirect table of two writable buffers) and three plain ones.
    let h0 = q.drv.peek_head();
    let mixed = [
        Buf {
            addr: buf_addr(h0, 0),
            len: 16,
            write: false,
        },
        Buf {
            addr: buf_addr(h0, 0x1000),
            len: 0x1800,
            write: true,
        },
        Buf {
            addr: buf_addr(h0, 0x3000),
            len: 0x800,
            write: true,
        },
    ];
    q.drv.post(&q.m.guest, &mixed, true).unwrap();
    let mut heads = vec![h0];
    heads.extend(q.post(3, 0x1000));
    q.dev.pop_all(&q.m.device);
    assert_eq!(q.dev.popped.len(), 4);
    assert_eq!(
        q.dev.popped[0].1, mixed,
        "indirect table flattened in ring order"
    );
    // One element for the first three chains (the first two used completely), one for the last.
    q.dev
        .complete_in_order(&q.m.device, &[0x2000, 0x1000, 100], true);
    q.dev.complete_in_order(&q.m.device, &[7], false);
    assert!(q.dev.publish(&q.m.device));
    let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!((u.completed, u.notify_guest), (4, true));
    let got: Vec<(u16, u32)> = q
        .drv
        .reap(&q.m.guest)
        .into_iter()
        .map(|(h, len, _)| (h, len))
        .collect();
    assert_eq!(
        got,
        vec![
            (heads[0], 0x2000),
            (heads[1], 0x1000),
            (heads[2], 100),
            (heads[3], 7)
        ]
    );
    // The guest got four used elements (not one batch element): its used index moved by 4 and
    // each slot holds its own head.
    let mut want: Vec<u64> = Vec::new();
    for (addr, len) in [
        (buf_addr(h0, 0x1000), 0x1800u64),
        (buf_addr(h0, 0x3000), 0x800),
        (buf_addr(heads[1], 0), 0x1000),
        (buf_addr(heads[2], 0), 100),
        (buf_addr(heads[3], 0), 7),
        (USED + 4, 32),
        (USED + 2, 2),
    ] {
        want.extend(pages(addr, len));
    }
    // avail_event written by forward_avail.
    want.extend(pages(USED + 4 + 8 * 8, 2));
    want.sort_unstable();
    want.dedup();
    assert_eq!(q.dlog.dirty_pages(), want);
}

#[test]
fn a_batch_beyond_the_published_used_index_breaks_only_this_queue() {
    let mut q = setup(cfg(8, 8, false));
    let mut other = setup(cfg(8, 8, false));
    let heads = q.post(4, 64);
    other.post(1, 64);
    q.dev.pop_all(&q.m.device);
    // Chain 0 properly, then an element naming chain 3 with the used index moved by one only.
    q.dev.complete_in_order(&q.m.device, &[64], false);
    let (id3, _) = q.dev.popped[2].clone();
    assert_eq!(id3, 3);
    q.dev.raw_used(&q.m.device, u32::from(id3), 64);
    q.dev.publish(&q.m.device);
    let want = QueueError::InOrderBatchBeyondUsed {
        id: 3,
        batch: 3,
        published: 1,
    };
    assert_eq!(q.e.forward_used(&q.m.guest, &q.log), Err(want.clone()));
    assert_eq!(q.e.broken(), Some(&want));
    // Chain 0 completed before the bad element still reached the guest.
    let got: Vec<u16> = q.drv.reap(&q.m.guest).into_iter().map(|r| r.0).collect();
    assert_eq!(got, vec![heads[0]]);
    assert_eq!(q.e.forward_avail(&q.m.guest, &q.log), Err(want.clone()));
    assert!(want.to_string().contains("in-order"));
    // Another queue is untouched.
    other.dev.pop_all(&other.m.device);
    other.dev.complete_in_order(&other.m.device, &[64], false);
    other.dev.publish(&other.m.device);
    assert_eq!(
        other
            .e
            .forward_used(&other.m.guest, &other.log)
            .unwrap()
            .completed,
        1
    );
}

#[test]
fn unknown_or_repeated_ids_from_an_in_order_device_break_the_queue() {
    for bad in [7u32, 0, 1000] {
        let mut q = setup(cfg(8, 8, false));
        q.post(2, 64);
        q.dev.pop_all(&q.m.device);
        q.dev.complete_in_order(&q.m.device, &[64], false);
        // 7: a free descriptor; 0: the chain just completed; 1000: outside the ring.
        q.dev.raw_used(&q.m.device, bad, 64);
        q.dev.publish(&q.m.device);
        let want = QueueError::BogusUsedId { id: bad };
        assert_eq!(q.e.forward_used(&q.m.guest, &q.log), Err(want.clone()));
        assert_eq!(q.e.forward_used(&q.m.guest, &q.log), Err(want));
        assert_eq!(q.drv.reap(&q.m.guest).len(), 1);
    }
}

/// Guest heads wrap around the table (6, 7, 0, 1): the exported order is the avail order, not
/// the head order, through an import into a smaller shadow ring (resubmit list) and a reclaim.
#[test]
fn exported_in_flight_chains_keep_avail_order_through_import_and_reclaim() {
    let mut q = setup(cfg(8, 8, false));
    q.post(6, 64);
    q.dev.pop_all(&q.m.device);
    q.dev.complete_in_order(&q.m.device, &[64; 6], true);
    q.dev.publish(&q.m.device);
    q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!(q.drv.reap(&q.m.guest).len(), 6);
    let heads = q.post(4, 64);
    assert_eq!(heads, vec![6, 7, 0, 1]);
    q.dev.pop_all(&q.m.device);
    // The device is lost with all four taken: they must be forwarded again, oldest first.
    let st = q.e.export_state();
    let order: Vec<u16> = st.in_flight.iter().map(|c| c.head).collect();
    assert_eq!(order, heads);

    // A shadow ring of 2 takes 6 and 7; 0 and 1 wait in the resubmit list.
    let cfg2 = cfg(8, 2, false);
    let mut e2 = ShadowVirtqueue::new_with_base(
        cfg2,
        shadow_area(&q.m, 0x8_0000, 2),
        IdentityTranslation,
        st,
        0x7fff,
    )
    .unwrap();
    let b = e2.forward_avail(&q.m.guest, &q.log).unwrap();
    assert_eq!((b.chains, b.shadow_full), (2, true));
    let order: Vec<u16> = e2.export_state().in_flight.iter().map(|c| c.head).collect();
    assert_eq!(order, heads, "shadow ring first, then the resubmit list");
    // The device took only chain 6: 7 goes back to the front of the resubmit list.
    let mut dev2 = Device::new(e2.device_addrs(), 2, false, 0x7fff);
    dev2.ring_order = Some(0);
    dev2.pop_all(&q.m.device);
    dev2.popped.truncate(1);
    e2.set_forwarding(false);
    assert_eq!(e2.reclaim_untaken(&q.m.guest, &q.log, 0x8000).unwrap(), 1);
    let order: Vec<u16> = e2.export_state().in_flight.iter().map(|c| c.head).collect();
    assert_eq!(order, heads);
    // Device completes 6; forwarding resumes with 7, 0, 1, completed in batches: the in-order
    // guest gets 6, 7, 0, 1.
    dev2.complete_in_order(&q.m.device, &[64], false);
    dev2.publish(&q.m.device);
    e2.forward_used(&q.m.guest, &q.log).unwrap();
    e2.set_forwarding(true);
    let mut got: Vec<u16> = q.drv.reap(&q.m.guest).into_iter().map(|r| r.0).collect();
    // The device restarts at the base it stopped at, in ring order after chain 6.
    dev2.last_avail = 0x8000;
    dev2.ring_order = Some(1);
    for _ in 0..4 {
        e2.forward_avail(&q.m.guest, &q.log).unwrap();
        dev2.pop_all(&q.m.device);
        let n = dev2.popped.len();
        if n == 0 {
            break;
        }
        dev2.complete_in_order(&q.m.device, &vec![64; n], n > 1);
        dev2.publish(&q.m.device);
        e2.forward_used(&q.m.guest, &q.log).unwrap();
        got.extend(q.drv.reap(&q.m.guest).into_iter().map(|r| r.0));
    }
    assert_eq!(got, heads);
    assert_eq!(e2.in_flight(), 0);
    assert!(e2.export_state().in_flight.is_empty());
}
