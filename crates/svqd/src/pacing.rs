//! When a shadow worker sleeps and when it keeps the CPU: judged from whether the CPU is wanted
//! by anyone else.
//!
//! Two layouts want opposite things. Where busy-polling peers (DPDK lcores) own every CPU, each
//! wake of the worker must preempt one of them, so a wake should move as much as possible: sleep
//! the batch wait with notifications off between work phases, never poll. Where the worker has a
//! CPU to itself, a sleep only adds latency to every turnaround of a latency-bound loop: keep
//! working while traffic flows and poll a little after it stops.
//!
//! The pacer starts *contended* (the safe side) and judges again while traffic flows:
//! - contended → own CPU: the CPUs the worker may run on were idle for at least [`IDLE_SHARE`] of
//!   a [`SLEEPING_WINDOW`] (`/proc/stat`; nobody used the time the worker slept);
//! - own CPU → contended, every [`SPINNING_WINDOW`]: the worker waited to run
//!   (`/proc/thread-self/schedstat`) for more than [`WAIT_SHARE`] of the window (without
//!   schedstat: it was preempted at all, `getrusage` involuntary context switches): someone
//!   else wants this CPU. A finding soon after the last one doubles how long the next contended
//!   spell lasts at least (up to [`MAX_BACKOFF`]), so a CPU that is shared after all is not
//!   taken back again and again; one after the CPU was kept for [`MAX_BACKOFF`] starts over.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How long the worker sleeps between phases before the idle time of its CPUs is judged
/// (`/proc/stat` counts in 10 ms ticks: ten per CPU).
pub const SLEEPING_WINDOW: Duration = Duration::from_millis(100);

/// How often a worker that keeps its CPU checks whether it was wanted by someone else. Long
/// enough that periodic kernel housekeeping on its CPU stays a small share of a window (DAMON's
/// `kdamond` runs 1.4–4 ms every ~0.5 s on this host's 6.18 kernel: in 10 ms windows it read as
/// a competitor twice a second and kept the dedicated layout contended most of the time).
pub const SPINNING_WINDOW: Duration = Duration::from_millis(50);

/// Idle share of the worker's CPUs, while it sleeps between phases, that means they are its own.
const IDLE_SHARE: f64 = 0.2;

/// Share of a window spent waiting to run that means the CPU is shared: a busy peer on the same
/// CPU makes the worker wait about half of the time, housekeeping a few percent.
const WAIT_SHARE: f64 = 0.2;

/// Longest contended spell a repeated finding leads to.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The worker's pacing between and after work phases.
#[derive(Debug)]
pub struct Pacer {
    batch_wait: Duration,
    poll: Duration,
    contended: bool,
    cpus: Vec<usize>,
    window_start: Instant,
    idle_at_start: Option<u64>,
    switches_at_start: u64,
    waited_at_start: Option<u64>,
    /// `/proc/thread-self/schedstat` of the worker thread (absent without CONFIG_SCHED_INFO).
    schedstat: Option<File>,
    /// The least a contended spell lasts now.
    backoff: Duration,
    /// When the worker last took the CPU as its own.
    kept_since: Instant,
}

/// Involuntary context switches of the calling thread so far.
fn involuntary_switches() -> u64 {
    // SAFETY: a zeroed rusage is a valid value for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_THREAD is the calling thread.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    ru.ru_nivcsw as u64
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set for sched_getaffinity to fill; pid 0 is
    // the calling thread.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        set
    };
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Idle + iowait ticks of `cpus`, summed, from `/proc/stat`.
fn idle_ticks(cpus: &[usize]) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut total = 0;
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut f = rest.split_ascii_whitespace();
        let Some(cpu) = f.next().and_then(|n| n.parse::<usize>().ok()) else {
            continue; // the "cpu" total line
        };
        if !cpus.contains(&cpu) {
            continue;
        }
        let v: Vec<u64> = f.take(5).filter_map(|x| x.parse().ok()).collect();
        total += v.get(3)? + v.get(4).copied().unwrap_or(0);
    }
    Some(total)
}

