//! When has a backend stopped taking buffers from a ring? The question every switch asks before
//! its `GET_VRING_BASE`, for the guest ring (passthrough → shadow) and for the shadow ring
//! (shadow → passthrough). See DESIGN.md, "Quiesce".
//!
//! The answer comes from the ring's memory alone, observed repeatedly:
//!
//! * everything published is completed (`used.idx == avail.idx`): nothing can be in flight;
//! * with EVENT_IDX, the backend's `avail_event` counts what it took: `used.idx == avail_event`
//!   means everything taken is completed, the rest was never taken. Only trusted when it lies
//!   between `used.idx` and `avail.idx`: a backend that polls (DPDK) never writes it, and a value
//!   outside that range is a leftover, not a position;
//! * otherwise: nothing completed for a quiet period.
//!
//! A device that only scans the ring when kicked (qemu-storage-daemon, which ignores a disable)
//! is drained with a kick of svqd's own. Until it has read that kick, nothing in memory is final:
//! its scan may still take more buffers, and GET_VRING_BASE would then meet requests in flight.
//! So while the kick is unread only the quiet period counts, and after it `avail_event` counts
//! only once it reached what was published at the last look that found the kick unread (the
//! scan takes at least that much; until then, the quiet period again).
//!
//! A ring whose avail index cannot move any more (the shadow ring once the worker holds it:
//! svqd is its only driver) with everything published completed needs no run of hits, only the
//! settle period since the last completion: nothing new can be taken, but the backend may not
//! have signalled its last completion yet, and qemu-storage-daemon drops the connection when
//! that signal meets the call fd GET_VRING_BASE closed.

use std::time::{Duration, Instant};

/// Without a trustworthy position in memory: how long nothing may complete.
pub const QUIET_PERIOD: Duration = Duration::from_millis(5);

/// Longest quiesce before the switch goes on to GET_VRING_BASE anyway (what is then still in
/// flight is verified and waited for after it).
pub const QUIESCE_LIMIT: Duration = Duration::from_secs(2);

/// How often a ring in memory is looked at while waiting (a look is a few loads; looking often
/// ends the wait soon after the ring got quiet). The waiting thread's timer slack is cut to match
/// ([`precise_sleeps`]); the default 50 µs would make every look 50 µs late.
const POLL: Duration = Duration::from_micros(25);

/// Sleeps of the calling thread end when asked rather than up to 50 µs later (the default timer
/// slack). Idempotent; a switch calls it before its first wait.
pub fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// With a trustworthy `avail_event`: how long it must stay equal to `used.idx`, and in how many
/// looks. Long enough for a backend's signal of its last completion to be out (a single-threaded
/// backend such as qemu-storage-daemon pushes and signals in one step, so any look after the push
/// is late enough); it need not cover a stale `avail_event` inside a vhost-user-backend pop loop
/// (which refreshes it only when re-enabling notifications): what such a backend still holds at
/// GET_VRING_BASE is verified and waited for after it (`drain.rs`), and it keeps no closed call
/// fd to trip over.
const SETTLE_PERIOD: Duration = Duration::from_micros(200);
const SETTLE_HITS: u32 = 3;

/// One look at a ring's indices in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIndices {
    /// `avail.idx`: what the driver published.
    pub avail_idx: u16,
    /// `used.idx`: what the device completed.
    pub used_idx: u16,
    /// `avail_event` at the end of the used ring (meaningful with EVENT_IDX only).
    pub avail_event: u16,
}

impl RingIndices {
    /// Whether `avail_event` can be a device position: between `used.idx` and `avail.idx`.
    pub fn avail_event_plausible(&self) -> bool {
        self.avail_event.wrapping_sub(self.used_idx) <= self.avail_idx.wrapping_sub(self.used_idx)
    }

    /// Whether the device's `avail_event` reached `floor`, an avail index published earlier
    /// (or the used index passed it: the device took at least that much).
    fn avail_event_reached(&self, floor: u16) -> bool {
        let ahead = floor.wrapping_sub(self.used_idx);
        ahead > self.avail_idx.wrapping_sub(self.used_idx)
            || self.avail_event.wrapping_sub(self.used_idx) >= ahead
    }
}

