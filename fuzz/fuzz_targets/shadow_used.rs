//! The shadow used-ring reader against a hostile device: used entries with ids out of range or
//! not in flight, lengths beyond a chain's writable size, a used index running away. The engine
//! completes only chains it forwarded, each once, logs at most what the chain could hold
//! (clipped, reported) and otherwise breaks the queue with a typed error.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use svq::{
    DirtyLog, IdentityTranslation, QueueConfig, QueueState, RingArea, ShadowVirtqueue, SharedLog,
    SplitLayout,
};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionCollection,
    GuestRegionMmap,
};

const RAM: u64 = 1 << 20;
const SHADOW_GPA: u64 = 1 << 40;
const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x8000;
const BUF: u32 = 0x100;

fuzz_target!(|data: &[u8]| {
    let Some((&head, entries)) = data.split_first() else {
        return;
    };
    // The top bit: a device that negotiated VIRTIO_F_IN_ORDER (one used element may complete a
    // batch); the rest: how many chains the guest posts.
    let in_order = head & 0x80 != 0;
    let chains = u16::from((head & 0x7f) % (SIZE as u8 + 1));
    let ram = Arc::new(GuestRegionMmap::from_range(GuestAddress(0), RAM as usize, None).unwrap());
    let sh =
        Arc::new(GuestRegionMmap::from_range(GuestAddress(SHADOW_GPA), 0x10000, None).unwrap());
    let guest: GuestMemoryMmap<()> = GuestRegionCollection::from_arc_regions(vec![ram]).unwrap();
    let shadow: GuestMemoryMmap<()> = GuestRegionCollection::from_arc_regions(vec![sh]).unwrap();
    // The guest posts `chains` one-descriptor, device-writable buffers.
    for i in 0..chains {
        let d = DESC + 16 * u64::from(i);
        guest
            .write_obj(DATA + u64::from(i) * u64::from(BUF), GuestAddress(d))
            .unwrap();
        guest.write_obj(BUF, GuestAddress(d + 8)).unwrap();
        guest.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // VRING_DESC_F_WRITE
        guest
            .write_obj(i, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    guest.write_obj(chains, GuestAddress(AVAIL + 2)).unwrap();
    let cfg = QueueConfig {
        guest_size: SIZE,
        shadow_size: SIZE,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        event_idx: false,
        indirect: false,
        in_order,
    };
    let layout = SplitLayout::new(SIZE).unwrap();
    let p = shadow.get_host_address(GuestAddress(SHADOW_GPA)).unwrap();
    // SAFETY: inside the shadow region, which outlives the engine (dropped first below).
    let area = unsafe { RingArea::new(p, layout.total_bytes(), SHADOW_GPA).unwrap() };
    let mut q =
        ShadowVirtqueue::new(cfg, area, IdentityTranslation, QueueState::default()).unwrap();
    let log = SharedLog::new(Some(Arc::new(DirtyLog::for_memory_end(RAM))));
    let fwd = q.forward_avail(&guest, &log).unwrap();
    assert_eq!(fwd.chains, u32::from(chains));
    // The hostile device: used entries straight from the input, then a used index.
    let used = SHADOW_GPA + layout.used_offset() as u64;
    let mut n = 0u16;
    for e in entries.chunks_exact(8).take(2 * usize::from(SIZE)) {
        let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
        let slot = used + 4 + 8 * u64::from(n % SIZE);
        shadow.write_obj(id, GuestAddress(slot)).unwrap();
        shadow.write_obj(len, GuestAddress(slot + 4)).unwrap();
        n = n.wrapping_add(1);
    }
    let idx = match entries.len() % 3 {
        0 => n,
        1 => n.wrapping_add(entries.first().copied().unwrap_or(0).into()),
        _ => u16::from_le_bytes([entries.len() as u8, 0]),
    };
    shadow.write_obj(idx, GuestAddress(used + 2)).unwrap();
    let mut completed = 0u32;
    let mut written = 0u64;
    let mut failed = false;
    for _ in 0..2 {
        match q.forward_used(&guest, &log) {
            Ok(u) => {
                completed += u.completed;
                written += u.bytes_written;
            }
            Err(_) => {
                assert!(q.broken().is_some());
                failed = true;
            }
        }
    }
    assert!(
        written <= u64::from(completed) * u64::from(BUF),
        "{written} bytes logged"
    );
    // Valid completions before a bad entry still reach the guest; never more than were taken.
    let guest_used: u16 = guest.read_obj(GuestAddress(USED + 2)).unwrap();
    assert!(
        guest_used <= chains,
        "guest used idx {guest_used} with {chains} chains"
    );
    assert!(u32::from(guest_used) >= completed);
    if !failed {
        assert_eq!(u32::from(guest_used), completed);
    }
    drop(q);
});
