//! `svqd`: a vhost-user proxy that makes devices without dirty logging live-migratable.
//!
//! svqd sits between a VMM (QEMU, Cloud Hypervisor) and a vhost-user backend. In passthrough mode it
//! forwards every vhost-user message and hands the kick/call eventfds straight to the backend, so the
//! data path never enters svqd. When the VMM starts dirty logging (VHOST_F_LOG_ALL), or on a control
//! command, each running queue switches to shadow mode: the backend is pointed at a shadow ring
//! owned by svqd and the [`svq`] engine relays buffers between the guest ring and the shadow ring,
//! marking every guest page the backend wrote in the VMM's dirty log.

pub mod api;
pub mod control;

pub use api::ControlTarget;
