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
#   bench/callgrind.sh                 # needs valgrind (Debian package)
#   TARGET=serve bench/callgrind.sh; TARGET=upstream bench/callgrind.sh
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
case "$TARGET" in
  gateway) start_upstreams; READY=/_gateway/readyz; URL_PATH=/ ;;
  serve) READY=/healthz; URL_PATH=/healthz ;;
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
      SHOAL_LOG__LEVEL=warn SHOAL_DATA_DIR="$RUN/data.$n" TOKIO_WORKER_THREADS=1 "${cg[@]}" \
        "$GATEWAY" serve --development --listen "127.0.0.1:$port" >"$RUN/gw.$n.log" 2>&1 & ;;
    upstream)
      "${cg[@]}" "$BIN/bench-upstream" --listen "127.0.0.1:$port" --size "$HEALTHZ_BYTES" \
        --threads 1 >"$RUN/gw.$n.log" 2>&1 & ;;
  esac
  local g=$!
  wait_http "http://127.0.0.1:$port$READY" >/dev/null
  if [ "$n" -gt 0 ]; then
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
echo "==> $REQUESTS requests under callgrind (about a minute)" >&2
loaded=$(total_for "$REQUESTS")
echo "==> the same time serving none" >&2
idle=$(total_for 0)
served=$(python3 -c "import json; print(json.load(open('$RUN/load.$REQUESTS.json'))['requests'])")
if [ -n "${KEEP:-}" ]; then cp "$RUN/cg.$REQUESTS" "$KEEP"; cp "$RUN/cg.0" "$KEEP.idle"; fi
echo "$TARGET: instructions: $loaded with $served requests, $idle serving none"
python3 -c "print(f'per request: {($loaded - $idle) / max(1, $served):,.0f}')"
echo
echo "top functions by own instructions (the loaded run):"
callgrind_annotate "$RUN/cg.$REQUESTS" 2>/dev/null | grep -E '^ *[0-9,]+ +\(' | grep -v 'PROGRAM TOTALS' | head -20 | cut -c1-160
