//! Whole scenarios: reference backend(s), an optional proxy between VMM and backend (injected, so
//! this crate never depends on svqd), the simulated guest, a live migration or a series of mode
//! switches, and the oracle's verdict.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::blk::{serve_blk, BlkDisk, BlkHandle, BlkOptions, CompletionDelay};
use crate::backend::net::{serve_net, NetHandle, NetOptions};
use crate::backend::BackendError;
use crate::guest::blk::{BlkGuest, BlkGuestOptions, BLOCK};
use crate::guest::net::{NetGuest, NetGuestOptions};
use crate::guest::ram::GuestRam;
use crate::guest::runner::GuestRunner;
use crate::guest::vring::{Anomaly, DriverQueue};
use crate::guest::{GuestWorkload, Ledger, Progress};
use crate::migration::{migrate, MigrationError, MigrationOptions, MigrationReport};
use crate::oracle::OracleReport;
use crate::vmm::{Vmm, VmmError, VmmOptions};

/// A running proxy between a VMM socket and a backend socket (svqd, injected by the caller).
pub trait Proxy: Send {
    /// Switches every started queue to shadow mode (`true`) or back to passthrough, through the
    /// proxy's control plane; returns once the switch is done.
    fn set_shadow(&self, enable: bool) -> Result<(), String>;
    /// Stops the proxy and waits for it.
    fn stop(self: Box<Self>);
}

/// A [`Proxy`] made of two closures (for callers that do not want to define a type).
pub struct FnProxy {
    set_shadow: Box<dyn Fn(bool) -> Result<(), String> + Send>,
    stop: Box<dyn FnOnce() + Send>,
}

impl FnProxy {
    /// A boxed proxy from its shadow switch and its stop function.
    pub fn boxed(
        set_shadow: impl Fn(bool) -> Result<(), String> + Send + 'static,
        stop: impl FnOnce() + Send + 'static,
    ) -> Box<dyn Proxy> {
        Box::new(FnProxy {
            set_shadow: Box::new(set_shadow),
            stop: Box::new(stop),
        })
    }
}

impl Proxy for FnProxy {
    fn set_shadow(&self, enable: bool) -> Result<(), String> {
        (self.set_shadow)(enable)
    }

    fn stop(self: Box<Self>) {
        (self.stop)()
    }
}

/// Starts a proxy listening on the first path (for the VMM) and connecting to the backend at
/// the second path. The listening socket must exist when it returns (or appear shortly: the VMM
/// retries for a few seconds).
pub type ProxyLauncher<'a> = dyn FnMut(&Path, &Path) -> Result<Box<dyn Proxy>, String> + 'a;

/// Which device the scenario uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk on a file.
    Blk,
    /// virtio-net echo.
    Net,
}

