//! Malicious-guest tests: one per validation rule. A violation breaks only that queue, with a
//! typed error, one warning, no panic; later calls return the same error without doing work;
//! chains before the bad one in the same batch still reach the device.

mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use svq::ring::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use svq::{
    DirtyLog, IdentityTranslation, QueueConfig, QueueError, QueueState, ShadowVirtqueue, SharedLog,
};
use vm_memory::{Bytes, GuestAddress};

/// Counts WARN events (to check "logged once").
struct WarnCounter(Arc<AtomicUsize>);
impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        if *e.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

struct Q {
    m: Memories,
    e: ShadowVirtqueue<IdentityTranslation>,
    drv: Driver,
    dev: Device,
    log: SharedLog,
}

fn setup(cfg: QueueConfig) -> Q {
    let m = memories();
    let drv = Driver::new(&m.guest, cfg.guest_size, cfg.event_idx, 0);
    let e = ShadowVirtqueue::new(
        cfg,
        shadow_area(&m, 0, cfg.shadow_size),
        IdentityTranslation,
        QueueState::default(),
    )
    .unwrap();
    let dev = Device::new(e.device_addrs(), cfg.shadow_size, cfg.event_idx, 0);
    Q {
        m,
        e,
        drv,
        dev,
        log: SharedLog::new(Some(Arc::new(DirtyLog::new_owned(256)))),
    }
}

fn buf(head: u16) -> Buf {
    Buf {
        addr: buf_addr(head, 0),
        len: 64,
        write: true,
    }
}

/// Post one good chain, then make avail slot of the next index point at `head` (crafted by
/// the test), publish both, and check: the good chain is forwarded, the error is `want`, logged
/// once, sticky, and the engine does no more work.
fn expect_break(q: &mut Q, bad_head: u16, want: QueueError) {
    let good = q.drv.post(&q.m.guest, &[buf(0)], false).unwrap();
    assert_eq!(good, 0);
    let idx = q.drv.next_avail;
    q.m.guest
        .write_obj(
            bad_head,
            GuestAddress(AVAIL + 4 + 2 * u64::from(idx & (q.drv.size - 1))),
        )
        .unwrap();
    q.m.guest
        .write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
        .unwrap();
    let warns = Arc::new(AtomicUsize::new(0));
    let got = tracing::subscriber::with_default(WarnCounter(warns.clone()), || {
        let first = q.e.forward_avail(&q.m.guest, &q.log);
        let second = q.e.forward_avail(&q.m.guest, &q.log);
        let third = q.e.forward_used(&q.m.guest, &q.log);
        assert_eq!(first, second);
        assert_eq!(first.clone().map(|_| ()), third.map(|_| ()));
        first
    });
    assert_eq!(got, Err(want.clone()));
    assert_eq!(q.e.broken(), Some(&want));
    assert_eq!(warns.load(Ordering::Relaxed), 1, "logged exactly once");
    // The good chain before the bad one reached the device.
    q.dev.pop_all(&q.m.device);
    assert_eq!(q.dev.popped.len(), 1);
    assert_eq!(q.dev.popped[0].1, vec![buf(0)]);
    // No more work: a fresh valid chain is not forwarded.
    q.drv.next_avail = idx.wrapping_add(1);
    q.drv.post(&q.m.guest, &[buf(1)], false);
    q.drv.publish(&q.m.guest);
    assert_eq!(q.e.forward_avail(&q.m.guest, &q.log), Err(want));
    q.dev.pop_all(&q.m.device);
    assert_eq!(q.dev.popped.len(), 1);
}

fn cfg() -> QueueConfig {
    config(8, 8, false, true)
}

#[test]
fn head_out_of_range() {
    let mut q = setup(cfg());
    expect_break(
        &mut q,
        8,
        QueueError::DescIndexOutOfRange { index: 8, size: 8 },
    );
}

#[test]
fn next_out_of_range() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, buf_addr(5, 0), 16, DESC_F_NEXT, 200);
    expect_break(
        &mut q,
        5,
        QueueError::DescIndexOutOfRange {
            index: 200,
            size: 8,
        },
    );
}

