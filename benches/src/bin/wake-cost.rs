//! wake-cost: what waking a sleeping process costs on this machine, the quantity that bounds
//! svqd's shadow mode wherever its peers are not polling it. `scripts/bench/run.py` runs it once
//! per run and prints the costs next to the measured ratios (docs/PERFORMANCE.md, tables 35–37,
//! turns them into bounds).
//!
//! A shadowed ring puts svqd between the guest and the device, so every request that finds svqd
//! asleep pays two more wake-ups (the kick to svqd, the call from it); and a worker that shares
//! busy CPUs moves at most one batch per timer wake. Neither cost is svqd's code: this measures
//! them with nothing but eventfds, epoll and a sleep, the calls svqd's worker makes:
//! - a hop between two processes (eventfd write → the other's `epoll_wait` returns), both on one
//!   CPU and on two CPUs (idle apart from the probe);
//! - a timer sleep of `--sleep-us` (svqd's batch wait) on a CPU that a busy loop in a session
//!   of its own (its own scheduling autogroup, like a DPDK lcore) keeps busy, and on an idle one:
//!   how long it lasts and how much of the sleeping thread's CPU it takes.
//!
//! The peers are this binary re-run with a hidden `--x-*` mode, so each hop switches address
//! spaces as it does between a VMM, svqd and a backend.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Measure the cost of a wake-up on this machine (eventfd hops, timer sleeps next to a busy loop).
#[derive(Debug, Parser)]
#[command(name = "wake-cost")]
struct Args {
    /// Round trips per hop measurement.
    #[arg(long, default_value_t = 20_000)]
    round_trips: u32,
    /// The timer sleep measured, in microseconds (svqd's default batch wait).
    #[arg(long, default_value_t = 21)]
    sleep_us: u64,
    /// Timer sleeps per measurement.
    #[arg(long, default_value_t = 20_000)]
    sleeps: u32,
    /// The CPUs to use, one or two, comma-separated (default: the first two this process may
    /// run on; with one, no hop across CPUs is measured).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Internal: be the echoing peer: `KICK_FD CALL_FD CPU ROUND_TRIPS`.
    #[arg(long, num_args = 4, hide = true)]
    x_echo: Vec<u64>,
    /// Internal: busy-loop on this CPU in a session of its own.
    #[arg(long, hide = true)]
    x_spin: Option<usize>,
}

/// Hops before a measurement starts (the peer is starting, caches and the scheduler settle).
const WARMUP_ROUND_TRIPS: u32 = 1_000;

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if let Some(cpu) = args.x_spin {
        spin(cpu)
    } else if let [kick, call, cpu, n] = args.x_echo[..] {
        echo(kick as RawFd, call as RawFd, cpu as usize, n as u32)
    } else {
        measure(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wake-cost: {e}");
            ExitCode::from(2)
        }
    }
}

fn pin(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("CPU {cpu} is out of range"));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET gets a CPU below CPU_SETSIZE
    // (checked above); pid 0 is the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("pinning to CPU {cpu}: {e}"));
    }
    Ok(())
}

/// The CPUs this process may run on, from `Cpus_allowed_list` in `/proc/self/status` ("0-3,6").
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
    else {
        return Vec::new();
    };
    let mut cpus = Vec::new();
    for range in list.trim().split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        if let (Ok(lo), Ok(hi)) = (lo.parse::<usize>(), hi.parse::<usize>()) {
            cpus.extend(lo..=hi);
        }
    }
    cpus
}

/// An eventfd without close-on-exec, so that the peer inherits it.
fn inheritable_eventfd() -> Result<EventFd, String> {
    EventFd::new(0).map_err(|e| format!("eventfd: {e}"))
}

/// An epoll set watching `fd` for input.
fn watch(fd: &EventFd) -> Result<Epoll, String> {
    let epoll = Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?;
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .map_err(|e| format!("epoll_ctl: {e}"))?;
    Ok(epoll)
}

/// Sleep in `epoll_wait` until `fd` is signalled, then consume the signal (what svqd's worker
/// does on a kick).
fn wait_and_read(epoll: &Epoll, fd: &EventFd) -> Result<(), String> {
    let mut events = [EpollEvent::default()];
    loop {
        match epoll.wait(10_000, &mut events) {
            Ok(1) => break,
            Ok(_) => return Err("the peer stopped answering".into()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("epoll_wait: {e}")),
        }
    }
    fd.read()
        .map(drop)
        .map_err(|e| format!("eventfd read: {e}"))
}

fn signal(fd: &EventFd) -> Result<(), String> {
    fd.write(1).map_err(|e| format!("eventfd write: {e}"))
}

/// The echoing peer: wait for a kick, answer with a call, `n` times.
fn echo(kick: RawFd, call: RawFd, cpu: usize, n: u32) -> Result<(), String> {
    // SAFETY: both are eventfds the parent created without close-on-exec for this process,
    // which owns its copies and uses nothing else under these numbers.
    let (kick, call) = unsafe { (EventFd::from_raw_fd(kick), EventFd::from_raw_fd(call)) };
    pin(cpu)?;
    let epoll = watch(&kick)?;
    for _ in 0..n {
        wait_and_read(&epoll, &kick)?;
        signal(&call)?;
    }
    Ok(())
}

