#!/usr/bin/env bash
# The project's test command (README): prepares the real-peer fixtures (QEMU 10, guest kernel and
# initramfs, DPDK, vhost-device-*; cached outside the repo) and runs the whole workspace test suite.
# SVQ_PEERS=0 skips the fixtures and the real-peer tests (fast developer loop).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SVQ_PEERS:-1}" != 0 ] && [ -x scripts/peers/fixtures.sh ]; then
    # shellcheck disable=SC1090
    eval "$(scripts/peers/fixtures.sh --print-env)"
    # The Debian package the operations tests install (cargo-deb, from the release binaries).
    cargo build --release -p svqd -p svq-gen-assets
    scripts/package-deb.sh --no-build >/dev/null
fi
# One test at a time within each test binary: the end-to-end and real-peer tests run guests,
# backends and proxies on their own threads and processes; on a 2-core machine two of them side by
# side starve each other's timing-bound phases.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-1}"
exec cargo test --workspace --release "$@"
