//! `svq-demo`: a self-contained live migration through a proxy, with a report a person can read.
//!
//! A reference backend that cannot log (virtio-blk by default), the proxy (injected: the caller
//! passes a [`ProxyLauncher`], so this crate stays independent of svqd), and the simulated guest
//! run on temporary sockets; the guest does verified I/O; the VMM live-migrates it through shadow
//! mode to a destination; the oracle judges the result. Any mismatch is an error.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::backend::blk::CompletionDelay;
use crate::migration::MigrationOptions;
use crate::scenario::{
    run_migration, DeviceKind, MigrationScenarioReport, ProxyLauncher, ScenarioError,
    ScenarioOptions,
};
use crate::vmm::{LogStyle, MemTableStyle, VmmOptions};

/// Device choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoDevice {
    /// virtio-blk on a temporary file (reads write guest RAM).
    Blk,
    /// virtio-net echo (received frames write guest RAM).
    Net,
}

/// VMM flavour on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoVmm {
    /// One dirty log for the whole migration, cleared on every read; ADD_MEM_REG.
    Qemu,
    /// A fresh dirty log for every read; SET_MEM_TABLE.
    CloudHypervisor,
}

/// Options of the demo (`svq-demo --help`).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "svq-demo",
    about = "Live-migrate a simulated guest through svqd's shadow virtqueue and verify it"
)]
pub struct DemoOptions {
    /// Device to migrate.
    #[arg(long, value_enum, default_value_t = DemoDevice::Blk)]
    pub device: DemoDevice,
    /// Request queues (blk) or queue pairs (net).
    #[arg(long, default_value_t = 2)]
    pub queues: u16,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    pub no_event_idx: bool,
    /// Which VMM's vhost-user behaviour to simulate.
    #[arg(long, value_enum, default_value_t = DemoVmm::Qemu)]
    pub vmm: DemoVmm,
    /// Seconds of I/O before and after the migration.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Longest simulated block completion delay, in microseconds (0: complete inline).
    #[arg(long, default_value_t = 1500)]
    pub max_delay_us: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    pub ram_mib: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions::parse_from(["svq-demo"])
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Bad options.
    #[error("{0}")]
    Usage(String),
    /// Setting up or running the scenario failed.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The migration was wrong.
    #[error("migration verification FAILED: {0}")]
    Mismatch(String),
}

