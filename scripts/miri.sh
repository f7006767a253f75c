#!/usr/bin/env bash
# Run the engine's unit tests (crates/svq, lib only) under Miri, the Rust UB checker. Not in CI:
# Miri is slow and needs nightly with the miri component (`rustup +nightly component add miri`).
# What Miri cannot run is skipped by name below, with the reason:
# - dirty-log tests that mmap a memfd (`from_fd`): Miri does not support mmap of files;
# - `random_ops_keep_indexes_consistent`: thousands of random IOVA operations, hours under Miri
#   (the same code paths run in the other iova tests);
# - `guest::tests`: guest RAM comes from vm-memory's anonymous mmap, which Miri's shim places at
#   whatever alignment its allocator picks; ring parts then land host-misaligned in some runs and
#   the engine (correctly) refuses them with MisalignedRing. Not UB, but not deterministic.
# Everything else in the engine is plain memory and atomics, which Miri checks for undefined
# behaviour, data races and out-of-bounds accesses.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup +nightly component list --installed | grep -q '^miri' || rustup +nightly component add miri
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}"
exec cargo +nightly miri test -p svq --lib -- --skip from_fd --skip random_ops_keep_indexes_consistent --skip guest::tests "$@"
