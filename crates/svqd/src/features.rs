//! Which virtio and vhost-user protocol features svqd offers the VMM and acks to the backend.
//!
//! svqd must never advertise something it cannot carry through in *both* modes: in shadow mode the
//! engine, not the backend, walks the guest ring, and the vhost 0.18 backend-side handler ends the
//! connection on messages it has no arm for (SET_LOG_FD, STATUS, IOTLB, SEND_RARP, NET_SET_MTU...).

use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// `VHOST_F_LOG_ALL`: the VMM asks the device to log every write to guest memory.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_IN_ORDER`: descriptors used in ring order, completions in avail order.
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;

/// `VIRTIO_F_ACCESS_PLATFORM`: buffer addresses are IOVAs translated by a platform IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `VIRTIO_F_RING_PACKED`.
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
/// `VIRTIO_F_ORDER_PLATFORM`: driver and device order memory accesses as the platform does
/// for real hardware.
pub const VIRTIO_F_ORDER_PLATFORM: u64 = 1 << 36;
/// `VIRTIO_F_NOTIFICATION_DATA`: the driver's notifications carry the ring position.
pub const VIRTIO_F_NOTIFICATION_DATA: u64 = 1 << 38;
/// `VIRTIO_F_RING_RESET`: the driver may reset and re-enable one queue at a time.
pub const VIRTIO_F_RING_RESET: u64 = 1 << 40;

/// Virtio feature bits passed through from the backend to the VMM.
///
/// Device-specific bits (0..=23) and the ring features the shadow engine implements: indirect
/// descriptors, EVENT_IDX and IN_ORDER (the engine keeps avail order end to end, allocates shadow
/// descriptors in ring order and splits a device's batch element into one used element per
/// chain; see `svq::ring`). Hidden, and why:
/// * RING_PACKED: the engine reads and writes split rings only.
/// * ACCESS_PLATFORM: needs IOTLB messages svqd cannot handle.
/// * NOTIFICATION_DATA: each kick would have to carry the ring position; eventfd kicks carry no
///   data, in passthrough and from the shadow worker alike, and the in-band kick message
///   (INBAND_NOTIFICATIONS) is not relayed.
/// * RING_RESET: the engine would carry it (a reset queue is an engine dropped and a new one
///   started at index 0), but in svqd a queue's GET_VRING_BASE in shadow mode is a switch back
///   that drains the shadow ring and restarts the backend on the guest ring, meant for a VM
///   stop, not for a ring the driver is abandoning; no peer in the test matrix drives a
///   per-queue reset over vhost-user to check that path.
/// * ORDER_PLATFORM: the engine orders its ring accesses with CPU (SMP) barriers, which is not
///   what a device that needs platform ordering (hardware behind vDPA) asks for.
/// * Everything else above bit 23 (SR_IOV, NOTIF_CONFIG_DATA, ADMIN_VQ, ...): transport or
///   hardware features that mean nothing between a VMM and a vhost-user backend, or that no
///   part of svqd implements.
pub const PASSTHROUGH_VIRTIO_FEATURES: u64 = ((1 << 24) - 1)
    | (1 << 24) // VIRTIO_F_NOTIFY_ON_EMPTY
    | (1 << 27) // VIRTIO_F_ANY_LAYOUT
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VHOST_USER_F_PROTOCOL_FEATURES
    | VIRTIO_F_VERSION_1
    | VIRTIO_F_IN_ORDER;

/// Features offered to the VMM for a backend offering `backend`: LOG_ALL always (svqd logs), and
/// PROTOCOL_FEATURES always (LOG_SHMFD needs it).
pub fn vmm_virtio_features(backend: u64) -> u64 {
    (backend & PASSTHROUGH_VIRTIO_FEATURES) | VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES
}

