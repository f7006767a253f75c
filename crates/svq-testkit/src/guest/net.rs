//! virtio-net guest workload against an echo device: numbered frames out, the same frames back.
//!
//! Every frame carries its token and a payload derived from it, so each echo is checked for
//! origin, length and content, and can be received at most once. Receive buffers are written by
//! the device: a page of them lost by a migration shows up as a corrupt echo (or a differing page).
//! Echoes of frames still inside the device when a migration stops it may be lost (a network may
//! drop packets); they are counted, not treated as errors.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::ram::{GuestRam, PAGE_SIZE};
use super::vring::{Anomaly, Buf, DriverQueue, QueueLayout};
use super::{splitmix, GuestAllocator, GuestWorkload, Ledger, Progress};
use crate::backend::XorShift;

/// virtio_net_hdr_v1 length.
pub const HDR: u64 = 12;
const FRAME_HDR: usize = 12;

/// Options of the net workload.
#[derive(Debug, Clone)]
pub struct NetGuestOptions {
    /// Queue pairs.
    pub pairs: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Transmit frames in flight per pair (receive buffers posted: the same number).
    pub depth: u16,
    /// Percentage of chains posted through indirect tables (when negotiated).
    pub indirect_pct: u8,
    /// Use EVENT_IDX.
    pub event_idx: bool,
    /// Use indirect descriptors.
    pub indirect: bool,
    /// VIRTIO_F_IN_ORDER negotiated: queues keep its rules and check completion order.
    pub in_order: bool,
    /// Seed.
    pub seed: u64,
}

