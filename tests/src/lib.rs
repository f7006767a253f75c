//! Glue between the testkit's scenarios and svqd: a [`ProxyLauncher`] that starts an in-process
//! svqd between each VMM socket and backend socket.
//!
//! [`ProxyLauncher`]: svq_testkit::scenario::ProxyLauncher

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use svq_testkit::scenario::Proxy as TestProxy;
use svq_testkit::scenario::{run_migration, MigrationScenarioReport, ScenarioOptions};
use svqd::{ControlTarget, Proxy, ProxyConfig, ProxyThread, ShadowPolicy};

/// An in-process svqd seen through the testkit's proxy interface.
pub struct SvqdProxy {
    thread: ProxyThread,
    control: Arc<dyn ControlTarget>,
}

impl SvqdProxy {
    /// Per-queue statistics as svqd reports them.
    pub fn stats(&self) -> String {
        format!("{:?}", self.control.query_stats())
    }
}

impl TestProxy for SvqdProxy {
    fn set_shadow(&self, enable: bool) -> Result<(), String> {
        self.control.set_shadow(enable)
    }

    fn stop(self: Box<Self>) {
        if let Err(e) = self.thread.stop() {
            eprintln!("svqd stopped with an error: {e}");
        }
    }
}

/// How to configure each svqd the launcher starts.
#[derive(Debug, Clone, Copy)]
pub struct SvqdSettings {
    /// Shadow policy.
    pub shadow: ShadowPolicy,
    /// Write the VMM's dirty log (false only for the negative control).
    pub log_enabled: bool,
    /// Use ADD_MEM_REG towards the backend for shadow rings.
    pub backend_mem_slots: bool,
}

impl Default for SvqdSettings {
    fn default() -> Self {
        SvqdSettings {
            shadow: ShadowPolicy::Auto,
            log_enabled: true,
            backend_mem_slots: true,
        }
    }
}

/// A launcher for [`svq_testkit::scenario`]: every call starts a fresh svqd.
pub fn svqd_launcher(
    settings: SvqdSettings,
) -> impl FnMut(&Path, &Path) -> Result<Box<dyn TestProxy>, String> {
    move |socket: &Path, backend: &Path| {
        let mut cfg = ProxyConfig::new(socket, backend);
        cfg.shadow = settings.shadow;
        cfg.log_enabled = settings.log_enabled;
        cfg.backend_mem_slots = settings.backend_mem_slots;
        let proxy = Proxy::new(cfg).map_err(|e| e.to_string())?;
        let control = proxy.control();
        let thread = proxy.spawn().map_err(|e| e.to_string())?;
        Ok(Box::new(SvqdProxy { thread, control }) as Box<dyn TestProxy>)
    }
}

pub use svq_testkit::init_test_tracing as init_tracing;

/// The scenario the migration tests start from: a small VM (32 MiB RAM, an 8 MiB disk) under
/// load for `pace` before the migration and again on the destination.
pub fn small_scenario(pace: Duration) -> ScenarioOptions {
    ScenarioOptions {
        ram_size: 32 << 20,
        disk_size: 8 << 20,
        warmup: pace,
        after: pace,
        ..Default::default()
    }
}

/// Runs the migration scenario `opts` with a fresh svqd per side configured by `settings`, and
/// returns its report with the scenario's progress lines; panics with those lines, prefixed by
/// `tag`, if the scenario fails.
pub fn migrate_through_svqd(
    opts: &ScenarioOptions,
    settings: SvqdSettings,
    tag: &str,
) -> (MigrationScenarioReport, Vec<String>) {
    let mut launcher = svqd_launcher(settings);
    let mut lines = Vec::new();
    let r = run_migration(opts, Some(&mut launcher), &mut |l| lines.push(l.to_owned()))
        .unwrap_or_else(|e| panic!("{tag}: scenario failed: {e}\n{}", lines.join("\n")));
    (r, lines)
}

/// Asserts that the oracle of `r` passed; on failure prints its verdict, failures and `lines`.
pub fn assert_oracle_passed(r: &MigrationScenarioReport, tag: &str, lines: &[String]) {
    assert!(
        r.oracle.passed(),
        "{tag}: oracle failed:\n{}\n{:?}\n{}",
        r.oracle,
        r.oracle.failures(),
        lines.join("\n")
    );
}
