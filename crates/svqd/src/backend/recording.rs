//! A [`BackendDevice`] test double: it answers every request from a script of its own state and
//! records what it was asked, so unit tests can check the requests the proxy sends and in which
//! order (memory-table edits, ring restarts) without a backend process.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::VringConfigData;
use vmm_sys_util::eventfd::EventFd;

use super::{BackendDevice, DeviceRegion, DeviceResult};
use crate::error::ProxyError;

/// One request the double received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A whole table, as (gpa, size) pairs.
    SetMemTable(Vec<(u64, u64)>),
    /// One region added, (gpa, size).
    AddMemRegion(u64, u64),
    /// One region removed, (gpa, size).
    RemoveMemRegion(u64, u64),
    /// A ring request: (name, queue, value).
    Ring(&'static str, usize, u64),
    /// GET_VRING_BASE on a queue.
    GetVringBase(usize),
    /// Anything else, by name.
    Other(&'static str),
}

/// The double. Clones share the log.
#[derive(Clone)]
pub struct RecordingDevice {
    /// Requests in arrival order.
    pub log: Arc<Mutex<Vec<Request>>>,
    /// Whether it takes ADD_MEM_REG / REM_MEM_REG.
    pub incremental: bool,
    /// Queues it has.
    pub queues: usize,
    /// What GET_VRING_BASE answers.
    pub base: u16,
    /// Fail requests with this name.
    pub fail: Option<&'static str>,
}

impl RecordingDevice {
    /// A device with `queues` queues that takes regions one by one when `incremental`.
    pub fn new(queues: usize, incremental: bool) -> Self {
        RecordingDevice {
            log: Arc::default(),
            incremental,
            queues,
            base: 0,
            fail: None,
        }
    }

    /// The requests so far (and forget them).
    pub fn take(&self) -> Vec<Request> {
        std::mem::take(&mut self.log.lock().unwrap())
    }

    fn record(&self, name: &'static str, r: Request) -> DeviceResult<()> {
        self.log.lock().unwrap().push(r);
        match self.fail {
            Some(f) if f == name => Err(ProxyError::NotAllowed(format!("{name} refused"))),
            _ => Ok(()),
        }
    }

    fn ring(&self, name: &'static str, q: usize, v: u64) -> DeviceResult<()> {
        self.record(name, Request::Ring(name, q, v))
    }
}

impl BackendDevice for RecordingDevice {
    fn kind(&self) -> &'static str {
        "recording"
    }
    fn features(&self) -> u64 {
        1 << 32
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }
    fn set_protocol_features(&mut self, _f: VhostUserProtocolFeatures) -> DeviceResult<()> {
        self.record(
            "SET_PROTOCOL_FEATURES",
            Request::Other("SET_PROTOCOL_FEATURES"),
        )
    }
    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_mem_slots(&self) -> Option<u64> {
        self.incremental.then_some(32)
    }
    fn set_owner(&mut self) -> DeviceResult<()> {
        self.record("SET_OWNER", Request::Other("SET_OWNER"))
    }
    fn set_features(&mut self, _features: u64) -> DeviceResult<()> {
        self.record("SET_FEATURES", Request::Other("SET_FEATURES"))
    }
    fn acked_features(&self) -> Option<u64> {
        None
    }
    fn has_enable(&self) -> bool {
        true
    }
    fn ignores_disable(&self) -> bool {
        false
    }
    fn reads_kick_fd(&self) -> bool {
        true
    }
    fn incremental_memory(&self) -> bool {
        self.incremental
    }
    fn set_mem_table(&mut self, regions: &[DeviceRegion]) -> DeviceResult<()> {
        let t = regions.iter().map(|r| (r.gpa, r.size)).collect();
        self.record("SET_MEM_TABLE", Request::SetMemTable(t))
    }
    fn add_mem_region(&mut self, r: &DeviceRegion) -> DeviceResult<()> {
        self.record("ADD_MEM_REG", Request::AddMemRegion(r.gpa, r.size))
    }
    fn remove_mem_region(&mut self, r: &DeviceRegion) -> DeviceResult<()> {
        self.record("REM_MEM_REG", Request::RemoveMemRegion(r.gpa, r.size))
    }
    fn set_vring_num(&mut self, q: usize, num: u16) -> DeviceResult<()> {
        self.ring("SET_VRING_NUM", q, num.into())
    }
    fn set_vring_base(&mut self, q: usize, base: u16) -> DeviceResult<()> {
        self.ring("SET_VRING_BASE", q, base.into())
    }
    fn set_vring_addr(&mut self, q: usize, ring: &VringConfigData) -> DeviceResult<()> {
        self.ring("SET_VRING_ADDR", q, ring.desc_table_addr)
    }
    fn set_vring_kick(&mut self, q: usize, _kick: &EventFd) -> DeviceResult<()> {
        self.ring("SET_VRING_KICK", q, 0)
    }
    fn set_vring_call(&mut self, q: usize, _call: &EventFd) -> DeviceResult<()> {
        self.ring("SET_VRING_CALL", q, 0)
    }
    fn set_vring_err(&mut self, q: usize, _err: &EventFd) -> DeviceResult<()> {
        self.ring("SET_VRING_ERR", q, 0)
    }
    fn set_vring_enable(&mut self, q: usize, enable: bool) -> DeviceResult<()> {
        self.ring("SET_VRING_ENABLE", q, enable.into())
    }
    fn get_vring_base(&mut self, q: usize) -> DeviceResult<u16> {
        self.record("GET_VRING_BASE", Request::GetVringBase(q))?;
        Ok(self.base)
    }
    fn hand_over_kick(&mut self, q: usize, kick: &EventFd) -> DeviceResult<()> {
        self.set_vring_kick(q, kick)?;
        let _ = kick.write(1);
        Ok(())
    }
    fn sync(&mut self) -> DeviceResult<()> {
        self.record("SYNC", Request::Other("SYNC"))
    }
    fn reset_device(&mut self) -> DeviceResult<()> {
        self.record("RESET_DEVICE", Request::Other("RESET_DEVICE"))
    }
    fn reset_owner(&mut self) -> DeviceResult<()> {
        self.record("RESET_OWNER", Request::Other("RESET_OWNER"))
    }
    fn get_config(
        &mut self,
        _o: u32,
        size: u32,
        _f: VhostUserConfigFlags,
    ) -> DeviceResult<Vec<u8>> {
        self.record("GET_CONFIG", Request::Other("GET_CONFIG"))?;
        Ok(vec![0; size as usize])
    }
    fn set_config(&mut self, _o: u32, _d: &[u8], _f: VhostUserConfigFlags) -> DeviceResult<()> {
        self.record("SET_CONFIG", Request::Other("SET_CONFIG"))
    }
    fn watch_fd(&self) -> Option<RawFd> {
        None
    }
    fn hung_up(&self) -> bool {
        false
    }
    fn close(&self) {}
}
