#!/usr/bin/env bash
# 100 consecutive live migrations (ping-pong) of a QEMU 10 guest through svqd to
# qemu-storage-daemon, each checked by the RAM oracle (0 differing pages) and the guest's own
# disk verification. Usage: scripts/peers/soak.sh [N] [svqd|direct]
# Prints one line per migration and a final "SOAK RESULT" line; exit code 0 only if all passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-100}"
VIA="${2:-svqd}"
bash scripts/peers/fixtures.sh
cargo build -q -p svqd --bins
LOG="${SVQ_SOAK_LOG:-/tmp/svq-soak-$VIA-$N.log}"
set +e
SVQ_SOAK_N="$N" SVQ_SOAK_VIA="$VIA" cargo test -q -p svq-peers --test blk_svqd -- --ignored --exact soak --nocapture 2>&1 |
	tee "$LOG" | grep --line-buffered -E 'SOAK|panicked|error|FAIL|test result'
rc=${PIPESTATUS[0]}
set -e
echo "soak: exit $rc, full log in $LOG"
exit "$rc"
