//! A whole queue in simulation: guest driver + engine (or passthrough) + device, with every
//! notification delivered only when its sender decided to send it (so a lost kick or call shows
//! up as a chain that never completes), and an independent model of what the dirty log must hold.
//! With `cfg.in_order` the driver and both devices keep the IN_ORDER rules (the driver panics
//! on a completion out of avail order, the shadow device on descriptors out of ring order) and
//! the devices often write one used element per batch.

use super::*;
use std::collections::{BTreeSet, HashMap};
use svq::{DirtyLog, IdentityTranslation, QueueConfig, QueueState, ShadowVirtqueue, SharedLog};

/// Shape of a chain the driver posts: buffers `(len, gap before it, device-writable)`.
#[derive(Debug, Clone)]
pub struct Shape {
    pub bufs: Vec<(u32, u16, bool)>,
    pub indirect: bool,
}

pub struct Sim {
    pub m: Memories,
    pub cfg: QueueConfig,
    /// `None`: passthrough (the device runs the guest ring itself).
    pub engine: Option<ShadowVirtqueue<IdentityTranslation>>,
    pub drv: Driver,
    pub dev: Device,
    pub log: SharedLog,
    pub logs: Vec<Arc<DirtyLog>>,
    pub guest_kick: bool,
    pub dev_kick: bool,
    pub dev_call: bool,
    pub guest_irq: bool,
    /// Pages the engine must have logged, nothing more, nothing less.
    pub expected_pages: BTreeSet<u64>,
    /// First buffer address of a chain -> length the device reported.
    pub expected_len: HashMap<u64, u32>,
    /// First buffer address of a posted chain -> its buffers (to compare with the device's view).
    pub posted: HashMap<u64, Vec<Buf>>,
    pub posted_count: u64,
    pub completed_count: u64,
    area_flip: bool,
    rng: u64,
}

fn log_bytes() -> usize {
    // Covers guest RAM only: the engine must never log anything else.
    (RAM_SIZE / 4096 / 8) as usize
}

/// The device of a fresh shadow ring (IN_ORDER: descriptors start at 0, in ring order).
fn shadow_device(cfg: &QueueConfig, e: &ShadowVirtqueue<IdentityTranslation>) -> Device {
    let mut dev = Device::new(
        e.device_addrs(),
        cfg.shadow_size,
        cfg.event_idx,
        e.shadow_base(),
    );
    if cfg.in_order {
        dev.ring_order = Some(0);
    }
    dev
}

