//! `svqctl`: drives svqd's control socket, for people (tables) and scripts (`--json`).
//!
//! ```text
//! svqctl -c /run/svqd/vm0-disk0.ctl status          # mode per queue, features, logging
//! svqctl -c /run/svqd/vm0-disk0.ctl stats           # counters per queue
//! svqctl -c /run/svqd/vm0-disk0.ctl set-shadow on   # with a progress line
//! svqctl -c /run/svqd/vm0-disk0.ctl watch           # both, refreshed every second
//! svqctl -c /run/svqd/vm0-disk0.ctl metrics         # Prometheus text (textfile collector)
//! svqctl -c /run/svqd/vm0-disk0.ctl --json status   # the control API's JSON
//! ```

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use svqd::cli::{Command, OnOff, SvqctlCli as Cli};
use svqd::control::ControlClient;
use svqd::{StatsReport, StatusReport};

/// A failed command: the message, and the exit code.
struct Failure(String, u8);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            eprintln!("svqctl: {msg}");
            ExitCode::from(code)
        }
    }
}

/// A connection to svqd, with the reasons it may not be there spelt out.
fn connect(path: &Path) -> Result<ControlClient, Failure> {
    ControlClient::connect(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "svqd is not running: no control socket at {} (svqd --control PATH)",
                path.display()
            ),
            std::io::ErrorKind::ConnectionRefused => format!(
                "svqd is not running: nobody listens on {} (a stale socket)",
                path.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "no permission to use {} (it is svqd's user's, mode 0600)",
                path.display()
            ),
            _ => format!("{}: {e}", path.display()),
        };
        Failure(why, 1)
    })
}

