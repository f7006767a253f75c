//! The control API's answers as typed structs: the schema of `query-status` and `query-stats`
//! (serialized as JSON on the control socket, reused by anything else that reports on a proxy).
//! Built from a [`Session`] under its lock; the structs own their data.

use std::sync::atomic::Ordering::Relaxed;

use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::features;
use crate::queue::Mode;
use crate::session::Session;
use crate::stats::QueueStats;

/// `query-status`: the proxy, its peers, what was negotiated and each queue's mode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// The VMM socket.
    pub socket: String,
    /// The backend (socket path or device node).
    pub backend: String,
    /// A backend connection is up.
    pub backend_connected: bool,
    /// A VMM is connected.
    pub vmm_connected: bool,
    /// Shadow policy (`always`, `auto`, `never`).
    pub policy: String,
    /// Shadow mode forced on by `set-shadow`.
    pub forced: bool,
    /// The VMM acked VHOST_F_LOG_ALL.
    pub log_all: bool,
    /// The engines write a dirty log now.
    pub logging: bool,
    /// Size of the VMM's dirty log, once it sent one.
    pub log_bytes: Option<usize>,
    /// Virtio features (hex strings).
    pub features: FeatureSet,
    /// vhost-user protocol features (hex strings).
    pub protocol_features: FeatureSet,
    /// The queues.
    pub queues: Vec<QueueStatus>,
    /// Set when the answer is a snapshot because svqd is busy waiting on a peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<String>,
}

/// A feature word as the backend offers it, as svqd offers it to the VMM, and as the VMM acked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeatureSet {
    /// Offered by the backend.
    pub backend: String,
    /// Offered by svqd to the VMM.
    pub offered: String,
    /// Acked by the VMM.
    pub acked: String,
}

/// One queue in `query-status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueStatus {
    /// Queue index.
    pub index: usize,
    /// `passthrough` or `shadow`.
    pub mode: String,
    /// The device runs the ring.
    pub started: bool,
    /// The VMM enabled the ring.
    pub enabled: bool,
    /// Ring size (0: not configured).
    pub size: u16,
    /// The shadow ring, in shadow mode.
    pub shadow: Option<ShadowStatus>,
    /// GPA of a shadow region kept in the backend's table for the next switch.
    pub parked_region: Option<String>,
}

/// A queue's shadow ring.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShadowStatus {
    /// Shadow ring size.
    pub size: u16,
    /// GPA of its region in the backend's table.
    pub gpa: String,
    /// User address of its region in the backend's table.
    pub uva: String,
    /// Region size in bytes.
    pub bytes: u64,
    /// The ring's indices and flags as they are in memory.
    pub ring: Option<ShadowRingState>,
    /// Seconds in shadow mode.
    pub seconds: f64,
}

/// A shadow ring's indices and flags as they are in memory (what the device sees and wrote).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShadowRingState {
    /// avail.flags (NO_INTERRUPT).
    pub avail_flags: u16,
    /// avail.idx.
    pub avail_idx: u16,
    /// used_event (EVENT_IDX).
    pub used_event: u16,
    /// used.flags (NO_NOTIFY).
    pub used_flags: u16,
    /// used.idx.
    pub used_idx: u16,
    /// avail_event (EVENT_IDX).
    pub avail_event: u16,
}

/// `query-stats`: counters per queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    /// The queues.
    pub queues: Vec<QueueStatsReport>,
}

/// One queue in `query-stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueStatsReport {
    /// Queue index.
    pub index: usize,
    /// `passthrough` or `shadow`.
    pub mode: String,
    /// The counters.
    #[serde(flatten)]
    pub counters: QueueCounters,
}

