//! A vhost-vdpa device (`/dev/vhost-vdpa-N`) as svqd drives it: open and probe, backend features,
//! the virtio status handshake, IOTLB v2 maps in batches, vrings, config space, reset, and
//! SUSPEND/RESUME where the device offers them. [`VdpaOps`] is what the backend needs of it (the
//! seam where the tests put a device with SUSPEND, which VDUSE lacks).
//!
//! Built on the vhost crate's `VhostKernVdpa`; raw ioctls only where vhost 0.18 lacks the call
//! (`VHOST_VDPA_RESUME`). Addresses given to the device (ring addresses, descriptor buffers) are
//! IOVAs: svqd maps its own memory into the device's IOTLB ([`super::iotlb`]) and chooses the IOVAs.
//!
//! Measured against VDUSE (Linux 6.12, qemu-storage-daemon 10 vduse-blk; docs/VDPA.md):
//! open resets the device and is exclusive (a second open is `EBUSY`); per-vring ioctls need
//! SET_OWNER first (`EPERM`); there is no SUSPEND (`EOPNOTSUPP` for the backend feature and for the
//! ioctl at DRIVER_OK); IOTLB errors are all `EFAULT`; memory must be a shared file mapping; right
//! after DRIVER_OK the call eventfd fires once without a used entry.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{
    VhostAccess, VhostBackend, VhostIotlbBackend, VhostIotlbMsg, VhostIotlbType, VringConfigData,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::features::VIRTIO_F_VERSION_1;

use super::iotlb::{IotlbError, IotlbMap, IotlbOp, Mapping};

/// virtio feature bit: ACCESS_PLATFORM (the device goes through an IOMMU: the vhost-vdpa IOTLB).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// vhost backend feature bit numbers (`VHOST_BACKEND_F_*` are bit numbers, not masks).
pub mod backend_bit {
    /// IOTLB messages in the v2 layout (with an ASID).
    pub const IOTLB_MSG_V2: u32 = 1;
    /// BATCH_BEGIN / BATCH_END around IOTLB updates.
    pub const IOTLB_BATCH: u32 = 2;
    /// IOTLB messages name an address space.
    pub const IOTLB_ASID: u32 = 3;
    /// VHOST_VDPA_SUSPEND.
    pub const SUSPEND: u32 = 4;
    /// VHOST_VDPA_RESUME.
    pub const RESUME: u32 = 5;
    /// Vrings may be enabled after DRIVER_OK.
    pub const ENABLE_AFTER_DRIVER_OK: u32 = 6;
    /// VHOST_VDPA_GET_VRING_DESC_GROUP.
    pub const DESC_ASID: u32 = 7;
    /// IOTLB entries survive a reset.
    pub const IOTLB_PERSIST: u32 = 8;
}

/// virtio device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: the device may use the rings.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Names of the backend feature bits, for logs and reports.
pub fn backend_feature_names(bits: u64) -> Vec<&'static str> {
    const NAMES: [(u32, &str); 8] = [
        (backend_bit::IOTLB_MSG_V2, "IOTLB_MSG_V2"),
        (backend_bit::IOTLB_BATCH, "IOTLB_BATCH"),
        (backend_bit::IOTLB_ASID, "IOTLB_ASID"),
        (backend_bit::SUSPEND, "SUSPEND"),
        (backend_bit::RESUME, "RESUME"),
        (
            backend_bit::ENABLE_AFTER_DRIVER_OK,
            "ENABLE_AFTER_DRIVER_OK",
        ),
        (backend_bit::DESC_ASID, "DESC_ASID"),
        (backend_bit::IOTLB_PERSIST, "IOTLB_PERSIST"),
    ];
    NAMES
        .iter()
        .filter(|(b, _)| bits & (1 << b) != 0)
        .map(|&(_, n)| n)
        .collect()
}