impl DemoOptions {
    fn scenario(&self) -> Result<ScenarioOptions, DemoError> {
        if !(0.05..=600.0).contains(&self.seconds) {
            return Err(DemoError::Usage("--seconds must be in 0.05..=600".into()));
        }
        if !(1..=16).contains(&self.queues) {
            return Err(DemoError::Usage("--queues must be in 1..=16".into()));
        }
        if !(16..=4096).contains(&self.ram_mib) {
            return Err(DemoError::Usage("--ram-mib must be in 16..=4096".into()));
        }
        let phase = Duration::from_secs_f64(self.seconds);
        Ok(ScenarioOptions {
            device: match self.device {
                DemoDevice::Blk => DeviceKind::Blk,
                DemoDevice::Net => DeviceKind::Net,
            },
            queues: self.queues,
            event_idx: !self.no_event_idx,
            indirect: true,
            in_order: false,
            blk_delay: (self.max_delay_us > 0).then(|| CompletionDelay {
                min: Duration::from_micros(self.max_delay_us / 50),
                max: Duration::from_micros(self.max_delay_us),
            }),
            blk_strict_call: false,
            ram_size: self.ram_mib << 20,
            disk_size: 32 << 20,
            depth: 16,
            vmm: VmmOptions {
                log_style: match self.vmm {
                    DemoVmm::Qemu => LogStyle::Qemu,
                    DemoVmm::CloudHypervisor => LogStyle::CloudHypervisor,
                },
                mem_style: match self.vmm {
                    DemoVmm::Qemu => MemTableStyle::AddMemReg,
                    DemoVmm::CloudHypervisor => MemTableStyle::SetMemTable,
                },
                ..Default::default()
            },
            migration: MigrationOptions {
                max_rounds: 4,
                converge_pages: 64,
                round_interval: Duration::from_millis(60),
                require_logging: true,
            },
            warmup: phase,
            after: phase,
            min_phase_ops: ScenarioOptions::default().min_phase_ops,
            idle_during_migration: false,
            live_progress: std::io::stderr().is_terminal(),
            hops: 1,
            cancel_first: false,
            seed: 0x5151,
        })
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs the demo, writing the report to `out`; `Err` on any setup problem or mismatch.
pub fn run(
    opts: &DemoOptions,
    launcher: &mut ProxyLauncher<'_>,
    out: &mut dyn Write,
) -> Result<MigrationScenarioReport, DemoError> {
    let sc = opts.scenario()?;
    let dev = match opts.device {
        DemoDevice::Blk => format!(
            "virtio-blk on a {} MiB file, {} queue(s), completions {}",
            sc.disk_size >> 20,
            sc.queues,
            match sc.blk_delay {
                Some(d) => format!(
                    "asynchronous and out of order ({}-{} µs)",
                    d.min.as_micros(),
                    d.max.as_micros()
                ),
                None => "inline".into(),
            }
        ),
        DemoDevice::Net => format!("virtio-net echo, {} queue pair(s)", sc.queues),
    };
    let _ = writeln!(
        out,
        "svq demo: live migration of a vhost-user device through svqd"
    );
    let _ = writeln!(
        out,
        "  backend : reference {dev}; offers NO dirty logging (no LOG_ALL, no LOG_SHMFD)"
    );
    let _ = writeln!(
        out,
        "  guest   : {} MiB shared memfd RAM, event_idx {}, {} in flight per queue",
        sc.ram_size >> 20,
        if sc.event_idx { "on" } else { "off" },
        sc.depth
    );
    let _ = writeln!(
        out,
        "  vmm     : {:?}-style dirty logging and memory table; svqd on each side",
        opts.vmm
    );
    let _ = out.flush();
    let tty = std::io::stderr().is_terminal();
    let mut progress = |line: &str| {
        let mut e = std::io::stderr().lock();
        if tty {
            // Erase the live throughput line first.
            let _ = write!(e, "\r\x1b[2K");
        }
        let _ = writeln!(e, "  .. {line}");
    };
    let r = run_migration(&sc, Some(launcher), &mut progress)?;
    let m = &r.migration;
    let _ = writeln!(out, "\nresults");
    for (name, p) in ["before", "during", "after"].iter().zip(r.phases.iter()) {
        let _ = writeln!(
            out,
            "  throughput {name:<6}: {:>9.0} req/s {:>8.1} MiB/s  ({} requests in {})",
            p.iops(),
            p.mib_s(),
            p.ops,
            ms(p.duration)
        );
    }
    let _ = writeln!(
        out,
        "  mode switch      : {} (SET_LOG_BASE + SET_FEATURES(LOG_ALL) + SET_VRING_ADDR(log), every queue to shadow)",
        ms(m.log_start)
    );
    let rounds: Vec<String> = m
        .rounds
        .iter()
        .map(|s| {
            if s.round == 0 {
                format!("#0 all {}", s.copied)
            } else {
                format!(
                    "#{} {} (cpu {}, device {})",
                    s.round, s.copied, s.cpu_pages, s.device_pages
                )
            }
        })
        .collect();
    let _ = writeln!(out, "  pages per round  : {}", rounds.join(", "));
    let _ = writeln!(
        out,
        "  stop-and-copy    : {} pages (cpu {}, device {}); rings stopped in {}, bases {:?}",
        m.final_round.copied,
        m.final_round.cpu_pages,
        m.final_round.device_pages,
        ms(m.ring_stop),
        m.bases
    );
    let _ = writeln!(
        out,
        "  downtime         : {} (guest stopped -> running on the destination); migration total {}",
        ms(m.downtime),
        ms(m.total)
    );
    let o = &r.oracle;
    let _ = writeln!(
        out,
        "  oracle memory    : {} pages differ (of {}; RAM sizes {})",
        o.differing_pages.len(),
        o.pages,
        if o.sizes_ok { "ok" } else { "WRONG" }
    );
    let _ = writeln!(
        out,
        "  oracle requests  : {} issued, {} completed exactly once, {} duplicated, {} lost",
        o.ledger.issued, o.ledger.completed, o.ledger.duplicates, o.ledger.outstanding
    );
    match opts.device {
        DemoDevice::Blk => {
            let _ = writeln!(
                out,
                "  oracle data      : {} anomalies; {} disk blocks verified against the guest's writes",
                o.anomalies.len(),
                r.blocks_verified
            );
        }
        DemoDevice::Net => {
            let _ = writeln!(
                out,
                "  oracle data      : {} anomalies; {} echoes lost inside the stopped source device (allowed)",
                o.anomalies.len(),
                r.echoes_lost
            );
        }
    }
    let failures = o.failures();
    if failures.is_empty() {
        let _ = writeln!(
            out,
            "\nPASS: 0 pages differ, every request completed exactly once"
        );
        let _ = out.flush();
        Ok(r)
    } else {
        let _ = writeln!(out, "\nFAIL:");
        for f in &failures {
            let _ = writeln!(out, "  - {f}");
        }
        let _ = out.flush();
        Err(DemoError::Mismatch(failures.join("; ")))
    }
}

/// Command-line entry: parses `args` (without the program and subcommand names), runs, and
/// returns the process exit code (0 = verified, 1 = mismatch or error, 2 = usage).
pub fn cli_main(
    args: impl IntoIterator<Item = String>,
    launcher: &mut ProxyLauncher<'_>,
) -> std::process::ExitCode {
    let argv = std::iter::once("svq-demo".to_owned()).chain(args);
    let opts = match DemoOptions::try_parse_from(argv) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let mut out = std::io::stdout().lock();
    match run(&opts, launcher, &mut out) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(DemoError::Usage(e)) => {
            eprintln!("svq-demo: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("svq-demo: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