/// One look at a ring while it is being quiesced.
#[derive(Debug, Clone, Copy)]
pub struct Look {
    /// The ring's indices in memory.
    pub ring: RingIndices,
    /// The backend signalled a completion since the last look.
    pub signalled: bool,
    /// The drain kick svqd gave the device is still unread: the scan that takes what is
    /// available (and publishes the device's position) has not begun.
    pub scan_pending: bool,
}

impl Look {
    /// A look at a ring with no drain kick outstanding.
    pub fn at(ring: RingIndices, signalled: bool) -> Self {
        Look {
            ring,
            signalled,
            scan_pending: false,
        }
    }
}

/// Repeated observations of one ring until it is quiet.
#[derive(Debug)]
pub struct Quiescer {
    event_idx: bool,
    avail_frozen: bool,
    /// What the device's scan after the drain kick takes at least: the avail index before the
    /// kick, raised by every look that finds it unread (see [`Quiescer::after_drain_kick`]).
    scan_floor: Option<u16>,
    start: Instant,
    last_used: Option<u16>,
    last_change: Instant,
    stable_hits: u32,
    settled: bool,
}

impl Quiescer {
    /// Start observing, now.
    pub fn new(event_idx: bool) -> Self {
        let now = Instant::now();
        Quiescer {
            event_idx,
            avail_frozen: false,
            scan_floor: None,
            start: now,
            last_used: None,
            last_change: now,
            stable_hits: 0,
            settled: false,
        }
    }

    /// Start observing a ring whose avail index no longer moves (svqd drives it and stopped
    /// publishing): `used.idx == avail.idx` is final; the ring is quiet once nothing completed
    /// for the settle period (the backend's last call is out), whatever the number of looks.
    pub fn with_frozen_avail(event_idx: bool) -> Self {
        Quiescer {
            avail_frozen: true,
            ..Quiescer::new(event_idx)
        }
    }

    /// Start observing a ring svqd just kicked through a kick fd of its own, `floor` being its
    /// avail index read before that kick: the device's scan takes at least up to `floor` (raised
    /// by every look that finds the kick still unread), so its `avail_event` is a position only
    /// from there on; the looks report whether the kick is read.
    pub fn after_drain_kick(event_idx: bool, floor: u16) -> Self {
        Quiescer {
            scan_floor: Some(floor),
            ..Quiescer::new(event_idx)
        }
    }

    /// Record one observation made at `now`. Returns whether the ring is quiet; once quiet, it
    /// stays so.
    pub fn observe(&mut self, look: Look, now: Instant) -> bool {
        if self.settled {
            return true;
        }
        let ring = look.ring;
        if look.signalled || self.last_used != Some(ring.used_idx) {
            self.last_used = Some(ring.used_idx);
            self.last_change = now;
        }
        let quiet_for = now.saturating_duration_since(self.last_change);
        let exact = if look.scan_pending {
            // The device's scan is still to come and will take at least what is published now;
            // a device that never reads its kick fd (one that polls) ends here by the quiet
            // period.
            if let Some(floor) = &mut self.scan_floor {
                *floor = ring.avail_idx;
            }
            None
        } else if ring.used_idx == ring.avail_idx {
            Some(true)
        } else if self
            .scan_floor
            .is_some_and(|f| !ring.avail_event_reached(f))
        {
            // The kick is read, the scan not done (or the device does not write avail_event).
            None
        } else if self.event_idx && ring.avail_event_plausible() {
            Some(ring.avail_event == ring.used_idx)
        } else {
            None
        };
        if self.avail_frozen && ring.used_idx == ring.avail_idx {
            self.settled = quiet_for >= SETTLE_PERIOD;
            return self.settled;
        }
        self.settled = match exact {
            Some(true) => {
                self.stable_hits += 1;
                self.stable_hits >= SETTLE_HITS && quiet_for >= SETTLE_PERIOD
            }
            Some(false) => {
                self.stable_hits = 0;
                false
            }
            None => {
                self.stable_hits = 0;
                quiet_for >= QUIET_PERIOD
            }
        };
        self.settled
    }

