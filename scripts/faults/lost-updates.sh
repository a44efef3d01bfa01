#!/usr/bin/env bash
# The lost-update checker at scale (docs/reliability.md): WRITES concurrent writes (default
# 10,000) of every kind (REST ops, conditional PUTs, socket ops) across two replicas while Redis
# is restarted once and one replica is killed; prints what was acknowledged, refused and lost.
#
#   scripts/faults/lost-updates.sh [writes]
set -euo pipefail
source "$(dirname "$0")/env.sh"
export SEGUE_LOST_UPDATE_WRITES="${1:-10000}"
cargo test --test api faults::lost_update -- --nocapture 2>&1 | grep -E -A3 '^(lost updates|test |thread)|panicked|left|right'