/// Nanoseconds the thread behind `f` (a schedstat file) waited on a run queue.
fn waited_ns(f: &File) -> Option<u64> {
    let mut buf = [0u8; 128];
    let n = f.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    text.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Whether a spinning worker's CPU is wanted by others, from the time it waited on the run queue
/// within `elapsed` (None: unknown) and how often it was preempted.
fn cpu_wanted(waited: Option<Duration>, preempted: u64, elapsed: Duration) -> bool {
    match waited {
        // A preemption alone is no evidence where the run-queue wait is known: a short-lived
        // thread (svqd's own control thread answering query-stats, a kworker) preempts a
        // spinning worker now and then on a CPU that is otherwise its own.
        Some(w) => w.as_secs_f64() > WAIT_SHARE * elapsed.as_secs_f64(),
        None => preempted > 0,
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

impl Pacer {
    /// A pacer for the configured batch wait (`--batch-wait-us`) and poll budget (`--poll-us`).
    /// Call from the worker thread, after pinning it.
    pub fn new(batch_wait: Duration, poll: Duration) -> Self {
        let cpus = allowed_cpus();
        let schedstat = File::open("/proc/thread-self/schedstat").ok();
        Pacer {
            batch_wait,
            poll,
            contended: true,
            idle_at_start: idle_ticks(&cpus),
            cpus,
            window_start: Instant::now(),
            switches_at_start: involuntary_switches(),
            waited_at_start: schedstat.as_ref().and_then(waited_ns),
            schedstat,
            backoff: SLEEPING_WINDOW,
            kept_since: Instant::now(),
        }
    }

    /// Whether traffic may be worked on in back-to-back phases with notifications off.
    pub fn defers(&self) -> bool {
        !self.batch_wait.is_zero()
    }

    /// The CPU was last found wanted by others.
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
    /// straight on (own CPU), judging the CPU again when a window is over. Returns whether the
    /// thread slept.
    pub fn between_phases(&mut self) -> bool {
        let elapsed = self.window_start.elapsed();
        if self.contended {
            std::thread::sleep(self.batch_wait);
            if elapsed >= self.backoff {
                self.judge_sleeping(elapsed);
            }
            true
        } else {
            if elapsed >= SPINNING_WINDOW {
                self.judge_spinning(elapsed);
            }
            false
        }
    }

    fn start_window(&mut self) {
        self.window_start = Instant::now();
        self.idle_at_start = idle_ticks(&self.cpus);
        self.switches_at_start = involuntary_switches();
        self.waited_at_start = self.schedstat.as_ref().and_then(waited_ns);
    }

    /// Contended so far: were the worker's CPUs idle while it slept?
    fn judge_sleeping(&mut self, elapsed: Duration) {
        let idle = match (self.idle_at_start, idle_ticks(&self.cpus)) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / ticks_per_second(),
            _ => 0.0,
        };
        let capacity = elapsed.as_secs_f64() * self.cpus.len().max(1) as f64;
        if idle >= IDLE_SHARE * capacity {
            self.set_contended(false, "idle CPU time while sleeping");
        }
        self.start_window();
    }

    /// Keeping the CPU so far: was the worker preempted, or did it wait to run?
    fn judge_spinning(&mut self, elapsed: Duration) {
        let preempted = involuntary_switches().wrapping_sub(self.switches_at_start);
        let waited = match (
            self.waited_at_start,
            self.schedstat.as_ref().and_then(waited_ns),
        ) {
            (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
            _ => Duration::ZERO,
        };
        let wanted = cpu_wanted(self.waited_at_start.map(|_| waited), preempted, elapsed);
        if wanted {
            if self.kept_since.elapsed() >= MAX_BACKOFF {
                self.backoff = SLEEPING_WINDOW;
            }
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            self.set_contended(true, "preempted or waited to run");
        }
        self.start_window();
    }

    fn set_contended(&mut self, contended: bool, why: &'static str) {
        if contended != self.contended {
            if !contended {
                self.kept_since = Instant::now();
            }
            tracing::debug!(
                contended,
                why,
                backoff_ms = self.backoff.as_millis() as u64,
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
    fn the_machine_answers_what_the_pacer_reads() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        assert!(idle_ticks(&cpus).is_some(), "/proc/stat");
        let p = Pacer::new(Duration::from_micros(25), Duration::from_micros(50));
        assert!(p.contended(), "starts on the safe side");
        assert_eq!(p.poll_budget(), Duration::ZERO);
    }

    #[test]
    fn a_spinning_worker_that_had_to_wait_backs_off_longer_each_time() {
        let mut p = Pacer::new(Duration::from_micros(25), Duration::from_micros(50));
        p.contended = false;
        assert_eq!(p.poll_budget(), Duration::from_micros(50));
        // Without schedstat, pretend the thread was preempted once in the window; with it,
        // count the window's wait from zero, so all the thread ever waited falls in a 1 ns
        // window.
        let wanted = |p: &mut Pacer| {
            p.contended = false;
            p.switches_at_start = involuntary_switches().wrapping_sub(1);
            p.waited_at_start = p.waited_at_start.map(|_| 0);
            p.judge_spinning(Duration::from_nanos(1));
        };
        let waited = p.schedstat.as_ref().and_then(waited_ns);
        if waited == Some(0) {
            return; // a thread that never waited to run cannot pretend it did
        }
        wanted(&mut p);
        assert!(p.contended());
        assert_eq!(p.backoff, SLEEPING_WINDOW * 2);
        wanted(&mut p);
        assert!(p.contended());
        assert_eq!(p.backoff, SLEEPING_WINDOW * 4);
        // Kept for a long time since: a new finding is a new competitor, not the old one back.
        p.backoff = MAX_BACKOFF;
        p.kept_since = Instant::now() - MAX_BACKOFF;
        wanted(&mut p);
        assert!(p.contended());
        assert_eq!(p.backoff, SLEEPING_WINDOW * 2);
    }

    #[test]
    fn only_waiting_to_run_means_the_cpu_is_wanted_where_it_is_known() {
        let ms = Duration::from_millis;
        assert!(
            !cpu_wanted(Some(ms(0)), 3, ms(10)),
            "preempted, never waited"
        );
        assert!(
            !cpu_wanted(Some(ms(4)), 1, SPINNING_WINDOW),
            "kdamond's longest run in a window"
        );
        assert!(
            cpu_wanted(Some(ms(25)), 0, SPINNING_WINDOW),
            "a busy peer's half"
        );
        assert!(
            cpu_wanted(None, 1, ms(10)),
            "no schedstat: a preemption is all there is"
        );
        assert!(!cpu_wanted(None, 0, ms(10)));
    }

    #[test]
    fn a_sleeping_worker_on_an_idle_cpu_keeps_it() {
        let mut p = Pacer::new(Duration::from_micros(25), Duration::ZERO);
        // A window whose CPUs were idle throughout: the idle counter moved by the whole window.
        let elapsed = Duration::from_millis(200);
        let ticks = (elapsed.as_secs_f64() * ticks_per_second()) as u64 * p.cpus.len() as u64;
        p.idle_at_start = idle_ticks(&p.cpus).map(|t| t.saturating_sub(ticks));
        p.judge_sleeping(elapsed);
        assert!(!p.contended());
        assert!(!p.between_phases(), "an own CPU: no sleep between phases");
    }
}