/// The busy peer: a loop that never sleeps, in its own session (autogroup), like an lcore.
fn spin(cpu: usize) -> Result<(), String> {
    // SAFETY: setsid takes no arguments; it fails only for a process group leader, which a
    // spawned child is not. PR_SET_PDEATHSIG takes a signal number: a probe killed midway
    // takes its busy loop with it.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    }
    pin(cpu)?;
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Kills and reaps the child when dropped, whatever the measurement's outcome.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[String]) -> Result<Peer, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    Command::new(exe)
        .args(args)
        .spawn()
        .map(Peer)
        .map_err(|e| format!("starting a peer: {e}"))
}

/// Microseconds per hop (half a round trip) between this process on `here` and a peer on
/// `there`.
fn hop_us(here: usize, there: usize, round_trips: u32) -> Result<f64, String> {
    pin(here)?;
    let kick = inheritable_eventfd()?;
    let call = inheritable_eventfd()?;
    let call_epoll = watch(&call)?;
    let total = WARMUP_ROUND_TRIPS + round_trips;
    let _peer = spawn(&[
        "--x-echo".into(),
        kick.as_raw_fd().to_string(),
        call.as_raw_fd().to_string(),
        there.to_string(),
        total.to_string(),
    ])?;
    let mut start = Instant::now();
    for i in 0..total {
        if i == WARMUP_ROUND_TRIPS {
            start = Instant::now();
        }
        signal(&kick)?;
        wait_and_read(&call_epoll, &call)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(round_trips) / 2.0)
}

/// A timer sleep as measured: mean microseconds from asking for the sleep to running again, and
/// the sleeping thread's own CPU microseconds per sleep (the timer, the switches in and out).
struct TimerWake {
    period_us: f64,
    cpu_us: f64,
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; the thread CPU clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `n` sleeps of `sleep` on `cpu`, with a busy loop on that CPU or not.
fn timer_wake(cpu: usize, sleep: Duration, n: u32, busy: bool) -> Result<TimerWake, String> {
    pin(cpu)?;
    // svqd's worker sleeps with 1 ns of timer slack (the default 50 µs would dwarf the sleep).
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let _spinner = if busy {
        let p = spawn(&["--x-spin".into(), cpu.to_string()])?;
        // Let it start and take its CPU.
        std::thread::sleep(Duration::from_millis(200));
        Some(p)
    } else {
        None
    };
    let (start, cpu0) = (Instant::now(), thread_cpu());
    for _ in 0..n {
        std::thread::sleep(sleep);
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    Ok(TimerWake {
        period_us: per(start.elapsed()),
        cpu_us: per(thread_cpu().saturating_sub(cpu0)),
    })
}

fn measure(a: &Args) -> Result<(), String> {
    if a.cpus.len() > 2 {
        return Err(format!(
            "--cpus takes one or two CPUs, not {}",
            a.cpus.len()
        ));
    }
    let cpus = if a.cpus.is_empty() {
        allowed_cpus()
    } else {
        a.cpus.clone()
    };
    let Some(&first) = cpus.first() else {
        return Err("no CPU to run on".into());
    };
    let second = cpus.get(1).copied();
    let sleep = Duration::from_micros(a.sleep_us);
    let same = hop_us(first, first, a.round_trips)?;
    let across = second
        .map(|s| hop_us(first, s, a.round_trips))
        .transpose()?;
    let idle = timer_wake(first, sleep, a.sleeps, false)?;
    let busy = timer_wake(first, sleep, a.sleeps, true)?;
    if a.json {
        println!(
            "{}",
            json!({
                "cpus": [first, second],
                "hop_same_cpu_us": same,
                "hop_cross_cpu_us": across,
                "sleep_us": a.sleep_us,
                "timer_wake_idle_cpu_us": idle.period_us,
                "timer_wake_busy_cpu_us": busy.period_us,
                "timer_sleep_thread_cpu_idle_us": idle.cpu_us,
                "timer_sleep_thread_cpu_busy_us": busy.cpu_us,
            })
        );
    } else {
        println!("eventfd hop between two processes, one CPU ({first}): {same:.1} µs");
        match (second, across) {
            (Some(s), Some(x)) => {
                println!("eventfd hop between two processes, CPUs {first} and {s}: {x:.1} µs")
            }
            _ => println!("eventfd hop across CPUs: only one CPU to run on"),
        }
        println!(
            "a {} µs timer sleep on CPU {first}: ends after {:.1} µs idle, {:.1} µs next to a busy \
             loop; costs the sleeper {:.1} / {:.1} µs of CPU",
            a.sleep_us, idle.period_us, busy.period_us, idle.cpu_us, busy.cpu_us
        );
    }
    Ok(())
}