/// Protocol features passed through when the backend has them.
///
/// Not passed: BACKEND_REQ and everything riding on it (BACKEND_SEND_FD, HOST_NOTIFIER maps the
/// backend's doorbell into the guest and would bypass svqd's kick path, SHARED_OBJECT, SHMEM), STATUS,
/// PAGEFAULT (postcopy), RARP, NET_MTU, CRYPTO_SESSION, INBAND_NOTIFICATIONS, XEN_MMAP, GPU: the
/// vhost crate cannot relay them, or they conflict with shadow mode.
pub fn passthrough_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// Protocol features offered to the VMM: what passes through, plus LOG_SHMFD (svqd writes the log).
pub fn vmm_protocol_features(backend: VhostUserProtocolFeatures) -> VhostUserProtocolFeatures {
    (backend & passthrough_protocol_features()) | VhostUserProtocolFeatures::LOG_SHMFD
}

/// Protocol features svqd acks to the backend when the VMM acked `vmm_acked`.
///
/// Whatever the VMM chose that passes through, plus the ones svqd itself relies on when the
/// backend has them: REPLY_ACK (errors from the backend become visible), MQ (queue count for index
/// validation) and CONFIGURE_MEM_SLOTS (adding the shadow ring region). None of these changes how
/// the backend treats the messages the VMM sends.
pub fn backend_protocol_features(
    backend: VhostUserProtocolFeatures,
    vmm_acked: VhostUserProtocolFeatures,
) -> VhostUserProtocolFeatures {
    let own = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    backend & ((vmm_acked & passthrough_protocol_features()) | own)
}

/// Features forwarded to the backend for what the VMM acked: LOG_ALL never reaches it.
pub fn backend_virtio_features(vmm_acked: u64) -> u64 {
    vmm_acked & !VHOST_F_LOG_ALL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_all_and_shmfd_always_offered_and_never_forwarded() {
        let backend = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | 1;
        let f = vmm_virtio_features(backend);
        assert_ne!(f & VHOST_F_LOG_ALL, 0);
        assert_eq!(backend_virtio_features(f) & VHOST_F_LOG_ALL, 0);
        let p = vmm_protocol_features(VhostUserProtocolFeatures::MQ);
        assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        let b = backend_protocol_features(
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::MQ,
        );
        assert!(!b.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        assert!(b.contains(VhostUserProtocolFeatures::MQ));
    }

    #[test]
    fn unsupported_features_are_hidden() {
        let hidden = VIRTIO_F_RING_PACKED
            | VIRTIO_F_ACCESS_PLATFORM
            | VIRTIO_F_ORDER_PLATFORM
            | VIRTIO_F_NOTIFICATION_DATA
            | VIRTIO_F_RING_RESET;
        let f = vmm_virtio_features(hidden | VIRTIO_F_VERSION_1);
        assert_eq!(f & hidden, 0);
        assert_eq!(f & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
        let p = vmm_protocol_features(VhostUserProtocolFeatures::all());
        assert!(!p.contains(VhostUserProtocolFeatures::STATUS));
        assert!(!p.contains(VhostUserProtocolFeatures::BACKEND_REQ));
        assert!(!p.contains(VhostUserProtocolFeatures::HOST_NOTIFIER));
        assert!(!p.contains(VhostUserProtocolFeatures::PAGEFAULT));
    }

    #[test]
    fn in_order_passes_through_both_ways() {
        let backend = VIRTIO_F_VERSION_1 | VIRTIO_F_IN_ORDER | VIRTIO_RING_F_EVENT_IDX;
        let offered = vmm_virtio_features(backend);
        assert_eq!(offered & VIRTIO_F_IN_ORDER, VIRTIO_F_IN_ORDER);
        assert_eq!(
            backend_virtio_features(offered | VHOST_F_LOG_ALL) & VIRTIO_F_IN_ORDER,
            VIRTIO_F_IN_ORDER
        );
        // Not invented for a backend without it.
        assert_eq!(
            vmm_virtio_features(VIRTIO_F_VERSION_1) & VIRTIO_F_IN_ORDER,
            0
        );
    }
}