impl Sim {
    pub fn new(cfg: QueueConfig, guest_start: u16, shadow_base: u16, seed: u64) -> Self {
        let m = memories();
        let drv = Driver::new(&m.guest, cfg.guest_size, cfg.event_idx, guest_start)
            .in_order(cfg.in_order);
        let first = Arc::new(DirtyLog::new_owned(log_bytes()));
        let engine = ShadowVirtqueue::new_with_base(
            cfg,
            shadow_area(&m, 0, cfg.shadow_size),
            IdentityTranslation,
            QueueState {
                last_avail_idx: guest_start,
                used_idx: guest_start,
                in_flight: vec![],
            },
            shadow_base,
        )
        .unwrap();
        let dev = shadow_device(&cfg, &engine);
        Sim {
            m,
            cfg,
            engine: Some(engine),
            drv,
            dev,
            log: SharedLog::new(Some(first.clone())),
            logs: vec![first],
            guest_kick: false,
            dev_kick: false,
            dev_call: false,
            guest_irq: false,
            expected_pages: BTreeSet::new(),
            expected_len: HashMap::new(),
            posted: HashMap::new(),
            posted_count: 0,
            completed_count: 0,
            area_flip: false,
            rng: seed | 1,
        }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    pub fn shadow_mode(&self) -> bool {
        self.engine.is_some()
    }

    fn engine(&mut self) -> &mut ShadowVirtqueue<IdentityTranslation> {
        self.engine.as_mut().unwrap()
    }

    /// The driver posts chains (as many as fit), then publishes once.
    pub fn post(&mut self, shapes: &[Shape]) {
        for sh in shapes {
            if sh.bufs.is_empty() {
                continue;
            }
            if sh.indirect && !self.cfg.indirect {
                continue;
            }
            let need = if sh.indirect { 1 } else { sh.bufs.len() };
            if self.drv.free_descs() < need {
                break;
            }
            // The head is the next free descriptor: place buffers in its data slot.
            let head_guess = self.drv.peek_head();
            let mut off = 0u64;
            let bufs: Vec<Buf> = sh
                .bufs
                .iter()
                .map(|&(len, gap, write)| {
                    off += u64::from(gap);
                    let b = Buf {
                        addr: buf_addr(head_guess, off),
                        len,
                        write,
                    };
                    off += u64::from(len);
                    b
                })
                .collect();
            assert!(off <= DATA_SLOT);
            let head = self.drv.post(&self.m.guest, &bufs, sh.indirect).unwrap();
            assert_eq!(head, head_guess);
            self.posted.insert(bufs[0].addr, bufs);
            self.posted_count += 1;
        }
        if self.drv.publish(&self.m.guest) {
            self.guest_kick = true;
        }
    }

    fn avail_event(&self) -> u16 {
        let a = USED + 4 + 8 * u64::from(self.cfg.guest_size);
        self.m
            .guest
            .load(GuestAddress(a), Ordering::Relaxed)
            .unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.m
            .guest
            .load(GuestAddress(USED + 2), Ordering::Relaxed)
            .unwrap()
    }

    /// The guest's used flags (the device's VRING_USED_F_NO_NOTIFY).
    fn used_flags(&self) -> u16 {
        self.m
            .guest
            .load(GuestAddress(USED), Ordering::Relaxed)
            .unwrap()
    }

    /// Engine forward_avail, checking the model: avail_event (EVENT_IDX) or the used flags
    /// (without) logged iff they changed, in-flight bounded by the shadow ring.
    pub fn forward_avail(&mut self) {
        let ev_before = self.avail_event();
        let flags_before = self.used_flags();
        let b = self
            .engine
            .as_mut()
            .unwrap()
            .forward_avail(&self.m.guest, &self.log)
            .unwrap();
        if self.cfg.event_idx && self.avail_event() != ev_before {
            self.expected_pages
                .extend(pages(USED + 4 + 8 * u64::from(self.cfg.guest_size), 2));
        }
        if !self.cfg.event_idx {
            assert_eq!(self.used_flags(), 0, "the guest is asked to kick");
            if flags_before != 0 {
                self.expected_pages.extend(pages(USED, 2));
            }
        }
        if b.kick_device {
            self.dev_kick = true;
        }
        let inflight = self.engine().in_flight();
        assert!(inflight <= usize::from(self.cfg.shadow_size));
    }

    pub fn deliver_guest_kick(&mut self) {
        if std::mem::take(&mut self.guest_kick) {
            if self.shadow_mode() {
                self.forward_avail();
            } else {
                self.dev_kick = true;
                self.deliver_dev_kick();
            }
        }
    }

    pub fn deliver_dev_kick(&mut self) {
        if !std::mem::take(&mut self.dev_kick) {
            return;
        }
        let mem = if self.shadow_mode() {
            &self.m.device
        } else {
            &self.m.guest
        };
        let before = self.dev.popped.len();
        self.dev.pop_all(mem);
        for (_, bufs) in &self.dev.popped[before..] {
            let posted = self
                .posted
                .get(&bufs[0].addr)
                .expect("device got a chain never posted");
            assert_eq!(
                posted, bufs,
                "device sees exactly the guest's (flattened) chain"
            );
        }
        let descs: usize = self.dev.popped.iter().map(|(_, b)| b.len()).sum();
        if self.shadow_mode() {
            assert!(
                descs <= usize::from(self.cfg.shadow_size),
                "shadow over-committed"
            );
        }
    }

    /// The device completes up to `count` popped chains in random order with random lengths
    /// (IN_ORDER: in order, in batches of random size, each with one used element or one per
    /// chain).
    pub fn device_complete(&mut self, count: usize) {
        let random_order = if self.cfg.in_order {
            self.device_complete_in_order(count);
            0
        } else {
            count
        };
        for _ in 0..random_order {
            if self.dev.popped.is_empty() {
                break;
            }
            let k = (self.rand() % self.dev.popped.len() as u64) as usize;
            let writable: u64 = self.dev.popped[k]
                .1
                .iter()
                .filter(|b| b.write)
                .map(|b| u64::from(b.len))
                .sum();
            // Sometimes more than the chain holds (clipped for logging, passed on unchanged).
            let len = (self.rand() % (writable + 64)) as u32;
            let shadow = self.shadow_mode();
            let mem = if shadow {
                &self.m.device
            } else {
                &self.m.guest
            };
            let (_, bufs) = self.dev.complete(mem, k, len);
            if shadow {
                let mut rem = u64::from(len);
                for b in bufs.iter().filter(|b| b.write) {
                    let n = rem.min(u64::from(b.len));
                    self.expected_pages.extend(pages(b.addr, n));
                    rem -= n;
                }
            }
            assert!(self.expected_len.insert(bufs[0].addr, len).is_none());
        }
        let mem = if self.shadow_mode() {
            &self.m.device
        } else {
            &self.m.guest
        };
        if self.dev.publish(mem) {
            if self.shadow_mode() {
                self.dev_call = true;
            } else {
                self.guest_irq = true;
            }
        }
    }

    fn device_complete_in_order(&mut self, count: usize) {
        let mut left = count.min(self.dev.popped.len());
        let shadow = self.shadow_mode();
        while left > 0 {
            let k = 1 + (self.rand() % left as u64) as usize;
            let batch = k > 1 && self.rand() & 1 == 0;
            let writable: Vec<u32> = self.dev.popped[..k]
                .iter()
                .map(|(_, bufs)| writable_bytes(bufs))
                .collect();
            let mut lens = Vec::with_capacity(k);
            for (i, w) in writable.into_iter().enumerate() {
                lens.push(if batch && i + 1 < k {
                    w
                } else {
                    // Sometimes more than the chain holds, as in random order.
                    (self.rand() % (u64::from(w) + 64)) as u32
                });
            }
            let mem = if shadow {
                &self.m.device
            } else {
                &self.m.guest
            };
            let done = self.dev.complete_in_order(mem, &lens, batch);
            for ((_, bufs), len) in done.into_iter().zip(lens) {
                if shadow {
                    let mut rem = u64::from(len);
                    for b in bufs.iter().filter(|b| b.write) {
                        let n = rem.min(u64::from(b.len));
                        self.expected_pages.extend(pages(b.addr, n));
                        rem -= n;
                    }
                }
                assert!(self.expected_len.insert(bufs[0].addr, len).is_none());
            }
            left -= k;
        }
    }

    pub fn forward_used(&mut self) {
        let before = self.used_idx();
        let b = self
            .engine
            .as_mut()
            .unwrap()
            .forward_used(&self.m.guest, &self.log)
            .unwrap();
        let after = self.used_idx();
        assert_eq!(after.wrapping_sub(before), b.completed as u16);
        if b.completed > 0 {
            let mut i = before;
            while i != after {
                let slot = USED + 4 + 8 * u64::from(i & (self.cfg.guest_size - 1));
                self.expected_pages.extend(pages(slot, 8));
                i = i.wrapping_add(1);
            }
            self.expected_pages.extend(pages(USED + 2, 2));
        }
        if b.notify_guest {
            self.guest_irq = true;
        }
        if b.retry_avail {
            self.forward_avail();
        }
    }

    pub fn deliver_dev_call(&mut self) {
        if std::mem::take(&mut self.dev_call) && self.shadow_mode() {
            self.forward_used();
        }
    }

    pub fn deliver_irq(&mut self) {
        if std::mem::take(&mut self.guest_irq) {
            for (_head, len, bufs) in self.drv.reap(&self.m.guest) {
                let want = self
                    .expected_len
                    .remove(&bufs[0].addr)
                    .expect("guest got a completion the device never made (duplicate?)");
                assert_eq!(len, want, "used length changed on the way");
                assert!(self.posted.remove(&bufs[0].addr).is_some());
                self.completed_count += 1;
            }
        }
    }

    pub fn replace_log(&mut self) {
        let new = Arc::new(DirtyLog::new_owned(log_bytes()));
        self.log.replace(Some(new.clone()));
        self.logs.push(new);
    }

    /// Switch shadow -> passthrough or passthrough -> shadow (drain first, as a transport must).
    pub fn switch(&mut self, shadow_base: u16, shadow_size: u16) {
        let mut rounds = 0;
        if self.shadow_mode() {
            self.engine().set_forwarding(false);
            if self.rand() & 1 == 0 {
                // Drain: wait until the device completed everything forwarded.
                while self.engine().in_flight() > 0 {
                    rounds += 1;
                    assert!(rounds < 1000, "drain stuck: a kick or call was lost");
                    self.deliver_dev_kick();
                    let n = self.dev.popped.len();
                    self.device_complete(n);
                    self.deliver_dev_call();
                }
            } else {
                // Stop the device where it is (GET_VRING_BASE), give the chains it never took
                // back to the guest ring, complete only the ones it took.
                if self.rand() & 1 == 0 {
                    self.deliver_dev_kick();
                }
                let base = self.dev.last_avail;
                let taken = self.dev.popped.len();
                let before = self.engine().in_flight();
                let avail_event = USED + 4 + 8 * u64::from(self.cfg.guest_size);
                let old_event = ld16(&self.m.guest, avail_event);
                let back = self
                    .engine
                    .as_mut()
                    .unwrap()
                    .reclaim_untaken(&self.m.guest, &self.log, base)
                    .unwrap();
                let guest_idx = self.engine().export_state().last_avail_idx;
                if self.cfg.event_idx {
                    // The guest's avail_event now asks for a kick at the first chain not taken.
                    assert_eq!(ld16(&self.m.guest, avail_event), guest_idx);
                    if old_event != guest_idx {
                        self.expected_pages.extend(pages(avail_event, 2));
                    }
                }
                // The rest of `before` was completed by the device, not relayed yet.
                assert!(usize::from(back) + taken <= before);
                let n = self.dev.popped.len();
                self.device_complete(n);
                self.forward_used();
                self.dev_call = false;
                assert_eq!(self.engine().in_flight(), 0);
            }
            assert!(self.dev.popped.is_empty());
            let st = self.engine().export_state();
            if !st.in_flight.is_empty() {
                // Imported chains not forwarded yet (a replaced shadow ring smaller than what
                // was in flight): no device would complete them after the switch, so the
                // queue stays shadowed (as svqd does).
                assert_eq!(self.engine().in_flight(), 0);
                self.engine().set_forwarding(true);
                self.forward_avail();
                return;
            }
            self.engine = None;
            self.dev_call = false;
            self.dev = Device::with_used(
                (DESC, AVAIL, USED),
                self.cfg.guest_size,
                self.cfg.event_idx,
                st.last_avail_idx,
                st.used_idx,
            );
            self.dev.allow_indirect = true;
            // Guest kicks swallowed while forwarding was off: kick the device once.
            self.dev_kick = true;
            self.deliver_dev_kick();
        } else {
            // Passthrough device drains: complete everything it popped.
            let n = self.dev.popped.len();
            self.device_complete(n);
            // Stopped while draining with kicks off (as vhost and rust-vmm backends do): the
            // stale NO_NOTIFY stays in the guest's used flags for the engine to clear.
            if !self.cfg.event_idx {
                self.dev.set_no_notify(&self.m.guest, true);
            }
            let base = self.dev.last_avail; // GET_VRING_BASE
            let st = QueueState::from_vring_base(&self.m.guest, &self.cfg, base).unwrap();
            assert_eq!(st.used_idx, self.dev.used_idx);
            self.start_shadow(st, shadow_base, shadow_size);
            // Chains posted while switching: forward once.
            self.forward_avail();
        }
    }

    /// A new engine at `st` on a fresh shadow ring (the other half of the shadow area than the
    /// last one) of `shadow_size` at `shadow_base`, and the device on it.
    fn start_shadow(&mut self, st: QueueState, shadow_base: u16, shadow_size: u16) {
        self.cfg.shadow_size = shadow_size;
        self.area_flip = !self.area_flip;
        let off = if self.area_flip { 0x8_0000 } else { 0 };
        let e = ShadowVirtqueue::new_with_base(
            self.cfg,
            shadow_area(&self.m, off, shadow_size),
            IdentityTranslation,
            st,
            shadow_base,
        )
        .unwrap();
        assert_eq!(e.shadow_base(), shadow_base);
        self.dev = shadow_device(&self.cfg, &e);
        self.engine = Some(e);
        self.dev_kick = false;
    }

    /// Shadow mode only: replace the shadow ring and its device mid-traffic with chains in flight
    /// (as after a backend reconnect). The old device may complete some chains (relayed), its
    /// untaken chains may be reclaimed, and it forgets the chains it took; the engine's exported
    /// state goes to a new engine on a new ring of `shadow_size` at `shadow_base`, which forwards
    /// those chains again before any new one.
    pub fn reshadow(&mut self, shadow_base: u16, shadow_size: u16) {
        if !self.shadow_mode() {
            return;
        }
        self.engine().set_forwarding(false);
        if self.rand() & 1 == 0 {
            self.deliver_dev_kick();
        }
        let n = (self.rand() % (self.dev.popped.len() as u64 + 1)) as usize;
        self.device_complete(n);
        self.forward_used();
        if self.rand() & 1 == 0 {
            // Stopped: the chains it never took go back to the guest ring.
            let base = self.dev.last_avail;
            let avail_event = USED + 4 + 8 * u64::from(self.cfg.guest_size);
            let old_event = ld16(&self.m.guest, avail_event);
            let in_flight = self.engine().in_flight();
            let back = self
                .engine
                .as_mut()
                .unwrap()
                .reclaim_untaken(&self.m.guest, &self.log, base)
                .unwrap();
            assert_eq!(usize::from(back) + self.dev.popped.len(), in_flight);
            if self.cfg.event_idx && ld16(&self.m.guest, avail_event) != old_event {
                self.expected_pages.extend(pages(avail_event, 2));
            }
        }
        // The device forgets what it took; nothing of it was written.
        self.dev.popped.clear();
        let st = self.engine().export_state();
        assert!(st.in_flight.len() >= self.engine().in_flight());
        self.engine = None;
        self.start_shadow(st, shadow_base, shadow_size);
        self.dev_call = false;
        self.forward_avail();
    }

    /// Deliver everything until quiet; every posted chain must then be complete.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let busy = self.guest_kick
                || self.dev_kick
                || self.dev_call
                || self.guest_irq
                || !self.dev.popped.is_empty();
            if !busy {
                break;
            }
            self.deliver_guest_kick();
            self.deliver_dev_kick();
            let n = self.dev.popped.len();
            self.device_complete(n);
            self.deliver_dev_call();
            self.deliver_irq();
        }
        assert!(
            self.drv.outstanding.is_empty(),
            "{} chains never completed: a notification was lost",
            self.drv.outstanding.len()
        );
        assert!(self.expected_len.is_empty());
        assert_eq!(self.posted_count, self.completed_count);
    }

    /// The union of every log installed during the run holds exactly the expected pages.
    pub fn check_log(&self) {
        let mut got = BTreeSet::new();
        for l in &self.logs {
            got.extend(l.dirty_pages());
            assert_eq!(l.out_of_range_pages(), 0);
        }
        let missing: Vec<_> = self.expected_pages.difference(&got).collect();
        let extra: Vec<_> = got.difference(&self.expected_pages).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "log missing {missing:?}, extra {extra:?}"
        );
    }
}
