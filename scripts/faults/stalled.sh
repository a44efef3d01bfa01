#!/usr/bin/env bash
# Memory under slow and dead clients (docs/reliability.md): SOCKETS sockets (default 1,000)
# that stop reading, kept stalled for SECONDS (default 300) while fan-out runs, each replaced
# when the hub closes it; prints the hub's RSS slope (KiB/min) and its descriptors afterwards.
#
#   scripts/faults/stalled.sh [sockets] [seconds]
set -euo pipefail
source "$(dirname "$0")/env.sh"
export SEGUE_STALLED_SOCKETS="${1:-1000}"
export SEGUE_STALLED_SECS="${2:-300}"
export SEGUE_STALLED_QUEUE="${SEGUE_STALLED_QUEUE:-256}"
cargo test --test api backpressure::stalled_sockets -- --nocapture 2>&1 | grep -E -A3 '^(stalled sockets|test |thread)|panicked'
