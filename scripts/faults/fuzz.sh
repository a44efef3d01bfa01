#!/usr/bin/env bash
# The long run of the fuzz targets (tests/api/fuzz.rs): every property with CASES cases
# (default 20000) instead of the test command's few hundred, and the live-socket targets with
# as many frames. A failure prints proptest's shrunken input: keep it as a named regression
# test in tests/api/fuzz.rs, then fix the cause.
#
#   scripts/faults/fuzz.sh [cases]
set -euo pipefail
source "$(dirname "$0")/env.sh"
export SEGUE_FUZZ_CASES="${1:-20000}"
started=$(date +%s)
cargo test --test api fuzz:: -- --nocapture --test-threads 2
echo "fuzz: $SEGUE_FUZZ_CASES cases per target in $(( $(date +%s) - started )) s"
