//! Criterion benchmarks of the svq engine live in `benches/`; this library is empty.
//!
//! Run them with `cargo bench -p svq-benches`.
