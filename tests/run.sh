#!/usr/bin/env bash
# The test command (README.md and .ci/run call exactly this).
#
# Runs every unit, integration and end-to-end test of the workspace: codec unit tests, the
# route table and log ring, the worker pieces, and the end-to-end suite in tests/e2e that puts
# real proxies (in-process and the `ringway` binary) between real sockets. Load, fault and soak
# tests target loopback only and stop by themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

# The data plane must never link the control plane's runtime or database client.
if cargo tree -p ringway-worker -e normal --locked 2>/dev/null | grep -Eq '\b(tokio|tokio-postgres|postgres)\b'; then
    echo "ringway-worker depends on tokio or postgres: the data plane must not" >&2
    exit 1
fi

# PostgreSQL for the database tests: the server at 127.0.0.1:5432 (user postgres, trust) if
# one answers, else a throwaway cluster (initdb + pg_ctl) on a free port, removed on exit.
# Tests read RINGWAY_TEST_PG and create and drop their own databases.
if [[ -z "${RINGWAY_TEST_PG:-}" ]]; then
    # A server that answers is not enough: it must let user postgres in without a password
    # (a freshly installed Debian cluster asks for one over TCP).
    if command -v psql >/dev/null \
        && PGCONNECT_TIMEOUT=3 psql -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -qAtc 'select 1' >/dev/null 2>&1; then
        export RINGWAY_TEST_PG="host=127.0.0.1 port=5432 user=postgres"
    else
        source tests/pg-throwaway.sh
        pg_throwaway_start
        export RINGWAY_TEST_PG="host=127.0.0.1 port=$PG_THROWAWAY_PORT user=postgres"
        trap pg_throwaway_stop EXIT
    fi
fi
echo "tests: PostgreSQL at $RINGWAY_TEST_PG" >&2

# Two test threads: every end-to-end test starts its own proxy with two workers.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace --locked "$@"
