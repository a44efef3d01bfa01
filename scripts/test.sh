#!/usr/bin/env bash
# Runs every Segue test on this machine, setting up what is missing first: on a fresh Debian
# machine it installs PostgreSQL, Redis, Node.js and Chromium with apt-get, starts the servers
# when they are stopped, installs the npm packages the client and browser tests use and the
# S3-compatible test server (s3s-fs), then runs clippy and the whole test suite. Safe to run
# again and again.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -- accounts     # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# A stable build directory outside the checkout keeps CI's builds warm across fresh clones.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/segue-target}"

log() { printf '\n== %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

missing=()
[ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/initdb" ] || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo is not installed: install Rust (rustup) first" >&2; exit 1; }

# PostgreSQL on 127.0.0.1:5432.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  log "starting PostgreSQL"
  cluster_version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$cluster_version" ]; then
    as_root pg_createcluster "$(basename "$(dirname "$(pg_bin)")")" main
    cluster_version=$(ls /etc/postgresql | sort -V | tail -n 1)
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
# Tests connect as `postgres` over TCP. Debian's default wants a password there, so give the
# role one unless the server already lets us in (trust auth).
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if ! psql "$TEST_DATABASE_URL" -Atqc 'SELECT 1' >/dev/null 2>&1; then
  log "setting a password for the postgres role (tests connect over TCP)"
  as_root runuser -u postgres -- psql -qc "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
  export TEST_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
  psql "$TEST_DATABASE_URL" -Atqc 'SELECT 1' >/dev/null
fi

# Redis on 127.0.0.1:6379.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi
export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"

# The official phoenix client and playwright-core (tests/node), reinstalled when package.json
# changes. No lock file is kept: package.json pins exact versions. playwright-core drives
# Debian's /usr/bin/chromium, so no browser is downloaded.
if [ ! -f tests/node/node_modules/.segue-installed ] || [ tests/node/package.json -nt tests/node/node_modules/.segue-installed ]; then
  log "installing the npm packages for the client and browser tests"
  (cd tests/node && npm install --no-package-lock --no-audit --no-fund --silent)
  touch tests/node/node_modules/.segue-installed
fi

# The S3-compatible server the object-store tests start per test (s3s-fs, pinned: newer
# releases need a newer rustc), built once into a tools folder outside the checkout so fresh
# clones reuse it.
export SEGUE_TOOLS_DIR="${SEGUE_TOOLS_DIR:-$HOME/.cache/segue-tools}"
export SEGUE_S3S_FS="$SEGUE_TOOLS_DIR/bin/s3s-fs"
if [ ! -x "$SEGUE_S3S_FS" ]; then
  log "installing s3s-fs 0.14.1 into $SEGUE_TOOLS_DIR (once)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$SEGUE_TOOLS_DIR" --quiet
fi

log "clippy"
cargo clippy --all-targets --quiet -- -D warnings

log "tests"
extra=()
if [ "${1:-}" = "--" ]; then shift; extra=("$@"); fi
cargo test --quiet "${extra[@]}"
