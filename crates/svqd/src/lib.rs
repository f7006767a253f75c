//! `svqd`: a vhost-user proxy that makes devices without dirty logging live-migratable.
//!
//! svqd sits between a VMM (QEMU, Cloud Hypervisor) and a vhost-user backend. In passthrough mode it
//! forwards every vhost-user message and hands the kick/call eventfds straight to the backend, so the
//! data path never enters svqd. When the VMM starts dirty logging (VHOST_F_LOG_ALL), or on a control
//! command, each running queue switches to shadow mode: the backend is pointed at a shadow ring
//! owned by svqd and the [`svq`] engine relays buffers between the guest ring and the shadow ring,
//! marking every guest page the backend wrote in the VMM's dirty log.
//!
//! Use as a library: [`Proxy::new`] with a [`ProxyConfig`], then [`Proxy::run`] (blocking) or
//! [`Proxy::spawn`]; [`Proxy::control`] gives the [`ControlTarget`] the control socket serves.

#![warn(missing_docs)]

pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod control;
pub mod drain;
pub mod early_enable;
pub mod error;
pub mod features;
pub mod handler;
pub mod memory;
pub mod metrics;
pub mod pacing;
pub mod proxy;
pub mod queue;
pub mod quiesce;
pub mod relay;
pub mod report;
pub mod session;
pub mod shadow;
pub mod sigbus;
pub mod space;
pub mod stats;
pub mod switch;
pub mod worker;

pub use api::ControlTarget;
pub use config::{ProxyConfig, ShadowPolicy};
pub use error::ProxyError;
pub use proxy::{Proxy, ProxyThread, ShutdownHandle};
pub use report::{StatsReport, StatusReport};
