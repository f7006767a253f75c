//! Prometheus exposition of a proxy's state (the official `prometheus-client` encoder): the
//! `query-stats` counters per queue, each queue's mode and last switch durations, and the
//! device's logging state, labelled by device (its VMM socket) and queue. Served over HTTP by
//! `svqd --metrics ADDR` ([`serve`]) and printed by `svqctl metrics` for the node-exporter
//! textfile collector. The dirty-log rate is `rate(svqd_queue_dirty_pages_total[1m])`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::api::ControlTarget;
use crate::report::{QueueCounters, StatsReport, StatusReport};

type Labels = Vec<(&'static str, String)>;

/// The exposition (OpenMetrics text) of one proxy's `status` and `stats`.
pub fn render(status: &StatusReport, stats: &StatsReport) -> String {
    let mut reg = Registry::with_prefix("svqd");
    let device = status.socket.clone();
    let dev = || vec![("device", device.clone())];
    let queue = |i: usize| vec![("device", device.clone()), ("queue", i.to_string())];

    let flag = |reg: &mut Registry, name: &str, help: &str, on: bool| {
        let g = Family::<Labels, Gauge>::default();
        g.get_or_create(&dev()).set(i64::from(on));
        reg.register(name, help, g);
    };
    flag(
        &mut reg,
        "vmm_connected",
        "A VMM is connected",
        status.vmm_connected,
    );
    flag(
        &mut reg,
        "backend_connected",
        "The backend is connected",
        status.backend_connected,
    );
    flag(
        &mut reg,
        "log_all",
        "The VMM asked for dirty logging (migration running)",
        status.log_all,
    );
    flag(
        &mut reg,
        "logging",
        "svqd writes the VMM's dirty log",
        status.logging,
    );
    flag(
        &mut reg,
        "forced_shadow",
        "Shadow mode forced by svqctl set-shadow",
        status.forced,
    );
    flag(
        &mut reg,
        "busy",
        "The answer is a snapshot: svqd waits on a peer",
        status.busy.is_some(),
    );

    let shadow = Family::<Labels, Gauge>::default();
    for q in &status.queues {
        shadow
            .get_or_create(&queue(q.index))
            .set(i64::from(q.mode == "shadow"));
    }
    reg.register(
        "queue_shadow",
        "1 while the queue runs through the shadow virtqueue",
        shadow,
    );

    type Field = fn(&QueueCounters) -> u64;
    let counters: [(&str, &str, Field); 13] = [
        (
            "queue_chains",
            "Guest chains forwarded in shadow mode",
            |c| c.chains,
        ),
        ("queue_descriptors", "Shadow descriptors written", |c| {
            c.descriptors
        }),
        ("queue_bytes", "Bytes described by forwarded chains", |c| {
            c.bytes
        }),
        (
            "queue_bytes_written",
            "Bytes the backend wrote into guest buffers",
            |c| c.bytes_written,
        ),
        (
            "queue_completed",
            "Guest chains completed in shadow mode",
            |c| c.completed,
        ),
        ("queue_kicks", "Guest kicks received", |c| c.kicks),
        ("queue_calls", "Backend calls received", |c| c.calls),
        ("queue_backend_kicks", "Kicks sent to the backend", |c| {
            c.backend_kicks
        }),
        (
            "queue_guest_notifies",
            "Interrupts sent to the guest",
            |c| c.guest_notifies,
        ),
        ("queue_dirty_pages", "Pages marked in the dirty log", |c| {
            c.dirty_pages
        }),
        (
            "queue_mode_switches",
            "Mode switches, either direction",
            |c| c.mode_switches,
        ),
        (
            "queue_late_completions",
            "Requests in flight at a stop, waited for",
            |c| c.late_completions,
        ),
        (
            "queue_reclaimed",
            "Untaken buffers given back to the guest ring at a switch back",
            |c| c.reclaimed,
        ),
    ];
    for (name, help, field) in counters {
        let fam = Family::<Labels, Counter>::default();
        for q in &stats.queues {
            fam.get_or_create(&queue(q.index))
                .inc_by(field(&q.counters));
        }
        reg.register(name, help, fam);
    }
    // Prometheus wants seconds: the nanosecond counters are exported as seconds.
    let ns_counters: [(&str, &str, Field); 2] = [
        (
            "queue_poll_seconds",
            "Time the shadow worker polled after work",
            |c| c.poll_ns,
        ),
        (
            "queue_worker_cpu_seconds",
            "CPU time of the shadow worker thread while it served the queue",
            |c| c.worker_cpu_ns,
        ),
    ];
    for (name, help, field) in ns_counters {
        let fam = Family::<Labels, Counter<f64, AtomicU64>>::default();
        for q in &stats.queues {
            fam.get_or_create(&queue(q.index))
                .inc_by(field(&q.counters) as f64 / 1e9);
        }
        reg.register(name, help, fam);
    }
    let seconds = |us: u64| us as f64 / 1e6;
    let durations: [(&str, &str, Field); 2] = [
        (
            "queue_last_switch_to_shadow_seconds",
            "Duration of the last switch to shadow mode",
            |c| c.last_switch_to_shadow_us,
        ),
        (
            "queue_last_switch_to_passthrough_seconds",
            "Duration of the last switch back to passthrough",
            |c| c.last_switch_to_passthrough_us,
        ),
    ];
    for (name, help, field) in durations {
        let fam = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for q in &stats.queues {
            fam.get_or_create(&queue(q.index))
                .set(seconds(field(&q.counters)));
        }
        reg.register(name, help, fam);
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// The same exposition in the classic Prometheus text format (0.0.4), which node-exporter's
/// textfile collector and `promtool check metrics` read: OpenMetrics names a counter family
/// without its `_total` suffix and ends with `# EOF`; the classic format names it as sampled.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out += renamed.as_deref().unwrap_or(line);
        out.push('\n');
    }
    out
}

/// A running metrics endpoint; stops accepting when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl MetricsServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Serve `GET /metrics` on `addr` (meant for localhost: the exposition names socket paths).
/// One short-lived connection at a time, with timeouts: a scraper cannot stall svqd.
pub fn serve(addr: &str, target: Arc<dyn ControlTarget>) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics served beyond localhost");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::Builder::new()
        .name("svqd-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(c) = conn {
                    if let Err(e) = answer(c, target.as_ref()) {
                        tracing::debug!(error = %e, "metrics client");
                    }
                }
            }
        })?;
    tracing::info!(%addr, "serving metrics");
    Ok(MetricsServer { addr, stop })
}

fn answer(conn: TcpStream, target: &dyn ControlTarget) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers: only Accept matters (Prometheus asks for OpenMetrics, curl does not).
    let mut accept = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        if line.to_ascii_lowercase().starts_with("accept:") {
            accept = line.to_ascii_lowercase();
        }
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let openmetrics = accept.contains("application/openmetrics-text");
    let (status, ctype, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        let text = render(&target.query_status(), &target.query_stats());
        if openmetrics {
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        } else {
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                to_classic_text(&text),
            )
        }
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only /metrics is here\n".to_owned(),
        )
    };
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}
