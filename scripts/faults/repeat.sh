#!/usr/bin/env bash
# The long version of the fault suite (docs/reliability.md): runs the fault tests of the test
# binary ROUNDS times each (default 10), one at a time so their timings do not disturb one
# another, and prints for every fault the spread of what it measured (time until every device
# was back on the store's state, writes acknowledged and refused, slowest refusal). Any
# failed round stops the run and shows the test's output.
#
#   scripts/faults/repeat.sh [rounds] [test-name-filter]      # filter defaults to `faults::`
#
# Needs what scripts/test.sh sets up (PostgreSQL and Redis on loopback; it starts its own
# private instances for the faults themselves).
set -euo pipefail
source "$(dirname "$0")/env.sh"
rounds=${1:-10}
filter=${2:-faults::}
export RUST_BACKTRACE=0

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Built once and copied, so a build started meanwhile cannot swap the binary mid-run.
built=$(cargo test --test api --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "api":
        print(m["executable"])')
cp "$built" "$out/api"
tests=$("$out/api" --list "$filter" 2>/dev/null | sed -n 's/: test$//p')
[ -n "$tests" ] || { echo "no test matches $filter" >&2; exit 1; }
for round in $(seq 1 "$rounds"); do
  for test in $tests; do
    if ! "$out/api" --exact "$test" --nocapture > "$out/run.log" 2>&1; then
      echo "round $round: $test failed" >&2
      cat "$out/run.log" >&2
      exit 1
    fi
    grep -E '^(fault |silent Redis|silent subscription|one replica|paused database|paused replica)' "$out/run.log" >> "$out/figures.log" || true
  done
  echo "round $round of $rounds done" >&2
done

python3 - "$out/figures.log" "$rounds" <<'EOF'
import re, statistics, sys
from collections import defaultdict

rows = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    line = line.strip()
    m = re.match(r"fault (.+?): lasted (\d+) ms; (\d+) writes acknowledged, (\d+) refused with 503"
                 r"(?: \(slowest refusal (\d+) ms\))?, 0 lost; every device on the store's state (\d+) ms", line)
    if m:
        name = m.group(1)
        rows[name]["converged ms"].append(int(m.group(6)))
        rows[name]["acknowledged"].append(int(m.group(3)))
        rows[name]["refused"].append(int(m.group(4)))
        if m.group(5) is not None:
            rows[name]["slowest refusal ms"].append(int(m.group(5)))
        p = re.search(r"presence whole again within (\d+) ms", line)
        if p:
            rows[name]["presence whole ms"].append(int(p.group(1)))
        continue
    m = re.match(r"fault (replica \S+(?: 20 s)?): (.*)", line)
    if m:
        name, rest = m.group(1), m.group(2)
        for label, pattern in [
            ("acknowledged", r"(\d+) writes acknowledged"),
            ("refused", r"(\d+) refused"),
            ("sockets closed ms", r"sockets closed \(1012\) after (\d+) ms"),
            ("exited ms", r"exited 0 after (\d+) ms"),
            ("converged ms", r"store's state (\d+) ms"),
            ("back online ms", r"online again (\d+) ms"),
        ]:
            found = re.search(pattern, rest)
            if found:
                rows[name][label].append(int(found.group(1)))
        continue
    m = re.match(r"paused replica: its device left the other replica's presence after (\d+) ms", line)
    if m:
        rows["replica SIGSTOP 20 s"]["presence dropped ms"].append(int(m.group(1)))
        continue
    m = re.match(r"(silent Redis): replica noticed its dead subscription after (\d+) ms", line)
    if m:
        rows["silent Redis"]["probe noticed ms"].append(int(m.group(2)))
        continue
    m = re.match(r"silent subscription: replica noticed it after (\d+) ms", line)
    if m:
        rows["silent subscription"]["probe noticed ms"].append(int(m.group(1)))
        continue
    m = re.match(r"one replica cut off from Redis: .* (\d+) ms", line)
    if m:
        rows["one replica cut off"]["converged ms"].append(int(m.group(1)))
        continue
    m = re.match(r"paused database: a cached queue read answered in (\d+) ms", line)
    if m:
        rows["SIGSTOP for 6 s"]["cached read ms"].append(int(m.group(1)))
    m = re.match(r"paused database: a write once the store was suspect was refused in (\d+) ms", line)
    if m:
        rows["SIGSTOP for 6 s"]["later write refused ms"].append(int(m.group(1)))

print(f"\n{sys.argv[2]} rounds per fault; min / median / max\n")
for name in sorted(rows):
    figures = "; ".join(
        f"{key} {min(v)} / {int(statistics.median(v))} / {max(v)}" for key, v in rows[name].items()
    )
    print(f"{name}: {figures}")
EOF
