//! forward_avail + forward_used per descriptor: 1-, 2- and 4-descriptor chains, batches of 1 and
//! 32, EVENT_IDX on, dirty logging on (the migration case); the same with VIRTIO_F_IN_ORDER on
//! both rings, the device writing one used element per batch (the engine splits it into one
//! completion per chain). Only the two engine calls are timed (`iter_custom`); the simulated
//! guest and device run outside the timed sections.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use svq::{
    DirtyLog, IdentityTranslation, QueueConfig, QueueState, RingArea, ShadowVirtqueue, SharedLog,
    SplitLayout,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const DATA: u64 = 0x10_0000;

struct Bench {
    mem: GuestMemoryMmap<()>,
    engine: ShadowVirtqueue<IdentityTranslation>,
    log: SharedLog,
    avail_idx: u16,
    dev_last_avail: u16,
    dev_used: u16,
    layout: SplitLayout,
    batch: u16,
    chain_len: u16,
    in_order: bool,
}

impl Bench {
    fn new(chain_len: u16, batch: u16, in_order: bool) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        // A fixed descriptor table: chain k uses descriptors k*n .. k*n+n; readable 64-byte
        // headers, then one writable 1500-byte buffer on its own page.
        for k in 0..batch {
            for j in 0..chain_len {
                let i = k * chain_len + j;
                let last = j + 1 == chain_len;
                let a = DESC + 16 * u64::from(i);
                let (addr, len, flags) = if last {
                    (DATA + 0x1000 * u64::from(k), 1500u32, 2u16)
                } else {
                    (DATA + 0x20_0000 + 0x100 * u64::from(i), 64u32, 1u16)
                };
                mem.write_obj(addr, GuestAddress(a)).unwrap();
                mem.write_obj(len, GuestAddress(a + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
                mem.write_obj(i + 1, GuestAddress(a + 14)).unwrap();
            }
        }
        let cfg = QueueConfig {
            guest_size: SIZE,
            shadow_size: SIZE,
            desc_table: DESC,
            avail_ring: AVAIL,
            used_ring: USED,
            event_idx: true,
            indirect: true,
            in_order,
        };
        let layout = SplitLayout::new(SIZE).unwrap();
        let engine = ShadowVirtqueue::new(
            cfg,
            RingArea::new_owned(layout.total_bytes(), 1 << 40),
            IdentityTranslation,
            QueueState::default(),
        )
        .unwrap();
        let log = SharedLog::new(Some(Arc::new(DirtyLog::for_memory_end(64 << 20))));
        Bench {
            mem,
            engine,
            log,
            avail_idx: 0,
            dev_last_avail: 0,
            dev_used: 0,
            layout,
            batch,
            chain_len,
            in_order,
        }
    }

    fn shadow_u16(&self, off: usize) -> &AtomicU16 {
        // SAFETY: offsets inside the shadow ring layout, 2-byte aligned.
        unsafe { &*(self.engine.ring().area().as_ptr().add(off) as *const AtomicU16) }
    }

    /// Guest: make the batch available.
    fn guest_post(&mut self) {
        for k in 0..self.batch {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx.wrapping_add(k) % SIZE);
            self.mem
                .write_obj(k * self.chain_len, GuestAddress(slot))
                .unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(self.batch);
        self.mem
            .store(self.avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
    }

    /// Device: complete everything available on the shadow ring, in order, 1500 bytes each
    /// (IN_ORDER: one used element for all of it, naming the last chain).
    fn device_complete(&mut self) {
        let base = self.engine.ring().area().as_ptr();
        let idx = self
            .shadow_u16(self.layout.avail_offset() + 2)
            .load(Ordering::Acquire);
        let batch_start = self.dev_used;
        while self.dev_last_avail != idx {
            let head = self
                .shadow_u16(
                    self.layout.avail_offset() + 4 + 2 * usize::from(self.dev_last_avail % SIZE),
                )
                .load(Ordering::Relaxed);
            let slot = if self.in_order {
                batch_start
            } else {
                self.dev_used
            };
            let e = self.layout.used_offset() + 4 + 8 * usize::from(slot % SIZE);
            // SAFETY: used element inside the shadow ring.
            unsafe {
                let p = base.add(e) as *mut u32;
                p.write_volatile(u32::from(head));
                p.add(1).write_volatile(1500);
            }
            self.dev_last_avail = self.dev_last_avail.wrapping_add(1);
            self.dev_used = self.dev_used.wrapping_add(1);
        }
        self.shadow_u16(self.layout.used_offset() + 2)
            .store(self.dev_used, Ordering::Release);
    }

    fn cycle(&mut self) -> Duration {
        self.guest_post();
        let t0 = Instant::now();
        let a = self.engine.forward_avail(&self.mem, &self.log).unwrap();
        let d1 = t0.elapsed();
        // Checked outside the timed sections (benches build without debug assertions): a
        // bench that forwarded nothing would report a meaninglessly fast time.
        assert_eq!(a.chains, u32::from(self.batch));
        self.device_complete();
        let t1 = Instant::now();
        let u = self.engine.forward_used(&self.mem, &self.log).unwrap();
        let d2 = t1.elapsed();
        assert_eq!(u.completed, u32::from(self.batch));
        d1 + d2
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward_avail+forward_used");
    for chain_len in [1u16, 2, 4] {
        for (batch, in_order) in [(1u16, false), (32, false), (1, true), (32, true)] {
            g.throughput(Throughput::Elements(u64::from(chain_len * batch)));
            let order = if in_order { ", in order" } else { "" };
            g.bench_with_input(
                BenchmarkId::new(
                    format!("{chain_len}-desc chains"),
                    format!("batch {batch}{order}"),
                ),
                &(chain_len, batch),
                |b, &(n, bt)| {
                    let mut s = Bench::new(n, bt, in_order);
                    b.iter_custom(|iters| (0..iters).map(|_| s.cycle()).sum());
                    assert!(s.engine.broken().is_none());
                    assert_eq!(s.engine.in_flight(), 0);
                },
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = bench, bench_parts
}
criterion_main!(benches);

/// Supporting costs: one dirty-log mark (a 1500-byte buffer) and IOVA lookups at two tree sizes
/// (O(log n): the larger tree costs a few more comparisons, not 100x more).
fn bench_parts(c: &mut Criterion) {
    let mut g = c.benchmark_group("parts");
    let log = SharedLog::new(Some(Arc::new(DirtyLog::for_memory_end(1 << 30))));
    let mut gpa = 0u64;
    g.bench_function("SharedLog batch + mark 1500 B", |b| {
        b.iter(|| {
            gpa = (gpa + 0x1_0000) & ((1 << 30) - 1);
            log.batch().mark(std::hint::black_box(gpa), 1500)
        })
    });
    for n in [1_000u64, 10_000, 100_000] {
        let mut t = svq::IovaTree::new(0x1000, (1 << 48) - 1).unwrap();
        for i in 0..n {
            t.alloc(0x1000, 0x1000, i * 0x2000).unwrap();
        }
        let mut i = 0u64;
        g.bench_function(format!("IovaTree translate_taddr, {n} mappings"), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                t.translate_taddr(std::hint::black_box(i * 0x2000 + 0x10), 0x100)
            })
        });
    }
    g.finish();
}