/// Scenario options.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// Device type.
    pub device: DeviceKind,
    /// Request queues (blk) or queue pairs (net).
    pub queues: u16,
    /// Negotiate EVENT_IDX.
    pub event_idx: bool,
    /// Negotiate INDIRECT_DESC.
    pub indirect: bool,
    /// Net: the device offers VIRTIO_F_IN_ORDER and the VMM acks it (whatever `vmm.in_order`
    /// says); the guest keeps the in-order rules whenever the VMM acked the bit.
    pub in_order: bool,
    /// Block backend completion delay (asynchronous, out of order).
    pub blk_delay: Option<CompletionDelay>,
    /// Block backend drops the connection when a completion must signal a closed call fd
    /// (qemu-storage-daemon's behaviour): a proxy that leaves requests in flight across a
    /// GET_VRING_BASE fails loudly.
    pub blk_strict_call: bool,
    /// Guest RAM size.
    pub ram_size: u64,
    /// Disk size (blk).
    pub disk_size: u64,
    /// Requests in flight per queue.
    pub depth: u16,
    /// VMM behaviour (memory table style, log style).
    pub vmm: VmmOptions,
    /// Pre-copy parameters.
    pub migration: MigrationOptions,
    /// I/O before the migration starts.
    pub warmup: Duration,
    /// I/O on the destination after the migration.
    pub after: Duration,
    /// The `warmup` and `after` phases also last until the guest completed at least this many
    /// requests (for at most [`PHASE_GRACE`] more): a loaded machine must not starve a phase
    /// that a check relies on.
    pub min_phase_ops: u64,
    /// Drain and stop the guest's I/O before migrating (a migration with an idle device).
    pub idle_during_migration: bool,
    /// Print a live progress line on stderr.
    pub live_progress: bool,
    /// Migrations in a row (each destination becomes the next source).
    pub hops: u32,
    /// Start a migration first and cancel it after a few pre-copy rounds (dirty logging on, then
    /// off again: svqd goes to shadow mode and back under load) before the real one.
    pub cancel_first: bool,
    /// Seed for workloads and delays.
    pub seed: u64,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            device: DeviceKind::Blk,
            queues: 1,
            event_idx: true,
            indirect: true,
            in_order: false,
            blk_delay: Some(CompletionDelay {
                min: Duration::from_micros(20),
                max: Duration::from_micros(1500),
            }),
            blk_strict_call: false,
            ram_size: 64 << 20,
            disk_size: 16 << 20,
            depth: 16,
            vmm: VmmOptions::default(),
            migration: MigrationOptions::default(),
            warmup: Duration::from_millis(200),
            after: Duration::from_millis(200),
            min_phase_ops: 64,
            idle_during_migration: false,
            live_progress: false,
            hops: 1,
            cancel_first: false,
            seed: 1,
        }
    }
}

/// Scenario failures (setup problems; a wrong migration is a failed [`OracleReport`]).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Backend setup.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    /// VMM step.
    #[error("vmm: {0}")]
    Vmm(#[from] VmmError),
    /// Migration step.
    #[error("migration: {0}")]
    Migration(#[from] MigrationError),
    /// Proxy start or control.
    #[error("proxy: {0}")]
    Proxy(String),
    /// Local I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Throughput of one phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phase {
    /// Wall time.
    pub duration: Duration,
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved (both directions).
    pub bytes: u64,
}

impl Phase {
    fn between(a: (Instant, (u64, u64, u64)), b: (Instant, (u64, u64, u64))) -> Self {
        Phase {
            duration: b.0 - a.0,
            ops: b.1 .0 - a.1 .0,
            bytes: (b.1 .1 + b.1 .2) - (a.1 .1 + a.1 .2),
        }
    }

    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// MiB per second.
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.duration.as_secs_f64().max(1e-9)
    }
}

/// Result of a migration scenario.
#[derive(Debug, Clone)]
pub struct MigrationScenarioReport {
    /// The (last) migration's own measurements.
    pub migration: MigrationReport,
    /// The oracle's verdict (differing pages of every hop).
    pub oracle: OracleReport,
    /// Throughput before, during and after the migration.
    pub phases: [Phase; 3],
    /// Net: echoes that never came back (frames inside the device at the stop; not an error).
    pub echoes_lost: u64,
    /// Blk: blocks checked on the disk image against the guest's model.
    pub blocks_verified: u64,
}

/// Result of a switching scenario.
#[derive(Debug, Clone)]
pub struct SwitchReport {
    /// Switches done (each on→off pair counts 2).
    pub switches: u64,
    /// Mean time of one switch as seen by the caller.
    pub mean_switch: Duration,
    /// Longest switch.
    pub max_switch: Duration,
    /// The guest's ledger after a drain.
    pub ledger: Ledger,
    /// Anomalies (data, stray completions).
    pub anomalies: Vec<String>,
    /// Blk: blocks verified on disk.
    pub blocks_verified: u64,
    /// I/O during the switching.
    pub phase: Phase,
    /// Virtio features the VMM acked (what the proxy offered, as negotiated).
    pub acked_features: u64,
}

