#!/usr/bin/env bash
# What the console costs the gateway: max requests/s and CPU per request
# of one gateway (1 worker thread) in front of three upstreams, with the
# console off (`gateway.console.enabled = false`: no sampler), on with no
# page open, and on with three pages open and streaming (three
# `/_shoal/api/live` clients, logged in). Rounds alternate the three so a
# slow spell of the shared machine falls on each; medians count. Prints
# the ratios (open / closed, closed / off); the goal is open within 2% of
# closed.
#
# Rounds of the same mode differ by more than 2% on this machine, so a
# second part measures the console's own work where it can be resolved:
# the gateway idle (no traffic) for IDLE_SECONDS in each mode, its CPU
# time from the threads' schedstat (nanoseconds), in alternating rounds.
# What the console adds (open minus off) is then set against the CPU the
# gateway spends each second at its max rate (req/s times CPU per request,
# medians of the first part): the share of the gateway's work the console
# takes. The per-request counters it reads are in every mode (see
# bench/README.md).
#   bench/console.sh                 # 10 s per measurement, 5 rounds; idle 20 s, 3 rounds
#   BENCH_SECONDS=5 BENCH_ROUNDS=3 BENCH_IDLE_SECONDS=10 bench/console.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-5}
IDLE_SECONDS=${BENCH_IDLE_SECONDS:-20}
IDLE_ROUNDS=${BENCH_IDLE_ROUNDS:-3}
CONNS=${BENCH_CONNECTIONS:-64}
[ "${BUILD:-1}" = 1 ] && bench/setup.sh   # BUILD=0: the release binaries as they are
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
BIN=target/release
. bench/lib.sh
bench_init console-bench
start_upstreams
TOKEN=console-bench-token-0123456789
ON=$(free_port); OFF=$(free_port)
for g in on:$ON off:$OFF; do
  name=${g%%:*}; port=${g##*:}
  enabled=true; [ "$name" = off ] && enabled=false
  SHOAL_LOG__LEVEL=warn SHOAL_GATEWAY__ADMIN_TOKEN=$TOKEN SHOAL_GATEWAY__CONSOLE__ENABLED=$enabled \
    $BIN/shoal gateway --listen 127.0.0.1:$port --workers 1 "${UPS[@]}" >"$RUN/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_$name=$!"
done
wait_http "http://127.0.0.1:$ON/_gateway/readyz"
wait_http "http://127.0.0.1:$OFF/_gateway/readyz"
COOKIE=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$ON/_shoal/api/login" \
  -H 'content-type: application/json' -H 'x-shoal-console: 1' -d "{\"token\":\"$TOKEN\"}" |
  sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\).*/\1/p')
[ -n "$COOKIE" ] || { echo "console login failed" >&2; exit 1; }
sleep 2

json() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
declare -A RPS CPU
for n in off closed open; do RPS[$n]=""; CPU[$n]=""; done
for round in $(seq 1 "$ROUNDS"); do
  for n in off closed open; do
    port=$ON; pid=$PID_on
    [ "$n" = off ] && { port=$OFF; pid=$PID_off; }
    WATCHERS=()
    if [ "$n" = open ]; then
      for _ in 1 2 3; do
        curl -s -N -b "$COOKIE" "http://127.0.0.1:$ON/_shoal/api/live" -o "$RUN/live.$round" & WATCHERS+=($!)
      done
      sleep 2
    fi
    read -r u0 s0 _ _ < <(cpu_ticks "$pid")
    out=$($BIN/loadgen --url "http://127.0.0.1:$port/" --connections "$CONNS" --duration "$SECONDS_PER" --threads 1)
    read -r u1 s1 _ _ < <(cpu_ticks "$pid")
    for w in "${WATCHERS[@]}"; do kill "$w" 2>/dev/null || true; done
    rps=$(json "$out" rps); reqs=$(json "$out" requests)
    cpu=$(python3 -c "print(f'{(($u1-$u0)+($s1-$s0))*1e6/$(getconf CLK_TCK)/max(1,$reqs):.2f}')")
    RPS[$n]+="$rps "; CPU[$n]+="$cpu "
    echo "  round $round $n: $rps req/s, $cpu µs CPU/request (errors $(json "$out" errors))" >&2
  done
done
[ "$(grep -c '^event: snapshot' "$RUN/live.1" 2>/dev/null || echo 0)" -gt 0 ] ||
  { echo "the open consoles received no snapshot" >&2; exit 1; }

# Part 2: idle, CPU per second of each mode.
declare -A IDLE
for n in off closed open; do IDLE[$n]=""; done
for round in $(seq 1 "$IDLE_ROUNDS"); do
  for n in off closed open; do
    pid=$PID_on
    [ "$n" = off ] && pid=$PID_off
    WATCHERS=()
    if [ "$n" = open ]; then
      for _ in 1 2 3; do
        curl -s -N -b "$COOKIE" "http://127.0.0.1:$ON/_shoal/api/live" -o "$RUN/idle-live.$round" & WATCHERS+=($!)
      done
    fi
    sleep 2
    c0=$(cpu_ns "$pid")
    sleep "$IDLE_SECONDS"
    c1=$(cpu_ns "$pid")
    for w in "${WATCHERS[@]}"; do kill "$w" 2>/dev/null || true; done
    per_sec=$(python3 -c "print(f'{($c1-$c0)/1e3/$IDLE_SECONDS:.1f}')")
    IDLE[$n]+="$per_sec "
    echo "  idle round $round $n: $per_sec µs CPU per second" >&2
  done
done
med() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
REPORT=bench/results/console-latest.md
{
  echo "# Console cost"
  echo
  echo "Run: \`bench/console.sh\` on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ); gateway with 1 worker thread, ${SECONDS_PER}s per measurement, $ROUNDS rounds, $CONNS connections, 1 KiB responses, 3 upstreams; open = 3 consoles streaming."
  echo
  echo "| console | max req/s (median) | CPU µs/request (median) | rounds (req/s) |"
  echo "|---|---|---|---|"
  for n in off closed open; do
    echo "| $n | $(printf '%.0f' "$(med ${RPS[$n]})") | $(med ${CPU[$n]}) | ${RPS[$n]}|"
  done
  echo
  python3 - "$(med ${RPS[open]})" "$(med ${RPS[closed]})" "$(med ${RPS[off]})" "$(med ${CPU[open]})" "$(med ${CPU[closed]})" "$(med ${CPU[off]})" <<'PY'
import sys
o, c, f, co, cc, cf = map(float, sys.argv[1:])
print(f"open / closed: {o/c:.3f}x req/s, {co/cc:.3f}x CPU per request (goal: within 2%)")
print(f"closed / off:  {c/f:.3f}x req/s, {cc/cf:.3f}x CPU per request")
PY
  echo
  echo "Idle (no traffic), ${IDLE_SECONDS}s per measurement, $IDLE_ROUNDS rounds, CPU from schedstat:"
  echo
  echo "| console | CPU µs per second (median) | rounds |"
  echo "|---|---|---|"
  for n in off closed open; do
    echo "| $n | $(med ${IDLE[$n]}) | ${IDLE[$n]}|"
  done
  echo
  python3 - "$(med ${IDLE[open]})" "$(med ${IDLE[closed]})" "$(med ${IDLE[off]})" "$(med ${RPS[closed]})" "$(med ${CPU[closed]})" <<'PY'
import sys
o, c, f, rps, cpu = map(float, sys.argv[1:])
busy = rps * cpu  # µs of CPU per second at the max rate
print(f"The console's own work: open - off = {o-f:.1f} µs per second, closed - off = {c-f:.1f} µs per second.")
print(f"Against the gateway's CPU at its max rate ({rps:.0f} req/s x {cpu:.2f} µs = {busy/1e3:.0f} ms per second):")
print(f"open costs {100*(o-f)/busy:.3f}% of it, closed {100*(c-f)/busy:.3f}% (goal: within 2%).")
PY
} > "$REPORT"
cat "$REPORT"