/// Run `name` and return its `return` value, or the error svqd gave.
fn call(c: &mut ControlClient, name: &str, arguments: Option<Value>) -> Result<Value, Failure> {
    let reply = c
        .execute(name, arguments)
        .map_err(|e| Failure(format!("{name}: {e}"), 1))?;
    if let Some(error) = reply.get("error") {
        return Err(Failure(
            format!(
                "{}: {}",
                error["class"].as_str().unwrap_or("Error"),
                error["desc"].as_str().unwrap_or("")
            ),
            1,
        ));
    }
    Ok(reply.get("return").cloned().unwrap_or(Value::Null))
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Failure> {
    serde_json::from_value(v).map_err(|e| Failure(format!("unexpected answer from svqd: {e}"), 1))
}

fn status(c: &mut ControlClient) -> Result<(Value, StatusReport), Failure> {
    let v = call(c, "query-status", None)?;
    Ok((v.clone(), typed(v)?))
}

fn stats(c: &mut ControlClient) -> Result<(Value, StatsReport), Failure> {
    let v = call(c, "query-stats", None)?;
    Ok((v.clone(), typed(v)?))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let mut c = connect(&cli.control)?;
    match &cli.command {
        Command::Status => {
            let (v, s) = status(&mut c)?;
            if cli.json {
                print_json(&v);
            } else {
                print!("{}", status_table(&s));
            }
        }
        Command::Stats => {
            let (v, s) = stats(&mut c)?;
            if cli.json {
                print_json(&v);
            } else {
                print!("{}", stats_table(&s));
            }
        }
        Command::SetShadow { state } => {
            let on = matches!(state, OnOff::On);
            set_shadow(&cli.control, &mut c, on, cli.json)?;
        }
        Command::Watch { count } => {
            let clear = std::io::stdout().is_terminal();
            let mut n = 0;
            loop {
                let (sv, st) = status(&mut c)?;
                let (tv, ts) = stats(&mut c)?;
                if clear {
                    print!("\x1b[H\x1b[2J");
                }
                if cli.json {
                    println!("{}", json!({ "status": sv, "stats": tv }));
                } else {
                    print!("{}\n{}", status_table(&st), stats_table(&ts));
                }
                let _ = std::io::stdout().flush();
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Command::Metrics => {
            let (_, st) = status(&mut c)?;
            let (_, ts) = stats(&mut c)?;
            print!(
                "{}",
                svqd::metrics::to_classic_text(&svqd::metrics::render(&st, &ts))
            );
        }
        Command::Execute { name, arguments } => {
            let arguments = arguments
                .as_deref()
                .map(serde_json::from_str::<Value>)
                .transpose()
                .map_err(|e| Failure(format!("arguments are not JSON: {e}"), 2))?;
            print_json(&call(&mut c, name, arguments)?);
        }
    }
    Ok(())
}

/// `set-shadow` blocks until every queue switched; meanwhile a progress line (on a terminal)
/// shows how long it has been waiting, then a summary of the switch per queue.
fn set_shadow(path: &Path, c: &mut ControlClient, on: bool, json: bool) -> Result<(), Failure> {
    let t0 = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = (!json && std::io::stderr().is_terminal()).then(|| {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                eprint!(
                    "\rswitching to {}: {:.1} s",
                    if on { "shadow mode" } else { "automatic mode" },
                    t0.elapsed().as_secs_f64()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            eprint!("\r\x1b[K");
        })
    });
    let res = call(c, "set-shadow", Some(json!({ "enable": on })));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(p) = progress {
        let _ = p.join();
    }
    res?;
    let took = t0.elapsed();
    if json {
        println!("{}", json!({ "enable": on, "seconds": took.as_secs_f64() }));
        return Ok(());
    }
    let mut c2 = connect(path)?;
    let (_, st) = stats(&mut c2)?;
    let shadowed = st.queues.iter().filter(|q| q.mode == "shadow").count();
    println!(
        "set-shadow {}: {shadowed} of {} queues in shadow mode ({:.1} ms)",
        if on { "on" } else { "off" },
        st.queues.len(),
        took.as_secs_f64() * 1e3
    );
    for q in &st.queues {
        let us = if on {
            q.counters.last_switch_to_shadow_us
        } else {
            q.counters.last_switch_to_passthrough_us
        };
        println!(
            "  queue {:>3}: {:<11} last switch {:.3} ms",
            q.index,
            q.mode,
            us as f64 / 1e3
        );
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `status` for people.
fn status_table(s: &StatusReport) -> String {
    let mut o = String::new();
    let shadowed = s.queues.iter().filter(|q| q.mode == "shadow").count();
    o += &format!("device    {}\n", s.socket);
    o += &format!(
        "backend   {} ({})\n",
        s.backend,
        if s.backend_connected {
            "connected"
        } else {
            "not connected"
        }
    );
    o += &format!(
        "vmm       {}    policy {}{}\n",
        if s.vmm_connected {
            "connected"
        } else {
            "not connected"
        },
        s.policy,
        if s.forced {
            " (shadow forced by svqctl)"
        } else {
            ""
        }
    );
    o += &format!(
        "logging   {} (VMM LOG_ALL {}), log {}\n",
        yes(s.logging),
        yes(s.log_all),
        s.log_bytes.map_or("none".into(), |b| format!("{b} bytes"))
    );
    o += &format!(
        "features  backend {} offered {} acked {}\n",
        s.features.backend, s.features.offered, s.features.acked
    );
    if let Some(b) = &s.busy {
        o += &format!("busy      {b}\n");
    }
    o += &format!("queues    {} ({shadowed} shadowed)\n", s.queues.len());
    o += "  QUEUE  MODE         STARTED  ENABLED  SIZE   SHADOW-FOR  PARKED-REGION\n";
    for q in &s.queues {
        let shadow_for = q
            .shadow
            .as_ref()
            .map_or("-".into(), |sh| format!("{:.1} s", sh.seconds));
        o += &format!(
            "  {:<5}  {:<11}  {:<7}  {:<7}  {:<5}  {:<10}  {}\n",
            q.index,
            q.mode,
            yes(q.started),
            yes(q.enabled),
            q.size,
            shadow_for,
            q.parked_region.as_deref().unwrap_or("-")
        );
    }
    o
}

/// `stats` for people.
fn stats_table(s: &StatsReport) -> String {
    let mut o = String::new();
    o += "  QUEUE  MODE         DESCRIPTORS     BYTES-WRITTEN   KICKS       CALLS       DIRTY-PAGES  SWITCHES  LAST-TO-SHADOW  LAST-BACK\n";
    let ms = |us: u64| format!("{:.3} ms", us as f64 / 1e3);
    for q in &s.queues {
        let c = &q.counters;
        let (to_shadow, back) = (
            ms(c.last_switch_to_shadow_us),
            ms(c.last_switch_to_passthrough_us),
        );
        o += &format!(
            "  {:<5}  {:<11}  {:<14}  {:<14}  {:<10}  {:<10}  {:<11}  {:<8}  {to_shadow:<14}  {back}\n",
            q.index,
            q.mode,
            c.descriptors,
            c.bytes_written,
            c.kicks,
            c.calls,
            c.dirty_pages,
            c.mode_switches,
        );
    }
    o
}