impl SwitchReport {
    /// Every way it went wrong (empty: correct).
    pub fn failures(&self) -> Vec<String> {
        let mut f: Vec<String> = self.anomalies.iter().take(8).cloned().collect();
        if self.ledger.duplicates > 0 {
            f.push(format!("{} duplicated completions", self.ledger.duplicates));
        }
        if self.ledger.outstanding > 0 {
            f.push(format!("{} requests lost", self.ledger.outstanding));
        }
        if self.ledger.completed + self.ledger.outstanding != self.ledger.issued {
            f.push("ledger does not add up".into());
        }
        f
    }
}

/// Either workload, so one runner type serves both devices.
pub enum AnyGuest {
    /// Block workload.
    Blk(BlkGuest),
    /// Net workload.
    Net(NetGuest),
}

macro_rules! both {
    ($s:expr, $g:ident => $e:expr) => {
        match $s {
            AnyGuest::Blk($g) => $e,
            AnyGuest::Net($g) => $e,
        }
    };
}

impl GuestWorkload for AnyGuest {
    fn step(&mut self) {
        both!(self, g => g.step())
    }
    fn reap(&mut self) {
        both!(self, g => g.reap())
    }
    fn set_posting(&mut self, on: bool) {
        both!(self, g => g.set_posting(on))
    }
    fn anomalies(&self) -> Vec<Anomaly> {
        both!(self, g => g.anomalies())
    }
    fn ledger(&self) -> Ledger {
        both!(self, g => g.ledger())
    }
    fn queues(&self) -> &[DriverQueue] {
        both!(self, g => g.queues())
    }
    fn queues_mut(&mut self) -> &mut [DriverQueue] {
        both!(self, g => g.queues_mut())
    }
    fn ram(&self) -> &Arc<GuestRam> {
        both!(self, g => g.ram())
    }
    fn attach(&mut self, ram: Arc<GuestRam>) -> std::io::Result<()> {
        both!(self, g => g.attach(ram))
    }
    fn progress(&self) -> Arc<Progress> {
        both!(self, g => g.progress())
    }
}

enum AnyBackend {
    Blk(BlkHandle),
    Net(NetHandle),
    /// A block device the testkit does not serve (see [`ExternalDevice`]): its image.
    External(PathBuf),
}

impl AnyBackend {
    fn describe(&self) -> String {
        match self {
            AnyBackend::Blk(b) => format!("{:?}", b.stats()),
            AnyBackend::Net(n) => format!("{:?}", n.stats()),
            AnyBackend::External(disk) => format!("external device on {}", disk.display()),
        }
    }

    fn stop(self) {
        match self {
            AnyBackend::Blk(b) => b.stop(),
            AnyBackend::Net(n) => n.stop(),
            AnyBackend::External(_) => {}
        }
    }
}

/// Starts side `n` of an [`ExternalDevice`]: a proxy listening for the VMM on the given socket.
pub type LaunchSide<'a> = dyn FnMut(u32, &Path) -> Result<Box<dyn Proxy>, String> + 'a;

/// A block device the testkit does not serve itself (a vDPA device behind svqd, say): the caller
/// starts each side's proxy, which reaches the device on its own; every side serves the same
/// image, which is checked block by block against the guest's model at the end.
pub struct ExternalDevice<'a> {
    /// The image the device serves.
    pub disk: PathBuf,
    /// Starts side `n` (0: the first source, then one per migration hop): a proxy listening
    /// for the VMM on the given socket.
    pub launch: &'a mut LaunchSide<'a>,
}

fn start_external_side(
    dir: &Path,
    n: u32,
    dev: &mut ExternalDevice<'_>,
) -> Result<Side, ScenarioError> {
    let vmm_socket = dir.join(format!("side{n}-vmm.sock"));
    let proxy = (dev.launch)(n, &vmm_socket).map_err(ScenarioError::Proxy)?;
    Ok(Side {
        backend: AnyBackend::External(dev.disk.clone()),
        proxy: Some(proxy),
        vmm_socket,
    })
}