/// A snapshot of a queue's counters ([`QueueStats`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueCounters {
    /// Guest chains forwarded to the backend in shadow mode.
    pub chains: u64,
    /// Shadow descriptors written.
    pub descriptors: u64,
    /// Bytes described by forwarded chains.
    pub bytes: u64,
    /// Bytes the backend wrote into guest buffers (reported used lengths).
    pub bytes_written: u64,
    /// Guest chains completed back to the guest.
    pub completed: u64,
    /// Guest kicks received by svqd.
    pub kicks: u64,
    /// Backend calls received by svqd.
    pub calls: u64,
    /// Kicks svqd sent to the backend.
    pub backend_kicks: u64,
    /// Interrupts svqd sent to the guest.
    pub guest_notifies: u64,
    /// Dirty-log page marks.
    pub dirty_pages: u64,
    /// Mode switches (either direction).
    pub mode_switches: u64,
    /// Duration of the last switch to shadow mode, in microseconds.
    pub last_switch_to_shadow_us: u64,
    /// Duration of the last switch back to passthrough, in microseconds.
    pub last_switch_to_passthrough_us: u64,
    /// Requests found in flight in the backend at GET_VRING_BASE and waited for.
    pub late_completions: u64,
    /// Buffers the backend never took, given back to the guest ring on a switch to passthrough.
    pub reclaimed: u64,
    /// Time the shadow worker spent polling after work (`--poll-us`), in nanoseconds.
    #[serde(default)]
    pub poll_ns: u64,
    /// CPU time of the shadow worker thread while it served this queue, in nanoseconds (queues
    /// served by the same thread each show the thread's whole time): divided by `descriptors` of
    /// the queues it served, svqd's cost per forwarded descriptor.
    #[serde(default)]
    pub worker_cpu_ns: u64,
    /// Times the shadow worker woke to work (from epoll or from a batch wait).
    #[serde(default)]
    pub worker_wakeups: u64,
}

impl QueueCounters {
    /// Read `stats` (each counter atomically; the set is not a single snapshot).
    pub fn read(stats: &QueueStats) -> Self {
        QueueCounters {
            chains: stats.chains.load(Relaxed),
            descriptors: stats.descriptors.load(Relaxed),
            bytes: stats.bytes.load(Relaxed),
            bytes_written: stats.bytes_written.load(Relaxed),
            completed: stats.completed.load(Relaxed),
            kicks: stats.kicks.load(Relaxed),
            calls: stats.calls.load(Relaxed),
            backend_kicks: stats.backend_kicks.load(Relaxed),
            guest_notifies: stats.guest_notifies.load(Relaxed),
            dirty_pages: stats.dirty_pages.load(Relaxed),
            mode_switches: stats.mode_switches.load(Relaxed),
            last_switch_to_shadow_us: stats.last_switch_to_shadow_us.load(Relaxed),
            last_switch_to_passthrough_us: stats.last_switch_to_passthrough_us.load(Relaxed),
            late_completions: stats.late_completions.load(Relaxed),
            reclaimed: stats.reclaimed.load(Relaxed),
            poll_ns: stats.poll_ns.load(Relaxed),
            worker_cpu_ns: stats.worker_cpu_ns(),
            worker_wakeups: stats.worker_wakeups.load(Relaxed),
        }
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

impl StatusReport {
    /// The status of `s`.
    pub fn of(s: &Session) -> Self {
        let queues = s
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueStatus {
                index: i,
                mode: q.mode.name().into(),
                started: q.vmm.running(),
                enabled: q.vmm.enabled,
                size: q.vmm.num,
                shadow: match &q.mode {
                    Mode::Passthrough => None,
                    Mode::Shadow(sq) => Some(ShadowStatus {
                        size: sq.shadow_size,
                        gpa: hex(sq.region.gpa),
                        uva: hex(sq.region.uva),
                        bytes: sq.region.size,
                        ring: sq.region.ring_state(sq.shadow_size),
                        seconds: sq.started.elapsed().as_secs_f64(),
                    }),
                },
                parked_region: s.space.parked(i).map(|r| hex(r.gpa)),
            })
            .collect();
        let (bf, bp) = s
            .device
            .as_ref()
            .map(|d| (d.features(), d.protocol_features()))
            .unwrap_or((0, VhostUserProtocolFeatures::empty()));
        StatusReport {
            socket: s.cfg.socket.display().to_string(),
            backend: s.cfg.backend.display().to_string(),
            backend_connected: s.device.is_some(),
            vmm_connected: s.vmm_connected,
            policy: s.cfg.shadow.as_str().into(),
            forced: s.forced,
            log_all: s.log_all(),
            logging: s.active_log.is_enabled(),
            log_bytes: s.vmm_log.as_ref().map(|l| l.len_bytes()),
            features: FeatureSet {
                backend: hex(bf),
                offered: hex(features::vmm_virtio_features(bf)),
                acked: hex(s.acked_features),
            },
            protocol_features: FeatureSet {
                backend: hex(bp.bits()),
                offered: hex(features::vmm_protocol_features(bp).bits()),
                acked: hex(s.acked_protocol.bits()),
            },
            queues,
            busy: None,
        }
    }
}

impl StatsReport {
    /// The counters of `s`'s queues.
    pub fn of(s: &Session) -> Self {
        StatsReport {
            queues: s
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueStatsReport {
                    index: i,
                    mode: q.mode.name().into(),
                    counters: QueueCounters::read(&q.stats),
                })
                .collect(),
        }
    }

