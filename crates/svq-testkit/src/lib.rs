//! svq-testkit: the pieces that let svq prove itself without a real VM.
//!
//! * [`backend`]: reference vhost-user backends (virtio-blk on a file, echo virtio-net) that offer
//!   no dirty logging, with qemu-storage-daemon-like asynchronous, out-of-order, delayed completion.
//! * [`guest`]: a userspace virtio driver: guest RAM in a shared memfd, split rings, block and net
//!   workloads that verify every byte a device wrote and every request's single completion.
//! * [`vmm`]: a simulated VMM (vhost-user frontend) with QEMU's and Cloud Hypervisor's way of
//!   driving the dirty log.
//! * [`migration`]: pre-copy live migration, stop-and-copy and restart on a destination.
//! * [`oracle`]: the verdict: equal memories page for page, exactly-once completion, data intact.
//! * [`scenario`]: whole runs with a proxy injected between VMM and backend; [`demo`] on top.
//!
//! The crate depends only on `svq`, never on `svqd`: a proxy is injected by the caller.

#![deny(missing_docs)]

pub mod backend;
pub mod demo;
pub mod guest;
pub mod migration;
pub mod oracle;
pub mod scenario;
pub mod vmm;

/// Installs a tracing subscriber for tests (RUST_LOG controls it; warnings only by default). Safe
/// to call from every test: only the first call installs it.
pub fn init_test_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
