#!/usr/bin/env bash
# Memory under slow and dead clients (docs/reliability.md): SOCKETS sockets (default 1,000)
# that stop reading, kept stalled for SECONDS (default 300) while fan-out runs, each replaced
# when the hub closes it; prints the hub's RSS slope (KiB/min) and its descriptors afterwards.
#
#   scripts/faults/stalled.sh [sockets] [seconds]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/segue-target}"
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export SEGUE_STALLED_SOCKETS="${1:-1000}"
export SEGUE_STALLED_SECS="${2:-300}"
export SEGUE_STALLED_QUEUE="${SEGUE_STALLED_QUEUE:-256}"
cargo test --test api backpressure::stalled_sockets -- --nocapture 2>&1 | grep -E -A3 '^(stalled sockets|test |thread)|panicked'
