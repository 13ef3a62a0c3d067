#!/usr/bin/env bash
# Ringway load tests against nginx and HAProxy: one command, nothing installed by surprise.
#
#   loadtest/run.sh                       # all scenarios, 3 rounds of 10 s
#   ROUNDS=1 DURATION=5 SCENARIOS=1,2 loadtest/run.sh
#
# Environment: ROUNDS, DURATION (s), SCENARIOS (1,2,3,4,5,6,7,8,9), PROXIES (ringway,nginx,haproxy),
# PROXY_CPUS (default 0), LOAD_CPUS (default 1), CONNECTIONS (64), IDLE_CONNECTIONS (10000),
# TLS_IDLE_CONNECTIONS (5000), RESULTS_NAME (output file name; default <date>-<host>),
# RINGWAY_SET (overrides of Ringway's config, e.g. "workers.driver=\"legacy\";timeouts.hot_read_ms=0"),
# RINGWAY_BASELINE (an earlier ringway binary, paired with this build in scenario 1),
# SLOW_HEADER_CONNECTIONS (6000), SLOW_BODY_CONNECTIONS (200).
# Output: a markdown table on stdout, loadtest/results/<date>-<host>.{md,json,svg}.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in wrk nginx haproxy python3 taskset pgrep; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "loadtest: missing: ${missing[*]}" >&2
    echo "install on Debian/Ubuntu with:" >&2
    echo "  sudo apt-get install -y wrk nginx-light haproxy python3 util-linux procps" >&2
    exit 1
fi

# 10,000 idle connections need file descriptors on both ends.
ulimit -n 262144 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "loadtest: building Ringway, its origin and load generator (release)" >&2
cargo build --release --locked -p ringway -p ringway-origin -p ringway-loadgen >&2

export LOADTEST_COMMAND="loadtest/run.sh${*:+ $*} (ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} SCENARIOS=${SCENARIOS:-1,2,3,4,5,6,7,8,9} PROXY_CPUS=${PROXY_CPUS:-0} LOAD_CPUS=${LOAD_CPUS:-1})"
exec python3 loadtest/bench.py "$@"
