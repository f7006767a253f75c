//! A vhost-vdpa device in memory, for the backend's tests: the kernel's rules for what a running,
//! suspended or reset device accepts, rings whose device side takes buffers on request, and
//! optional SUSPEND/RESUME (which no vDPA device on this host offers: VDUSE answers EOPNOTSUPP).

use std::cell::RefCell;
use std::io;

use vmm_sys_util::eventfd::EventFd;

use super::device::{status, DeviceInfo, VdpaError, VdpaOps};
use super::iotlb::{IotlbMap, IotlbOp};

/// One ring as the device holds it.
#[derive(Default)]
pub struct FakeRing {
    pub num: u16,
    pub addr: Option<(u64, u64, u64)>,
    /// The device's next avail index (what GET_VRING_BASE answers).
    pub last_avail: u16,
    pub enabled: bool,
    /// The device's copy of the kick fd (shares the counter with the fd it was given).
    pub kick: Option<EventFd>,
    pub call: bool,
}

/// Device state behind `&self` (the ioctls take `&self`, as the kernel's do).
#[derive(Default)]
pub struct FakeState {
    pub status: u8,
    pub features: u64,
    pub suspended: bool,
    pub rings: Vec<FakeRing>,
    /// Every request, in order ("reset", "suspend", "set_vring_base 0 5", ...).
    pub log: Vec<String>,
}

/// The device. `suspend`/`resume`: whether those backend features are offered.
pub struct FakeVdpa {
    info: DeviceInfo,
    suspend: bool,
    resume: bool,
    pub state: RefCell<FakeState>,
    pub iotlb: IotlbMap,
}

