//! QEMU guests, qemu-storage-daemon, svqd: starting them, migrating, and the RAM oracle.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::proc::Proc;
use crate::qmp::Qmp;
use crate::{count_differing_pages, workspace_bin, Fixtures};

/// How to start one QEMU.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Name (file names in the test dir).
    pub name: String,
    /// Guest RAM in MiB (memory-backend-memfd, share=on).
    pub mem_mib: u64,
    /// Kernel command line.
    pub append: String,
    /// Device arguments (`-chardev ... -device ...`).
    pub args: Vec<String>,
    /// `-incoming URI` for a migration destination.
    pub incoming: Option<String>,
    /// `-S`: stay paused after start / after incoming migration.
    pub paused: bool,
}

impl VmSpec {
    /// A guest with `mem_mib` of RAM running the given kernel command line, no devices yet.
    pub fn new(name: &str, mem_mib: u64, append: &str) -> Self {
        VmSpec {
            name: name.into(),
            mem_mib,
            append: append.into(),
            args: Vec::new(),
            incoming: None,
            paused: false,
        }
    }

    /// Adds a vhost-user-blk device on `sock`.
    pub fn vhost_user_blk(mut self, sock: &Path) -> Self {
        self.args.extend([
            "-chardev".into(),
            format!("socket,id=vub0,path={}", sock.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=vub0,num-queues=1".into(),
        ]);
        self
    }

    /// Adds raw QEMU arguments (devices).
    pub fn raw(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Adds a vhost-user-net device (virtio-net-pci, no option ROM) on `sock`.
    pub fn vhost_user_net(self, sock: &Path) -> Self {
        self.raw(&[
            "-chardev",
            &format!("socket,id=vun0,path={}", sock.display()),
            "-netdev",
            "vhost-user,id=n0,chardev=vun0",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=",
        ])
    }

    /// Makes this a paused migration destination listening on `uri`.
    pub fn incoming(mut self, uri: &str) -> Self {
        self.incoming = Some(uri.into());
        self.paused = true;
        self
    }
}

/// A running QEMU with its QMP connection and serial console file.
pub struct Vm {
    /// The spec it was started with.
    pub spec: VmSpec,
    /// QMP.
    pub qmp: Qmp,
    /// The serial console (ttyS0) file.
    pub console: PathBuf,
    /// When the process was spawned.
    pub started: Instant,
    proc: Proc,
}

/// Migration statistics as QEMU reports them (`query-migrate` on the source).
#[derive(Debug, Clone, Default)]
pub struct MigStats {
    /// Final status ("completed").
    pub status: String,
    /// total-time, ms.
    pub total_ms: u64,
    /// downtime, ms.
    pub downtime_ms: u64,
    /// setup-time, ms.
    pub setup_ms: u64,
    /// RAM bytes transferred.
    pub transferred: u64,
    /// Dirty bitmap sync rounds.
    pub dirty_syncs: u64,
    /// Pages re-sent because they were dirtied.
    pub dirty_pages_rate: u64,
}

impl Vm {
    /// Spawns QEMU (TCG, q35, shared memfd RAM) and connects QMP.
    pub fn start(fx: &Fixtures, dir: &Path, spec: VmSpec) -> Result<Vm, String> {
        let qmp_path = dir.join(format!("{}.qmp", spec.name));
        let console = dir.join(format!("{}.console", spec.name));
        let _ = fs::remove_file(&qmp_path);
        let mut c = Command::new(&fx.qemu);
        c.env("QEMU_MODULE_DIR", &fx.qemu_modules);
        for d in &fx.qemu_data {
            c.arg("-L").arg(d);
        }
        let m = spec.mem_mib;
        c.args([
            "-machine",
            "q35,accel=tcg,memory-backend=mem",
            "-cpu",
            "max",
            "-smp",
            "1",
        ])
        .args(["-m", &format!("{m}M")])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={m}M,share=on"),
        ])
        .args([
            "-nic",
            "none",
            "-display",
            "none",
            "-vga",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(["-monitor", "none"])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_path.display()),
        ])
        .arg("-kernel")
        .arg(&fx.kernel)
        .arg("-initrd")
        .arg(&fx.initrd)
        .args(["-append", &spec.append])
        .args(&spec.args);
        if spec.paused {
            c.arg("-S");
        }
        if let Some(u) = &spec.incoming {
            c.args(["-incoming", u]);
        }
        let started = Instant::now();
        let mut proc = Proc::spawn(&spec.name, c, &dir.join(format!("{}.log", spec.name)));
        if let Err(e) = proc.wait_socket(&qmp_path, Duration::from_secs(20)) {
            return Err(format!("QEMU {}: {e}", spec.name));
        }
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(20))
            .map_err(|e| format!("QEMU {}: {e}\n{}", spec.name, proc.log_tail(20)))?;
        Ok(Vm {
            spec,
            qmp,
            console,
            started,
            proc,
        })
    }

    /// Guest RAM size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.spec.mem_mib << 20
    }

    /// The console text so far.
    pub fn console_text(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// QEMU's own log (stderr).
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// Waits until `pred(console)` holds. Fails on timeout, on a `SVQ-FAIL` console line, or if
    /// QEMU exits; the error carries the console tail and QEMU's log.
    pub fn wait_console(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let t0 = Instant::now();
        loop {
            let text = self.console_text();
            if let Some(l) = text.lines().find(|l| l.contains("SVQ-FAIL")) {
                return Err(self.failure(&format!("guest reported failure: {l}"), &text));
            }
            if pred(&text) {
                return Ok(text);
            }
            if let Some(s) = self.proc.try_exit() {
                // The last output may have landed just before exit.
                let text = self.console_text();
                if pred(&text) {
                    return Ok(text);
                }
                return Err(self.failure(&format!("QEMU exited ({s}) waiting for {what}"), &text));
            }
            if t0.elapsed() > timeout {
                return Err(
                    self.failure(&format!("timeout ({timeout:?}) waiting for {what}"), &text)
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn failure(&self, msg: &str, console: &str) -> String {
        let lines: Vec<&str> = console.lines().collect();
        format!(
            "{}: {msg}\n--- console tail:\n{}\n--- qemu log:\n{}",
            self.spec.name,
            lines[lines.len().saturating_sub(15)..].join("\n"),
            self.proc.log_tail(20)
        )
    }

    /// Waits for the guest's `SVQ-BOOT` line; returns host wall time since spawn.
    pub fn wait_boot(&mut self, timeout: Duration) -> Result<Duration, String> {
        self.wait_console("SVQ-BOOT", timeout, |t| t.contains("SVQ-BOOT"))?;
        Ok(self.started.elapsed())
    }

    /// Waits until the guest's blk loop has completed `n` more iterations than `after`.
    pub fn wait_iterations(
        &mut self,
        after: u64,
        n: u64,
        timeout: Duration,
    ) -> Result<u64, String> {
        let t = self.wait_console(&format!("{n} iterations after {after}"), timeout, |t| {
            crate::guest::iterations(t).0 >= after + n
        })?;
        Ok(crate::guest::iterations(&t).0)
    }

    /// Migrates this (running) VM to `dst` (started with `-incoming uri`, paused) and waits for
    /// completion on both sides. `max_bw` (bytes/s) slows the copy so the guest's I/O overlaps
    /// several pre-copy rounds.
    pub fn migrate_to(
        &mut self,
        dst: &mut Vm,
        uri: &str,
        max_bw: Option<u64>,
    ) -> Result<MigStats, String> {
        if let Some(bw) = max_bw {
            self.qmp
                .cmd("migrate-set-parameters", json!({ "max-bandwidth": bw }))?;
        }
        self.qmp.cmd("migrate", json!({ "uri": uri }))?;
        let t0 = Instant::now();
        let info = loop {
            let r = self.qmp.cmd("query-migrate", json!({}))?;
            match r["status"].as_str().unwrap_or("") {
                "completed" => break r,
                "failed" | "cancelled" => {
                    return Err(format!(
                        "migration {}: {}\n--- src log:\n{}\n--- dst log:\n{}",
                        r["status"],
                        r.get("error-desc").unwrap_or(&Value::Null),
                        self.log_tail(20),
                        dst.log_tail(20)
                    ))
                }
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(180) {
                return Err(format!("migration did not complete in 180 s: {r}"));
            }
            sleep(Duration::from_millis(50));
        };
        // The destination finishes loading after the source says "completed".
        let t1 = Instant::now();
        loop {
            let s = dst.qmp.status()?;
            if s == "paused" || s == "running" {
                break;
            }
            if t1.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "destination stuck in state {s}:\n{}",
                    dst.log_tail(20)
                ));
            }
            sleep(Duration::from_millis(20));
        }
        let n = |k: &str| info[k].as_u64().unwrap_or(0);
        Ok(MigStats {
            status: info["status"].as_str().unwrap_or("").into(),
            total_ms: n("total-time"),
            downtime_ms: n("downtime"),
            setup_ms: n("setup-time"),
            transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
            dirty_syncs: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            dirty_pages_rate: info["ram"]["dirty-pages-rate"].as_u64().unwrap_or(0),
        })
    }

    /// Dumps all guest RAM (physical 0..mem) to `path` with `pmemsave`.
    pub fn pmemsave(&mut self, path: &Path) -> Result<(), String> {
        let _ = fs::remove_file(path);
        self.qmp.cmd(
            "pmemsave",
            json!({ "val": 0, "size": self.mem_bytes(), "filename": path.to_str().unwrap() }),
        )?;
        Ok(())
    }

    /// Resumes a paused VM.
    pub fn cont(&mut self) -> Result<(), String> {
        self.qmp.cmd("cont", json!({})).map(|_| ())
    }

    /// Ends QEMU (quit, then kill if needed).
    pub fn quit(mut self) {
        let _ = self.qmp.cmd("quit", json!({}));
        if self.proc.wait_exit(Duration::from_secs(5)).is_none() {
            self.proc.stop(Duration::from_secs(1));
        }
    }
}

/// The RAM oracle after a migration to a paused destination: dump both sides and count differing
/// 4 KiB pages. Dump files are removed afterwards (they are large).
pub fn compare_ram(src: &mut Vm, dst: &mut Vm, dir: &Path) -> Result<Vec<u64>, String> {
    let (a, b) = (
        dir.join(format!("{}.ram", src.spec.name)),
        dir.join(format!("{}.ram", dst.spec.name)),
    );
    src.pmemsave(&a)?;
    dst.pmemsave(&b)?;
    let r = count_differing_pages(&a, &b, src.mem_bytes());
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    r
}

/// qemu-storage-daemon with one file node and one vhost-user-blk export per socket (all of the
/// same node: one export serves one client at a time, so source and destination get their own).
pub fn start_qsd(
    fx: &Fixtures,
    dir: &Path,
    disk: &Path,
    socks: &[PathBuf],
) -> Result<Proc, String> {
    let mut c = Command::new(&fx.qsd);
    c.args([
        "--blockdev",
        &format!("driver=file,node-name=file0,filename={}", disk.display()),
    ]);
    for (i, s) in socks.iter().enumerate() {
        let _ = fs::remove_file(s);
        c.args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=exp{i},node-name=file0,addr.type=unix,addr.path={},writable=on",
                s.display()
            ),
        ]);
    }
    let mut p = Proc::spawn("qsd", c, &dir.join("qsd.log"));
    for s in socks {
        p.wait_socket(s, Duration::from_secs(10))?;
    }
    Ok(p)
}

