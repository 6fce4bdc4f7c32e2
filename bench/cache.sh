#!/usr/bin/env bash
# Cache benchmark: the gateway's HTTP cache against Varnish, same object
# (1 KiB, Cache-Control: public, max-age=3600), same upstream, same run.
# Prints cache-hit requests/s and p99 at half of Varnish's max rate, and
# the ratio.   bench/cache.sh   (BENCH_SECONDS=10 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${BENCH_SECONDS:-10}
CONNS=${BENCH_CONNECTIONS:-64}
bench/setup.sh
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
BIN=target/release
RUN=$(mktemp -d /tmp/shoal-cbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; pkill -f "varnishd.*$RUN" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
json() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

$BIN/bench-upstream --listen 127.0.0.1:19201 --size 1024 --cache-control "public, max-age=3600" >/dev/null & PIDS+=($!)
SHOAL_LOG__LEVEL=warn $BIN/shoal gateway --listen 127.0.0.1:18180 --workers 1 --cache --to http://127.0.0.1:19201 >"$RUN/shoal.log" 2>&1 & PIDS+=($!)
varnishd -n "$RUN/varnish" -a 127.0.0.1:18181 -b 127.0.0.1:19201 -s malloc,256m -p thread_pools=1 -p thread_pool_min=10 -F >"$RUN/varnish.log" 2>&1 & PIDS+=($!)
wait_port 19201; wait_port 18180; wait_port 18181
for port in 18180 18181; do curl -s -o /dev/null "http://127.0.0.1:$port/object"; done
declare -A MAX P99 HITS
for name in shoal:18180 varnish:18181; do
  n=${name%%:*}; port=${name##*:}
  before=$(curl -s 127.0.0.1:19201/_stats | sed 's/.*"requests":\([0-9]*\).*/\1/')
  out=$($BIN/loadgen --url "http://127.0.0.1:$port/object" --connections "$CONNS" --duration "$SECONDS_PER")
  after=$(curl -s 127.0.0.1:19201/_stats | sed 's/.*"requests":\([0-9]*\).*/\1/')
  MAX[$n]=$(json "$out" rps); HITS[$n]=$((after - before))
  echo "  $n max: ${MAX[$n]} req/s, origin requests during the run: ${HITS[$n]}" >&2
done
RATE=$(python3 -c "print(int(${MAX[varnish]}/2))")
for name in shoal:18180 varnish:18181; do
  n=${name%%:*}; port=${name##*:}
  out=$($BIN/loadgen --url "http://127.0.0.1:$port/object" --connections "$CONNS" --duration "$SECONDS_PER" --rate "$RATE")
  P99[$n]=$(json "$out" p99_us)
done
REPORT=bench/results/cache-latest.md
{
echo "# Cache-hit benchmark"
echo
echo "Run: \`bench/cache.sh\` on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ); ${SECONDS_PER}s per measurement, $CONNS connections, one 1 KiB object, Shoal gateway with 1 worker thread vs Varnish $(varnishd -V 2>&1 | head -1 | sed 's/.*(varnish-\([^ ]*\).*/\1/') with one thread pool."
echo
echo "| | hit req/s | ratio (Shoal / Varnish) | p99 at ${RATE} req/s | origin requests during max run |"
echo "|---|---|---|---|---|"
for n in shoal varnish; do
  echo "| $n | $(printf '%.0f' "${MAX[$n]}") | $(python3 -c "print(f'{${MAX[shoal]}/${MAX[$n]}:.2f}x')") | ${P99[$n]} µs | ${HITS[$n]} |"
done
} > "$REPORT"
cat "$REPORT"
