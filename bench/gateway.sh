#!/usr/bin/env bash
# Gateway benchmark: Shoal's gateway against nginx and HAProxy configured
# as equivalent load balancers, in one run, on the same three upstreams
# (1 KiB responses, HTTP/1.1 keep-alive), at 1 and 2 worker threads.
# Prints max requests/s and the ratios, added latency over going direct at
# half of nginx's max rate (p50, p99), upstream connection reuse, and
# resident memory with 1,000 open client connections.
#   bench/gateway.sh            # 10 s per measurement, 3 rounds of each
#   BENCH_SECONDS=5 BENCH_ROUNDS=5 bench/gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CONNS=${BENCH_CONNECTIONS:-64}
bench/setup.sh
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
BIN=target/release
. bench/lib.sh
bench_init gateway-bench
# Free loopback ports, not fixed ones: a run beside another service (or a
# second run) must not find its ports taken.
start_upstreams
UP_PORTS=("${UPSTREAM_PORTS[@]}")
SP=$(free_port); NP=$(free_port); HP=$(free_port)
sleep 0.5
upstream_stats() { # total connections, total requests over all upstreams
  local c=0 r=0 j
  for p in "${UP_PORTS[@]}"; do
    j=$(curl -s 127.0.0.1:$p/_stats)
    c=$((c + $(echo "$j" | sed 's/.*"connections":\([0-9]*\).*/\1/')))
    r=$((r + $(echo "$j" | sed 's/.*"requests":\([0-9]*\).*/\1/')))
  done
  echo "$c $r"
}
json() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
rss_kb() { # sum of VmRSS of the given pids and their children
  local total=0 p
  for p in "$@"; do
    for q in $p $(pgrep -P "$p" || true); do
      total=$((total + $(awk '/VmRSS/{print $2}' /proc/$q/status 2>/dev/null || echo 0)))
    done
  done
  echo $total
}
median() { python3 -c "import statistics,sys; print(int(statistics.median(int(x) for x in sys.argv[1:])))" "$@"; }

REPORT=bench/results/gateway-latest.md
{
echo "# Gateway benchmark"
echo
echo "Run: \`bench/gateway.sh\` on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ); ${SECONDS_PER}s per measurement, $CONNS client connections, 1 KiB responses, 3 upstreams."
echo "nginx $(nginx -v 2>&1 | sed 's/.*\///'), HAProxy $(haproxy -v | head -1 | awk '{print $3}'). Load generator: \`bench/src/bin/loadgen.rs\` (same machine, so it shares the cores)."
echo
} > "$REPORT"

for W in 1 2; do
  SERVERS_NGINX=""; SERVERS_HA=""; TO=()
  for p in "${UP_PORTS[@]}"; do
    SERVERS_NGINX+="    server 127.0.0.1:$p;"$'\n'
    SERVERS_HA+="  server u$p 127.0.0.1:$p"$'\n'
    TO+=(--to "http://127.0.0.1:$p")
  done
  sed -e "s|@WORKERS@|$W|; s|@PORT@|$NP|; s|@RUN@|$RUN|g" -e "/@SERVERS@/{
r /dev/stdin
d
}" bench/peers/nginx.conf.in <<<"$SERVERS_NGINX" > "$RUN/nginx.conf"
  sed -e "s|@WORKERS@|$W|; s|@PORT@|$HP|" -e "/@SERVERS@/{
