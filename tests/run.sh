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

# Two test threads: every end-to-end test starts its own proxy with two workers.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace --locked "$@"
