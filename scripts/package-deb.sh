#!/usr/bin/env bash
# Build the Debian package of svqd (cargo-deb): target/debian/svqd_<version>_<arch>.deb with svqd,
# svqctl, their man pages and shell completions, the systemd unit and example configurations.
# `--no-build` packages the release binaries already in target/release (the test command builds
# them first). Installs cargo-deb on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
if [ "${1:-}" != "--no-build" ]; then
	cargo build --release -p svqd -p svq-gen-assets
fi
./target/release/svq-gen-assets target/assets
cargo deb -p svqd --no-build --no-strip -o target/debian/ >&2
ls target/debian/svqd_*.deb | tail -1
