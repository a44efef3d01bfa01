#!/usr/bin/env bash
# Authorization under interleavings (docs/reliability.md): follows, unfollows, share toggles,
# logouts, refresh reuse, topic joins and leaves across two replicas, while every socket
# streams events; judges EVENTS pushed frames (default 100,000) and prints how many reached a
# user who may not see them (must be 0). SEGUE_AUTHZ_SEED=<seed> replays a run.
#
#   scripts/faults/authz.sh [events]
set -euo pipefail
source "$(dirname "$0")/env.sh"
export SEGUE_AUTHZ_EVENTS="${1:-100000}"
cargo test --test api faults::authz -- --nocapture 2>&1 | grep -E -A6 '^(authorization|test |thread)|panicked'
