#!/usr/bin/env bash
# Coverage-guided fuzzing of Ringway's parsers, on the stable toolchain, each target for a
# bounded time:
#
#   fuzz/run.sh                            # every target, FUZZ_SECONDS (60) each
#   FUZZ_SECONDS=600 fuzz/run.sh path chunked
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). libFuzzer drives the targets of
# crates/ringway-fuzz with SanitizerCoverage (`-Cpasses=sancov-module`, a stable flag) and no
# sanitizer (AddressSanitizer needs nightly): it finds panics, failed properties, aborts,
# hangs (FUZZ_TIMEOUT_S per input) and memory blow-ups (FUZZ_RSS_MB), not undefined behaviour
# in unsafe code (the parsers have none: ringway-proto forbids it).
#
# Each target starts from fuzz/corpus/<target> (committed) and writes what it finds to
# fuzz/work/<target> (not committed); the inputs that add coverage are then merged back into
# fuzz/corpus/<target>, which the test suite replays (crates/ringway-fuzz/tests/corpus.rs).
# Crashes land in fuzz/artifacts/<target>/ and make the script exit 1. A summary line per
# target (executions, coverage, corpus size) goes to stdout and to fuzz/work/summary.txt.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
timeout_s="${FUZZ_TIMEOUT_S:-10}"
rss_mb="${FUZZ_RSS_MB:-2048}"
all=(request_head response_head chunked proxy_protocol host path spool_frames challenge_cookie)
targets=("$@")
((${#targets[@]})) || targets=("${all[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 1
fi
flags=(--sanitizer none -O)
cargo fuzz build "${flags[@]}" >&2

mkdir -p work
failed=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "corpus/$t"
    log="work/$t.log"
    status=ok
    t0=$(date +%s)
    if ! cargo fuzz run "${flags[@]}" "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout="$timeout_s" -rss_limit_mb="$rss_mb" \
        -print_final_stats=1 >"$log" 2>&1; then
        status=CRASH
        failed=1
    fi
    elapsed=$(($(date +%s) - t0))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
    # Keep only what adds coverage.
    cargo fuzz run "${flags[@]}" "$t" "corpus/$t" "work/$t" -- -merge=1 >"work/$t.merge.log" 2>&1 || true
    line="$t: ${elapsed}s, ${execs:-0} executions, ${cov:-cov: ?}, corpus $(ls "corpus/$t" | wc -l) inputs, $status"
    echo "$line" | tee -a work/summary.txt
    if [[ $status != ok ]]; then
        grep -E 'panicked|Failing input|SUMMARY' "$log" | head -5 >&2 || true
    fi
done
exit "$failed"