#[test]
fn descriptor_loop() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, buf_addr(5, 0), 16, DESC_F_NEXT, 6);
    put_desc(&q.m.guest, DESC, 6, buf_addr(6, 0), 16, DESC_F_NEXT, 5);
    expect_break(&mut q, 5, QueueError::ChainTooLong { max: 8 });
}

#[test]
fn self_loop() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 7, buf_addr(7, 0), 16, DESC_F_NEXT, 7);
    expect_break(&mut q, 7, QueueError::ChainTooLong { max: 8 });
}

#[test]
fn buffer_outside_guest_memory() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, RAM_SIZE + 0x1000, 16, DESC_F_WRITE, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadGuestAddress {
            addr: RAM_SIZE + 0x1000,
            len: 16,
        },
    );
}

#[test]
fn buffer_crossing_end_of_memory() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, RAM_SIZE - 8, 16, 0, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadGuestAddress {
            addr: RAM_SIZE - 8,
            len: 16,
        },
    );
}

#[test]
fn buffer_in_the_shadow_region_is_not_guest_memory() {
    // The device can reach the shadow ring's region; the guest must not point buffers at it.
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, SHADOW_GPA, 16, DESC_F_WRITE, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadGuestAddress {
            addr: SHADOW_GPA,
            len: 16,
        },
    );
}

#[test]
fn buffer_address_wraps() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, u64::MAX - 3, 16, 0, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadGuestAddress {
            addr: u64::MAX - 3,
            len: 16,
        },
    );
}

#[test]
fn avail_index_jump() {
    let mut q = setup(cfg());
    q.drv.post(&q.m.guest, &[buf(0)], false).unwrap();
    q.m.guest.write_obj(9u16, GuestAddress(AVAIL + 2)).unwrap(); // 9 > size 8 ahead of 0
    let r = q.e.forward_avail(&q.m.guest, &q.log);
    assert_eq!(
        r,
        Err(QueueError::AvailIndexJump {
            last: 0,
            new: 9,
            size: 8
        })
    );
    // Nothing was forwarded: the jump is detected before reading any chain.
    q.dev.pop_all(&q.m.device);
    assert!(q.dev.popped.is_empty());
    assert_eq!(q.e.pending_guest(&q.m.guest), r.map(|_| 0));
}

#[test]
fn indirect_not_negotiated() {
    let mut q = setup(config(8, 8, false, false));
    put_desc(&q.m.guest, DESC, 5, INDIRECT, 16, DESC_F_INDIRECT, 0);
    put_desc(&q.m.guest, INDIRECT, 0, buf_addr(5, 0), 16, 0, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadIndirect(
            "indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC not negotiated",
        ),
    );
}

#[test]
fn indirect_with_next() {
    let mut q = setup(cfg());
    put_desc(
        &q.m.guest,
        DESC,
        5,
        INDIRECT,
        16,
        DESC_F_INDIRECT | DESC_F_NEXT,
        6,
    );
    put_desc(&q.m.guest, INDIRECT, 0, buf_addr(5, 0), 16, 0, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadIndirect("indirect descriptor with NEXT set"),
    );
}

#[test]
fn indirect_bad_length() {
    for len in [0u32, 17, 8] {
        let mut q = setup(cfg());
        put_desc(&q.m.guest, DESC, 5, INDIRECT, len, DESC_F_INDIRECT, 0);
        expect_break(
            &mut q,
            5,
            QueueError::BadIndirect("indirect table length not a non-zero multiple of 16"),
        );
    }
}

#[test]
fn nested_indirect() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, INDIRECT, 32, DESC_F_INDIRECT, 0);
    put_desc(&q.m.guest, INDIRECT, 0, buf_addr(5, 0), 16, DESC_F_NEXT, 1);
    put_desc(
        &q.m.guest,
        INDIRECT,
        1,
        INDIRECT + 0x400,
        16,
        DESC_F_INDIRECT,
        0,
    );
    expect_break(
        &mut q,
        5,
        QueueError::BadIndirect("nested indirect descriptor"),
    );
}

#[test]
fn indirect_table_outside_memory() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, RAM_SIZE - 16, 32, DESC_F_INDIRECT, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadGuestAddress {
            addr: RAM_SIZE - 16,
            len: 32,
        },
    );
}

#[test]
fn indirect_table_address_wraps() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, u64::MAX - 15, 32, DESC_F_INDIRECT, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadGuestAddress {
            addr: u64::MAX - 15,
            len: 32,
        },
    );
}