/// Errors of the vhost-vdpa device layer.
#[derive(Debug, thiserror::Error)]
pub enum VdpaError {
    /// The device node cannot be opened.
    #[error("cannot open vDPA device {path}: {reason} ({source})")]
    Open {
        /// The path given.
        path: String,
        /// What it most likely means.
        reason: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The node is not a vhost-vdpa device.
    #[error("{path} is not a vhost-vdpa device ({op}: {source})")]
    NotVdpa {
        /// The path given.
        path: String,
        /// The ioctl that failed.
        op: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// An ioctl or IOTLB write failed.
    #[error("{op}: {source}")]
    Kernel {
        /// What was asked.
        op: &'static str,
        /// The kernel's answer (errno).
        source: io::Error,
    },
    /// The device lacks something svqd needs.
    #[error("the vDPA device lacks {0}")]
    Missing(&'static str),
    /// The device did not accept the features (FEATURES_OK did not stick).
    #[error("the device refused features {features:#x} (status {status:#x} after FEATURES_OK)")]
    FeaturesRefused {
        /// Features offered to the device.
        features: u64,
        /// Status read back.
        status: u8,
    },
    /// The device reports a failed or needs-reset status.
    #[error("device status {status:#x} after {step}")]
    BadStatus {
        /// The status read back.
        status: u8,
        /// The step after which it was read.
        step: &'static str,
    },
    /// A queue index beyond the device's queues.
    #[error("queue {index} out of range (the device has {queues} queues)")]
    BadQueue {
        /// Index asked for.
        index: usize,
        /// Queues of the device.
        queues: usize,
    },
    /// A ring configuration the device cannot take.
    #[error("queue {index}: {reason}")]
    BadRing {
        /// Queue index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A map or unmap refused by svqd's IOTLB mirror (nothing was sent).
    #[error("IOTLB: {0}")]
    Iotlb(#[from] IotlbError),
}

impl VdpaError {
    /// The errno of a kernel refusal, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VdpaError::Kernel { source, .. }
            | VdpaError::Open { source, .. }
            | VdpaError::NotVdpa { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the kernel said the device does not implement the operation (`EOPNOTSUPP`).
    pub fn is_unsupported(&self) -> bool {
        self.errno() == Some(libc::EOPNOTSUPP)
    }
}

/// The kernel's errno inside a vhost crate error.
fn os_error(e: vhost::Error) -> io::Error {
    match e {
        vhost::Error::IoctlError(e) | vhost::Error::IOError(e) | vhost::Error::VhostOpen(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn kernel(op: &'static str) -> impl FnOnce(vhost::Error) -> VdpaError {
    move |e| VdpaError::Kernel {
        op,
        source: os_error(e),
    }
}

/// What the device is, as probed at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// virtio device id (2 = block, 1 = net).
    pub device_id: u32,
    /// Device features (VHOST_GET_FEATURES).
    pub features: u64,
    /// Backend features the device offers (VHOST_GET_BACKEND_FEATURES).
    pub backend_features: u64,
    /// First usable IOVA.
    pub iova_first: u64,
    /// Last usable IOVA.
    pub iova_last: u64,
    /// Size of the config space.
    pub config_size: u32,
    /// Virtqueues of the device.
    pub num_queues: u32,
    /// Largest queue size.
    pub max_queue_size: u16,
    /// Virtqueue groups.
    pub groups: u32,
    /// Address spaces.
    pub address_spaces: u32,
}

/// The device memory type the vhost crate wants; vhost-vdpa takes IOVAs, so it stays empty.
type NoMemory = Arc<GuestMemoryMmap<()>>;

/// An open vhost-vdpa device. Closing it (drop) resets the device in the kernel.
pub struct VdpaDevice {
    path: PathBuf,
    dev: VhostKernVdpa<NoMemory>,
    info: DeviceInfo,
    acked_backend: u64,
    iotlb: IotlbMap,
}

/// ioctls missing from vhost 0.18's bindings.
mod raw {
    // uapi: #define VHOST_VDPA_RESUME _IO(VHOST_VIRTIO, 0x7E), VHOST_VIRTIO = 0xAF.
    vmm_sys_util::ioctl_io_nr!(VHOST_VDPA_RESUME, 0xAF, 0x7E);
}

impl VdpaDevice {
    /// Opens `path`, takes ownership (SET_OWNER), probes it and acks the backend features svqd
    /// uses: IOTLB_MSG_V2 (required), IOTLB_BATCH, SUSPEND, RESUME and IOTLB_PERSIST where
    /// offered.
    pub fn open(path: &Path) -> Result<Self, VdpaError> {
        let shown = path.display().to_string();
        let s = path.to_str().ok_or_else(|| VdpaError::Open {
            path: shown.clone(),
            reason: "the path is not UTF-8",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut dev = VhostKernVdpa::new(s, NoMemory::default()).map_err(|e| {
            let source = os_error(e);
            let reason = match source.raw_os_error() {
                Some(libc::ENOENT) => {
                    "no such device (create it with `vdpa dev add` and bind it to vhost_vdpa)"
                }
                Some(libc::EBUSY) => {
                    "the device is in use (a vhost-vdpa device can be opened by one process at a time)"
                }
                Some(libc::EACCES) | Some(libc::EPERM) => "permission denied",
                Some(libc::ENXIO) | Some(libc::ENODEV) => "the device is gone",
                _ => "open failed",
            };
            VdpaError::Open {
                path: shown.clone(),
                reason,
                source,
            }
        })?;
        let device_id = dev.get_device_id().map_err(|e| VdpaError::NotVdpa {
            path: shown.clone(),
            op: "VHOST_VDPA_GET_DEVICE_ID",
            source: os_error(e),
        })?;
        dev.set_owner().map_err(kernel("VHOST_SET_OWNER"))?;
        let features = dev.get_features().map_err(kernel("VHOST_GET_FEATURES"))?;
        let offered = dev
            .get_backend_features()
            .map_err(kernel("VHOST_GET_BACKEND_FEATURES"))?;
        if offered & (1 << backend_bit::IOTLB_MSG_V2) == 0 {
            return Err(VdpaError::Missing("the IOTLB_MSG_V2 backend feature"));
        }
        let want = offered
            & ((1 << backend_bit::IOTLB_MSG_V2)
                | (1 << backend_bit::IOTLB_BATCH)
                | (1 << backend_bit::SUSPEND)
                | (1 << backend_bit::RESUME)
                | (1 << backend_bit::IOTLB_PERSIST));
        dev.set_backend_features(want)
            .map_err(kernel("VHOST_SET_BACKEND_FEATURES"))?;
        let range = dev
            .get_iova_range()
            .map_err(kernel("VHOST_VDPA_GET_IOVA_RANGE"))?;
        if range.first > range.last {
            return Err(VdpaError::Missing("a usable IOVA range"));
        }
        let config_size = dev
            .get_config_size()
            .map_err(kernel("VHOST_VDPA_GET_CONFIG_SIZE"))?;
        let num_queues = dev
            .get_vqs_count()
            .map_err(kernel("VHOST_VDPA_GET_VQS_COUNT"))?;
        let max_queue_size = dev
            .get_vring_num()
            .map_err(kernel("VHOST_VDPA_GET_VRING_NUM"))?;
        // Groups and address spaces: absent on old kernels, one of each then.
        let groups = dev.get_group_num().unwrap_or(1);
        let address_spaces = dev.get_as_num().unwrap_or(1);
        let info = DeviceInfo {
            device_id,
            features,
            backend_features: offered,
            iova_first: range.first,
            iova_last: range.last,
            config_size,
            num_queues,
            max_queue_size,
            groups,
            address_spaces,
        };
        Ok(VdpaDevice {
            path: path.to_path_buf(),
            dev,
            info,
            acked_backend: want,
            iotlb: IotlbMap::new(range.first, range.last),
        })
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was probed at open.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Backend features acked.
    pub fn acked_backend_features(&self) -> u64 {
        self.acked_backend
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_backend & (1 << bit) != 0
    }

    /// Whether the device offers VHOST_VDPA_SUSPEND (it stops processing rings and keeps its
    /// state: the vring bases read afterwards are final).
    pub fn can_suspend(&self) -> bool {
        self.acked(backend_bit::SUSPEND)
    }

    /// Whether the device offers VHOST_VDPA_RESUME.
    pub fn can_resume(&self) -> bool {
        self.acked(backend_bit::RESUME)
    }

    /// Whether the device keeps its IOTLB across a reset (IOTLB_PERSIST acked). Without it a
    /// parent may drop its own copy of the mappings on reset (VDUSE 6.12 keeps them).
    pub fn iotlb_persists(&self) -> bool {
        self.acked(backend_bit::IOTLB_PERSIST)
    }

    /// Whether IOTLB updates are sent in batches.
    pub fn batches_iotlb(&self) -> bool {
        self.acked(backend_bit::IOTLB_BATCH)
    }

    /// The IOTLB as svqd mapped it.
    pub fn iotlb(&self) -> &IotlbMap {
        &self.iotlb
    }

    fn check_queue(&self, index: usize) -> Result<(), VdpaError> {
        if index >= self.info.num_queues as usize {
            return Err(VdpaError::BadQueue {
                index,
                queues: self.info.num_queues as usize,
            });
        }
        Ok(())
    }

    /// VHOST_VDPA_GET_STATUS.
    pub fn status(&self) -> Result<u8, VdpaError> {
        self.dev
            .get_status()
            .map_err(kernel("VHOST_VDPA_GET_STATUS"))
    }

    fn set_status(&self, s: u8, op: &'static str) -> Result<(), VdpaError> {
        self.dev.set_status(s).map_err(kernel(op))
    }

    /// Resets the device (status 0): it forgets features, rings and their indices; svqd's IOTLB
    /// entries stay in the kernel (the IOTLB belongs to the open file, not the device status).
    pub fn reset(&self) -> Result<(), VdpaError> {
        self.set_status(0, "VHOST_VDPA_SET_STATUS(reset)")?;
        let s = self.status()?;
        if s != 0 {
            return Err(VdpaError::BadStatus {
                status: s,
                step: "reset",
            });
        }
        Ok(())
    }

    /// Status handshake up to FEATURES_OK with `features` (which must be a subset of the device's
    /// and include VERSION_1). The device must be reset (status 0) before.
    pub fn negotiate(&self, features: u64) -> Result<(), VdpaError> {
        if features & !self.info.features != 0 {
            return Err(VdpaError::Missing("some of the features asked for"));
        }
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VdpaError::Missing("VERSION_1 in the features asked for"));
        }
        self.set_status(status::ACKNOWLEDGE, "VHOST_VDPA_SET_STATUS(ACKNOWLEDGE)")?;
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER,
            "VHOST_VDPA_SET_STATUS(DRIVER)",
        )?;
        self.dev
            .set_features(features)
            .map_err(kernel("VHOST_SET_FEATURES"))?;
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s, "VHOST_VDPA_SET_STATUS(FEATURES_OK)")?;
        let got = self.status()?;
        if got & status::FEATURES_OK == 0 {
            return Err(VdpaError::FeaturesRefused {
                features,
                status: got,
            });
        }
        Ok(())
    }

    /// Sets DRIVER_OK: the device starts serving the enabled rings.
    pub fn driver_ok(&self) -> Result<(), VdpaError> {
        let s = self.status()?;
        if s & status::FEATURES_OK == 0 {
            return Err(VdpaError::BadStatus {
                status: s,
                step: "DRIVER_OK without FEATURES_OK",
            });
        }
        self.set_status(s | status::DRIVER_OK, "VHOST_VDPA_SET_STATUS(DRIVER_OK)")?;
        let got = self.status()?;
        if got & (status::FAILED | status::NEEDS_RESET) != 0 || got & status::DRIVER_OK == 0 {
            return Err(VdpaError::BadStatus {
                status: got,
                step: "DRIVER_OK",
            });
        }
        Ok(())
    }

    /// Whether DRIVER_OK is set.
    pub fn running(&self) -> Result<bool, VdpaError> {
        Ok(self.status()? & status::DRIVER_OK != 0)
    }

    /// VHOST_SET_VRING_NUM.
    pub fn set_vring_num(&self, index: usize, num: u16) -> Result<(), VdpaError> {
        self.check_queue(index)?;
        if num == 0 || !num.is_power_of_two() || num > self.info.max_queue_size {
            return Err(VdpaError::BadRing {
                index,
                reason: format!(
                    "size {num} (must be a power of two up to {})",
                    self.info.max_queue_size
                ),
            });
        }
        self.dev
            .set_vring_num(index, num)
            .map_err(kernel("VHOST_SET_VRING_NUM"))
    }

    /// VHOST_SET_VRING_ADDR with IOVAs of the descriptor table, driver and device areas (each
    /// must be mapped in the IOTLB).
    pub fn set_vring_addr(
        &self,
        index: usize,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), VdpaError> {
        self.check_queue(index)?;
        let n = u64::from(num);
        for (what, addr, len) in [
            ("descriptor table", desc, 16 * n),
            ("driver area", avail, 6 + 2 * n),
            ("device area", used, 6 + 8 * n),
        ] {
            if !self.covered(addr, len) {
                return Err(VdpaError::BadRing {
                    index,
                    reason: format!("{what} at IOVA {addr:#x}+{len:#x} is not mapped"),
                });
            }
        }
        let cfg = VringConfigData {
            queue_max_size: num,
            queue_size: num,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        // The inherent `VhostKernVdpa::set_vring_addr` passes IOVAs through unchanged.
        self.dev
            .set_vring_addr(index, &cfg)
            .map_err(kernel("VHOST_SET_VRING_ADDR"))
    }

    /// Whether `len` bytes at `iova` are covered by the IOTLB (possibly by adjacent mappings).
    pub fn covered(&self, iova: u64, len: u64) -> bool {
        let mut at = iova;
        let Some(end) = iova.checked_add(len) else {
            return false;
        };
        while at < end {
            match self.iotlb.find(at) {
                Some(m) => at = m.last().saturating_add(1),
                None => return false,
            }
            if at == 0 {
                // The mapping ended at u64::MAX.
                return true;
            }
        }
        true
    }

    /// VHOST_SET_VRING_BASE: the next avail index the device reads.
    pub fn set_vring_base(&self, index: usize, base: u16) -> Result<(), VdpaError> {
        self.check_queue(index)?;
        self.dev
            .set_vring_base(index, base)
            .map_err(kernel("VHOST_SET_VRING_BASE"))
    }

    /// VHOST_GET_VRING_BASE. On a running device without SUSPEND this is a snapshot: the device
    /// may take more buffers right after.
    pub fn vring_base(&self, index: usize) -> Result<u16, VdpaError> {
        self.check_queue(index)?;
        self.dev
            .get_vring_base(index)
            .map(|b| b as u16)
            .map_err(kernel("VHOST_GET_VRING_BASE"))
    }

    /// VHOST_SET_VRING_KICK.
    pub fn set_vring_kick(&self, index: usize, fd: &EventFd) -> Result<(), VdpaError> {
        self.check_queue(index)?;
        self.dev
            .set_vring_kick(index, fd)
            .map_err(kernel("VHOST_SET_VRING_KICK"))
    }

    /// VHOST_SET_VRING_CALL.
    pub fn set_vring_call(&self, index: usize, fd: &EventFd) -> Result<(), VdpaError> {
        self.check_queue(index)?;
        self.dev
            .set_vring_call(index, fd)
            .map_err(kernel("VHOST_SET_VRING_CALL"))
    }

    /// VHOST_VDPA_SET_VRING_ENABLE. Without ENABLE_AFTER_DRIVER_OK, enable before DRIVER_OK.
    pub fn set_vring_enable(&self, index: usize, on: bool) -> Result<(), VdpaError> {
        self.check_queue(index)?;
        self.dev
            .set_vring_enable(index, on)
            .map_err(kernel("VHOST_VDPA_SET_VRING_ENABLE"))
    }

    /// VHOST_VDPA_GET_CONFIG: `len` bytes of the device's config space at `offset`.
    pub fn config(&self, offset: u32, len: u32) -> Result<Vec<u8>, VdpaError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.info.config_size) {
            return Err(VdpaError::BadRing {
                index: 0,
                reason: format!(
                    "config read {offset}+{len} beyond the config space ({} bytes)",
                    self.info.config_size
                ),
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.dev
            .get_config(offset, &mut buf)
            .map_err(kernel("VHOST_VDPA_GET_CONFIG"))?;
        Ok(buf)
    }

    /// VHOST_VDPA_SET_CONFIG.
    pub fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), VdpaError> {
        self.dev
            .set_config(offset, data)
            .map_err(kernel("VHOST_VDPA_SET_CONFIG"))
    }

    /// VHOST_VDPA_SET_CONFIG_CALL: `fd` is signalled when the config space changes.
    pub fn set_config_call(&self, fd: &EventFd) -> Result<(), VdpaError> {
        self.dev
            .set_config_call(fd)
            .map_err(kernel("VHOST_VDPA_SET_CONFIG_CALL"))
    }

    /// VHOST_VDPA_SUSPEND. Issued even when the backend feature is absent, so that the kernel's
    /// exact answer can be reported (VDUSE 6.12: `EOPNOTSUPP` at DRIVER_OK).
    pub fn suspend(&self) -> Result<(), VdpaError> {
        self.dev.suspend().map_err(kernel("VHOST_VDPA_SUSPEND"))
    }

    /// VHOST_VDPA_RESUME (raw ioctl: not in vhost 0.18).
    pub fn resume(&self) -> Result<(), VdpaError> {
        // SAFETY: an argument-less ioctl on the vhost-vdpa fd this struct owns; result checked.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl(&self.dev, raw::VHOST_VDPA_RESUME()) };
        if rc < 0 {
            return Err(VdpaError::Kernel {
                op: "VHOST_VDPA_RESUME",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn send(&self, msg_type: VhostIotlbType, m: &Mapping) -> Result<(), VdpaError> {
        let msg = VhostIotlbMsg {
            iova: m.iova,
            size: m.size,
            userspace_addr: m.uaddr,
            perm: if m.readonly {
                VhostAccess::ReadOnly
            } else {
                VhostAccess::ReadWrite
            },
            msg_type,
        };
        let op = match msg_type {
            VhostIotlbType::Update => "IOTLB UPDATE",
            VhostIotlbType::Invalidate => "IOTLB INVALIDATE",
            VhostIotlbType::BatchBegin => "IOTLB BATCH_BEGIN",
            VhostIotlbType::BatchEnd => "IOTLB BATCH_END",
            _ => "IOTLB message",
        };
        self.dev.send_iotlb_msg(&msg).map_err(kernel(op))
    }

    /// Applies `ops` to the device's IOTLB (ASID 0) in one batch when the device batches. The
    /// whole batch is checked against svqd's mirror first; a kernel refusal midway still closes
    /// the batch, and the mirror then holds exactly the steps the kernel accepted.
    pub fn update_iotlb(&mut self, ops: &[IotlbOp]) -> Result<(), VdpaError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.iotlb.check(ops)?;
        let none = Mapping {
            iova: 0,
            size: 0,
            uaddr: 0,
            readonly: false,
        };
        let batch = self.batches_iotlb() && ops.len() > 1;
        if batch {
            self.send(VhostIotlbType::BatchBegin, &none)?;
        }
        let mut result = Ok(());
        for op in ops {
            let r = match op {
                IotlbOp::Map(m) => self.send(VhostIotlbType::Update, m),
                IotlbOp::Unmap { iova, size } => self.send(
                    VhostIotlbType::Invalidate,
                    &Mapping {
                        iova: *iova,
                        size: *size,
                        ..none
                    },
                ),
            };
            if let Err(e) = r.and_then(|()| Ok(self.iotlb.apply_one(op)?)) {
                result = Err(e);
                break;
            }
        }
        if batch {
            let end = self.send(VhostIotlbType::BatchEnd, &none);
            if result.is_ok() {
                result = end;
            }
        }
        result
    }

    /// Sends every mapping again (INVALIDATE + UPDATE of each, one batch): after a reset of a
    /// device without IOTLB_PERSIST, whose parent may have dropped them.
    pub fn remap_all(&mut self) -> Result<(), VdpaError> {
        let ops: Vec<IotlbOp> = self
            .iotlb
            .mappings()
            .flat_map(|m| {
                [
                    IotlbOp::Unmap {
                        iova: m.iova,
                        size: m.size,
                    },
                    IotlbOp::Map(*m),
                ]
            })
            .collect();
        self.update_iotlb(&ops)
    }

    /// Maps `maps` (one batch).
    pub fn map(&mut self, maps: &[Mapping]) -> Result<(), VdpaError> {
        let ops: Vec<IotlbOp> = maps.iter().map(|&m| IotlbOp::Map(m)).collect();
        self.update_iotlb(&ops)
    }

    /// Unmaps the mappings starting at the given IOVAs (one batch).
    pub fn unmap(&mut self, iovas: &[u64]) -> Result<(), VdpaError> {
        let mut ops = Vec::new();
        for &iova in iovas {
            let m = self
                .iotlb
                .find(iova)
                .filter(|m| m.iova == iova)
                .ok_or(IotlbError::NotMapped { iova, size: 0 })?;
            ops.push(IotlbOp::Unmap { iova, size: m.size });
        }
        self.update_iotlb(&ops)
    }
}

/// What [`super::VdpaBackend`] needs of a vhost-vdpa device: [`VdpaDevice`] in svqd, a device
/// with SUSPEND and RESUME in the tests (no vDPA device on hand offers them).
pub trait VdpaOps: Send {
    /// What was probed at open.
    fn info(&self) -> &DeviceInfo;
    /// VHOST_VDPA_SUSPEND was offered and acked.
    fn can_suspend(&self) -> bool;
    /// VHOST_VDPA_RESUME was offered and acked.
    fn can_resume(&self) -> bool;
    /// IOTLB_PERSIST was acked.
    fn iotlb_persists(&self) -> bool;
    /// VHOST_VDPA_GET_STATUS.
    fn status(&self) -> Result<u8, VdpaError>;
    /// Status 0.
    fn reset(&self) -> Result<(), VdpaError>;
    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    fn negotiate(&self, features: u64) -> Result<(), VdpaError>;
    /// DRIVER_OK.
    fn driver_ok(&self) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_NUM.
    fn set_vring_num(&self, index: usize, num: u16) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_ADDR (IOVAs).
    fn set_vring_addr(
        &self,
        index: usize,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_BASE.
    fn set_vring_base(&self, index: usize, base: u16) -> Result<(), VdpaError>;
    /// VHOST_GET_VRING_BASE.
    fn vring_base(&self, index: usize) -> Result<u16, VdpaError>;
    /// VHOST_SET_VRING_KICK.
    fn set_vring_kick(&self, index: usize, fd: &EventFd) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_CALL.
    fn set_vring_call(&self, index: usize, fd: &EventFd) -> Result<(), VdpaError>;
    /// VHOST_VDPA_SET_VRING_ENABLE.
    fn set_vring_enable(&self, index: usize, on: bool) -> Result<(), VdpaError>;
    /// VHOST_VDPA_GET_CONFIG.
    fn config(&self, offset: u32, len: u32) -> Result<Vec<u8>, VdpaError>;
    /// VHOST_VDPA_SET_CONFIG.
    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), VdpaError>;
    /// VHOST_VDPA_SUSPEND.
    fn suspend(&self) -> Result<(), VdpaError>;
    /// VHOST_VDPA_RESUME.
    fn resume(&self) -> Result<(), VdpaError>;
    /// IOTLB updates, batched.
    fn update_iotlb(&mut self, ops: &[IotlbOp]) -> Result<(), VdpaError>;
    /// Every mapping sent again.
    fn remap_all(&mut self) -> Result<(), VdpaError>;
}

/// Forwards to the inherent methods (which the device-layer tools also use directly).
impl VdpaOps for VdpaDevice {
    fn info(&self) -> &DeviceInfo {
        VdpaDevice::info(self)
    }
    fn can_suspend(&self) -> bool {
        VdpaDevice::can_suspend(self)
    }
    fn can_resume(&self) -> bool {
        VdpaDevice::can_resume(self)
    }
    fn iotlb_persists(&self) -> bool {
        VdpaDevice::iotlb_persists(self)
    }
    fn status(&self) -> Result<u8, VdpaError> {
        VdpaDevice::status(self)
    }
    fn reset(&self) -> Result<(), VdpaError> {
        VdpaDevice::reset(self)
    }
    fn negotiate(&self, features: u64) -> Result<(), VdpaError> {
        VdpaDevice::negotiate(self, features)
    }
    fn driver_ok(&self) -> Result<(), VdpaError> {
        VdpaDevice::driver_ok(self)
    }
    fn set_vring_num(&self, index: usize, num: u16) -> Result<(), VdpaError> {
        VdpaDevice::set_vring_num(self, index, num)
    }
    fn set_vring_addr(
        &self,
        index: usize,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), VdpaError> {
        VdpaDevice::set_vring_addr(self, index, num, desc, avail, used)
    }
    fn set_vring_base(&self, index: usize, base: u16) -> Result<(), VdpaError> {
        VdpaDevice::set_vring_base(self, index, base)
    }
    fn vring_base(&self, index: usize) -> Result<u16, VdpaError> {
        VdpaDevice::vring_base(self, index)
    }
    fn set_vring_kick(&self, index: usize, fd: &EventFd) -> Result<(), VdpaError> {
        VdpaDevice::set_vring_kick(self, index, fd)
    }
    fn set_vring_call(&self, index: usize, fd: &EventFd) -> Result<(), VdpaError> {
        VdpaDevice::set_vring_call(self, index, fd)
    }
    fn set_vring_enable(&self, index: usize, on: bool) -> Result<(), VdpaError> {
        VdpaDevice::set_vring_enable(self, index, on)
    }
    fn config(&self, offset: u32, len: u32) -> Result<Vec<u8>, VdpaError> {
        VdpaDevice::config(self, offset, len)
    }
    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), VdpaError> {
        VdpaDevice::set_config(self, offset, data)
    }
    fn suspend(&self) -> Result<(), VdpaError> {
        VdpaDevice::suspend(self)
    }
    fn resume(&self) -> Result<(), VdpaError> {
        VdpaDevice::resume(self)
    }
    fn update_iotlb(&mut self, ops: &[IotlbOp]) -> Result<(), VdpaError> {
        VdpaDevice::update_iotlb(self, ops)
    }
    fn remap_all(&mut self) -> Result<(), VdpaError> {
        VdpaDevice::remap_all(self)
    }
}

/// An eventfd from a file descriptor received from the VMM (vhost-user kick/call fds are eventfds).
pub fn eventfd_from_file(file: File) -> EventFd {
    // SAFETY: the fd is owned by `file` and handed over whole; EventFd only reads and writes it.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl AsRawFd for VdpaDevice {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.dev.as_raw_fd()
    }
}
