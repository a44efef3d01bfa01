#!/usr/bin/env bash
# Queue REST throughput on PostgreSQL, with pgbench's single-statement revision-checked
# UPDATE measured in the same run for comparison. Prints requests/s and latency percentiles.
#
#   scripts/bench-queue.sh [seconds] [connections]
#
# The hub (release build) runs on HUB_CPUS (default core 0) with HUB_WORKERS HTTP workers
# (default 1); wrk runs on core 1. PostgreSQL is not pinned. HUB_ENV adds settings to the hub's
# environment (e.g. HUB_ENV="SEGUE_DB_POOL_SIZE=32").
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-32}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/segue-target}"
admin=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
cargo build --release --quiet
db="segue_bench_$$"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
psql "$admin" -qc "CREATE DATABASE $db"
cleanup() { kill "$hub" 2>/dev/null || true; wait "$hub" 2>/dev/null || true; psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -rf "$dir"; }
trap cleanup EXIT
url="${admin%/*}/$db"
env -i SEGUE_BIND="127.0.0.1:$port" SEGUE_DATA_DIR="$dir" DATABASE_URL="$url" SEGUE_WORKERS="${HUB_WORKERS:-1}" \
  SEGUE_LOG=warn SEGUE_JWT_SECRET=bench-secret-bench-secret-bench-secret-0123 ${HUB_ENV:-} \
  taskset -c "${HUB_CPUS:-0}" "$CARGO_TARGET_DIR/release/segue" &
hub=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

# 64 users, so writes spread over rows as real traffic does.
: > "$dir/tokens.txt"
for i in $(seq 1 64); do
  curl -sf -X POST "http://127.0.0.1:$port/auth/register" -H 'content-type: application/json' \
    -d "{\"handle\":\"bench$i\",\"password\":\"correct horse\"}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])' >> "$dir/tokens.txt"
done
# Every user starts with a queue (revision 1).
while read -r token; do
  curl -sf -X PUT "http://127.0.0.1:$port/queue/" -H "authorization: Bearer $token" \
    -H 'content-type: application/json' -d '{"state":{"track_ids":["t1","t2","t3"]}}' >/dev/null
done < "$dir/tokens.txt"

run() {
  echo "== $1: wrk -t1 -c$connections -d${seconds}s"
  # PROFILE=<mode> records a CPU profile of the hub during that run (perf report -i it).
  if [ "${PROFILE:-}" = "$1" ]; then
    perf record -e cpu-clock -F 499 -g -p "$hub" -o "${PROFILE_OUT:-/tmp/segue-$1.perf}" -- sleep "$seconds" >/dev/null 2>&1 &
  fi
  TOKENS="$dir/tokens.txt" MODE="$1" taskset -c 1 wrk -t1 -c"$connections" -d"${seconds}s" --latency \
    -s benches/queue/requests.lua "http://127.0.0.1:$port" | grep -E "Requests/sec|Non-2xx|50%|90%|99%|requests in"
}
run get
run put
run ops

echo "== pgbench: the revision-checked UPDATE alone, 8 clients, ${seconds}s"
psql "$url" -qc "CREATE TABLE bench_queue (user_id bigint PRIMARY KEY, state text NOT NULL, revision bigint NOT NULL);
  INSERT INTO bench_queue SELECT g, '{\"track_ids\":[\"t1\",\"t2\",\"t3\"]}', 1 FROM generate_series(1, 64) g;"
cat > "$dir/update.sql" <<'SQL'
\set u random(1, 64)
UPDATE bench_queue SET state = state, revision = revision + 1 WHERE user_id = :u AND revision = (SELECT revision FROM bench_queue WHERE user_id = :u) RETURNING revision;
SQL
taskset -c 1 pgbench -n -c 8 -j 1 -T "$seconds" -f "$dir/update.sql" "$url" 2>/dev/null | grep -E "tps|latency average"