/// External devices are block devices (the image is what the end of a scenario verifies).
fn external_blk_only(opts: &ScenarioOptions) -> Result<(), ScenarioError> {
    if opts.device != DeviceKind::Blk {
        return Err(ScenarioError::Proxy(
            "an external device is a block device".into(),
        ));
    }
    Ok(())
}

/// [`run_migration`] with an [`ExternalDevice`] (block only): each side is a proxy the caller
/// starts.
pub fn run_migration_external(
    opts: &ScenarioOptions,
    dev: &mut ExternalDevice<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<MigrationScenarioReport, ScenarioError> {
    external_blk_only(opts)?;
    let dir = tempfile::Builder::new().prefix("svq-scenario").tempdir()?;
    let mut new_side = |n: u32| start_external_side(dir.path(), n, dev);
    migration_body(opts, &mut new_side, progress)
}

/// [`run_switching`] with an [`ExternalDevice`] (block only).
pub fn run_switching_external(
    opts: &ScenarioOptions,
    dev: &mut ExternalDevice<'_>,
    switches: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<SwitchReport, ScenarioError> {
    external_blk_only(opts)?;
    let dir = tempfile::Builder::new().prefix("svq-switch").tempdir()?;
    let side = start_external_side(dir.path(), 0, dev)?;
    let r = switching_body(opts, &side, switches, progress);
    let r = r.map(|(mut rep, guest)| {
        let mut extra = Vec::new();
        rep.blocks_verified = verify_disk(&guest, &side, &mut extra);
        rep.anomalies.extend(extra);
        rep
    });
    side.stop();
    r
}

/// Everything of one side (source or destination) but the guest.
struct Side {
    backend: AnyBackend,
    proxy: Option<Box<dyn Proxy>>,
    vmm_socket: PathBuf,
}

impl Side {
    fn stop(mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop();
        }
        self.backend.stop();
    }
}

fn start_side(
    dir: &Path,
    name: &str,
    opts: &ScenarioOptions,
    launcher: &mut Option<&mut ProxyLauncher<'_>>,
) -> Result<Side, ScenarioError> {
    let be_sock = dir.join(format!("{name}-backend.sock"));
    let backend = match opts.device {
        DeviceKind::Blk => {
            // Source and destination share the image, as with shared storage.
            let disk = BlkDisk::open(&dir.join("disk.img"), Some(opts.disk_size))?;
            AnyBackend::Blk(serve_blk(
                &be_sock,
                disk,
                BlkOptions {
                    num_queues: opts.queues,
                    event_idx: opts.event_idx,
                    delay: opts.blk_delay,
                    disconnect_on_closed_call: opts.blk_strict_call,
                    seed: opts.seed ^ name.len() as u64,
                    ..Default::default()
                },
            )?)
        }
        DeviceKind::Net => AnyBackend::Net(serve_net(
            &be_sock,
            NetOptions {
                queue_pairs: opts.queues,
                event_idx: opts.event_idx,
                in_order: opts.in_order,
                ..Default::default()
            },
        )?),
    };
    let (proxy, vmm_socket) = match launcher {
        Some(l) => {
            let vs = dir.join(format!("{name}-vmm.sock"));
            match l(&vs, &be_sock) {
                Ok(p) => (Some(p), vs),
                Err(e) => {
                    backend.stop();
                    return Err(ScenarioError::Proxy(e));
                }
            }
        }
        None => (None, be_sock),
    };
    Ok(Side {
        backend,
        proxy,
        vmm_socket,
    })
}

/// The VMM options of a scenario (`in_order` asks the VMM to ack IN_ORDER too).
fn vmm_options(opts: &ScenarioOptions) -> VmmOptions {
    VmmOptions {
        in_order: opts.vmm.in_order || opts.in_order,
        ..opts.vmm
    }
}

fn make_guest(ram: Arc<GuestRam>, vmm: &Vmm, opts: &ScenarioOptions) -> std::io::Result<AnyGuest> {
    Ok(match opts.device {
        DeviceKind::Blk if vmm.in_order() => {
            return Err(std::io::Error::other(
                "the blk guest does not drive VIRTIO_F_IN_ORDER",
            ))
        }
        DeviceKind::Blk => AnyGuest::Blk(BlkGuest::new(
            ram,
            BlkGuestOptions {
                queues: opts.queues,
                depth: opts.depth,
                blocks: opts.disk_size / BLOCK,
                event_idx: vmm.event_idx(),
                indirect: vmm.indirect(),
                seed: opts.seed,
                ..Default::default()
            },
        )?),
        DeviceKind::Net => AnyGuest::Net(NetGuest::new(
            ram,
            NetGuestOptions {
                pairs: opts.queues,
                depth: opts.depth,
                event_idx: vmm.event_idx(),
                indirect: vmm.indirect(),
                in_order: vmm.in_order(),
                seed: opts.seed,
                ..Default::default()
            },
        )?),
    })
}

/// A progress ticker on stderr: "\r<phase>: <iops> req/s, <MiB/s>".
struct Ticker {
    phase: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(enabled: bool, progress: Arc<Progress>) -> Self {
        let phase = Arc::new(Mutex::new(String::from("starting")));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = enabled.then(|| {
            let (p, s) = (phase.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut last = (Instant::now(), progress.get());
                while !s.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(250));
                    let now = (Instant::now(), progress.get());
                    let ph = Phase::between(last, now);
                    last = now;
                    let name = p.lock().map(|g| g.clone()).unwrap_or_default();
                    let mut e = std::io::stderr().lock();
                    let _ = write!(
                        e,
                        "\r\x1b[2K  [{name}] {:>8.0} req/s {:>7.1} MiB/s, {} requests done",
                        ph.iops(),
                        ph.mib_s(),
                        now.1 .0
                    );
                    let _ = e.flush();
                }
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            })
        });
        Ticker {
            phase,
            stop,
            thread,
        }
    }

    fn set(&self, phase: &str) {
        if let Ok(mut g) = self.phase.lock() {
            *g = phase.to_owned();
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn verify_disk(guest: &AnyGuest, side: &Side, anomalies: &mut Vec<String>) -> u64 {
    use std::os::unix::fs::FileExt;
    let AnyGuest::Blk(g) = guest else {
        return 0;
    };
    let external = match &side.backend {
        AnyBackend::External(path) => match std::fs::File::open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                anomalies.push(format!("cannot open the image {}: {e}", path.display()));
                return 0;
            }
        },
        AnyBackend::Blk(_) => None,
        AnyBackend::Net(_) => return 0,
    };
    let read = |buf: &mut [u8], off: u64| match (&side.backend, &external) {
        (AnyBackend::Blk(b), _) => b.disk().read_at(buf, off),
        (_, Some(f)) => f.read_exact_at(buf, off),
        _ => Err(std::io::Error::other("no disk")),
    };
    let mut buf = vec![0u8; BLOCK as usize];
    let mut n = 0;
    for (blk, _) in g.model().iter().enumerate() {
        if read(&mut buf, blk as u64 * BLOCK).is_err() || buf != g.expected_block(blk as u64) {
            anomalies.push(format!(
                "disk block {blk} does not hold what the guest wrote"
            ));
        }
        n += 1;
    }
    n
}

