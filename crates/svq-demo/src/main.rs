//! `svq-demo`: the README's self-contained demonstration (see `svq_testkit::demo`). This binary
//! only injects the real proxy; the scenario, the simulated guest and VMM, the reference backend
//! and the oracle live in svq-testkit, which never depends on svqd and which svqd never links.

use std::path::Path;
use std::process::ExitCode;

use svq_testkit::scenario::{FnProxy, Proxy as TestProxy};
use svqd::{Proxy, ProxyConfig};

/// Runs the demo with the command line's options; non-zero exit code on any mismatch.
fn main() -> ExitCode {
    let args = std::env::args().skip(1);
    // svqd's own log lines would interleave with the report: warnings and errors only.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut launcher = |socket: &Path, backend: &Path| -> Result<Box<dyn TestProxy>, String> {
        let proxy = Proxy::new(ProxyConfig::new(socket, backend)).map_err(|e| e.to_string())?;
        let control = proxy.control();
        let thread = proxy.spawn().map_err(|e| e.to_string())?;
        Ok(FnProxy::boxed(
            move |on| control.set_shadow(on),
            move || {
                if let Err(e) = thread.stop() {
                    eprintln!("svq-demo: proxy stopped with an error: {e}");
                }
            },
        ))
    };
    svq_testkit::demo::cli_main(args, &mut launcher)
}
