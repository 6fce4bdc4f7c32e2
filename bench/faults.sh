#!/usr/bin/env bash
# Gateway fault scenarios (issue 3), on loopback, each stopping by itself.
# Open-loop load at RATE req/s over 32 keep-alive connections (GET, so
# idempotent), one `shoal gateway` thread in front of three bench-upstreams:
#  1. failover: a steady run, then a run in which one upstream is SIGKILLed
#     one second in: failed requests, time until the gateway shows the
#     instance unavailable, and p99 of the run with the kill vs the steady
#     one (goal: zero failures, ejected within 1 s, p99 at most 2x);
#  2. a slow instance: one upstream answering in 10 ms, the others in 1 ms:
#     p99 with the default balancer (p2c_peak_ewma) and with round_robin,
#     vs all three at 1 ms (goal: default p99 at most 1.5x).
#   bench/faults.sh                  # RATE=2000 SECONDS_PER=6
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-2000}
SECONDS_PER=${SECONDS_PER:-6}
echo "==> building shoal, loadgen and bench-upstream (release)"
cargo build --release -q -p shoal -p shoal-bench
BIN=target/release
. bench/lib.sh
bench_init faultbench

upstreams() { # one delay in ms per upstream
  UP_PIDS=(); UP_URLS=(); TO=()
  for d in "$@"; do
    local p; p=$(free_port)
    $BIN/bench-upstream --listen "127.0.0.1:$p" --delay-ms "$d" >/dev/null 2>&1 &
    UP_PIDS+=($!); PIDS+=($!); UP_URLS+=("http://127.0.0.1:$p"); TO+=(--to "http://127.0.0.1:$p")
  done
}
# The pools are read with an admin token of this run's own.
ADMIN_TOKEN="faults-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
gateway() { # extra env
  GP=$(free_port)
  env SHOAL_LOG__LEVEL=warn SHOAL_GATEWAY__HEALTH_INTERVAL_MS=500 SHOAL_GATEWAY__ADMIN_TOKEN="$ADMIN_TOKEN" "$@" \
    $BIN/shoal gateway --listen "127.0.0.1:$GP" --workers 1 "${TO[@]}" > "$RUN/gw.log" 2>&1 &
  GW=$!; PIDS+=($GW)
  wait_http "http://127.0.0.1:$GP/_gateway/readyz"
  # Let the balancer see every instance once.
  $BIN/loadgen --url "http://127.0.0.1:$GP/" --connections 8 --duration 1 --warmup 0 >/dev/null
}
stop_all() { kill "$GW" "${UP_PIDS[@]}" 2>/dev/null || true; wait "$GW" "${UP_PIDS[@]}" 2>/dev/null || true; }
load() {
  $BIN/loadgen --url "http://127.0.0.1:$GP/" --connections 32 --rate "$RATE" \
    --duration "$SECONDS_PER" --threads 1 --warmup 1
}
# counts URL: the pool's requests so far, and those that went to URL.
counts() {
  curl -s -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$GP/_gateway/pools" | python3 -c '
import json, sys
p = json.load(sys.stdin)["pools"][0]["instances"]
print(sum(i["requests"] for i in p), sum(i["requests"] for i in p if i["url"] == sys.argv[1]))' "$1"
}
# measured_load URL: runs `load` and sets LOAD (its JSON) and SHARE (the
# percentage of that run's requests that went to URL; the warm-up
# requests of `gateway` are left out).
measured_load() {
  local t0 s0 t1 s1
  read -r t0 s0 < <(counts "$1")
  LOAD=$(load)
  read -r t1 s1 < <(counts "$1")
  SHARE=$(python3 -c "print(round(100 * ($s1 - $s0) / max(1, $t1 - $t0), 2))")
}
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

echo "  failover ..." >&2
upstreams 0 0 0
gateway
steady=$(load)
load > "$RUN/kill.json" & L=$!
sleep 2
victim=${UP_URLS[0]}
kill -9 "${UP_PIDS[0]}"
t0=$(date +%s%N)
ejected_ms=timeout
for _ in $(seq 1 100); do
  if curl -sf -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$GP/_gateway/pools" | python3 -c '
import json, sys
p = json.load(sys.stdin)["pools"][0]["instances"]
sys.exit(0 if any(i["url"] == sys.argv[1] and not i["available"] for i in p) else 1)' "$victim"; then
    ejected_ms=$(( ($(date +%s%N) - t0) / 1000000 )); break
  fi
  sleep 0.02
done
wait "$L"
killed=$(cat "$RUN/kill.json")
stop_all

echo "  slow instance ..." >&2
upstreams 1 1 1
gateway
healthy=$(load)
stop_all
upstreams 1 1 10
gateway
measured_load "${UP_URLS[2]}"
slow_p2c=$LOAD share_p2c=$SHARE
stop_all
upstreams 1 1 10
gateway SHOAL_GATEWAY__BALANCER=round_robin
measured_load "${UP_URLS[2]}"
slow_rr=$LOAD share_rr=$SHARE
stop_all

REPORT=bench/results/faults-latest.md
python3 - "$REPORT" "$RATE" "$SECONDS_PER" "$ejected_ms" "$steady" "$killed" "$healthy" "$slow_p2c" "$slow_rr" "$share_p2c" "$share_rr" <<'PY'
import json, sys, datetime, os
out, rate, secs, ejected = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
steady, killed, healthy, p2c, rr = (json.loads(a) for a in sys.argv[5:10])
share_p2c, share_rr = sys.argv[10], sys.argv[11]
ms = lambda us: f"{us/1000:.2f} ms"
lines = [
    "# Gateway fault scenarios", "",
    f"Run: `bench/faults.sh` on {os.cpu_count()} cores, {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}; "
    f"{rate} req/s open loop, 32 connections, {secs} s per run, 1 gateway thread, 3 upstreams.", "",
    "## SIGKILL one of three upstreams", "",
    "| run | requests | failed | p50 | p99 | p99 vs steady | shown unavailable after |",
    "|---|---|---|---|---|---|---|",
    f"| steady | {steady['requests']} | {steady['errors']} | {ms(steady['p50_us'])} | {ms(steady['p99_us'])} | 1.00x | - |",
    f"| kill at 1 s | {killed['requests']} | {killed['errors']} | {ms(killed['p50_us'])} | {ms(killed['p99_us'])} | "
    f"{killed['p99_us']/max(1,steady['p99_us']):.2f}x | {ejected} ms |", "",
    "## One upstream ten times slower (10 ms vs 1 ms)", "",
    "| run | p50 | p99 | p99 vs all healthy | failed | slow one's share of the run's requests |",
    "|---|---|---|---|---|---|",
    f"| all at 1 ms (p2c_peak_ewma) | {ms(healthy['p50_us'])} | {ms(healthy['p99_us'])} | 1.00x | {healthy['errors']} | - |",
    f"| one at 10 ms, p2c_peak_ewma (default) | {ms(p2c['p50_us'])} | {ms(p2c['p99_us'])} | {p2c['p99_us']/max(1,healthy['p99_us']):.2f}x | {p2c['errors']} | {share_p2c}% |",
    f"| one at 10 ms, round_robin | {ms(rr['p50_us'])} | {ms(rr['p99_us'])} | {rr['p99_us']/max(1,healthy['p99_us']):.2f}x | {rr['errors']} | {share_rr}% |",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