/// How svqd runs for a test.
#[derive(Debug, Clone)]
pub struct SvqdOpts {
    /// `--shadow` value: always, auto, never.
    pub shadow: String,
    /// Extra (test-only) arguments, e.g. the switch that disables dirty logging.
    pub extra: Vec<String>,
    /// Whether to open a control socket.
    pub control: bool,
}

impl Default for SvqdOpts {
    fn default() -> Self {
        SvqdOpts {
            shadow: "auto".into(),
            extra: Vec::new(),
            control: true,
        }
    }
}

/// A running svqd and its socket paths.
pub struct Svqd {
    /// The process.
    pub proc: Proc,
    /// Its vhost-user socket (for QEMU).
    pub socket: PathBuf,
    /// Its control socket, if any.
    pub control: Option<PathBuf>,
}

impl Svqd {
    /// Starts `svqd --socket dir/<name>.sock --backend backend ...` and waits for its socket.
    pub fn start(dir: &Path, name: &str, backend: &Path, opts: &SvqdOpts) -> Result<Svqd, String> {
        let socket = dir.join(format!("{name}.sock"));
        let control = opts.control.then(|| dir.join(format!("{name}.ctl")));
        let _ = fs::remove_file(&socket);
        let mut c = Command::new(workspace_bin("svqd"));
        c.arg("--socket")
            .arg(&socket)
            .arg("--backend")
            .arg(backend)
            .args(["--shadow", &opts.shadow])
            .args(&opts.extra);
        if let Some(ctl) = &control {
            let _ = fs::remove_file(ctl);
            c.arg("--control").arg(ctl);
        }
        c.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        let mut proc = Proc::spawn(name, c, &dir.join(format!("{name}.log")));
        proc.wait_socket(&socket, Duration::from_secs(15))?;
        Ok(Svqd {
            proc,
            socket,
            control,
        })
    }

