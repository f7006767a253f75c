//! virtio-blk guest workload: random reads and writes of 4 KiB blocks with known patterns.
//!
//! The guest keeps a model of the disk (the generation last written to every block). Writes fill
//! the buffer with the block's new pattern; reads are checked against the model when they
//! complete, so a device write into guest RAM that a migration lost (a page not logged) shows up
//! as a data anomaly on the destination, besides the page comparison of the oracle. A block has at
//! most one request in flight, so the model is exact whatever the completion order.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use super::latency::LatencyHistogram;
use super::ram::GuestRam;
use super::vring::{Anomaly, Buf, DriverQueue, QueueLayout};
use super::{splitmix, GuestAllocator, GuestWorkload, Ledger, Progress};
use crate::backend::XorShift;

/// Block size of the workload (8 sectors).
pub const BLOCK: u64 = 4096;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Options of the block workload.
#[derive(Debug, Clone)]
pub struct BlkGuestOptions {
    /// Queues to drive.
    pub queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Blocks (4 KiB) of the disk the workload uses (must fit the disk).
    pub blocks: u64,
    /// Largest request in blocks.
    pub max_blocks: u16,
    /// Percentage of reads among data requests.
    pub read_pct: u8,
    /// Percentage of flush and get-id requests (two thirds flushes) among all requests.
    pub admin_pct: u8,
    /// Split data buffers into 1..=3 descriptors at arbitrary offsets (off: one data descriptor
    /// per request, as a kernel posts a page-aligned 4 KiB I/O).
    pub split: bool,
    /// Percentage of requests posted through indirect tables (when negotiated).
    pub indirect_pct: u8,
    /// Use EVENT_IDX (must match what the VMM negotiated).
    pub event_idx: bool,
    /// Use indirect descriptors (must match what the VMM negotiated).
    pub indirect: bool,
    /// Seed of the request generator.
    pub seed: u64,
    /// Record every request's latency, post to reap ([`BlkGuest::latency`]).
    pub record_latency: bool,
}

