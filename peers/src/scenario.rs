//! The vhost-user-blk migration scenario: QEMU → (svqd →) qemu-storage-daemon, migrated to a
//! paused destination QEMU, RAM compared page by page, then the destination runs on and the guest
//! keeps verifying its disk data. Used by the tests and by `scripts/peers/soak.sh`.

use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::guest::{self, iterations};
use crate::proc::Proc;
use crate::vm::{compare_ram, start_qsd, MigStats, Svqd, SvqdOpts, Vm, VmSpec};
use crate::{bin_dir, Setup, TestDir};

/// Guest RAM for the blk scenarios (MiB). Small keeps pmemsave and the comparison cheap.
pub const MEM_MIB: u64 = 256;
/// Migration bandwidth cap (bytes/s): 256 MiB then takes ~4 s, long enough for the guest's disk
/// reads (one iteration every ~3 s) to land in pages already sent.
pub const MAX_BW: u64 = 64 << 20;

/// What sits between QEMU and qemu-storage-daemon.
#[derive(Debug, Clone)]
pub enum Via {
    /// QEMU talks to qsd directly (qsd logs dirty pages itself): proves the harness.
    Direct,
    /// Through svqd with these options.
    Svqd(SvqdOpts),
    /// Through this crate's `vu-relay`; `drop_log` hides dirty logging from qsd (a negative control
    /// that does not depend on svqd).
    Relay {
        /// Hide SET_LOG_BASE / LOG_ALL from the backend.
        drop_log: bool,
    },
}

/// One side of a migration: a QEMU and, with [`Via::Svqd`], its svqd.
pub struct Side {
    /// The guest.
    pub vm: Vm,
    /// Its svqd, if any.
    pub svqd: Option<Svqd>,
    /// Its vu-relay, if any.
    pub relay: Option<Proc>,
}