/// Runs I/O, live-migrates to a destination, runs I/O there, and judges the result.
///
/// With `launcher`, each side gets a proxy between its VMM and its backend; without, the VMM
/// talks to the backend directly (which cannot log: set `migration.require_logging = false` to
/// see what is lost). `progress` receives one line per step. `opts.hops` > 1 migrates the guest
/// on from each destination to a fresh one (ping-pong); memory is judged for every hop.
pub fn run_migration(
    opts: &ScenarioOptions,
    mut launcher: Option<&mut ProxyLauncher<'_>>,
    progress: &mut dyn FnMut(&str),
) -> Result<MigrationScenarioReport, ScenarioError> {
    let dir = tempfile::Builder::new().prefix("svq-scenario").tempdir()?;
    let mut new_side = |n: u32| start_side(dir.path(), &format!("m{n}"), opts, &mut launcher);
    migration_body(opts, &mut new_side, progress)
}

fn snapshot_progress(p: &Progress) -> (Instant, (u64, u64, u64)) {
    (Instant::now(), p.get())
}

/// How much longer than its nominal duration a phase may run to reach `min_phase_ops`.
pub const PHASE_GRACE: Duration = Duration::from_secs(10);

/// Lets the guest run for at least `duration` and until it completed `min_ops` more requests
/// (giving up after [`PHASE_GRACE`] more: the phase checks then report the starvation).
fn run_phase(p: &Progress, duration: Duration, min_ops: u64) {
    let start_ops = p.get().0;
    std::thread::sleep(duration);
    let deadline = Instant::now() + PHASE_GRACE;
    while p.get().0 - start_ops < min_ops && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Everything of the side the guest currently runs on.
struct Current {
    side: Side,
    ram: Arc<GuestRam>,
    vmm: Vmm,
}

fn migration_body(
    opts: &ScenarioOptions,
    new_side: &mut dyn FnMut(u32) -> Result<Side, ScenarioError>,
    progress: &mut dyn FnMut(&str),
) -> Result<MigrationScenarioReport, ScenarioError> {
    let side = new_side(0)?;
    let ram = GuestRam::new("svq-guest-0", opts.ram_size)?;
    let mut vmm = match Vmm::connect(&side.vmm_socket, ram.clone(), vmm_options(opts)) {
        Ok(v) => v,
        Err(e) => {
            side.stop();
            return Err(e.into());
        }
    };
    let guest = match make_guest(ram.clone(), &vmm, opts)
        .map_err(ScenarioError::from)
        .and_then(|g| {
            vmm.start_queues(g.queues())
                .map(|_| g)
                .map_err(ScenarioError::from)
        }) {
        Ok(g) => g,
        Err(e) => {
            drop(vmm);
            side.stop();
            return Err(e);
        }
    };
    let prog = guest.progress();
    let ticker = Ticker::start(opts.live_progress, prog.clone());
    let runner = GuestRunner::spawn(guest)?;
    let mut cur = Current { side, ram, vmm };
    let result = hops(opts, &runner, &mut cur, &prog, &ticker, new_side, progress);
    drop(ticker);
    let workload = runner.stop();
    let Current { side, vmm, .. } = cur;
    drop(vmm);
    let guest = match Arc::try_unwrap(workload) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(_) => {
            side.stop();
            return Err(ScenarioError::Io(std::io::Error::other(
                "workload still shared",
            )));
        }
    };
    let r = result.map(|mut rep| {
        rep.oracle.ledger = guest.ledger();
        rep.oracle
            .anomalies
            .extend(guest.anomalies().iter().map(|a| a.to_string()));
        rep.blocks_verified = verify_disk(&guest, &side, &mut rep.oracle.anomalies);
        rep
    });
    side.stop();
    r
}

