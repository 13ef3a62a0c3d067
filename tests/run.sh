#!/usr/bin/env bash
# The test command (README.md and .ci/run call exactly this).
#
# Runs every unit, integration and end-to-end test of the workspace: codec unit tests, the
# route table and log ring, the worker pieces, and the end-to-end suite in tests/e2e that puts
# real proxies (in-process and the `ringway` binary) between real sockets. Load, fault and soak
# tests target loopback only and stop by themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

# Two test threads: every end-to-end test starts its own proxy with two workers.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace --locked "$@"