    /// Observe every [`POLL`] until the ring is quiet or `limit` passed since observing started.
    /// `look` looks at the ring (`None`: nothing to observe this time). Returns whether the ring
    /// is quiet.
    pub fn wait(&mut self, limit: Duration, mut look: impl FnMut() -> Option<Look>) -> bool {
        let deadline = self.start + limit;
        precise_sleeps();
        loop {
            let quiet = look().is_some_and(|l| self.observe(l, Instant::now()));
            if quiet || Instant::now() >= deadline {
                return quiet;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the last observation found the ring quiet.
    pub fn settled(&self) -> bool {
        self.settled
    }

    /// Time since observing started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// After GET_VRING_BASE answered `base`: poll the used index (`used`; `None` counts as
/// reached) until it is `base` or `deadline` passes. On timeout, how many requests the backend
/// still holds.
pub fn wait_for_used(
    deadline: Instant,
    base: u16,
    mut used: impl FnMut() -> Option<u16>,
) -> Result<(), u16> {
    loop {
        let now = used().unwrap_or(base);
        if now == base {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(base.wrapping_sub(now));
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(avail_idx: u16, used_idx: u16, avail_event: u16) -> RingIndices {
        RingIndices {
            avail_idx,
            used_idx,
            avail_event,
        }
    }

    /// Observe `r` every 100 µs for `ms` milliseconds; the first time quiet, if ever.
    fn run(q: &mut Quiescer, r: RingIndices, t0: Instant, ms: u64) -> Option<Duration> {
        (0..ms * 10).find_map(|i| {
            let now = t0 + Duration::from_micros(100 * i);
            q.observe(Look::at(r, false), now).then(|| now - t0)
        })
    }

    #[test]
    fn plausible_avail_event_is_between_used_and_avail() {
        assert!(ring(10, 5, 5).avail_event_plausible());
        assert!(ring(10, 5, 10).avail_event_plausible());
        assert!(!ring(10, 5, 11).avail_event_plausible());
        assert!(
            !ring(10, 5, 4).avail_event_plausible(),
            "behind used: stale"
        );
        assert!(
            ring(3, 0xfffe, 1).avail_event_plausible(),
            "across the wrap"
        );
        assert!(!ring(3, 0xfffe, 0xfffd).avail_event_plausible());
    }

    #[test]
    fn everything_completed_settles_fast() {
        let t0 = Instant::now();
        let mut q = Quiescer::new(false);
        let at = run(&mut q, ring(7, 7, 0), t0, 50).unwrap();
        assert!(at >= SETTLE_PERIOD && at < QUIET_PERIOD, "{at:?}");
    }

    #[test]
    fn frozen_avail_settles_once_everything_published_is_completed() {
        let t0 = Instant::now();
        let mut q = Quiescer::with_frozen_avail(true);
        // Taken and not completed: not quiet, however long.
        assert_eq!(run(&mut q, ring(9, 7, 9), t0, 20), None);
        // Everything completed: quiet once the settle period passed since that completion,
        // on the first look after it (no run of hits).
        let t1 = t0 + Duration::from_millis(20);
        assert!(!q.observe(Look::at(ring(9, 9, 9), true), t1));
        assert!(q.observe(Look::at(ring(9, 9, 9), false), t1 + SETTLE_PERIOD));
        // Without EVENT_IDX the same, where the unfrozen ring needs the 5 ms quiet period.
        let mut q = Quiescer::with_frozen_avail(false);
        assert!(!q.observe(Look::at(ring(4, 4, 0), false), t0));
        assert!(q.observe(Look::at(ring(4, 4, 0), false), t0 + SETTLE_PERIOD));
        let mut q = Quiescer::new(false);
        assert!(!q.observe(Look::at(ring(4, 4, 0), false), t0));
        assert!(!q.observe(Look::at(ring(4, 4, 0), false), t0 + SETTLE_PERIOD));
    }

    #[test]
    fn trusted_avail_event_waits_for_taken_buffers_only() {
        let t0 = Instant::now();
        // Receive queue: 200 posted, the device took 3 and completed them.
        let mut q = Quiescer::new(true);
        let at = run(&mut q, ring(200, 3, 3), t0, 50).unwrap();
        assert!(at < QUIET_PERIOD, "{at:?}");
        // One taken and not completed: never quiet, however long.
        let mut q = Quiescer::new(true);
        assert_eq!(run(&mut q, ring(200, 3, 4), t0, 50), None);
    }

    #[test]
    fn avail_event_reaches_a_floor_across_the_wrap() {
        assert!(ring(20, 5, 12).avail_event_reached(12));
        assert!(!ring(20, 5, 11).avail_event_reached(12));
        assert!(ring(20, 14, 14).avail_event_reached(12), "used passed it");
        assert!(ring(4, 0xfff0, 2).avail_event_reached(0xffff));
        assert!(!ring(4, 0xfff0, 0xfffe).avail_event_reached(0xffff));
    }

    #[test]
    fn unread_drain_kick_trusts_nothing_in_memory() {
        let t0 = Instant::now();
        let pending = |r| Look {
            ring: r,
            signalled: false,
            scan_pending: true,
        };
        // Everything published completed and avail_event at used: still not quiet before the
        // quiet period while the device has not read its kick (its scan may take more).
        for r in [ring(30, 30, 30), ring(30, 20, 20)] {
            let mut q = Quiescer::after_drain_kick(true, 25);
            for i in 0..4 {
                assert!(!q.observe(pending(r), t0 + SETTLE_PERIOD * i));
            }
            // A device that never reads it (one that polls) is judged by the quiet period.
            assert!(q.observe(pending(r), t0 + QUIET_PERIOD));
        }
    }

    #[test]
    fn read_drain_kick_trusts_avail_event_once_it_reached_the_floor() {
        let t0 = Instant::now();
        // Kick read, but avail_event (20) is from before what was published at the kick (25):
        // the scan is under way (or the device never writes avail_event): the quiet period.
        let mut q = Quiescer::after_drain_kick(true, 25);
        let at = run(&mut q, ring(40, 20, 20), t0, 50).unwrap();
        assert!(at >= QUIET_PERIOD, "{at:?}");
        // The scan took up to 27 and everything taken is completed: quiet after the settle.
        let mut q = Quiescer::after_drain_kick(true, 25);
        let at = run(&mut q, ring(40, 27, 27), t0, 50).unwrap();
        assert!(at >= SETTLE_PERIOD && at < QUIET_PERIOD, "{at:?}");
        // The floor rises with every look that finds the kick unread: published 30 by then,
        // a scan that ended at 27 is an old one.
        let mut q = Quiescer::after_drain_kick(true, 25);
        let pending = Look {
            ring: ring(30, 27, 27),
            signalled: false,
            scan_pending: true,
        };
        assert!(!q.observe(pending, t0));
        let at = run(&mut q, ring(40, 27, 27), t0, 50).unwrap();
        assert!(at >= QUIET_PERIOD, "{at:?}");
        let mut q = Quiescer::after_drain_kick(true, 25);
        assert!(!q.observe(pending, t0));
        assert!(run(&mut q, ring(40, 30, 30), t0, 50).unwrap() < QUIET_PERIOD);
        // Everything published completed: the floor does not matter.
        let mut q = Quiescer::after_drain_kick(true, 25);
        assert!(run(&mut q, ring(30, 30, 3), t0, 50).unwrap() < QUIET_PERIOD);
    }

    #[test]
    fn stale_avail_event_falls_back_to_the_quiet_period() {
        let t0 = Instant::now();
        // A polling backend (DPDK) never writes avail_event: 0 behind a used idx of 1000.
        let mut q = Quiescer::new(true);
        let at = run(&mut q, ring(1200, 1000, 0), t0, 50).unwrap();
        assert!(at >= QUIET_PERIOD, "{at:?}");
        // Without EVENT_IDX, the same.
        let mut q = Quiescer::new(false);
        let at = run(&mut q, ring(1200, 1000, 1100), t0, 50).unwrap();
        assert!(at >= QUIET_PERIOD, "{at:?}");
    }

    #[test]
    fn completions_restart_the_quiet_period() {
        let t0 = Instant::now();
        let mut q = Quiescer::new(false);
        let r = ring(100, 10, 0);
        for i in 0..40u64 {
            let now = t0 + Duration::from_micros(250 * i);
            // A completion signalled every 1 ms.
            assert!(!q.observe(Look::at(r, i % 4 == 0), now));
        }
        let later = t0 + Duration::from_millis(10) + QUIET_PERIOD;
        assert!(q.observe(Look::at(r, false), later));
        assert!(q.settled());
    }
}
