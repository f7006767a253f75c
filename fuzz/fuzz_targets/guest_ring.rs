//! The guest-ring reader and forwarder against arbitrary guest memory and ring state: whatever
//! the guest wrote, the engine returns a typed error or forwards valid chains; it never panics,
//! never touches memory outside the regions, and its state export stays consistent.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use svq::{
    DirtyLog, IdentityTranslation, QueueConfig, QueueState, RingArea, ShadowVirtqueue, SharedLog,
    SplitLayout,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionCollection, GuestRegionMmap};

const RAM: u64 = 64 << 10;
const SHADOW_GPA: u64 = 1 << 40;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ctl, image) = data.split_at(8);
    let guest_size = 1u16 << (ctl[0] % 9); // 1..256
    let shadow_size = 1u16 << (ctl[1] % 9);
    let event_idx = ctl[2] & 1 != 0;
    let indirect = ctl[2] & 2 != 0;
    let in_order = ctl[2] & 4 != 0;
    let start = u16::from_le_bytes([ctl[3], ctl[4]]);
    let rounds = 1 + ctl[5] % 4;
    let reclaim_at = u16::from_le_bytes([ctl[6], ctl[7]]);

    let ram = Arc::new(GuestRegionMmap::from_range(GuestAddress(0), RAM as usize, None).unwrap());
    let guest: GuestMemoryMmap<()> = GuestRegionCollection::from_arc_regions(vec![ram]).unwrap();
    // Guest RAM holds whatever the fuzzer says, rings included.
    let n = image.len().min(RAM as usize);
    guest.write_slice(&image[..n], GuestAddress(0)).unwrap();

    let cfg = QueueConfig {
        guest_size,
        shadow_size,
        desc_table: 0x1000,
        avail_ring: 0x3000,
        used_ring: 0x4000,
        event_idx,
        indirect,
        in_order,
    };
    let len = SplitLayout::new(shadow_size).unwrap().total_bytes();
    let area = RingArea::new_owned(len, SHADOW_GPA);
    let state = QueueState {
        last_avail_idx: start,
        used_idx: start,
        in_flight: Vec::new(),
    };
    let Ok(mut q) = ShadowVirtqueue::new(cfg, area, IdentityTranslation, state) else {
        return;
    };
    let log = SharedLog::new(Some(Arc::new(DirtyLog::for_memory_end(RAM))));
    for _ in 0..rounds {
        let _ = q.forward_avail(&guest, &log);
        let _ = q.forward_used(&guest, &log);
        assert!(q.in_flight() <= usize::from(shadow_size));
    }
    let before = q.in_flight();
    let _ = q.reclaim_untaken(&guest, &log, reclaim_at);
    assert!(q.in_flight() <= before);
    let st = q.export_state();
    assert_eq!(st.in_flight.len(), q.in_flight());
});