fn refuse(op: &'static str, errno: i32) -> VdpaError {
    VdpaError::Kernel {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
}

impl FakeVdpa {
    /// A block-like device with `queues` rings, VERSION_1 | EVENT_IDX | INDIRECT offered.
    pub fn new(queues: u32, suspend: bool, resume: bool) -> Self {
        let info = DeviceInfo {
            device_id: 2,
            features: (1 << 32) | (1 << 29) | (1 << 28),
            backend_features: 0,
            iova_first: 0,
            iova_last: u64::MAX,
            config_size: 64,
            num_queues: queues,
            max_queue_size: 256,
            groups: 1,
            address_spaces: 1,
        };
        FakeVdpa {
            info,
            suspend,
            resume,
            state: RefCell::new(FakeState {
                rings: (0..queues).map(|_| FakeRing::default()).collect(),
                ..FakeState::default()
            }),
            iotlb: IotlbMap::new(0, u64::MAX),
        }
    }

    fn running(&self) -> bool {
        let s = self.state.borrow();
        s.status & status::DRIVER_OK != 0 && !s.suspended
    }

    /// The device side of ring `q` takes `n` buffers, as a device does after a kick it saw.
    /// Returns whether the ring was running (a stopped or suspended device takes nothing).
    pub fn take(&self, q: usize, n: u16) -> bool {
        if !self.running() {
            return false;
        }
        let mut s = self.state.borrow_mut();
        let r = &mut s.rings[q];
        if !r.enabled || r.addr.is_none() {
            return false;
        }
        r.last_avail = r.last_avail.wrapping_add(n);
        true
    }

    /// Whether a kick reached ring `q`'s device side since the last look.
    pub fn kicked(&self, q: usize) -> bool {
        let s = self.state.borrow();
        s.rings[q].kick.as_ref().is_some_and(|k| k.read().is_ok())
    }

    /// How many times `what` was requested after the first request starting with `since`.
    pub fn count_since(&self, since: &str, what: &str) -> usize {
        let s = self.state.borrow();
        let start = s
            .log
            .iter()
            .position(|l| l.starts_with(since))
            .map_or(0, |i| i + 1);
        s.log[start..]
            .iter()
            .filter(|l| l.starts_with(what))
            .count()
    }

    /// How many times `what` was requested since the log was cleared.
    pub fn count(&self, what: &str) -> usize {
        let s = self.state.borrow();
        s.log.iter().filter(|l| l.starts_with(what)).count()
    }

    /// Forget the requests so far.
    pub fn clear_log(&self) {
        self.state.borrow_mut().log.clear();
    }

    fn record(&self, what: String) {
        self.state.borrow_mut().log.push(what);
    }

    /// The kernel refuses ring changes on a running device unless it is suspended (EINVAL).
    fn ring_change(&self, op: &'static str) -> Result<(), VdpaError> {
        if self.running() {
            return Err(refuse(op, libc::EINVAL));
        }
        Ok(())
    }
}

impl VdpaOps for FakeVdpa {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn can_suspend(&self) -> bool {
        self.suspend
    }
    fn can_resume(&self) -> bool {
        self.resume
    }
    fn iotlb_persists(&self) -> bool {
        true
    }
    fn status(&self) -> Result<u8, VdpaError> {
        Ok(self.state.borrow().status)
    }
    fn reset(&self) -> Result<(), VdpaError> {
        self.record("reset".into());
        let mut s = self.state.borrow_mut();
        s.status = 0;
        s.features = 0;
        s.suspended = false;
        for r in &mut s.rings {
            *r = FakeRing::default();
        }
        Ok(())
    }
    fn negotiate(&self, features: u64) -> Result<(), VdpaError> {
        self.record(format!("negotiate {features:#x}"));
        let mut s = self.state.borrow_mut();
        if s.status != 0 {
            return Err(VdpaError::BadStatus {
                status: s.status,
                step: "negotiate without a reset",
            });
        }
        s.features = features;
        s.status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        Ok(())
    }
    fn driver_ok(&self) -> Result<(), VdpaError> {
        self.record("driver_ok".into());
        let mut s = self.state.borrow_mut();
        if s.status & status::FEATURES_OK == 0 {
            return Err(VdpaError::BadStatus {
                status: s.status,
                step: "DRIVER_OK without FEATURES_OK",
            });
        }
        s.status |= status::DRIVER_OK;
        Ok(())
    }
    fn set_vring_num(&self, index: usize, num: u16) -> Result<(), VdpaError> {
        self.ring_change("VHOST_SET_VRING_NUM")?;
        self.state.borrow_mut().rings[index].num = num;
        Ok(())
    }
    fn set_vring_addr(
        &self,
        index: usize,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), VdpaError> {
        self.ring_change("VHOST_SET_VRING_ADDR")?;
        self.record(format!("set_vring_addr {index} {desc:#x}"));
        let mut s = self.state.borrow_mut();
        s.rings[index].num = num;
        s.rings[index].addr = Some((desc, avail, used));
        Ok(())
    }
    fn set_vring_base(&self, index: usize, base: u16) -> Result<(), VdpaError> {
        self.ring_change("VHOST_SET_VRING_BASE")?;
        self.record(format!("set_vring_base {index} {base}"));
        self.state.borrow_mut().rings[index].last_avail = base;
        Ok(())
    }
    fn vring_base(&self, index: usize) -> Result<u16, VdpaError> {
        Ok(self.state.borrow().rings[index].last_avail)
    }
    fn set_vring_kick(&self, index: usize, fd: &EventFd) -> Result<(), VdpaError> {
        let copy = fd.try_clone().map_err(|e| VdpaError::Kernel {
            op: "dup",
            source: e,
        })?;
        self.state.borrow_mut().rings[index].kick = Some(copy);
        Ok(())
    }
    fn set_vring_call(&self, index: usize, _fd: &EventFd) -> Result<(), VdpaError> {
        self.state.borrow_mut().rings[index].call = true;
        Ok(())
    }
    fn set_vring_enable(&self, index: usize, on: bool) -> Result<(), VdpaError> {
        self.state.borrow_mut().rings[index].enabled = on;
        Ok(())
    }
    fn config(&self, offset: u32, len: u32) -> Result<Vec<u8>, VdpaError> {
        Ok((offset..offset + len).map(|b| b as u8).collect())
    }
    fn set_config(&self, _offset: u32, _data: &[u8]) -> Result<(), VdpaError> {
        Ok(())
    }
    fn suspend(&self) -> Result<(), VdpaError> {
        self.record("suspend".into());
        if !self.suspend {
            return Err(refuse("VHOST_VDPA_SUSPEND", libc::EOPNOTSUPP));
        }
        let mut s = self.state.borrow_mut();
        if s.status & status::DRIVER_OK == 0 {
            return Err(refuse("VHOST_VDPA_SUSPEND", libc::EINVAL));
        }
        s.suspended = true;
        Ok(())
    }
    fn resume(&self) -> Result<(), VdpaError> {
        self.record("resume".into());
        if !self.resume {
            return Err(refuse("VHOST_VDPA_RESUME", libc::EOPNOTSUPP));
        }
        self.state.borrow_mut().suspended = false;
        Ok(())
    }
    fn update_iotlb(&mut self, ops: &[IotlbOp]) -> Result<(), VdpaError> {
        self.iotlb.check(ops)?;
        for op in ops {
            self.iotlb.apply_one(op)?;
        }
        Ok(())
    }
    fn remap_all(&mut self) -> Result<(), VdpaError> {
        Ok(())
    }
}
