#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind (not
# seconds: repeatable within ~2% whatever else the machine does). One
# server under callgrind, 10,000 requests at 1,000 req/s from 16
# keep-alive connections, then a run serving none (start-up and idle),
# and the difference per request. Prints the totals and the top functions
# by their own instructions. TARGET picks the server:
#   gateway   one gateway thread proxying to three bench-upstreams (default)
#   serve     one `shoal serve` (SQLite, development settings) answering
#             /healthz through the standard middleware
#   upstream  a bare hyper server (bench-upstream, one thread) answering
#             /healthz with a body as long as serve's: the baseline the
#             standard middleware is judged against (issue 20: <= 20%)
# With TARGET=serve, SERVE_PATH picks a service path instead of /healthz,
# driven by wrk (closed loop, 4 connections, SECONDS_PER seconds, 20) with
# bench/api.sh's browser headers, Redis sessions (REDIS_URL) and 200
# seeded products; the same login and seeding happen in the idle run:
#   product   GET /api/catalog/products/{id} (query cache hit)
#   me        GET /api/accounts/me (session in Redis)
#   list      GET /api/catalog/products?page=1&per_page=10 (cached, br)
#   bench/callgrind.sh                 # needs valgrind (Debian package)
#   TARGET=serve bench/callgrind.sh; TARGET=upstream bench/callgrind.sh
#   TARGET=serve SERVE_PATH=me bench/callgrind.sh
#   REQUESTS=20000 bench/callgrind.sh
#   KEEP=/tmp/cg.out bench/callgrind.sh   # keeps the loaded run's profile
#                                         # (and the idle run's as /tmp/cg.out.idle)
#                                         # (callgrind_annotate --inclusive=yes)
#   SHOAL=/tmp/old/target/release/shoal bench/callgrind.sh
#                                         # another build's gateway (e.g. a
#                                         # git worktree of an earlier commit)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-10000}
RATE=1000
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
echo "==> building shoal, loadgen and bench-upstream (release)" >&2
[ "${BUILD:-1}" = 0 ] || cargo build --release -q -p shoal -p shoal-bench
BIN=target/release
GATEWAY=${SHOAL:-$BIN/shoal}
. bench/lib.sh
TARGET=${TARGET:-gateway}
bench_init callgrind
# The body serve's /healthz answers, for the upstream's to match.
HEALTHZ_BYTES=${HEALTHZ_BYTES:-61}
SERVE_PATH=${SERVE_PATH:-healthz}
SECONDS_PER=${SECONDS_PER:-20}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
case "$SERVE_PATH" in
  healthz) SCRIPT="" ;;
  product) SCRIPT=bench/api/product.lua; URL_PATH='/api/catalog/products/{product}' ;;
  me) SCRIPT=bench/api/me.lua; URL_PATH=/api/accounts/me ;;
  list) SCRIPT=bench/api/list.lua; URL_PATH='/api/catalog/products?page=1&per_page=10' ;;
  *) echo "SERVE_PATH must be healthz, product, me or list" >&2; exit 2 ;;
esac
if [ -n "$SCRIPT" ]; then
  [ "$TARGET" = serve ] || { echo "SERVE_PATH needs TARGET=serve" >&2; exit 2; }
  install_missing wrk:wrk
  redis-cli -u "$REDIS_URL" ping >/dev/null || { echo "SERVE_PATH=$SERVE_PATH needs Redis at $REDIS_URL" >&2; exit 1; }
  PREFIX="shoal-callgrind-$$"
  callgrind_cleanup() {
    bench_cleanup
    redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX*" 2>/dev/null | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
  }
  trap callgrind_cleanup EXIT
  export SHOAL_SESSIONS__BACKEND=redis SHOAL_SESSIONS__REDIS_URL="$REDIS_URL" SHOAL_SESSIONS__REDIS_PREFIX="$PREFIX"
fi
case "$TARGET" in
  gateway) start_upstreams; READY=/_gateway/readyz; URL_PATH=/ ;;
  serve) READY=/healthz; URL_PATH=${URL_PATH:-/healthz} ;;
  # bench-upstream has no handler for SIGINT, which a background job of a
  # script ignores; valgrind writes the profile when TERM ends it.
  upstream) READY=/healthz; URL_PATH=/healthz; STOP=TERM ;;
  *) echo "TARGET must be gateway, serve or upstream" >&2; exit 2 ;;
