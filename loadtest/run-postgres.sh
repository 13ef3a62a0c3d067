#!/usr/bin/env bash
# Figures of the PostgreSQL control plane: change-to-visible latency, full load time and RSS
# with 100k and 1M domains, request logging cost at scenario 1's rate. See postgres.py.
#
#   loadtest/run-postgres.sh
#   ROUNDS=1 DURATION=5 UPDATES=200 SIZES=100000 loadtest/run-postgres.sh   # quick look
#
# Environment: RINGWAY_PG (server, default "host=127.0.0.1 port=5432 user=postgres"; a
# database of its own is created and dropped), ROUNDS, DURATION, UPDATES, SIZES, PROXY_CPUS,
# LOAD_CPUS, RESULTS_NAME. Output: loadtest/results/<date>-postgres.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in wrk psql python3 taskset; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "run-postgres: missing: ${missing[*]}" >&2
    echo "install on Debian/Ubuntu with: sudo apt-get install -y wrk postgresql-client python3 util-linux" >&2
    exit 1
fi
ulimit -n 65536 2>/dev/null || true
cargo build --release --locked -p ringway -p ringway-origin >&2
exec python3 loadtest/postgres.py "$@"