impl Side {
    /// Quits QEMU, then stops svqd (SIGTERM) and checks it exited cleanly.
    pub fn shutdown(self) -> Result<(), String> {
        self.vm.quit();
        if let Some(mut s) = self.svqd {
            match s.proc.stop(Duration::from_secs(5)) {
                Some(st) if st.success() => {}
                st => {
                    return Err(format!(
                        "svqd did not exit cleanly on SIGTERM ({st:?}):\n{}",
                        s.proc.log_tail(20)
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The blk rig: a test dir, a disk image with known data, one qsd with two exports.
pub struct BlkRig {
    /// Scratch directory (logs, sockets, consoles).
    pub dir: TestDir,
    /// The disk image.
    pub disk: PathBuf,
    /// md5 of the disk's known data region.
    pub data_md5: String,
    /// The two qsd export sockets (generation g uses `exports[g % 2]`).
    pub exports: [PathBuf; 2],
    /// qemu-storage-daemon.
    pub qsd: Proc,
    via: Via,
}

/// One migration's outcome.
#[derive(Debug, Clone)]
pub struct MigRecord {
    /// QEMU's numbers.
    pub stats: MigStats,
    /// Differing 4 KiB pages (page frame numbers) between source and destination RAM.
    pub differing: Vec<u64>,
    /// Guest iteration reached on the destination after it resumed.
    pub dest_iter: u64,
}

impl fmt::Display for MigRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "total {} ms, downtime {} ms, setup {} ms, {} MiB sent, {} dirty syncs, {} pages differ",
            self.stats.total_ms,
            self.stats.downtime_ms,
            self.stats.setup_ms,
            self.stats.transferred >> 20,
            self.stats.dirty_syncs,
            self.differing.len()
        )
    }
}

impl BlkRig {
    /// Creates the disk and starts qsd.
    pub fn new(s: &Setup, name: &str, via: Via) -> Result<BlkRig, String> {
        let dir = TestDir::new(name);
        let disk = dir.join("disk.raw");
        let data_md5 = guest::make_disk(&disk);
        let exports = [dir.join("expA.sock"), dir.join("expB.sock")];
        let qsd = start_qsd(&s.fx, dir.path(), &disk, &exports)?;
        Ok(BlkRig {
            dir,
            disk,
            data_md5,
            exports,
            qsd,
            via,
        })
    }

    /// Starts generation `g` (QEMU, and svqd if configured) on export `g % 2`, optionally as a
    /// paused migration destination on `incoming`.
    pub fn start_side(&self, s: &Setup, g: usize, incoming: Option<&str>) -> Result<Side, String> {
        let export = &self.exports[g % 2];
        let (mut svqd, mut relay, mut sock) = (None, None, export.clone());
        match &self.via {
            Via::Direct => {}
            Via::Svqd(o) => {
                let d = Svqd::start(self.dir.path(), &format!("svqd{g}"), export, o)?;
                sock = d.socket.clone();
                svqd = Some(d);
            }
            Via::Relay { drop_log } => {
                sock = self.dir.join(&format!("relay{g}.sock"));
                let _ = std::fs::remove_file(&sock);
                let mut c = Command::new(bin_dir().join("vu-relay"));
                c.arg("--socket").arg(&sock).arg("--backend").arg(export);
                if *drop_log {
                    c.arg("--drop-log");
                }
                let name = format!("relay{g}");
                let mut p = Proc::spawn(&name, c, &self.dir.join(&format!("{name}.log")));
                p.wait_socket(&sock, Duration::from_secs(10))?;
                relay = Some(p);
            }
        }
        let mut spec = VmSpec::new(
            &format!("vm{g}"),
            MEM_MIB,
            &guest::append("blk-dirty", &self.data_md5),
        )
        .vhost_user_blk(&sock);
        if let Some(u) = incoming {
            spec = spec.incoming(u);
        }
        let vm = Vm::start(&s.fx, self.dir.path(), spec).map_err(|e| {
            let extra = svqd
                .as_ref()
                .map(|d| format!("\n--- svqd log:\n{}", d.proc.log_tail(30)))
                .unwrap_or_default();
            format!("{e}{extra}\n--- qsd log:\n{}", self.qsd.log_tail(10))
        })?;
        Ok(Side { vm, svqd, relay })
    }

    /// Adds svqd's and qsd's log tails to an error message.
    pub fn context(&self, side: &Side, e: String) -> String {
        let svqd = side
            .svqd
            .as_ref()
            .map(|d| format!("\n--- {} log:\n{}", d.proc.name, d.proc.log_tail(40)))
            .unwrap_or_default();
        format!("{e}{svqd}\n--- qsd log:\n{}", self.qsd.log_tail(10))
    }

    /// Boots generation 0 and waits until the guest's I/O loop has run once. Returns the running
    /// side and the boot time (spawn → `/init` running).
    pub fn boot(&self, s: &Setup) -> Result<(Side, Duration), String> {
        let mut side = self.start_side(s, 0, None)?;
        let boot = side
            .vm
            .wait_boot(Duration::from_secs(120))
            .map_err(|e| self.context(&side, e))?;
        side.vm
            .wait_iterations(0, 1, Duration::from_secs(120))
            .map_err(|e| self.context(&side, e))?;
        Ok((side, boot))
    }

    /// Migrates `src` (generation `g - 1`) to a new paused destination (generation `g`), runs the
    /// RAM oracle, resumes the destination, shuts the source down, and waits until the guest has
    /// completed `iters_after` more verified I/O iterations on the destination.
    /// Differing pages are returned, not judged: the caller decides (negative control).
    pub fn migrate(
        &self,
        s: &Setup,
        src: Side,
        g: usize,
        iters_after: u64,
    ) -> Result<(Side, MigRecord), String> {
        let mut src = src;
        let uri = format!("unix:{}", self.dir.join(&format!("mig{g}.sock")).display());
        let mut dst = self.start_side(s, g, Some(&uri))?;
        let stats = src
            .vm
            .migrate_to(&mut dst.vm, &uri, Some(MAX_BW))
            .map_err(|e| self.context(&src, self.context(&dst, e)))?;
        let differing = compare_ram(&mut src.vm, &mut dst.vm, self.dir.path())?;
        let src_iter = iterations(&src.vm.console_text()).0;
        dst.vm.cont()?;
        src.shutdown()?;
        let dest_iter = if iters_after > 0 {
            dst.vm
                .wait_iterations(src_iter, iters_after, Duration::from_secs(150))
                .map_err(|e| self.context(&dst, e))?
        } else {
            0
        };
        Ok((
            dst,
            MigRecord {
                stats,
                differing,
                dest_iter,
            },
        ))
    }
}

/// Boots a guest and migrates it `n` times back and forth (each destination gets a fresh QEMU and
/// svqd on the other qsd export), requiring 0 differing pages and a verified guest after each.
/// Calls `report` after each migration. Returns boot time and all records.
pub fn ping_pong(
    s: &Setup,
    name: &str,
    via: Via,
    n: usize,
    iters_after: u64,
    mut report: impl FnMut(usize, &MigRecord),
) -> Result<(Duration, Vec<MigRecord>), String> {
    let rig = BlkRig::new(s, name, via)?;
    let (mut side, boot) = rig.boot(s)?;
    let mut recs = Vec::new();
    let t0 = Instant::now();
    for g in 1..=n {
        let (next, rec) = rig.migrate(s, side, g, iters_after)?;
        report(g, &rec);
        if !rec.differing.is_empty() {
            return Err(format!(
                "migration {g}: {} pages differ between source and destination RAM (first: {:?}); {rec}",
                rec.differing.len(),
                &rec.differing[..rec.differing.len().min(10)]
            ));
        }
        recs.push(rec);
        side = next;
    }
    eprintln!("{name}: {n} migrations in {:?}", t0.elapsed());
    side.shutdown()?;
    let host_md5 = guest::data_md5(&rig.disk);
    if host_md5 != rig.data_md5 {
        return Err(format!(
            "disk data region changed on the host: {host_md5} != {}",
            rig.data_md5
        ));
    }
    Ok((boot, recs))
}