esac
# total_for N: callgrind's instruction total for a run serving N requests.
total_for() {
  local n=$1 port out
  port=$(free_port)
  out="$RUN/cg.$n"
  local cg=(valgrind --tool=callgrind --callgrind-out-file="$out")
  case "$TARGET" in
    gateway)
      SHOAL_LOG__LEVEL=warn "${cg[@]}" \
        "$GATEWAY" gateway --listen "127.0.0.1:$port" --workers 1 "${UPS[@]}" >"$RUN/gw.$n.log" 2>&1 & ;;
    serve)
      if [ -n "$SCRIPT" ]; then
        SHOAL_LOG__LEVEL=warn "$GATEWAY" seed --products 200 --data-dir "$RUN/data.$n" >/dev/null 2>&1
      fi
      SHOAL_LOG__LEVEL=warn SHOAL_DATA_DIR="$RUN/data.$n" TOKIO_WORKER_THREADS=1 "${cg[@]}" \
        "$GATEWAY" serve --development --listen "127.0.0.1:$port" >"$RUN/gw.$n.log" 2>&1 & ;;
    upstream)
      "${cg[@]}" "$BIN/bench-upstream" --listen "127.0.0.1:$port" --size "$HEALTHZ_BYTES" \
        --threads 1 >"$RUN/gw.$n.log" 2>&1 & ;;
  esac
  local g=$!
  wait_http "http://127.0.0.1:$port$READY" >/dev/null
  if [ -n "$SCRIPT" ]; then
    # The same set-up in both runs (a login hashes a password: its
    # instructions must cancel out, not land on the requests).
    local base="http://127.0.0.1:$port" token product
    token=$(login "$base" callgrind@example.com)
    product=$(curl -sf "$base/api/catalog/products?per_page=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')
    if [ "$n" -gt 0 ]; then
      wrk -t1 -c4 -d"${SECONDS_PER}s" -s "$SCRIPT" "$base${URL_PATH//\{product\}/$product}" -- "$token" 2>&1 |
        sed -n 's/^WRKJSON //p' >"$RUN/load.$n.json"
    else
      sleep "$SECONDS_PER"
    fi
  elif [ "$n" -gt 0 ]; then
    $BIN/loadgen --url "http://127.0.0.1:$port$URL_PATH" --connections 16 --rate "$RATE" \
      --duration $((n / RATE)) --warmup 0 >"$RUN/load.$n.json"
  else
    sleep $((REQUESTS / RATE))
  fi
  # A graceful stop writes the profile; one that has not ended within a
  # minute (slow under valgrind, or stuck) is killed and the run fails.
  kill -"${STOP:-INT}" "$g"
  for _ in $(seq 1 600); do kill -0 "$g" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$g" 2>/dev/null; then
    kill -KILL "$g"; echo "the gateway under callgrind did not stop within 60 s" >&2; exit 1
  fi
  wait "$g" || true
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}
if [ -n "$SCRIPT" ]; then
  echo "==> $URL_PATH under callgrind, wrk for ${SECONDS_PER}s" >&2
else
  echo "==> $REQUESTS requests under callgrind (about a minute)" >&2
fi
loaded=$(total_for "$REQUESTS")
echo "==> the same time serving none" >&2
idle=$(total_for 0)
served=$(python3 -c "import json; print(json.load(open('$RUN/load.$REQUESTS.json'))['requests'])")
[ "$served" -gt 0 ] || { echo "no request was served" >&2; exit 1; }
if [ -n "${KEEP:-}" ]; then cp "$RUN/cg.$REQUESTS" "$KEEP"; cp "$RUN/cg.0" "$KEEP.idle"; fi
echo "$TARGET${SCRIPT:+ $SERVE_PATH}: instructions: $loaded with $served requests, $idle serving none"
python3 -c "print(f'per request: {($loaded - $idle) / max(1, $served):,.0f}')"
echo
echo "top functions by own instructions (the loaded run):"
callgrind_annotate "$RUN/cg.$REQUESTS" 2>/dev/null | grep -E '^ *[0-9,]+ +\(' | grep -v 'PROGRAM TOTALS' | head -20 | cut -c1-160