    /// Checks (`svqctl query-status`) that every started queue is in `mode` ("shadow" or
    /// "passthrough") and, for shadow, that descriptors went through the shadow rings
    /// (`query-stats`). Returns the stats for printing.
    pub fn expect_mode(&self, mode: &str) -> Result<Value, String> {
        let parse = |out: String| -> Result<Value, String> {
            serde_json::from_str(&out)
                .map_err(|e| format!("svqctl output is not JSON ({e}): {out}"))
        };
        let status = parse(self.ctl(&["--json", "query-status"])?)?;
        let stats = parse(self.ctl(&["--json", "query-stats"])?)?;
        let started: Vec<&Value> = status["queues"]
            .as_array()
            .ok_or_else(|| format!("query-status has no queues array: {status}"))?
            .iter()
            .filter(|q| q["started"].as_bool() == Some(true))
            .collect();
        if started.is_empty() {
            return Err(format!("svqd reports no started queue: {status}"));
        }
        for q in &started {
            if q["mode"].as_str() != Some(mode) {
                return Err(format!("started queue not in {mode} mode: {q}"));
            }
        }
        if mode == "shadow" {
            let descs = stats_sum(&stats, "descriptors");
            if descs == 0 {
                return Err(format!(
                    "no descriptor went through the shadow rings: {stats}"
                ));
            }
        }
        Ok(stats)
    }

