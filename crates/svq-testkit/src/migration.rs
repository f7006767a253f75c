//! Live migration as a VMM performs it: pre-copy rounds driven by the CPU dirty bitmap and the
//! vhost dirty log, stop-and-copy, and restart of the guest on a destination device.
//!
//! The proxy (svqd) is not known here: the caller connects the source [`Vmm`] to whatever socket
//! it likes and supplies a closure that connects the destination VMM.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::guest::ram::GuestRam;
use crate::guest::runner::GuestRunner;
use crate::guest::GuestWorkload;
use crate::oracle::RamSnapshot;
use crate::vmm::{Vmm, VmmError};

/// Pre-copy parameters.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Most pre-copy rounds after the full copy.
    pub max_rounds: u32,
    /// Stop iterating once a round found at most this many dirty pages.
    pub converge_pages: u64,
    /// Time the guest runs between rounds (the "bandwidth" of the simulated stream).
    pub round_interval: Duration,
    /// Refuse to migrate when the device path cannot log (QEMU's behaviour). When false, the
    /// migration runs on the CPU dirty bitmap alone (to show the oracle catches the loss).
    pub require_logging: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            max_rounds: 5,
            converge_pages: 64,
            round_interval: Duration::from_millis(40),
            require_logging: true,
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundStat {
    /// Round number (0 = the full copy).
    pub round: u32,
    /// Pages the guest CPU dirtied.
    pub cpu_pages: u64,
    /// Pages the device path logged.
    pub device_pages: u64,
    /// Pages copied (union).
    pub copied: u64,
    /// Time spent syncing logs and copying.
    pub duration: Duration,
}

/// What a migration did and measured.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// Pre-copy rounds, the full copy first.
    pub rounds: Vec<RoundStat>,
    /// The final stop-and-copy round.
    pub final_round: RoundStat,
    /// Time of SET_LOG_BASE + SET_FEATURES(LOG_ALL) + SET_VRING_ADDR(log): with svqd this
    /// includes switching every queue to shadow mode.
    pub log_start: Duration,
    /// Guest paused → source rings stopped (SET_VRING_ENABLE 0 + GET_VRING_BASE).
    pub ring_stop: Duration,
    /// Guest paused → guest running on the destination (excluding the oracle's snapshot).
    pub downtime: Duration,
    /// Whole migration.
    pub total: Duration,
    /// Ring bases returned by GET_VRING_BASE, per queue.
    pub bases: Vec<u16>,
    /// Whether the device path logged (false: CPU dirty bitmap only).
    pub device_logging: bool,
}

impl MigrationReport {
    /// Pages the device path logged over the whole migration (every round and the final one).
    pub fn device_pages(&self) -> u64 {
        self.rounds.iter().map(|s| s.device_pages).sum::<u64>() + self.final_round.device_pages
    }
}

/// Migration failures.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A vhost-user step failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// Copying memory failed.
    #[error("memory copy: {0}")]
    Io(#[from] std::io::Error),
}

fn copy_pages(src: &GuestRam, dst: &GuestRam, pages: &BTreeSet<u64>) -> std::io::Result<()> {
    for &p in pages {
        src.copy_page_to(dst, p)?;
    }
    Ok(())
}

fn sync_round(
    round: u32,
    src_vmm: &mut Vmm,
    src: &GuestRam,
    dst: &GuestRam,
) -> Result<RoundStat, MigrationError> {
    let t = Instant::now();
    let cpu = src.take_cpu_dirty();
    let dev = src_vmm.sync_dirty_log()?;
    let mut all: BTreeSet<u64> = cpu.iter().copied().collect();
    all.extend(dev.iter().copied());
    copy_pages(src, dst, &all)?;
    Ok(RoundStat {
        round,
        cpu_pages: cpu.len() as u64,
        device_pages: dev.len() as u64,
        copied: all.len() as u64,
        duration: t.elapsed(),
    })
}