impl Default for BlkGuestOptions {
    fn default() -> Self {
        BlkGuestOptions {
            queues: 1,
            queue_size: 128,
            depth: 16,
            blocks: 1024,
            max_blocks: 4,
            read_pct: 60,
            admin_pct: 3,
            split: true,
            indirect_pct: 30,
            event_idx: true,
            indirect: true,
            seed: 7,
            record_latency: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    GetId,
}

#[derive(Debug, Clone)]
struct Req {
    queue: u16,
    slot: u16,
    op: Op,
    block: u64,
    nblocks: u64,
    gen: u32,
    posted: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    hdr: u64,
    data: u64,
}

/// The block workload.
pub struct BlkGuest {
    opts: BlkGuestOptions,
    ram: Arc<GuestRam>,
    queues: Vec<DriverQueue>,
    slots: Vec<Vec<Slot>>,
    free_slots: Vec<Vec<u16>>,
    model: Vec<u32>,
    busy: Vec<bool>,
    outstanding: HashMap<u64, Req>,
    next_token: u64,
    next_gen: u32,
    ledger: Ledger,
    anomalies: Vec<Anomaly>,
    progress: Arc<Progress>,
    rng: XorShift,
    posting: bool,
    latency: LatencyHistogram,
    /// Block-sized scratch buffers (patterns written, read back and expected), so that a request
    /// allocates nothing for its data.
    scratch: Vec<u8>,
    expected: Vec<u8>,
}

/// Byte `i` of the pattern of block `block` at generation `gen` (generation 0 = zeros, a fresh
/// disk).
pub fn pattern(block: u64, gen: u32, buf: &mut [u8]) {
    if gen == 0 {
        buf.fill(0);
        return;
    }
    for (w, chunk) in buf.chunks_mut(8).enumerate() {
        let v = splitmix((block << 24) ^ (u64::from(gen) << 4) ^ w as u64 ^ 0xb10c);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

impl BlkGuest {
    /// Lays out queues and buffers in `ram` (starting at 1 MiB, as a kernel would leave low
    /// memory alone) and initialises the rings.
    pub fn new(ram: Arc<GuestRam>, opts: BlkGuestOptions) -> std::io::Result<Self> {
        if opts.depth == 0 || opts.depth > opts.queue_size || opts.max_blocks == 0 {
            return Err(std::io::Error::other("bad blk workload options"));
        }
        if opts.blocks < u64::from(opts.max_blocks) * u64::from(opts.depth) * u64::from(opts.queues)
        {
            return Err(std::io::Error::other("too few blocks for the depth"));
        }
        let mut a = GuestAllocator::new(1 << 20, ram.size());
        let oom = || std::io::Error::other("guest RAM too small for the workload");
        let mut queues = Vec::new();
        let mut slots = Vec::new();
        let mut free_slots = Vec::new();
        let indirect_max = 8;
        for q in 0..opts.queues {
            let base = a
                .alloc_pages(QueueLayout::bytes_needed(opts.queue_size, indirect_max))
                .ok_or_else(oom)?;
            let layout = QueueLayout::at(base, opts.queue_size, indirect_max);
            queues.push(DriverQueue::new(
                ram.memory(),
                q,
                layout,
                opts.event_idx,
                opts.indirect,
            )?);
            // Headers + status bytes of all slots on their own page(s); data on separate pages so
            // that device writes of data are never hidden by guest CPU writes to the same page.
            let hdrs = a.alloc_pages(64 * u64::from(opts.depth)).ok_or_else(oom)?;
            let mut s = Vec::new();
            for i in 0..u64::from(opts.depth) {
                let data = a
                    .alloc_pages(BLOCK * u64::from(opts.max_blocks))
                    .ok_or_else(oom)?;
                s.push(Slot {
                    hdr: hdrs + 64 * i,
                    data,
                });
            }
            slots.push(s);
            free_slots.push((0..opts.depth).rev().collect());
        }
        Ok(BlkGuest {
            rng: XorShift::new(opts.seed),
            model: vec![0; opts.blocks as usize],
            busy: vec![false; opts.blocks as usize],
            opts,
            ram,
            queues,
            slots,
            free_slots,
            outstanding: HashMap::new(),
            next_token: 1,
            next_gen: 1,
            ledger: Ledger::default(),
            anomalies: Vec::new(),
            progress: Arc::new(Progress::default()),
            posting: true,
            latency: LatencyHistogram::default(),
            scratch: vec![0; BLOCK as usize],
            expected: vec![0; BLOCK as usize],
        })
    }

    /// The disk model: generation last written to each block (0 = never written).
    pub fn model(&self) -> &[u32] {
        &self.model
    }

    /// Expected contents of `block` per the model.
    pub fn expected_block(&self, block: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        pattern(block, self.model[block as usize], &mut b);
        b
    }

    /// Latencies of the requests completed since the start or the last
    /// [`BlkGuest::reset_latency`] (empty unless [`BlkGuestOptions::record_latency`]).
    pub fn latency(&self) -> &LatencyHistogram {
        &self.latency
    }

    /// Forgets the latencies recorded so far (the end of a warm-up).
    pub fn reset_latency(&mut self) {
        self.latency.reset();
    }

    fn pick_range(&mut self) -> Option<(u64, u64)> {
        for _ in 0..8 {
            let n = self.rng.range(1, u64::from(self.opts.max_blocks));
            let start = self.rng.range(0, self.opts.blocks - n);
            if (start..start + n).all(|b| !self.busy[b as usize]) {
                return Some((start, n));
            }
        }
        None
    }

    /// Splits `len` bytes at `addr` into 1..=3 segments (sector multiples not required by
    /// virtio: arbitrary splits test the device's stream handling).
    fn split(&mut self, addr: u64, len: u64, writable: bool) -> Vec<Buf> {
        if !self.opts.split {
            return vec![Buf {
                addr,
                len: len as u32,
                writable,
            }];
        }
        let pieces = self.rng.range(1, 3).min(len);
        let mut out = Vec::new();
        let mut off = 0;
        for i in 0..pieces {
            let rest = len - off;
            let n = if i + 1 == pieces {
                rest
            } else {
                self.rng.range(1, rest - (pieces - 1 - i))
            };
            out.push(Buf {
                addr: addr + off,
                len: n as u32,
                writable,
            });
            off += n;
        }
        out
    }

    /// Posts one request on queue `q` if a slot and a block range are free.
    fn post_one(&mut self, q: u16) -> bool {
        let qi = usize::from(q);
        let Some(&slot_no) = self.free_slots[qi].last() else {
            return false;
        };
        let slot = self.slots[qi][usize::from(slot_no)];
        let roll = self.rng.range(0, 99);
        let admin = u64::from(self.opts.admin_pct);
        let op = if roll < admin && roll * 3 < admin * 2 {
            Op::Flush
        } else if roll < admin {
            Op::GetId
        } else if self.rng.range(0, 99) < u64::from(self.opts.read_pct) {
            Op::Read
        } else {
            Op::Write
        };
        let (block, nblocks) = match op {
            Op::Read | Op::Write => match self.pick_range() {
                Some(r) => r,
                None => return false,
            },
            _ => (0, 0),
        };
        let ram = self.ram.clone();
        let mem = ram.memory();
        let mut gen = 0;
        let (kind, sector) = match op {
            Op::Read => (T_IN, block * (BLOCK / 512)),
            Op::Write => {
                gen = self.next_gen;
                self.next_gen = self.next_gen.wrapping_add(1).max(1);
                for i in 0..nblocks {
                    pattern(block + i, gen, &mut self.scratch);
                    if mem
                        .write_slice(&self.scratch, GuestAddress(slot.data + i * BLOCK))
                        .is_err()
                    {
                        return false;
                    }
                }
                (T_OUT, block * (BLOCK / 512))
            }
            Op::Flush => (T_FLUSH, 0),
            Op::GetId => (T_GET_ID, 0),
        };
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        // Status poisoned so a completion without a status write is noticed.
        if mem.write_slice(&hdr, GuestAddress(slot.hdr)).is_err()
            || mem.write_obj(0xffu8, GuestAddress(slot.hdr + 32)).is_err()
        {
            return false;
        }
        let mut bufs = vec![Buf::ro(slot.hdr, 16)];
        let data_len = nblocks * BLOCK;
        match op {
            Op::Read => {
                let s = self.split(slot.data, data_len, true);
                bufs.extend(s)
            }
            Op::Write => {
                let s = self.split(slot.data, data_len, false);
                bufs.extend(s)
            }
            Op::GetId => bufs.push(Buf::wo(slot.data, 20)),
            Op::Flush => {}
        }
        bufs.push(Buf::wo(slot.hdr + 32, 1));
        let indirect =
            self.opts.indirect && self.rng.range(0, 99) < u64::from(self.opts.indirect_pct);
        if !self.queues[qi].fits(bufs.len(), indirect) {
            return false;
        }
        let token = self.next_token;
        let posted = self.opts.record_latency.then(Instant::now);
        match self.queues[qi].add(mem, &bufs, indirect, token) {
            Ok(_) => {}
            Err(e) => {
                self.anomalies
                    .push(Anomaly::Data(format!("queue {q}: posting failed: {e}")));
                return false;
            }
        }
        self.next_token += 1;
        self.free_slots[qi].pop();
        for b in block..block + nblocks {
            self.busy[b as usize] = true;
        }
        self.outstanding.insert(
            token,
            Req {
                queue: q,
                slot: slot_no,
                op,
                block,
                nblocks,
                gen,
                posted,
            },
        );
        self.ledger.issued += 1;
        true
    }

    fn complete(&mut self, token: u64, len: u32) {
        let Some(req) = self.outstanding.remove(&token) else {
            self.ledger.duplicates += 1;
            self.anomalies.push(Anomaly::Ledger(format!(
                "request {token} completed twice or never issued"
            )));
            return;
        };
        self.ledger.completed += 1;
        if let Some(t) = req.posted {
            self.latency.record(t.elapsed().as_nanos() as u64);
        }
        let qi = usize::from(req.queue);
        let slot = self.slots[qi][usize::from(req.slot)];
        let ram = self.ram.clone();
        let mem = ram.memory();
        let status: u8 = mem.read_obj(GuestAddress(slot.hdr + 32)).unwrap_or(0xfe);
        let data_len = req.nblocks * BLOCK;
        let expected_len = match req.op {
            Op::Read => data_len as u32 + 1,
            Op::GetId => 21,
            _ => 1,
        };
        if status != 0 {
            self.anomalies.push(Anomaly::Data(format!(
                "request {token} ({:?} block {} x{}) status {status}",
                req.op, req.block, req.nblocks
            )));
        } else if len != expected_len {
            self.anomalies.push(Anomaly::Data(format!(
                "request {token} ({:?}) used len {len}, expected {expected_len}",
                req.op
            )));
        }
        match req.op {
            Op::Read if status == 0 => {
                for i in 0..req.nblocks {
                    let b = req.block + i;
                    if mem
                        .read_slice(&mut self.scratch, GuestAddress(slot.data + i * BLOCK))
                        .is_err()
                    {
                        continue;
                    }
                    pattern(b, self.model[b as usize], &mut self.expected);
                    if self.scratch != self.expected {
                        self.anomalies.push(Anomaly::Data(format!(
                            "read of block {b} (request {token}) does not hold generation {}",
                            self.model[b as usize]
                        )));
                    }
                }
                self.progress
                    .bytes_in
                    .fetch_add(data_len, Ordering::Relaxed);
            }
            Op::Write if status == 0 => {
                for b in req.block..req.block + req.nblocks {
                    self.model[b as usize] = req.gen;
                }
                self.progress
                    .bytes_out
                    .fetch_add(data_len, Ordering::Relaxed);
            }
            Op::Write => {
                // A failed write leaves the blocks unknown: mark them so reads are not judged.
                self.anomalies
                    .push(Anomaly::Data(format!("write request {token} failed")));
            }
            _ => {}
        }
        for b in req.block..req.block + req.nblocks {
            self.busy[b as usize] = false;
        }
        self.free_slots[qi].push(req.slot);
        self.progress.ops.fetch_add(1, Ordering::Relaxed);
    }
}

impl GuestWorkload for BlkGuest {
    fn step(&mut self) {
        if !self.posting {
            return;
        }
        for q in 0..self.opts.queues {
            let mut posted = false;
            while self.post_one(q) {
                posted = true;
            }
            if posted {
                let mem = self.ram.memory();
                let dq = &mut self.queues[usize::from(q)];
                dq.publish(mem);
                dq.kick_if_needed(mem);
            }
        }
    }

    fn reap(&mut self) {
        for q in 0..self.queues.len() {
            let done = self.queues[q].reap_all(self.ram.memory());
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

    fn ledger(&self) -> Ledger {
        Ledger {
            outstanding: self.outstanding.len() as u64,
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