fn wait_echoes(runner: &GuestRunner<AnyGuest>, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let missing = runner.with(|w| match w {
            AnyGuest::Net(n) => n.echoes_missing() as u64,
            AnyGuest::Blk(_) => 0,
        });
        if missing == 0 || Instant::now() >= deadline {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[allow(clippy::too_many_arguments)]
fn hops(
    opts: &ScenarioOptions,
    runner: &GuestRunner<AnyGuest>,
    cur: &mut Current,
    prog: &Progress,
    ticker: &Ticker,
    new_side: &mut dyn FnMut(u32) -> Result<Side, ScenarioError>,
    progress: &mut dyn FnMut(&str),
) -> Result<MigrationScenarioReport, ScenarioError> {
    ticker.set("source, before migration");
    progress(&format!(
        "guest running on the source ({} queue(s), event_idx {}, indirect {})",
        opts.queues,
        cur.vmm.event_idx(),
        cur.vmm.indirect()
    ));
    let a = snapshot_progress(prog);
    run_phase(prog, opts.warmup, opts.min_phase_ops);
    let b = snapshot_progress(prog);
    if opts.idle_during_migration {
        // An echo device is idle only once every echo came back (frames in its backlog would
        // still be written into receive buffers).
        let left =
            runner.drain(Duration::from_secs(5)) + wait_echoes(runner, Duration::from_secs(5));
        progress(&format!("guest I/O drained before migrating ({left} left)"));
    }
    if opts.cancel_first {
        cur.vmm.start_dirty_log()?;
        let mut logged = 0;
        for _ in 0..3 {
            std::thread::sleep(opts.migration.round_interval);
            logged += cur.vmm.sync_dirty_log()?.len();
        }
        cur.vmm.stop_dirty_log()?;
        progress(&format!(
            "migration cancelled after 3 rounds ({logged} device pages logged); guest runs on"
        ));
        std::thread::sleep(opts.warmup);
    }
    let mut differing = Vec::new();
    let mut sizes_ok = true;
    let mut pages = 0;
    let mut last = None;
    for hop in 1..=opts.hops.max(1) {
        ticker.set(&format!("migrating ({hop}/{})", opts.hops.max(1)));
        let dst = new_side(hop)?;
        let dst_ram = GuestRam::new(&format!("svq-guest-{hop}"), opts.ram_size)?;
        let dst_vmm_opts = vmm_options(opts);
        let dst_sock = dst.vmm_socket.clone();
        let migrated = migrate(
            runner,
            &mut cur.vmm,
            dst_ram.clone(),
            |ram| Vmm::connect(&dst_sock, ram, dst_vmm_opts),
            &opts.migration,
            &mut *progress,
        );
        let (dst_vmm, snapshot, mig) = match migrated {
            Ok(m) => m,
            Err(e) => {
                dst.stop();
                return Err(e.into());
            }
        };
        progress(&format!(
            "hop {hop}: guest running on the destination (downtime {:.1} ms)",
            mig.downtime.as_secs_f64() * 1e3
        ));
        // The source VMM goes away (as QEMU's source process would) and its device path is shut
        // down before its RAM counts as final: a device (or proxy) that still writes the source
        // after the stop must show up as differing pages.
        let old = std::mem::replace(
            cur,
            Current {
                side: dst,
                ram: dst_ram,
                vmm: dst_vmm,
            },
        );
        drop(old.vmm);
        old.side.stop();
        let o = OracleReport::compare(&old.ram, &snapshot, &cur.ram)?;
        sizes_ok &= o.sizes_ok;
        pages = o.pages;
        if !o.differing_pages.is_empty() {
            progress(&format!(
                "hop {hop}: {} pages differ",
                o.differing_pages.len()
            ));
        }
        differing.extend(o.differing_pages);
        last = Some(mig);
        if hop < opts.hops.max(1) {
            std::thread::sleep(opts.warmup);
        }
    }
    let c = snapshot_progress(prog);
    ticker.set("destination, after migration");
    if opts.idle_during_migration {
        runner.with(|w| w.set_posting(true));
    }
    run_phase(prog, opts.after, opts.min_phase_ops);
    let d = snapshot_progress(prog);
    let left = runner.drain(Duration::from_secs(10));
    // Echoes still missing after a moment were inside a stopped source device (allowed).
    let echoes_lost = wait_echoes(runner, Duration::from_millis(500));
    progress(&format!("destination drained ({left} requests left)"));
    Ok(MigrationScenarioReport {
        migration: last.expect("at least one hop"),
        oracle: OracleReport {
            pages,
            differing_pages: differing,
            sizes_ok,
            ..Default::default()
        },
        phases: [
            Phase::between(a, b),
            Phase::between(b, c),
            Phase::between(c, d),
        ],
        echoes_lost,
        blocks_verified: 0,
    })
}

/// Runs I/O through a proxy and switches it between passthrough and shadow `switches` times
/// (on, off, on, ...), then drains and checks every request completed exactly once with correct
/// data.
pub fn run_switching(
    opts: &ScenarioOptions,
    launcher: &mut ProxyLauncher<'_>,
    switches: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<SwitchReport, ScenarioError> {
    let dir = tempfile::Builder::new().prefix("svq-switch").tempdir()?;
    let mut l = Some(launcher);
    let side = start_side(dir.path(), "src", opts, &mut l)?;
    let r = switching_body(opts, &side, switches, progress);
    let r = r.map(|(mut rep, guest)| {
        let mut extra = Vec::new();
        rep.blocks_verified = verify_disk(&guest, &side, &mut extra);
        rep.anomalies.extend(extra);
        rep
    });
    side.stop();
    r
}

fn switching_body(
    opts: &ScenarioOptions,
    side: &Side,
    switches: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<(SwitchReport, AnyGuest), ScenarioError> {
    let ram = GuestRam::new("svq-guest", opts.ram_size)?;
    let mut vmm = Vmm::connect(&side.vmm_socket, ram.clone(), vmm_options(opts))?;
    let guest = make_guest(ram, &vmm, opts)?;
    vmm.start_queues(guest.queues())?;
    let prog = guest.progress();
    let ticker = Ticker::start(opts.live_progress, prog.clone());
    ticker.set("switching");
    let runner = GuestRunner::spawn(guest)?;
    std::thread::sleep(opts.warmup);
    let proxy = side
        .proxy
        .as_ref()
        .ok_or_else(|| ScenarioError::Proxy("switching needs a proxy".into()))?;
    let a = snapshot_progress(&prog);
    let mut total = Duration::ZERO;
    let mut max = Duration::ZERO;
    let mut last_ops = a.1 .0;
    for i in 0..switches {
        let t = Instant::now();
        proxy.set_shadow(i % 2 == 0).map_err(|e| {
            let ring = runner.with(|w| {
                w.queues()
                    .iter()
                    .map(|q| {
                        format!(
                            "q{} next_avail {} last_used {} device_used {} in_flight {}",
                            q.index(),
                            q.next_avail(),
                            q.last_used(),
                            q.device_used_idx(w.ram().memory()),
                            q.in_flight()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            });
            ScenarioError::Proxy(format!(
                "switch {i} (to {}): {e}; backend {}; guest {ring}",
                if i % 2 == 0 { "shadow" } else { "passthrough" },
                side.backend.describe()
            ))
        })?;
        let d = t.elapsed();
        total += d;
        max = max.max(d);
        if (i + 1) % 100 == 0 {
            let ops = prog.get().0;
            progress(&format!(
                "{} switches, {} requests completed since the last report",
                i + 1,
                ops - last_ops
            ));
            last_ops = ops;
        }
    }
    // End in passthrough.
    if switches % 2 == 1 {
        proxy.set_shadow(false).map_err(ScenarioError::Proxy)?;
    }
    let b = snapshot_progress(&prog);
    let left = runner.drain(Duration::from_secs(10));
    drop(ticker);
    let workload = runner.stop();
    let acked_features = vmm.acked_features();
    drop(vmm);
    let guest = match Arc::try_unwrap(workload) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(_) => {
            return Err(ScenarioError::Io(std::io::Error::other(
                "workload still shared",
            )))
        }
    };
    progress(&format!("drained ({left} left)"));
    Ok((
        SwitchReport {
            switches,
            mean_switch: total / switches.max(1) as u32,
            max_switch: max,
            ledger: guest.ledger(),
            anomalies: guest.anomalies().iter().map(|a| a.to_string()).collect(),
            blocks_verified: 0,
            phase: Phase::between(a, b),
            acked_features,
        },
        guest,
    ))
}
