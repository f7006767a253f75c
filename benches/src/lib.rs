//! Criterion benchmarks of the svq engine live in `benches/`; this library is empty.
//!
//! Run them with `cargo bench -p svq-benches`. `src/bin/blk-load.rs` is the block load generator
//! of `scripts/bench/run.py --workload blk` (see docs/PERFORMANCE.md).