impl Default for NetGuestOptions {
    fn default() -> Self {
        NetGuestOptions {
            pairs: 1,
            queue_size: 128,
            depth: 32,
            indirect_pct: 30,
            event_idx: true,
            indirect: true,
            in_order: false,
            seed: 11,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct NetReq {
    queue: u16,
    slot: u16,
}

/// Frame payload byte `i` for `token`.
fn payload_byte(token: u64, i: usize) -> u8 {
    (splitmix(token ^ ((i as u64 / 8) << 40)) >> ((i % 8) * 8)) as u8
}

/// The net workload.
pub struct NetGuest {
    opts: NetGuestOptions,
    ram: Arc<GuestRam>,
    queues: Vec<DriverQueue>,
    /// Per queue: buffer page of each slot.
    slots: Vec<Vec<u64>>,
    free_slots: Vec<Vec<u16>>,
    outstanding: HashMap<u64, NetReq>,
    /// Frames sent whose echo has not arrived: token → frame length.
    awaiting_echo: HashMap<u64, usize>,
    next_token: u64,
    ledger: Ledger,
    echoes: u64,
    anomalies: Vec<Anomaly>,
    progress: Arc<Progress>,
    rng: XorShift,
    posting: bool,
}

impl NetGuest {
    /// Lays out 2 × `pairs` queues and their buffers in `ram`.
    pub fn new(ram: Arc<GuestRam>, opts: NetGuestOptions) -> std::io::Result<Self> {
        if opts.depth == 0 || opts.depth > opts.queue_size / 2 {
            return Err(std::io::Error::other("net depth must be 1..=queue_size/2"));
        }
        let mut a = GuestAllocator::new(1 << 20, ram.size());
        let oom = || std::io::Error::other("guest RAM too small for the workload");
        let mut queues = Vec::new();
        let mut slots = Vec::new();
        let mut free_slots = Vec::new();
        for q in 0..2 * opts.pairs {
            let base = a
                .alloc_pages(QueueLayout::bytes_needed(opts.queue_size, 4))
                .ok_or_else(oom)?;
            let layout = QueueLayout::at(base, opts.queue_size, 4);
            queues.push(
                DriverQueue::new(ram.memory(), q, layout, opts.event_idx, opts.indirect)?
                    .in_order(opts.in_order),
            );
            let mut s = Vec::new();
            for _ in 0..opts.depth {
                s.push(a.alloc_pages(PAGE_SIZE).ok_or_else(oom)?);
            }
            slots.push(s);
            free_slots.push((0..opts.depth).rev().collect());
        }
        Ok(NetGuest {
            rng: XorShift::new(opts.seed),
            opts,
            ram,
            queues,
            slots,
            free_slots,
            outstanding: HashMap::new(),
            awaiting_echo: HashMap::new(),
            next_token: 1,
            ledger: Ledger::default(),
            echoes: 0,
            anomalies: Vec::new(),
            progress: Arc::new(Progress::default()),
            posting: true,
        })
    }

    /// Frames sent whose echo has not (yet) come back.
    pub fn echoes_missing(&self) -> usize {
        self.awaiting_echo.len()
    }

    /// Echoes received and verified.
    pub fn echoes(&self) -> u64 {
        self.echoes
    }

    /// Receive buffers currently posted (not an error to have them outstanding).
    pub fn rx_posted(&self) -> usize {
        self.outstanding
            .values()
            .filter(|r| r.queue % 2 == 0)
            .count()
    }

    fn post(&mut self, q: u16, bufs: &[Buf], slot: u16) -> bool {
        let qi = usize::from(q);
        let indirect =
            self.opts.indirect && self.rng.range(0, 99) < u64::from(self.opts.indirect_pct);
        if !self.queues[qi].fits(bufs.len(), indirect) {
            return false;
        }
        let token = self.next_token;
        let ram = self.ram.clone();
        if let Err(e) = self.queues[qi].add(ram.memory(), bufs, indirect, token) {
            self.anomalies
                .push(Anomaly::Data(format!("queue {q}: posting failed: {e}")));
            return false;
        }
        self.next_token += 1;
        self.outstanding.insert(token, NetReq { queue: q, slot });
        self.ledger.issued += 1;
        true
    }

    fn post_rx(&mut self, pair: u16) -> bool {
        let q = 2 * pair;
        let Some(&slot) = self.free_slots[usize::from(q)].last() else {
            return false;
        };
        let page = self.slots[usize::from(q)][usize::from(slot)];
        let bufs = if self.rng.range(0, 1) == 0 {
            vec![Buf::wo(page, PAGE_SIZE as u32)]
        } else {
            vec![
                Buf::wo(page, HDR as u32),
                Buf::wo(page + HDR, (PAGE_SIZE - HDR) as u32),
            ]
        };
        if self.post(q, &bufs, slot) {
            self.free_slots[usize::from(q)].pop();
            true
        } else {
            false
        }
    }

    fn post_tx(&mut self, pair: u16) -> bool {
        let q = 2 * pair + 1;
        let Some(&slot) = self.free_slots[usize::from(q)].last() else {
            return false;
        };
        let page = self.slots[usize::from(q)][usize::from(slot)];
        let token = self.next_token;
        let len = self.rng.range(64, 1500) as usize;
        let mut frame = vec![0u8; HDR as usize + len];
        let f = &mut frame[HDR as usize..];
        f[0..8].copy_from_slice(&token.to_le_bytes());
        f[8..10].copy_from_slice(&pair.to_le_bytes());
        f[10..12].copy_from_slice(&(len as u16).to_le_bytes());
        for (i, b) in f[FRAME_HDR..].iter_mut().enumerate() {
            *b = payload_byte(token, i);
        }
        if self
            .ram
            .memory()
            .write_slice(&frame, GuestAddress(page))
            .is_err()
        {
            return false;
        }
        let total = frame.len() as u32;
        let bufs = if self.rng.range(0, 1) == 0 {
            vec![Buf::ro(page, total)]
        } else {
            vec![
                Buf::ro(page, HDR as u32),
                Buf::ro(page + HDR, total - HDR as u32),
            ]
        };
        if self.post(q, &bufs, slot) {
            self.free_slots[usize::from(q)].pop();
            self.awaiting_echo.insert(token, len);
            true
        } else {
            false
        }
    }

    fn complete(&mut self, token: u64, len: u32) {
        let Some(req) = self.outstanding.remove(&token) else {
            self.ledger.duplicates += 1;
            self.anomalies.push(Anomaly::Ledger(format!(
                "buffer {token} completed twice or never posted"
            )));
            return;
        };
        self.ledger.completed += 1;
        let qi = usize::from(req.queue);
        let page = self.slots[qi][usize::from(req.slot)];
        self.free_slots[qi].push(req.slot);
        self.progress.ops.fetch_add(1, Ordering::Relaxed);
        if req.queue % 2 == 1 {
            let l = self.awaiting_echo.get(&token).copied().unwrap_or(0);
            self.progress
                .bytes_out
                .fetch_add(l as u64, Ordering::Relaxed);
            return;
        }
        // A receive buffer: check the echo.
        let flen = (len as usize).saturating_sub(HDR as usize);
        if flen < FRAME_HDR || len as u64 > PAGE_SIZE {
            self.anomalies.push(Anomaly::Data(format!(
                "rx buffer {token}: bad used length {len}"
            )));
            return;
        }
        let mut frame = vec![0u8; flen];
        if self
            .ram
            .memory()
            .read_slice(&mut frame, GuestAddress(page + HDR))
            .is_err()
        {
            return;
        }
        let sent = u64::from_le_bytes(frame[0..8].try_into().expect("8"));
        let pair = u16::from_le_bytes(frame[8..10].try_into().expect("2"));
        let flen_hdr = u16::from_le_bytes(frame[10..12].try_into().expect("2")) as usize;
        let Some(want_len) = self.awaiting_echo.remove(&sent) else {
            self.anomalies.push(Anomaly::Data(format!(
                "rx buffer {token}: echo of frame {sent} that was not sent or was already echoed"
            )));
            return;
        };
        if pair != req.queue / 2 || flen_hdr != want_len || flen != want_len {
            self.anomalies.push(Anomaly::Data(format!(
                "rx buffer {token}: frame {sent} has pair {pair} length {flen}/{flen_hdr}, expected pair {} length {want_len}",
                req.queue / 2
            )));
            return;
        }
        if let Some(i) = frame[FRAME_HDR..]
            .iter()
            .enumerate()
            .position(|(i, b)| *b != payload_byte(sent, i))
        {
            self.anomalies.push(Anomaly::Data(format!(
                "rx buffer {token}: frame {sent} payload differs at byte {i}"
            )));
            return;
        }
        self.echoes += 1;
        self.progress
            .bytes_in
            .fetch_add(flen as u64, Ordering::Relaxed);
    }
}

impl GuestWorkload for NetGuest {
    fn step(&mut self) {
        for pair in 0..self.opts.pairs {
            // Receive buffers are always replenished (a NIC driver keeps its RX ring full).
            let mut posted_rx = false;
            while self.post_rx(pair) {
                posted_rx = true;
            }
            let mut posted_tx = false;
            if self.posting {
                while self.post_tx(pair) {
                    posted_tx = true;
                }
            }
            let ram = self.ram.clone();
            for (q, posted) in [(2 * pair, posted_rx), (2 * pair + 1, posted_tx)] {
                if posted {
                    let dq = &mut self.queues[usize::from(q)];
                    dq.publish(ram.memory());
                    dq.kick_if_needed(ram.memory());
                }
            }
        }
    }

    fn reap(&mut self) {
        for q in 0..self.queues.len() {
            let ram = self.ram.clone();
            let done = self.queues[q].reap_all(ram.memory());
            for c in done {
                self.complete(c.token, c.len);
            }
            let a = self.queues[q].take_anomalies();
            self.anomalies.extend(a);
        }
    }

    fn set_posting(&mut self, on: bool) {
        self.posting = on;
    }

    fn anomalies(&self) -> Vec<Anomaly> {
        self.anomalies.clone()
    }

    /// Receive buffers still posted wait for traffic legitimately: they are not counted as
    /// issued requests until the device returns them (see [`NetGuest::rx_posted`]).
    fn ledger(&self) -> Ledger {
        Ledger {
            issued: self.ledger.issued - self.rx_posted() as u64,
            outstanding: self
                .outstanding
                .values()
                .filter(|r| r.queue % 2 == 1)
                .count() as u64,
            ..self.ledger
        }
    }

    fn queues(&self) -> &[DriverQueue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [DriverQueue] {
        &mut self.queues
    }

    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn attach(&mut self, ram: Arc<GuestRam>) -> std::io::Result<()> {
        super::attach_ram(&mut self.ram, &mut self.queues, ram)
    }

    fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}
