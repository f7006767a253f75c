//! The vhost-vdpa backend through the `BackendDevice` trait, in the order svqd's switch logic
//! calls it, on an in-memory device ([`super::fake`]): the SUSPEND path (which VDUSE cannot
//! exercise) and the reset-and-restart path without it.

use vhost::VringConfigData;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::fake::FakeVdpa;
use super::VdpaBackend;
use crate::backend::{BackendDevice, DeviceRegion};
use crate::error::ProxyError;
use crate::features::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};

const GUEST_RAM: u64 = 0x10_0000;
const SHADOW: u64 = 0x100_0000_0000;

fn region(gpa: u64, size: u64, device_readonly: u64) -> DeviceRegion {
    DeviceRegion {
        gpa,
        size,
        uva: 0x7000_0000_0000 + gpa,
        mmap_offset: 0,
        fd: -1,
        host_addr: 0x7f00_0000_0000 + gpa,
        device_readonly,
    }
}

fn ring_at(desc: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: desc,
        avail_ring_addr: desc + 0x1000,
        used_ring_addr: desc + 0x2000,
        log_addr: None,
    }
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// The VMM's kick and call fds of one ring.
struct VmmRing {
    kick: EventFd,
    call: EventFd,
}

/// A backend on `dev` with guest RAM and a shadow region mapped and `queues` rings started on
/// guest rings at base 0, as a VMM starts a device.
fn started(dev: FakeVdpa, queues: usize) -> (VdpaBackend<FakeVdpa>, Vec<VmmRing>) {
    let mut b = VdpaBackend::with_device(dev).unwrap();
    b.set_features(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
        .unwrap();
    assert_eq!(
        b.device().state.borrow().features,
        VIRTIO_F_VERSION_1,
        "PROTOCOL_FEATURES never reaches the device"
    );
    b.set_mem_table(&[region(GUEST_RAM, 0x100_0000, 0)])
        .unwrap();
    let rings: Vec<VmmRing> = (0..queues)
        .map(|_| VmmRing {
            kick: eventfd(),
            call: eventfd(),
        })
        .collect();
    for (q, r) in rings.iter().enumerate() {
        b.set_vring_num(q, 256).unwrap();
        b.set_vring_addr(q, &ring_at(GUEST_RAM + 0x10_000 * q as u64))
            .unwrap();
        b.set_vring_base(q, 0).unwrap();
        b.set_vring_call(q, &r.call).unwrap();
        b.set_vring_kick(q, &r.kick).unwrap();
    }
    // A VMM starts its rings one after the other (kick before the next ring's address): the
    // device runs from the first kick, and each later ring restarts it (nothing taken yet).
    let dev = b.device();
    assert_eq!(dev.count("driver_ok"), queues);
    assert_eq!(dev.count("reset"), queues - 1);
    for q in 0..queues {
        let s = dev.state.borrow();
        assert!(s.rings[q].enabled && s.rings[q].addr.is_some() && s.rings[q].last_avail == 0);
    }
    dev.clear_log();
    (b, rings)
}

/// Moves ring `q` onto a shadow ring at `base`, as `Switch::start_shadow` does.
fn to_shadow(b: &mut VdpaBackend<FakeVdpa>, q: usize, base: u16) -> Result<EventFd, ProxyError> {
    let kick = eventfd();
    b.set_vring_num(q, 256)?;
    b.set_vring_base(q, base)?;
    b.set_vring_addr(q, &ring_at(SHADOW + 0x10_000 * q as u64))?;
    b.set_vring_call(q, &eventfd())?;
    b.hand_over_kick(q, &kick)?;
    Ok(kick)
}

#[test]
fn suspend_stops_one_ring_and_resume_keeps_the_others_where_they_are() {
    let (mut b, vmm) = started(FakeVdpa::new(2, true, true), 2);
    let dev = b.device();
    assert!(dev.take(0, 5) && dev.take(1, 3));

    // GET_VRING_BASE: the device is suspended (nothing more taken from any ring), the guest's
    // kicks no longer reach ring 0, the answer is final.
    assert_eq!(b.get_vring_base(0).unwrap(), 5);
    let dev = b.device();
    assert!(dev.state.borrow().suspended);
    assert!(!dev.take(0, 1), "a suspended device takes nothing");
    vmm[0].kick.write(1).unwrap();
    assert!(!dev.kicked(0), "the guest's kick reached a stopped ring");

    // The ring moves to the shadow ring with the device suspended: no reset, RESUME at the kick.
    let shadow_kick = to_shadow(&mut b, 0, 5).unwrap();
    let dev = b.device();
    assert_eq!(dev.count("reset"), 0);
    assert_eq!(dev.count_since("suspend", "resume"), 1);
    let s = dev.state.borrow();
    assert!(!s.suspended);
    assert_eq!(s.rings[0].addr.unwrap().0, SHADOW);
    assert_eq!(s.rings[0].last_avail, 5);
    // Ring 1 was not touched: same ring, its own position, its own kick.
    assert_eq!(s.rings[1].addr.unwrap().0, GUEST_RAM + 0x10_000);
    assert_eq!(s.rings[1].last_avail, 3, "ring 1 rewound by the resume");
    drop(s);
    assert!(dev.kicked(0), "the shadow ring's first kick");
    shadow_kick.write(1).unwrap();
    assert!(dev.kicked(0));
    vmm[1].kick.write(1).unwrap();
    assert!(dev.kicked(1));
    assert!(dev.take(0, 2) && dev.take(1, 1));

    // And back to the guest ring at the shadow ring's end, the same way.
    assert_eq!(b.get_vring_base(0).unwrap(), 7);
    b.set_vring_num(0, 256).unwrap();
    b.set_vring_base(0, 7).unwrap();
    b.set_vring_addr(0, &ring_at(GUEST_RAM)).unwrap();
    b.hand_over_kick(0, &vmm[0].kick).unwrap();
    let dev = b.device();
    assert_eq!(dev.count("reset"), 0);
    let s = dev.state.borrow();
    assert_eq!(
        (s.rings[0].addr.unwrap().0, s.rings[0].last_avail),
        (GUEST_RAM, 7)
    );
    assert_eq!(s.rings[1].last_avail, 4);
}

#[test]
fn vm_stop_with_suspend_reads_every_base_then_resets() {
    let (mut b, _vmm) = started(FakeVdpa::new(2, true, true), 2);
    assert!(b.device().take(0, 9) && b.device().take(1, 4));
    assert_eq!(b.get_vring_base(0).unwrap(), 9);
    // The second ring is read on the suspended device; its kick is taken away as well.
    assert_eq!(b.get_vring_base(1).unwrap(), 4);
    assert_eq!(b.device().count("suspend"), 1);
    b.reset_device().unwrap();
    assert_eq!(b.device().state.borrow().status, 0);
}

#[test]
fn without_suspend_a_stopped_ring_restarts_by_reset_at_its_base() {
    let (mut b, vmm) = started(FakeVdpa::new(1, false, false), 1);
    assert!(b.device().take(0, 7));
    assert_eq!(b.get_vring_base(0).unwrap(), 7);
    let dev = b.device();
    assert_eq!(dev.count("suspend"), 0, "not offered");
    vmm[0].kick.write(1).unwrap();
    assert!(!dev.kicked(0), "the guest's kick reached a stopped ring");
    // The device still runs (it may complete what it took; svqd's drain waits for that).
    assert!(dev.take(0, 0));

    to_shadow(&mut b, 0, 7).unwrap();
    let dev = b.device();
    assert_eq!(dev.count("reset"), 1);
    assert_eq!(dev.count_since("reset", "negotiate"), 1);
    assert_eq!(dev.count_since("reset", "driver_ok"), 1);
    let s = dev.state.borrow();
    assert_eq!(s.features, VIRTIO_F_VERSION_1, "renegotiated as before");
    assert_eq!(
        (s.rings[0].addr.unwrap().0, s.rings[0].last_avail),
        (SHADOW, 7)
    );
    assert!(s.rings[0].enabled && s.rings[0].call);
}

#[test]
fn without_suspend_a_ring_cannot_restart_while_another_runs() {
    let (mut b, _vmm) = started(FakeVdpa::new(2, false, false), 2);
    assert!(b.device().take(1, 2));
    assert_eq!(b.get_vring_base(0).unwrap(), 0);
    let err = to_shadow(&mut b, 0, 0).unwrap_err().to_string();
    assert!(err.contains("[1]"), "{err}");
    assert_eq!(b.device().count("reset"), 0);
    // Once every ring is stopped, they restart together at their bases.
    assert_eq!(b.get_vring_base(1).unwrap(), 2);
    to_shadow(&mut b, 0, 0).unwrap();
    b.set_vring_base(1, 2).unwrap();
    b.set_vring_addr(1, &ring_at(GUEST_RAM + 0x10_000)).unwrap();
    b.hand_over_kick(1, &eventfd()).unwrap();
    let s = b.device().state.borrow();
    assert_eq!(s.rings[0].last_avail, 0);
    assert_eq!(s.rings[1].last_avail, 2);
    assert!(s.status & super::status::DRIVER_OK != 0);
}

#[test]
fn suspend_without_resume_restarts_by_reset() {
    let (mut b, _vmm) = started(FakeVdpa::new(1, true, false), 1);
    assert!(b.device().take(0, 4));
    assert_eq!(b.get_vring_base(0).unwrap(), 4);
    to_shadow(&mut b, 0, 4).unwrap();
    let dev = b.device();
    assert_eq!(dev.count_since("suspend", "resume"), 0);
    assert_eq!(dev.count_since("suspend", "reset"), 1);
    assert_eq!(dev.state.borrow().rings[0].last_avail, 4);
}

#[test]
fn shadow_ring_driver_area_is_mapped_read_only() {
    let mut b = VdpaBackend::with_device(FakeVdpa::new(1, false, false)).unwrap();
    b.set_mem_table(&[region(GUEST_RAM, 0x10_0000, 0)]).unwrap();
    b.add_mem_region(&region(SHADOW, 0x4000, 0x3000)).unwrap();
    let maps: Vec<(u64, u64, bool)> = b
        .device()
        .iotlb
        .mappings()
        .map(|m| (m.iova, m.size, m.readonly))
        .collect();
    assert_eq!(
        maps,
        [
            (GUEST_RAM, 0x10_0000, false),
            (SHADOW, 0x3000, true),
            (SHADOW + 0x3000, 0x1000, false)
        ]
    );
    // Removed whole; a region that is not there is a clear error.
    b.remove_mem_region(&region(SHADOW, 0x4000, 0x3000))
        .unwrap();
    assert_eq!(b.device().iotlb.mappings().count(), 1);
    assert!(b.remove_mem_region(&region(SHADOW, 0x4000, 0)).is_err());
    // A table without the guest RAM unmaps it.
    b.set_mem_table(&[]).unwrap();
    assert_eq!(b.device().iotlb.mappings().count(), 0);
}

#[test]
fn features_the_device_lacks_are_refused() {
    let mut b = VdpaBackend::with_device(FakeVdpa::new(1, false, false)).unwrap();
    let err = b.set_features(VIRTIO_F_VERSION_1 | (1 << 40)).unwrap_err();
    assert!(matches!(err, ProxyError::BadRequest(_)), "{err}");
    assert!(b.get_vring_base(3).is_err(), "queue out of range");
}
