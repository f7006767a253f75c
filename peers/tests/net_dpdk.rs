//! vhost-user-net through svqd: a QEMU guest's virtio-net → svqd → DPDK testpmd (`net_vhost`,
//! macswap: every frame comes back). Traffic must flow in passthrough, in shadow mode (switched
//! on with svqctl), and across a live migration to a second QEMU on a second testpmd port, with
//! the RAM oracle: the guest keeps a few hundred 1.2 KB frames per second coming back (see
//! `mode=net` in init.sh), so the device writes guest RAM throughout the migration, and svqd with
//! its logging disabled must leave differing pages.

use std::time::Duration;

use svq_peers::guest;
use svq_peers::vm::{
    compare_ram, net_counters, start_testpmd, stats_sum, Svqd, SvqdOpts, Vm, VmSpec,
};
use svq_peers::TestDir;

const MEM_MIB: u64 = 256;
/// Quick shadow on/off round trips under traffic in the full svqd test.
const TOGGLES: usize = 20;

fn rx(vm: &Vm) -> u64 {
    net_counters(&vm.console_text()).map(|c| c.1).unwrap_or(0)
}

/// Waits until the guest has received at least `more` frames beyond `base`. Fails at once if
/// svqd (when present) has dropped the VMM connection: no frame can flow after that.
fn wait_rx(vm: &mut Vm, d: &Option<Svqd>, base: u64, more: u64, what: &str) -> u64 {
    let mut dropped = false;
    let t = vm
        .wait_console(what, Duration::from_secs(120), |t| {
            dropped = d.as_ref().is_some_and(|d| {
                let log = d.proc.log_text();
                log.contains("closing the VMM connection") || log.contains("VMM disconnected")
            });
            dropped || net_counters(t).is_some_and(|c| c.1 >= base + more)
        })
        .unwrap_or_else(|e| panic!("{e}{}", logs(d)));
    if dropped {
        panic!(
            "svqd dropped the VMM connection while waiting for {what}{}",
            logs(d)
        );
    }
    net_counters(&t).unwrap().1
}

/// What one test does.
#[derive(Clone, Copy, PartialEq)]
enum Plan {
    /// Without svqd, then a migration: proves the harness (and gives the baseline timings).
    Direct,
    /// Through svqd in passthrough only.
    SvqdPassthrough,
    /// Through svqd: passthrough, shadow mode and back, quick toggles, then a migration.
    SvqdFull,
    /// Through svqd with its dirty logging disabled, then a migration: pages must differ.
    SvqdNoLog,
}

impl Plan {
    fn via(self) -> Option<SvqdOpts> {
        match self {
            Plan::Direct => None,
            Plan::SvqdPassthrough | Plan::SvqdFull => Some(SvqdOpts::default()),
            Plan::SvqdNoLog => Some(SvqdOpts {
                extra: vec!["--x-test-no-log".into()],
                ..SvqdOpts::default()
            }),
        }
    }
}

#[test]
fn net_dpdk_direct_migration() {
    run("net_dpdk_direct_migration", Plan::Direct);
}

/// QEMU's virtio-net sends SET_VRING_ENABLE before SET_FEATURES: svqd must keep the connection
/// and traffic must flow.
#[test]
fn net_dpdk_svqd_passthrough() {
    run("net_dpdk_svqd_passthrough", Plan::SvqdPassthrough);
}

/// Passthrough, shadow mode forced with svqctl and back, 20 quick round trips, then a live
/// migration (shadow mode again, from LOG_ALL) to a destination behind its own svqd.
#[test]
fn net_dpdk_svqd_passthrough_shadow_and_migration() {
    run(
        "net_dpdk_svqd_passthrough_shadow_and_migration",
        Plan::SvqdFull,
    );
}

/// The negative control for net: the same migration with svqd's logging disabled must leave
/// pages that differ (the frames the device wrote while the VMM was copying RAM).
#[test]
fn net_dpdk_svqd_without_logging_pages_differ() {
    run(
        "net_dpdk_svqd_without_logging_pages_differ",
        Plan::SvqdNoLog,
    );
}

/// Starts svqd on `port` with `via` (returning it and the socket QEMU uses), else uses the port.
fn front(
    dir: &TestDir,
    name: &str,
    port: &std::path::Path,
    via: &Option<SvqdOpts>,
) -> (Option<Svqd>, std::path::PathBuf) {
    let Some(opts) = via else {
        return (None, port.to_path_buf());
    };
    let d = Svqd::start(dir.path(), name, port, opts).unwrap_or_else(|e| panic!("{e}"));
    let sock = d.socket.clone();
    (Some(d), sock)
}

