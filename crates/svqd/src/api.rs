//! The seam between the daemon and its control plane.
//!
//! The control socket ([`crate::control`]) and in-process users (tests, `svq-demo`) drive a
//! running proxy only through [`ControlTarget`]; they never see the proxy's internals.

use crate::report::{StatsReport, StatusReport};

/// What the control plane may ask of a running proxy.
///
/// Implementations are shared between the vhost-user thread and control clients, so every method
/// takes `&self` and must be safe to call concurrently with VMM traffic.
pub trait ControlTarget: Send + Sync {
    /// Mode per queue, features, backend path...
    fn query_status(&self) -> StatusReport;
    /// Force shadow mode on (true) or back to automatic/passthrough (false). Blocks until switched.
    fn set_shadow(&self, enable: bool) -> Result<(), String>;
    /// Per queue: descriptors forwarded, bytes, kicks, calls, dirty pages logged, mode switches.
    fn query_stats(&self) -> StatsReport;
}