#[test]
fn indirect_next_out_of_range() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, INDIRECT, 32, DESC_F_INDIRECT, 0);
    put_desc(&q.m.guest, INDIRECT, 0, buf_addr(5, 0), 16, DESC_F_NEXT, 2);
    expect_break(
        &mut q,
        5,
        QueueError::DescIndexOutOfRange { index: 2, size: 2 },
    );
}

#[test]
fn indirect_loop() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, INDIRECT, 48, DESC_F_INDIRECT, 0);
    put_desc(&q.m.guest, INDIRECT, 0, buf_addr(5, 0), 16, DESC_F_NEXT, 1);
    put_desc(&q.m.guest, INDIRECT, 1, buf_addr(5, 16), 16, DESC_F_NEXT, 0);
    expect_break(&mut q, 5, QueueError::ChainTooLong { max: 3 });
}

#[test]
fn indirect_buffer_outside_memory() {
    let mut q = setup(cfg());
    put_desc(&q.m.guest, DESC, 5, INDIRECT, 16, DESC_F_INDIRECT, 0);
    put_desc(&q.m.guest, INDIRECT, 0, RAM_SIZE, 1, DESC_F_WRITE, 0);
    expect_break(
        &mut q,
        5,
        QueueError::BadGuestAddress {
            addr: RAM_SIZE,
            len: 1,
        },
    );
}

#[test]
fn flattened_chain_longer_than_shadow_ring() {
    let mut q = setup(config(8, 4, false, true));
    put_desc(&q.m.guest, DESC, 5, INDIRECT, 16 * 5, DESC_F_INDIRECT, 0);
    for i in 0..5u16 {
        let last = i == 4;
        put_desc(
            &q.m.guest,
            INDIRECT,
            i,
            buf_addr(5, 64 * u64::from(i)),
            16,
            if last { 0 } else { DESC_F_NEXT },
            i + 1,
        );
    }
    expect_break(
        &mut q,
        5,
        QueueError::ChainExceedsShadow { len: 5, size: 4 },
    );
}

#[test]
fn rings_outside_memory_or_misaligned() {
    let m = memories();
    let mut c = config(8, 8, false, false);
    c.used_ring = RAM_SIZE - 16; // used ring crosses the end of guest memory
    let mut e = ShadowVirtqueue::new(
        c,
        shadow_area(&m, 0, 8),
        IdentityTranslation,
        QueueState::default(),
    )
    .unwrap();
    let log = SharedLog::default();
    let err = e.forward_avail(&m.guest, &log).unwrap_err();
    assert!(matches!(err, QueueError::BadGuestAddress { .. }));
    assert_eq!(e.forward_used(&m.guest, &log).unwrap_err(), err);
    let mut c = config(8, 8, false, false);
    c.desc_table = 0x1008;
    assert!(matches!(
        ShadowVirtqueue::new(
            c,
            shadow_area(&m, 0, 8),
            IdentityTranslation,
            QueueState::default()
        ),
        Err(QueueError::MisalignedRing { align: 16, .. })
    ));
    let mut c = config(8, 8, false, false);
    c.guest_size = 12;
    assert!(matches!(
        ShadowVirtqueue::new(
            c,
            shadow_area(&m, 0, 8),
            IdentityTranslation,
            QueueState::default()
        ),
        Err(QueueError::InvalidConfig(_))
    ));
}

#[test]
fn other_queues_keep_running() {
    // Two queues over the same memory: breaking one leaves the other working.
    let mut bad = setup(cfg());
    expect_break(
        &mut bad,
        9,
        QueueError::DescIndexOutOfRange { index: 9, size: 8 },
    );
    let m = &bad.m;
    let mut c = config(8, 8, false, true);
    c.desc_table = 0x5000;
    c.avail_ring = 0x6000;
    c.used_ring = 0x7000;
    let mut good = ShadowVirtqueue::new(
        c,
        shadow_area(m, 0x8_0000, 8),
        IdentityTranslation,
        QueueState::default(),
    )
    .unwrap();
    put_desc(&m.guest, 0x5000, 0, buf_addr(3, 0), 32, DESC_F_WRITE, 0);
    m.guest.write_obj(0u16, GuestAddress(0x6004)).unwrap();
    m.guest.write_obj(1u16, GuestAddress(0x6002)).unwrap();
    let b = good.forward_avail(&m.guest, &bad.log).unwrap();
    assert_eq!((b.chains, b.kick_device), (1, true));
}