fn logs(d: &Option<Svqd>) -> String {
    d.as_ref()
        .map(|d| format!("\n--- {}:\n{}", d.proc.name, d.proc.log_tail(30)))
        .unwrap_or_default()
}

fn run(name: &str, plan: Plan) {
    let via = plan.via();
    let Some(s) = svq_peers::setup(name) else {
        return;
    };
    let dir = TestDir::new(name);
    let ports = [dir.join("vhost0.sock"), dir.join("vhost1.sock")];
    let _pmd = start_testpmd(&s.fx, dir.path(), &ports).unwrap_or_else(|e| panic!("{e}"));
    let append = guest::append("net", "none");
    let (d0, sock0) = front(&dir, "svqd0", &ports[0], &via);
    let mut vm0 = Vm::start(
        &s.fx,
        dir.path(),
        VmSpec::new("vm0", MEM_MIB, &append).vhost_user_net(&sock0),
    )
    .unwrap_or_else(|e| panic!("{e}{}", logs(&d0)));
    let boot = vm0
        .wait_boot(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    let r = wait_rx(&mut vm0, &d0, 0, 8, "rx in passthrough");
    eprintln!("net: boot {boot:?}; passthrough rx={r}");
    if plan == Plan::SvqdPassthrough {
        return;
    }

    if let (Plan::SvqdFull, Some(d)) = (plan, &d0) {
        d.ctl(&["set-shadow", "on"])
            .unwrap_or_else(|e| panic!("{e}{}", logs(&d0)));
        let st = d.ctl(&["--json", "query-status"]).unwrap_or_default();
        let base = rx(&vm0);
        let r = wait_rx(&mut vm0, &d0, base, 8, "rx in shadow mode");
        eprintln!("net: shadow rx={r}; status: {st}");
        d.ctl(&["set-shadow", "off"])
            .unwrap_or_else(|e| panic!("{e}{}", logs(&d0)));
        let base = rx(&vm0);
        let r = wait_rx(&mut vm0, &d0, base, 8, "rx back in passthrough");
        eprintln!("net: passthrough again rx={r}");

        // Switches in quick succession while the guest keeps sending: each one stops a ring of
        // the running port (DPDK tears the device down and brings it up again) and hands the
        // idle receive buffers back and forth. Traffic must still flow afterwards.
        for i in 0..TOGGLES {
            for on in ["on", "off"] {
                d.ctl(&["set-shadow", on])
                    .unwrap_or_else(|e| panic!("toggle {i} {on}: {e}{}", logs(&d0)));
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        let stats = d.ctl(&["--json", "query-stats"]).unwrap_or_default();
        let base = rx(&vm0);
        let r = wait_rx(&mut vm0, &d0, base, 8, "rx after the toggles");
        eprintln!("net: {TOGGLES} shadow on/off toggles, then rx={r}; stats: {stats}");
        let switches = serde_json::from_str(&stats).map_or(0, |v| stats_sum(&v, "mode_switches"));
        // Both rings switched 2 + 2 × TOGGLES times (the first round trip included).
        assert_eq!(switches, 2 * (2 + 2 * TOGGLES as u64), "{stats}");
    }

    // Live migration to a second QEMU on the second testpmd port, through its own svqd.
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (d1, sock1) = front(&dir, "svqd1", &ports[1], &via);
    let mut vm1 = Vm::start(
        &s.fx,
        dir.path(),
        VmSpec::new("vm1", MEM_MIB, &append)
            .vhost_user_net(&sock1)
            .incoming(&uri),
    )
    .unwrap_or_else(|e| panic!("{e}{}", logs(&d1)));
    let stats = vm0
        .migrate_to(&mut vm1, &uri, Some(64 << 20))
        .unwrap_or_else(|e| panic!("{e}{}{}", logs(&d0), logs(&d1)));
    let diff = compare_ram(&mut vm0, &mut vm1, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let at_stop = rx(&vm0);
    eprintln!(
        "net migration (svqd: {}): total {} ms, downtime {} ms, {} pages differ",
        via.is_some(),
        stats.total_ms,
        stats.downtime_ms,
        diff.len()
    );
    if plan == Plan::SvqdNoLog {
        assert!(
            !diff.is_empty(),
            "svqd with logging disabled left 0 differing pages: the net oracle cannot fail"
        );
        vm0.quit();
        vm1.quit();
        return;
    }
    assert!(
        diff.is_empty(),
        "{} pages differ after a vhost-user-net migration: {:?}",
        diff.len(),
        &diff[..diff.len().min(10)]
    );
    vm1.cont().unwrap_or_else(|e| panic!("{e}"));
    vm0.quit();
    let r = wait_rx(&mut vm1, &d1, at_stop, 8, "rx on the destination");
    eprintln!("net: destination rx={r} (source stopped at {at_stop})");
    vm1.quit();
}
