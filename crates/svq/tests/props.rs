//! Property tests: a simulated guest driver and device run against the engine with random chain
//! shapes and sizes, indirect tables, EVENT_IDX on/off, shadow size != guest size, random
//! completion order and lengths, log replacement and passthrough <-> shadow switches mid-run.
//!
//! Checked: every guest chain completes exactly once with the length the device reported, the
//! device sees exactly the guest's chain (flattened), in-flight never exceeds the shadow ring,
//! no notification is lost (a quiet system has nothing outstanding), and the union of all dirty
//! logs holds exactly the pages of the written bytes plus the used-ring writes.

mod common;

use common::sim::{Shape, Sim};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Post(Vec<Shape>),
    GuestKick,
    DevKick,
    Complete(u8),
    DevCall,
    Irq,
    ReplaceLog,
    Switch { base: u16, shadow_pow: u8 },
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop::collection::vec((0u32..3000, 0u16..1000, any::<bool>()), 1..=8),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(bufs, indirect)| Shape { bufs, indirect })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(shape(), 1..6).prop_map(Op::Post),
        4 => Just(Op::GuestKick),
        4 => Just(Op::DevKick),
        5 => (1u8..8).prop_map(Op::Complete),
        4 => Just(Op::DevCall),
        4 => Just(Op::Irq),
        1 => Just(Op::ReplaceLog),
        1 => (any::<u16>(), 3u8..=8).prop_map(|(base, shadow_pow)| Op::Switch { base, shadow_pow }),
    ]
}

fn run(cfg: svq::QueueConfig, guest_start: u16, shadow_base: u16, seed: u64, ops: &[Op]) {
    let mut sim = Sim::new(cfg, guest_start, shadow_base, seed);
    for op in ops {
        match op {
            Op::Post(shapes) => sim.post(shapes),
            Op::GuestKick => sim.deliver_guest_kick(),
            Op::DevKick => sim.deliver_dev_kick(),
            Op::Complete(n) => sim.device_complete(usize::from(*n)),
            Op::DevCall => sim.deliver_dev_call(),
            Op::Irq => sim.deliver_irq(),
            Op::ReplaceLog => sim.replace_log(),
            Op::Switch { base, shadow_pow } => sim.switch(*base, 1 << shadow_pow),
        }
    }
    sim.settle();
    sim.check_log();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_buffer_completes_once_and_log_is_exact(
        guest_pow in 2u8..=7,
        shadow_pow in 3u8..=8,
        event_idx in any::<bool>(),
        indirect in any::<bool>(),
        guest_start in prop_oneof![Just(0u16), Just(0xfff0u16), any::<u16>()],
        shadow_base in prop_oneof![Just(0u16), Just(0xfffcu16), any::<u16>()],
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let cfg = common::config(1 << guest_pow, 1 << shadow_pow, event_idx, indirect);
        run(cfg, guest_start, shadow_base, seed, &ops);
    }
}
