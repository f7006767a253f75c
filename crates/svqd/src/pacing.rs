//! When a shadow worker sleeps and when it keeps the CPU: judged from whether the CPU is wanted
//! by anyone else.
//!
//! Two layouts want opposite things. Where busy-polling peers (DPDK lcores) own every CPU, each
//! wake of the worker must preempt one of them, so a wake should move as much as possible: sleep
//! the batch wait with notifications off between work phases, never poll. Where the worker has a
//! CPU to itself, a sleep only adds latency to every turnaround of a latency-bound loop: keep
//! working while traffic flows and poll a little after it stops.
//!
//! The pacer tells them apart from the thread's own experience, once per [`WINDOW`] while traffic
//! flows: it was preempted (involuntary context switches: someone else wanted this CPU), or a
//! probe sleep of the batch wait came back late (the CPU was busy when the timer fired). Either
//! makes it *contended* until a later window finds neither. It starts contended, the safe side.

use std::time::{Duration, Instant};

/// How often the pacer re-judges the CPU while traffic flows.
pub const WINDOW: Duration = Duration::from_millis(10);

/// A probe sleep this much later than asked means the CPU was busy when the timer fired.
const LATE_LIMIT: Duration = Duration::from_micros(50);

/// The worker's pacing between and after work phases.
#[derive(Debug)]
pub struct Pacer {
    batch_wait: Duration,
    poll: Duration,
    contended: bool,
    window_start: Instant,
    switches_at_start: u64,
}

/// Involuntary context switches of the calling thread so far.
fn involuntary_switches() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given; RUSAGE_THREAD is the calling thread.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    ru.ru_nivcsw as u64
}

impl Pacer {
    /// A pacer for the configured batch wait (`--batch-wait-us`) and poll budget (`--poll-us`).
    /// Call from the worker thread.
    pub fn new(batch_wait: Duration, poll: Duration) -> Self {
        Pacer {
            batch_wait,
            poll,
            contended: true,
            window_start: Instant::now(),
            switches_at_start: involuntary_switches(),
        }
    }

    /// Whether traffic may be worked on in back-to-back phases with notifications off.
    pub fn defers(&self) -> bool {
        !self.batch_wait.is_zero()
    }

    /// The CPU was found wanted by others in the last window.
    pub fn contended(&self) -> bool {
        self.contended
    }

    /// How long to poll after the last work before re-arming notifications: the configured
    /// budget while the CPU is the worker's own, none while others want it.
    pub fn poll_budget(&self) -> Duration {
        if self.contended {
            Duration::ZERO
        } else {
            self.poll
        }
    }

    /// Between two work phases of flowing traffic: sleep the batch wait (contended CPU), or go
    /// straight on (own CPU). Once per window the CPU is judged again, with a probe sleep.
    /// Returns whether the thread slept.
    pub fn between_phases(&mut self) -> bool {
        let now = Instant::now();
        let window_over = now.duration_since(self.window_start) >= WINDOW;
        if !self.contended && !window_over {
            return false;
        }
        std::thread::sleep(self.batch_wait);
        if window_over {
            let late = now.elapsed().saturating_sub(self.batch_wait);
            let switches = involuntary_switches();
            self.judge(switches.wrapping_sub(self.switches_at_start), late);
            self.switches_at_start = switches;
            self.window_start = Instant::now();
        }
        true
    }

    fn judge(&mut self, preempted: u64, late: Duration) {
        let contended = preempted > 0 || late > LATE_LIMIT;
        if contended != self.contended {
            tracing::debug!(
                contended,
                preempted,
                late_us = late.as_micros() as u64,
                "worker pacing"
            );
        }
        self.contended = contended;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_contended_and_follows_the_evidence() {
        let mut p = Pacer::new(Duration::from_micros(25), Duration::from_micros(50));
        assert!(p.contended());
        assert_eq!(p.poll_budget(), Duration::ZERO);
        p.judge(0, Duration::from_micros(5));
        assert!(!p.contended());
        assert_eq!(p.poll_budget(), Duration::from_micros(50));
        p.judge(1, Duration::ZERO);
        assert!(p.contended(), "preempted");
        p.judge(0, Duration::from_micros(10));
        p.judge(0, Duration::from_millis(2));
        assert!(p.contended(), "a late probe");
    }

    #[test]
    fn an_own_cpu_goes_straight_on_between_phases_within_a_window() {
        let mut p = Pacer::new(Duration::from_micros(25), Duration::ZERO);
        p.judge(0, Duration::ZERO);
        assert!(!p.between_phases(), "no sleep inside the window");
        p.contended = true;
        assert!(p.between_phases(), "a contended CPU sleeps the batch wait");
    }
}
