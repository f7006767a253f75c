//! The wake-cost probe measures what it claims and leaves nothing behind: its busy loop and
//! its echoing peer end with it.

use std::process::Command;
use std::time::Duration;

const PROBE: &str = env!("CARGO_BIN_EXE_wake-cost");

/// Processes still running the probe in one of its peer modes.
fn probe_peers_left() -> Vec<String> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("wake-cost"))
            && args.iter().any(|a| a == "--x-spin" || a == "--x-echo")
        {
            left.push(args.join(" "));
        }
    }
    left
}

#[test]
fn the_probe_reports_every_cost_and_its_peers_end_with_it() {
    let out = Command::new(PROBE)
        .args([
            "--json",
            "--round-trips",
            "300",
            "--sleeps",
            "300",
            "--sleep-us",
            "21",
        ])
        .output()
        .expect("run wake-cost");
    assert!(
        out.status.success(),
        "wake-cost failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let v: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a line")).expect("one JSON line");
    let us = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"))
    };
    let same = us("hop_same_cpu_us");
    assert!(same > 0.0 && same < 10_000.0, "hop on one CPU: {same} µs");
    if v["cpus"][1].is_null() {
        assert!(
            v["hop_cross_cpu_us"].is_null(),
            "one CPU, yet a cross-CPU hop: {v}"
        );
    } else {
        let across = us("hop_cross_cpu_us");
        assert!(
            across > 0.0 && across < 10_000.0,
            "hop across CPUs: {across} µs"
        );
    }
    // A sleep never ends early, so each measured period is at least the sleep asked for.
    assert_eq!(v["sleep_us"], 21);
    for (period, cpu) in [
        ("timer_wake_idle_cpu_us", "timer_sleep_thread_cpu_idle_us"),
        ("timer_wake_busy_cpu_us", "timer_sleep_thread_cpu_busy_us"),
    ] {
        let t = us(period);
        assert!((21.0..100_000.0).contains(&t), "{period}: {t} µs");
        // The sleeper's own CPU fits in the period it measured (one thread).
        let c = us(cpu);
        assert!(c > 0.0 && c <= t, "{cpu}: {c} µs of a {t} µs period");
    }
    // The busy loop must not outlive the probe: it would take a CPU from every later test.
    let mut left = probe_peers_left();
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        left = probe_peers_left();
    }
    assert!(left.is_empty(), "peers left running: {left:?}");
}

#[test]
fn the_probe_refuses_a_cpu_it_cannot_run_on() {
    let out = Command::new(PROBE)
        .args([
            "--cpus",
            "100000,0",
            "--round-trips",
            "10",
            "--sleeps",
            "10",
        ])
        .output()
        .expect("run wake-cost");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CPU 100000"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