/// Migrates the guest of `runner` from `src_vmm` to a destination on `dst_ram`.
///
/// Returns the destination VMM (rings started, guest resumed on it), a snapshot of the
/// destination RAM taken at switchover (for the oracle, to compare with the source's final RAM)
/// and the report. `progress` is called after each round with a one-line status.
pub fn migrate<W, F>(
    runner: &GuestRunner<W>,
    src_vmm: &mut Vmm,
    dst_ram: Arc<GuestRam>,
    connect_dst: F,
    opts: &MigrationOptions,
    mut progress: impl FnMut(&str),
) -> Result<(Vmm, RamSnapshot, MigrationReport), MigrationError>
where
    W: GuestWorkload + 'static,
    F: FnOnce(Arc<GuestRam>) -> Result<Vmm, VmmError>,
{
    let t0 = Instant::now();
    let src = src_vmm.ram().clone();
    let device_logging = src_vmm.supports_logging();
    let log_start = if device_logging {
        let t = Instant::now();
        src_vmm.start_dirty_log()?;
        t.elapsed()
    } else if opts.require_logging {
        // start_dirty_log produces QEMU's refusal message.
        src_vmm.start_dirty_log()?;
        Duration::ZERO
    } else {
        tracing::warn!("migrating without device dirty logging: device writes will be lost");
        Duration::ZERO
    };
    // Round 0: everything (the bitmaps start clean now, so what changes from here on is caught).
    let t = Instant::now();
    src.reset_cpu_dirty();
    src.copy_all_to(&dst_ram)?;
    let mut rounds = vec![RoundStat {
        round: 0,
        copied: src.pages(),
        duration: t.elapsed(),
        ..Default::default()
    }];
    progress(&format!("round 0: copied all {} pages", src.pages()));
    for round in 1..=opts.max_rounds {
        std::thread::sleep(opts.round_interval);
        let st = sync_round(round, src_vmm, &src, &dst_ram)?;
        progress(&format!(
            "round {round}: {} pages dirty ({} by the guest CPU, {} logged for the device)",
            st.copied, st.cpu_pages, st.device_pages
        ));
        rounds.push(st);
        if st.copied <= opts.converge_pages {
            break;
        }
    }
    // Stop-and-copy.
    let t_pause = Instant::now();
    runner.pause();
    let queues: Vec<_> = runner.with(|w| w.queues().iter().map(|q| q.index()).collect());
    let mut bases = Vec::new();
    for q in &queues {
        bases.push(src_vmm.stop_queue(*q)?);
    }
    let ring_stop = t_pause.elapsed();
    let final_round = sync_round(u32::MAX, src_vmm, &src, &dst_ram)?;
    let stop_phase = t_pause.elapsed();
    progress(&format!(
        "stop-and-copy: {} pages ({} cpu, {} device), rings stopped at {:?}",
        final_round.copied, final_round.cpu_pages, final_round.device_pages, bases
    ));
    let snapshot = RamSnapshot::take(&dst_ram)?;
    // Destination: connect, move the guest, start its rings at the source's bases, resume.
    let t_dst = Instant::now();
    let mut dst_vmm = connect_dst(dst_ram.clone())?;
    runner.with(|w| w.attach(dst_ram.clone()))?;
    let specs: Vec<_> = runner.with(|w| {
        w.queues()
            .iter()
            .map(|q| {
                (
                    q.index(),
                    q.layout(),
                    q.kick_fd().try_clone(),
                    q.call_fd().try_clone(),
                )
            })
            .collect()
    });
    for ((idx, layout, kick, call), base) in specs.into_iter().zip(bases.iter()) {
        dst_vmm.start_queue(idx, layout, *base, &kick?, &call?)?;
    }
    // The destination guest may have posted before the stop without the source seeing the
    // kick: notify every queue once, as QEMU does when it restarts a vhost device.
    runner.with(|w| {
        for q in w.queues_mut() {
            q.kick_now();
        }
    });
    dst_ram.reset_cpu_dirty();
    runner.resume();
    let downtime = stop_phase + t_dst.elapsed();
    Ok((
        dst_vmm,
        snapshot,
        MigrationReport {
            rounds,
            final_round,
            log_start,
            ring_stop,
            downtime,
            total: t0.elapsed(),
            bases,
            device_logging,
        },
    ))
}
