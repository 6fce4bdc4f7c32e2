#!/usr/bin/env bash
# Two builds of the gateway against each other: the same three
# bench-upstreams, max rate, W worker threads, ROUNDS alternating 6 s
# runs. Prints req/s and user and system CPU microseconds per request
# (from /proc, over the measured seconds only) for each, so a change to
# the request path can be judged beside the build before it, on the same
# machine in the same minutes.
#   git worktree add /tmp/before <rev>
#   (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release -p shoal)
#   BEFORE=/tmp/before-target/release/shoal W=1 ROUNDS=4 bench/ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${BEFORE:?set BEFORE to the other build of the shoal binary}
W=${W:-1}
ROUNDS=${ROUNDS:-4}
echo "==> building shoal, loadgen and bench-upstream (release)" >&2
cargo build --release -q -p shoal -p shoal-bench
BIN=target/release
. bench/lib.sh
bench_init ab
start_upstreams
BP=$(free_port); AP=$(free_port)
SHOAL_LOG__LEVEL=warn "$BEFORE" gateway --listen "127.0.0.1:$BP" --workers "$W" "${UPS[@]}" >"$RUN/before.log" 2>&1 &
B=$!; PIDS+=($B)
SHOAL_LOG__LEVEL=warn $BIN/shoal gateway --listen "127.0.0.1:$AP" --workers "$W" "${UPS[@]}" >"$RUN/after.log" 2>&1 &
A=$!; PIDS+=($A)
wait_http "http://127.0.0.1:$BP/_gateway/readyz"
wait_http "http://127.0.0.1:$AP/_gateway/readyz"
sleep 1
HZ=$(getconf CLK_TCK)
for round in $(seq 1 "$ROUNDS"); do
  for who in "before:$BP:$B" "after:$AP:$A"; do
    n=${who%%:*}; rest=${who#*:}; port=${rest%%:*}; pid=${rest#*:}
    read -r u0 s0 _ _ < <(cpu_ticks "$pid")
    out=$($BIN/loadgen --url "http://127.0.0.1:$port/" --connections 64 --duration 6 --warmup 0 --threads "$W")
    read -r u1 s1 _ _ < <(cpu_ticks "$pid")
    python3 -c "
import json, sys
d = json.loads(sys.argv[1]); r = max(1, d['requests']); hz = int(sys.argv[4])
print(f'round $round $n: {d[\"rps\"]:.0f} req/s, user {int(sys.argv[2])*1e6/hz/r:.2f} us/req, system {int(sys.argv[3])*1e6/hz/r:.2f} us/req')" \
      "$out" $((u1-u0)) $((s1-s0)) "$HZ"
  done
done