    /// The counters of queues given as (mode, counters).
    pub fn from_queues(queues: &[(String, std::sync::Arc<QueueStats>)]) -> Self {
        StatsReport {
            queues: queues
                .iter()
                .enumerate()
                .map(|(i, (mode, stats))| QueueStatsReport {
                    index: i,
                    mode: mode.clone(),
                    counters: QueueCounters::read(stats),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::backend::recording::RecordingDevice;
    use crate::config::ProxyConfig;

    fn keys(v: &Value) -> BTreeSet<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn set(names: &[&'static str]) -> BTreeSet<&'static str> {
        names.iter().copied().collect()
    }

    /// The JSON on the control socket is what it was before the answers were typed (the
    /// members the hand-built `json!` objects had, with the same value types).
    #[test]
    fn wire_format_is_unchanged() {
        let mut s = Session::new(Arc::new(ProxyConfig::new("vmm.sock", "be.sock")));
        s.attach(Box::new(RecordingDevice::new(2, true)));
        let status = serde_json::to_value(StatusReport::of(&s)).unwrap();
        assert_eq!(
            keys(&status),
            set(&[
                "socket",
                "backend",
                "backend_connected",
                "vmm_connected",
                "policy",
                "forced",
                "log_all",
                "logging",
                "log_bytes",
                "features",
                "protocol_features",
                "queues"
            ])
        );
        for f in ["features", "protocol_features"] {
            assert_eq!(keys(&status[f]), set(&["backend", "offered", "acked"]));
        }
        assert_eq!(status["features"]["backend"], "0x100000000");
        assert_eq!(status["policy"], "auto");
        assert_eq!(status["log_bytes"], Value::Null);
        let q = &status["queues"][1];
        assert_eq!(
            keys(q),
            set(&[
                "index",
                "mode",
                "started",
                "enabled",
                "size",
                "shadow",
                "parked_region"
            ])
        );
        assert_eq!(q["index"], 1);
        assert_eq!(q["mode"], "passthrough");
        assert_eq!(q["shadow"], Value::Null);
        assert_eq!(q["parked_region"], Value::Null);

        let shadow = serde_json::to_value(ShadowStatus {
            size: 256,
            gpa: hex(1 << 40),
            uva: hex(1 << 30),
            bytes: 12288,
            ring: Some(ShadowRingState {
                avail_flags: 0,
                avail_idx: 5,
                used_event: 0,
                used_flags: 1,
                used_idx: 4,
                avail_event: 5,
            }),
            seconds: 1.5,
        })
        .unwrap();
        assert_eq!(
            keys(&shadow),
            set(&["size", "gpa", "uva", "bytes", "ring", "seconds"])
        );
        assert_eq!(shadow["gpa"], "0x10000000000");
        assert_eq!(
            shadow["ring"],
            json!({"avail_flags": 0, "avail_idx": 5, "used_event": 0, "used_flags": 1,
                   "used_idx": 4, "avail_event": 5})
        );

        s.queues[0].stats.kicks.store(3, Relaxed);
        let stats = serde_json::to_value(StatsReport::of(&s)).unwrap();
        assert_eq!(keys(&stats), set(&["queues"]));
        let q = &stats["queues"][0];
        assert_eq!(
            keys(q),
            set(&[
                "index",
                "mode",
                "chains",
                "descriptors",
                "bytes",
                "bytes_written",
                "completed",
                "kicks",
                "calls",
                "backend_kicks",
                "guest_notifies",
                "dirty_pages",
                "mode_switches",
                "last_switch_to_shadow_us",
                "last_switch_to_passthrough_us",
                "late_completions",
                "reclaimed",
                // Added with the poll phase; the members above are unchanged.
                "poll_ns",
                "worker_cpu_ns",
                "worker_wakeups"
            ])
        );
        assert_eq!(q["kicks"], 3);
        assert_eq!(q["mode"], "passthrough");
        // Clients can read the answers back into the types.
        let back: StatsReport = serde_json::from_value(stats).unwrap();
        assert_eq!(back.queues[0].counters.kicks, 3);
    }
}