#[test]
fn duplicate_heads_beyond_the_queue_size_are_harmless() {
    // A guest that posts the same head again and again (more chains than its queue size in
    // flight). The engine forwards them (the guest only hurts itself), nothing panics, and the
    // used-ring logging stays inside the used ring.
    let mut q = setup(config(4, 16, false, false));
    put_desc(&q.m.guest, DESC, 0, buf_addr(0, 0), 64, DESC_F_WRITE, 0);
    for round in 0..2u16 {
        for i in 0..4u16 {
            let idx = round * 4 + i;
            q.m.guest
                .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx & 3)))
                .unwrap();
        }
        q.m.guest
            .write_obj((round + 1) * 4, GuestAddress(AVAIL + 2))
            .unwrap();
        assert_eq!(q.e.forward_avail(&q.m.guest, &q.log).unwrap().chains, 4);
    }
    assert_eq!(q.e.in_flight(), 8);
    q.dev.pop_all(&q.m.device);
    for _ in 0..8 {
        q.dev.complete(&q.m.device, 0, 64);
    }
    q.dev.publish(&q.m.device);
    let u = q.e.forward_used(&q.m.guest, &q.log).unwrap();
    assert_eq!(u.completed, 8);
    let log = q.log.current().unwrap();
    let mut want: Vec<u64> = pages(USED + 2, 2 + 8 * 4)
        .chain(pages(buf_addr(0, 0), 64))
        .collect();
    want.sort_unstable();
    want.dedup();
    assert_eq!(log.dirty_pages(), want);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Garbage descriptor tables, indirect tables, avail rings and used rings: the engine
        /// never panics; it forwards only buffers inside guest memory, or breaks the queue
        /// with a typed error that then sticks.
        #[test]
        fn garbage_never_panics(
            descs in prop::collection::vec(
                (prop_oneof![0u64..RAM_SIZE, any::<u64>()], 0u32..0x3000, 0u16..8, 0u16..20),
                8,
            ),
            indirect in prop::collection::vec((0u64..RAM_SIZE, any::<u32>(), any::<u16>(), any::<u16>()), 4),
            ring in prop::collection::vec(any::<u16>(), 8),
            avail_idx in any::<u16>(),
            used in prop::collection::vec((any::<u32>(), any::<u32>()), 0..10),
            event_idx in any::<bool>(),
        ) {
            let mut q = setup(config(8, 8, event_idx, true));
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                // Point indirect descriptors at the table below now and then.
                let addr = if flags & DESC_F_INDIRECT != 0 && addr % 2 == 0 { INDIRECT } else { addr };
                put_desc(&q.m.guest, DESC, i as u16, addr, len, flags, next);
            }
            for (i, &(addr, len, flags, next)) in indirect.iter().enumerate() {
                put_desc(&q.m.guest, INDIRECT, i as u16, addr, len, flags, next);
            }
            for (i, &h) in ring.iter().enumerate() {
                q.m.guest.write_obj(h, GuestAddress(AVAIL + 4 + 2 * i as u64)).unwrap();
            }
            q.m.guest.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
            let first = q.e.forward_avail(&q.m.guest, &q.log);
            q.dev.pop_all(&q.m.device);
            for (_, bufs) in &q.dev.popped {
                for b in bufs {
                    prop_assert!(b.addr.checked_add(u64::from(b.len)).is_some_and(|e| e <= RAM_SIZE));
                }
            }
            // A device returning garbage too.
            for &(id, len) in &used {
                q.dev.raw_used(&q.m.device, id % 16, len);
            }
            q.dev.publish(&q.m.device);
            let second = q.e.forward_used(&q.m.guest, &q.log);
            if let Err(e) = &first {
                prop_assert_eq!(second.as_ref().err(), Some(e));
            }
            if let Some(e) = q.e.broken().cloned() {
                prop_assert_eq!(q.e.forward_avail(&q.m.guest, &q.log), Err(e));
            }
            prop_assert_eq!(q.log.current().unwrap().out_of_range_pages(), 0);
        }
    }
}
