//! Real concurrency: guest driver, engine, device and a log-swapping "VMM" each on their own
//! thread, notifications delivered only when the sender decided to send one (condvar events
//! standing in for eventfds). This exercises the fences and re-checks around notification
//! suppression: a lost kick or call shows up as a guest waiting forever (caught by a timeout),
//! a doubled completion as a panic in the driver. The union of all dirty logs must hold exactly
//! the written pages plus the used ring.

mod common;

use common::*;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use svq::{DirtyLog, IdentityTranslation, QueueState, ShadowVirtqueue, SharedLog};

const KICK: u32 = 1;
const CALL: u32 = 2;
const IRQ: u32 = 4;
const STOP: u32 = 8;

/// An eventfd stand-in: bits set by `signal`, taken by `wait`.
#[derive(Default)]
struct Event {
    bits: Mutex<u32>,
    cv: Condvar,
}

impl Event {
    fn signal(&self, bits: u32) {
        *self.bits.lock().unwrap() |= bits;
        self.cv.notify_one();
    }
    /// Bits pending, or 0 after `timeout`.
    fn wait(&self, timeout: Duration) -> u32 {
        let g = self.bits.lock().unwrap();
        let (mut g, _) = self.cv.wait_timeout_while(g, timeout, |b| *b == 0).unwrap();
        std::mem::take(&mut *g)
    }
}

/// How the engine thread waits for work.
#[derive(Clone, Copy, PartialEq)]
enum EngineMode {
    /// Notifications armed after every batch; one batch per wake.
    Notified,
    /// On a wake: suppress notifications, poll both rings for a random number of empty rounds
    /// (random pauses), then re-arm and re-check before waiting again (svqd's worker).
    Polling,
}

fn run(guest_size: u16, shadow_size: u16, event_idx: bool, total: usize) {
    run_mode(
        guest_size,
        shadow_size,
        event_idx,
        total,
        EngineMode::Notified,
    )
}

