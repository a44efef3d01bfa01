#!/usr/bin/env bash
# The reconnect storm (docs/reliability.md): SOCKETS sockets (default 10,000) joined on one
# replica, which is then stopped; every client reconnects to the other with full-jitter
# backoff. Prints how long until all are joined again, Redis's peak command rate, the store's
# transactions and the survivor's /healthz latency.
#
#   scripts/faults/storm.sh [sockets]
set -euo pipefail
source "$(dirname "$0")/env.sh"
export SEGUE_STORM_SOCKETS="${1:-10000}"
cargo test --test api faults::storm -- --nocapture 2>&1 | grep -E -A3 '^(reconnect storm|test |thread)|panicked'