r /dev/stdin
d
}" bench/peers/haproxy.cfg.in <<<"$SERVERS_HA" > "$RUN/haproxy.cfg"
  SHOAL_LOG__LEVEL=warn $BIN/shoal gateway --listen 127.0.0.1:$SP --workers "$W" "${TO[@]}" >"$RUN/shoal.log" 2>&1 & SHOAL=$!
  nginx -c "$RUN/nginx.conf" -p "$RUN" & NGINX=$!
  haproxy -f "$RUN/haproxy.cfg" & HAPROXY=$!
  PIDS+=($SHOAL $NGINX $HAPROXY)
  wait_port $SP; wait_port $NP; wait_port $HP
  sleep 1
  declare -A MAX P50 P99 REUSE RSS
  # Max rate in ROUNDS rounds, the three in turn within each, so a slow
  # spell of the shared machine falls on all three alike; the median
  # round counts, and each round's ratios are printed.
  declare -A RUNS
  for n in shoal nginx haproxy; do RUNS[$n]=""; done
  for round in $(seq 1 "$ROUNDS"); do
    for name in shoal:$SP nginx:$NP haproxy:$HP; do
      n=${name%%:*}; port=${name##*:}
      out=$($BIN/loadgen --url http://127.0.0.1:$port/ --connections "$CONNS" --duration "$SECONDS_PER" --threads "$W")
      rps=$(json "$out" rps); RUNS[$n]+="$rps "
      echo "  $W thread(s) round $round $n max: $rps req/s (errors $(json "$out" errors))" >&2
    done
  done
  for n in shoal nginx haproxy; do
    MAX[$n]=$(python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" ${RUNS[$n]})
  done
  ROUND_RATIOS=$(python3 - "${RUNS[shoal]}" "${RUNS[nginx]}" "${RUNS[haproxy]}" <<'PY'
import sys
s, n, h = ([float(x) for x in a.split()] for a in sys.argv[1:4])
print(", ".join(f"{a/b:.2f}x / {a/c:.2f}x" for a, b, c in zip(s, n, h)))
PY
)
  RATE=$(python3 -c "print(int(${MAX[nginx]}/2))")
  # Latency at half of nginx's max, ROUNDS rounds (the direct baseline
  # and the three in turn within each, as above); the medians count. The
  # direct baseline: one upstream at a third of the rate, the share each
  # of the three upstreams gets behind a balancer.
  declare -A L50 L99 CONN_USED REQS
  for n in direct shoal nginx haproxy; do L50[$n]=""; L99[$n]=""; CONN_USED[$n]=0; REQS[$n]=0; done
  for round in $(seq 1 "$ROUNDS"); do
    for name in direct:${UP_PORTS[0]} shoal:$SP nginx:$NP haproxy:$HP; do
      n=${name%%:*}; port=${name##*:}
      rate=$RATE; [ "$n" = direct ] && rate=$((RATE / 3))
      read -r c0 r0 < <(upstream_stats)
      out=$($BIN/loadgen --url http://127.0.0.1:$port/ --connections "$CONNS" --duration "$SECONDS_PER" --rate "$rate" --threads "$W")
      read -r c1 r1 < <(upstream_stats)
      L50[$n]+="$(json "$out" p50_us) "; L99[$n]+="$(json "$out" p99_us) "
      CONN_USED[$n]=$(( ${CONN_USED[$n]} + c1 - c0 )); REQS[$n]=$(( ${REQS[$n]} + r1 - r0 ))
      echo "  $W thread(s) round $round $n at $rate req/s: p50 $(json "$out" p50_us) µs, p99 $(json "$out" p99_us) µs" >&2
    done
  done
  for n in direct shoal nginx haproxy; do
    P50[$n]=$(median ${L50[$n]}); P99[$n]=$(median ${L99[$n]})
    REUSE[$n]=$(python3 -c "print(f'{100*(1-${CONN_USED[$n]}/max(1,${REQS[$n]})):.2f}')")
  done
  for name in shoal:$SP nginx:$NP haproxy:$HP; do
    n=${name%%:*}; port=${name##*:}
    $BIN/loadgen --url http://127.0.0.1:$port/ --idle 1000 --duration 4 >/dev/null & L=$!
    sleep 3
    case $n in shoal) pid=$SHOAL;; nginx) pid=$NGINX;; haproxy) pid=$HAPROXY;; esac
    RSS[$n]=$(rss_kb "$pid"); wait $L || true
  done
  {
  echo "## $W worker thread(s)"
  echo
  echo "| | max req/s | ratio (Shoal / peer) | p50 added at ${RATE} req/s | p99 added | upstream conn reuse | RSS, 1,000 idle clients |"
  echo "|---|---|---|---|---|---|---|"
  for n in shoal nginx haproxy; do
    ratio=$(python3 -c "print(f'{${MAX[shoal]}/${MAX[$n]}:.2f}x')")
    a50=$(( ${P50[$n]} - ${P50[direct]} )); a99=$(( ${P99[$n]} - ${P99[direct]} ))
    echo "| $n | $(printf '%.0f' "${MAX[$n]}") | $ratio | ${a50} µs | ${a99} µs | ${REUSE[$n]}% | $(( ${RSS[$n]} / 1024 )) MiB |"
  done
  echo "| direct to one upstream at a third of the rate | | | p50 ${P50[direct]} µs | p99 ${P99[direct]} µs | | |"
  echo
  echo "Max req/s is the median of $ROUNDS rounds; Shoal / nginx and Shoal / HAProxy in each round: $ROUND_RATIOS."
  echo "Latency and reuse: medians of $ROUNDS rounds at a fixed rate; p99 (µs) in each round: shoal ${L99[shoal]}, nginx ${L99[nginx]}, haproxy ${L99[haproxy]}, direct ${L99[direct]}."
  echo
  } >> "$REPORT"
  kill $SHOAL $NGINX $HAPROXY 2>/dev/null || true; wait $SHOAL $NGINX $HAPROXY 2>/dev/null || true
  sleep 0.5
done
cat "$REPORT"