fn run_mode(guest_size: u16, shadow_size: u16, event_idx: bool, total: usize, mode: EngineMode) {
    let cfg = config(guest_size, shadow_size, event_idx, true);
    let m = Arc::new(memories());
    let mut drv = Driver::new(&m.guest, guest_size, event_idx, 0x1234);
    let mut engine = ShadowVirtqueue::new_with_base(
        cfg,
        shadow_area(&m, 0, shadow_size),
        IdentityTranslation,
        QueueState {
            last_avail_idx: 0x1234,
            used_idx: 0x1234,
            in_flight: vec![],
        },
        0xfff0,
    )
    .unwrap();
    let mut dev = Device::new(engine.device_addrs(), shadow_size, event_idx, 0xfff0);
    let log = Arc::new(SharedLog::new(Some(Arc::new(DirtyLog::for_memory_end(
        RAM_SIZE,
    )))));
    let logs = Arc::new(Mutex::new(vec![log.current().unwrap()]));
    let (ev_engine, ev_dev, ev_drv) = (
        Arc::new(Event::default()),
        Arc::new(Event::default()),
        Arc::new(Event::default()),
    );
    let expected_len: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let written: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    let engine_t = {
        let (m, log, ev_engine, ev_dev, ev_drv) = (
            m.clone(),
            log.clone(),
            ev_engine.clone(),
            ev_dev.clone(),
            ev_drv.clone(),
        );
        let mut rng = 0x6a09_e667_f3bc_c908u64;
        std::thread::spawn(move || loop {
            let bits = ev_engine.wait(Duration::from_millis(100));
            if bits & STOP != 0 {
                return engine;
            }
            // Only a notification starts work: a stranded buffer must show up as a hang.
            if mode == EngineMode::Polling && bits != 0 {
                engine.suppress_notifications(&m.guest, &log).unwrap();
                loop {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let mut idle_rounds = rng % 40;
                    loop {
                        let u = engine.forward_used(&m.guest, &log).unwrap();
                        if u.notify_guest {
                            ev_drv.signal(IRQ);
                        }
                        let b = engine.forward_avail(&m.guest, &log).unwrap();
                        assert!(engine.in_flight() <= usize::from(shadow_size));
                        if b.kick_device {
                            ev_dev.signal(KICK);
                        }
                        if u.completed == 0 && b.chains == 0 {
                            if idle_rounds == 0 {
                                break;
                            }
                            idle_rounds -= 1;
                            if rng & 1 == 0 {
                                std::thread::yield_now();
                            } else {
                                std::thread::sleep(Duration::from_micros(rng >> 56));
                            }
                        }
                    }
                    // Before sleeping: re-arm both sides; anything that slipped in is handled
                    // now, or its notification would never come.
                    if !engine.arm_notifications(&m.guest, &log).unwrap() {
                        break;
                    }
                    engine.suppress_notifications(&m.guest, &log).unwrap();
                }
                continue;
            }
            let mut avail = bits & KICK != 0;
            if bits & CALL != 0 {
                let u = engine.forward_used(&m.guest, &log).unwrap();
                if u.notify_guest {
                    ev_drv.signal(IRQ);
                }
                avail |= u.retry_avail;
            }
            if avail {
                let b = engine.forward_avail(&m.guest, &log).unwrap();
                assert!(engine.in_flight() <= usize::from(shadow_size));
                if b.kick_device {
                    ev_dev.signal(KICK);
                }
            }
        })
    };

    let dev_t = {
        let (m, ev_engine, ev_dev) = (m.clone(), ev_engine.clone(), ev_dev.clone());
        let (expected_len, written) = (expected_len.clone(), written.clone());
        std::thread::spawn(move || {
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            loop {
                let bits = ev_dev.wait(Duration::from_millis(100));
                if bits & STOP != 0 {
                    return;
                }
                if bits & KICK == 0 {
                    continue;
                }
                dev.pop_all(&m.device);
                // Complete in random order, in small publishes, yielding in between so the
                // engine races with us.
                while !dev.popped.is_empty() {
                    let burst = 1 + (next() % 3) as usize;
                    for _ in 0..burst.min(dev.popped.len()) {
                        let k = (next() % dev.popped.len() as u64) as usize;
                        let cap: u64 = dev.popped[k]
                            .1
                            .iter()
                            .filter(|b| b.write)
                            .map(|b| u64::from(b.len))
                            .sum();
                        let len = (next() % (cap + 1)) as u32;
                        let (_, bufs) = dev.complete(&m.device, k, len);
                        let mut rem = u64::from(len);
                        let mut w = written.lock().unwrap();
                        for b in bufs.iter().filter(|b| b.write) {
                            let n = rem.min(u64::from(b.len));
                            w.extend(pages(b.addr, n));
                            rem -= n;
                        }
                        expected_len.lock().unwrap().insert(bufs[0].addr, len);
                    }
                    if dev.publish(&m.device) {
                        ev_engine.signal(CALL);
                    }
                    std::thread::yield_now();
                    // Late kicks are handled by popping again.
                    dev.pop_all(&m.device);
                }
            }
        })
    };

    // The "VMM": swaps in a fresh log again and again (Cloud Hypervisor style).
    let vmm_t = {
        let (log, logs, done) = (log.clone(), logs.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let fresh = Arc::new(DirtyLog::for_memory_end(RAM_SIZE));
                log.replace(Some(fresh.clone()));
                logs.lock().unwrap().push(fresh);
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };

    // The driver runs on this thread.
    let mut posted = 0usize;
    let mut completed = 0usize;
    let mut x = 0x9e37_79b9u64;
    while completed < total {
        while posted < total {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let nbufs = 1 + (x >> 60) as usize % 4;
            let indirect = (x >> 40) & 3 == 0;
            if drv.free_descs() < if indirect { 1 } else { nbufs } {
                break;
            }
            let head = drv.peek_head();
            let bufs: Vec<Buf> = (0..nbufs)
                .map(|i| Buf {
                    addr: buf_addr(head, 0x1000 * i as u64 + (x >> 20) % 0x800),
                    len: 1 + ((x >> (8 * i)) % 0x1800) as u32,
                    write: i + 1 == nbufs || (x >> (30 + i)) & 1 == 1,
                })
                .collect();
            drv.post(&m.guest, &bufs, indirect).unwrap();
            posted += 1;
            // Publish in small groups so kicks race with the engine.
            if posted.is_multiple_of(3) && drv.publish(&m.guest) {
                ev_engine.signal(KICK);
            }
        }
        if drv.publish(&m.guest) {
            ev_engine.signal(KICK);
        }
        let bits = ev_drv.wait(Duration::from_secs(10));
        assert!(
            bits != 0 || drv.outstanding.is_empty(),
            "no interrupt for 10 s with {} chains outstanding: a notification was lost",
            drv.outstanding.len()
        );
        for (_, len, bufs) in drv.reap(&m.guest) {
            let want = expected_len
                .lock()
                .unwrap()
                .remove(&bufs[0].addr)
                .expect("completion the device never made (duplicate?)");
            assert_eq!(len, want);
            completed += 1;
        }
    }
    done.store(true, Ordering::Relaxed);
    ev_engine.signal(STOP);
    ev_dev.signal(STOP);
    let engine = engine_t.join().unwrap();
    dev_t.join().unwrap();
    vmm_t.join().unwrap();
    assert_eq!(engine.in_flight(), 0);
    assert!(engine.broken().is_none());

    let mut expected = written.lock().unwrap().clone();
    // Every used element slot was written (total > guest size), plus used.idx (and the flags,
    // on the same page, when the polling engine wrote NO_NOTIFY).
    expected.extend(pages(USED + 2, 2 + 8 * u64::from(guest_size)));
    if mode == EngineMode::Polling && !event_idx {
        expected.extend(pages(USED, 2));
    }
    if event_idx {
        expected.extend(pages(USED + 4 + 8 * u64::from(guest_size), 2));
    }
    let mut got = BTreeSet::new();
    for l in logs.lock().unwrap().iter() {
        got.extend(l.dirty_pages());
    }
    assert_eq!(got, expected);
}

#[test]
fn threads_event_idx() {
    run(16, 8, true, 3000);
}

#[test]
fn threads_no_event_idx() {
    run(16, 8, false, 3000);
}

#[test]
fn threads_big_shadow() {
    run(8, 64, true, 2000);
}

#[test]
fn polling_engine_event_idx() {
    run_mode(64, 64, true, 20_000, EngineMode::Polling);
}

#[test]
fn polling_engine_no_event_idx() {
    run_mode(64, 64, false, 20_000, EngineMode::Polling);
}

#[test]
fn polling_engine_small_shadow_no_event_idx() {
    run_mode(64, 8, false, 20_000, EngineMode::Polling);
}

#[test]
fn polling_engine_small_shadow_event_idx() {
    run_mode(64, 8, true, 20_000, EngineMode::Polling);
}