    /// Runs `svqctl --control <ctl> <args>` and returns its stdout (error with output on failure).
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let ctl = self.control.as_ref().ok_or("svqd has no control socket")?;
        let out = Command::new(workspace_bin("svqctl"))
            .arg("--control")
            .arg(ctl)
            .args(args)
            .output()
            .map_err(|e| format!("svqctl: {e}"))?;
        let so = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "svqctl {args:?} failed ({}): {so}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(so)
    }
}

/// One counter of svqd's `query-stats`, summed over all queues (0 if absent).
pub fn stats_sum(stats: &Value, key: &str) -> u64 {
    stats["queues"]
        .as_array()
        .map(|qs| qs.iter().filter_map(|q| q[key].as_u64()).sum())
        .unwrap_or(0)
}

/// DPDK testpmd as a vhost-user-net backend: one `net_vhost` port per socket (testpmd is the
/// server), `macswap` forwarding with each port looped to itself, no hugepages, lcores pinned
/// (unpinned testpmd on 2 cores collapses to a few kpps).
pub fn start_testpmd(fx: &Fixtures, dir: &Path, socks: &[PathBuf]) -> Result<Proc, String> {
    let bin = fx
        .testpmd
        .as_ref()
        .ok_or("dpdk-testpmd missing: re-run scripts/peers/fixtures.sh (package dpdk-dev)")?;
    let mut c = Command::new(bin);
    c.args(["--lcores", "0@0,1@1", "--no-pci", "--no-huge", "-m", "256"])
        .arg(format!("--file-prefix=svqpeers{}", std::process::id()));
    for (i, s) in socks.iter().enumerate() {
        let _ = fs::remove_file(s);
        c.args([
            "--vdev",
            &format!("net_vhost{i},iface={},queues=1", s.display()),
        ]);
    }
    c.args([
        "--",
        "--total-num-mbufs=8192",
        "--nb-cores=1",
        "--port-topology=loop",
        "--forward-mode=macswap",
        "--stats-period",
        "5",
    ]);
    let mut p = Proc::spawn("testpmd", c, &dir.join("testpmd.log"));
    for s in socks {
        p.wait_socket(s, Duration::from_secs(30))?;
    }
    Ok(p)
}

/// The last `SVQ-NET tx=.. rx=..` counters a net guest printed.
pub fn net_counters(console: &str) -> Option<(u64, u64)> {
    console.lines().rev().find_map(|l| {
        let l = &l[l.find("SVQ-NET ")? + 8..];
        let mut tx = None;
        let mut rx = None;
        for kv in l.split_whitespace() {
            if let Some(v) = kv.strip_prefix("tx=") {
                tx = v.parse().ok();
            } else if let Some(v) = kv.strip_prefix("rx=") {
                rx = v.parse().ok();
            }
        }
        Some((tx?, rx?))
    })
}
