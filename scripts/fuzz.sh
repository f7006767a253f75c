#!/usr/bin/env bash
# Run every cargo-fuzz target for a bounded time (default 60 s each; FUZZ_SECONDS overrides):
#   scripts/fuzz.sh [target...]
# Needs the nightly toolchain and cargo-fuzz (installed on first use with `cargo install
# cargo-fuzz --locked`). The seed corpus lives in fuzz/corpus/<target>/ (committed); new inputs
# go to fuzz/corpus-new/<target>/ (not committed), crashes to fuzz/artifacts/<target>/.
# Not part of CI: a fuzzer's findings are turned into regression tests in the suite instead.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH="${FUZZ_SECONDS:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(guest_ring shadow_used vmm_messages)
cargo +nightly fuzz build --release
status=0
for t in "${TARGETS[@]}"; do
	mkdir -p "corpus/$t" "corpus-new/$t" "artifacts/$t"
	echo "== $t (${SECONDS_EACH}s)"
	if ! cargo +nightly fuzz run --release "$t" "corpus-new/$t" "corpus/$t" -- \
		-max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -print_final_stats=1 \
		2>"artifacts/$t/log.txt"; then
		status=1
		echo "$t: FOUND A CRASH (see fuzz/artifacts/$t/)"
	fi
	grep -E "stat::number_of_executed_units|stat::peak_rss_mb|cov:" "artifacts/$t/log.txt" | tail -3 || true
done
exit $status
