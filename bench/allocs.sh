#!/usr/bin/env bash
# Heap allocations per request on Shoal's service paths, counted by
# valgrind's DHAT (counts, not seconds: repeatable whatever else the
# machine does). One `shoal serve` (built with glibc's malloc, the
# `system-alloc` feature, so DHAT sees every allocation) on SQLite with
# Redis sessions, under DHAT, for each path: wrk with a browser's headers
# (bench/api/*.lua) for SECONDS, then the same time serving nothing; the
# difference over the requests served is what one request allocates.
#   bench/allocs.sh                      # needs valgrind, wrk, Redis
#   SECONDS_PER=20 bench/allocs.sh
#   KEEP=/tmp/dhat bench/allocs.sh       # keeps each path's dhat JSON
#                                        # (open in DHAT's dh_view.html)
# Paths: /healthz (middleware only), product by id (query cache hit),
# /api/accounts/me (Redis session, user from the query cache), a 10-item
# list page (cached, compressed form kept).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${SECONDS_PER:-10}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
. bench/lib.sh
install_missing wrk:wrk valgrind:valgrind
redis-cli -u "$REDIS_URL" ping >/dev/null || { echo "bench/allocs.sh needs Redis at $REDIS_URL" >&2; exit 1; }
echo "==> building shoal with the system allocator (release, --features system-alloc)" >&2
cargo build --release -q -p shoal --features system-alloc
BIN=target/release
bench_init allocs
cp "$BIN/shoal" "$RUN/shoal-sysalloc"
# The usual binary again, so later benchmarks measure mimalloc.
cargo build --release -q -p shoal
PREFIX="shoal-allocs-$$"
allocs_cleanup() {
  bench_cleanup
  redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX*" 2>/dev/null | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
}
trap allocs_cleanup EXIT
export SHOAL_LOG__LEVEL=warn SHOAL_SESSIONS__BACKEND=redis SHOAL_SESSIONS__REDIS_URL="$REDIS_URL" \
  SHOAL_SESSIONS__REDIS_PREFIX="$PREFIX" SHOAL_DATA_DIR="$RUN/data"
"$RUN/shoal-sysalloc" seed --products 200 >/dev/null 2>&1

# under_dhat NAME SCRIPT PATH [ARGS...]: serve under DHAT, drive PATH
# with SCRIPT (none: idle) for SECONDS_PER; prints "blocks bytes requests".
under_dhat() {
  local name=$1 script=$2 path=$3 port out pid requests=0
  shift 3
  port=$(free_port)
  out="$RUN/dhat.$name.json"
  valgrind --tool=dhat --dhat-out-file="$out" "$RUN/shoal-sysalloc" serve --development \
    --listen "127.0.0.1:$port" >"$RUN/serve.$name.log" 2>&1 &
  pid=$!
  wait_http "http://127.0.0.1:$port/readyz" >/dev/null
  base="http://127.0.0.1:$port"
  # The same set-up in every run, idle too (a login hashes a password:
  # its allocations must cancel out, not land on the requests).
  token=$(login "$base" allocs@example.com)
  product=$(curl -sf "$base/api/catalog/products?per_page=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')
  if [ "$script" != none ]; then
    url="$base${path//\{product\}/$product}"
    # Warm what a steady server has warm (caches, pools); counted too.
    for secs in 2 "$SECONDS_PER"; do
      n=$(wrk -t1 -c4 -d"${secs}s" -s "$script" "$url" -- "$token" 2>&1 |
        sed -n 's/^WRKJSON //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
      requests=$((requests + n))
    done
  else
    sleep $((SECONDS_PER + 2))
  fi
  kill -INT "$pid"
  for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; echo "serve under DHAT did not stop" >&2; exit 1; fi
  wait "$pid" || true
  [ -n "${KEEP:-}" ] && { mkdir -p "$KEEP"; cp "$out" "$KEEP/"; }
  # DHAT's summary: "Total:     N bytes in M blocks".
  awk -v r="$requests" '/Total:/ {gsub(",", ""); for (i=1;i<=NF;i++) { if ($i=="bytes") b=$(i-1); if ($i=="blocks") k=$(i-1) } }
    END { print k, b, r }' "$RUN/serve.$name.log"
}

echo "==> idle (${SECONDS_PER}s under DHAT)" >&2
read -r idle_blocks idle_bytes _ < <(under_dhat idle none /)
printf '%-10s %10s %14s %12s %16s\n' path requests "allocs/req" "bytes/req" "vs idle (allocs)" > "$RUN/table"
for spec in "healthz bench/api/plain.lua /healthz" \
            "product bench/api/product.lua /api/catalog/products/{product}" \
            "me bench/api/me.lua /api/accounts/me" \
            "list bench/api/list.lua /api/catalog/products?page=1&per_page=10"; do
  read -r name script path <<<"$spec"
  echo "==> $name (${SECONDS_PER}s under DHAT)" >&2
  read -r blocks bytes requests < <(under_dhat "$name" "$script" "$path")
  python3 - "$name" "$blocks" "$bytes" "$requests" "$idle_blocks" "$idle_bytes" >> "$RUN/table" <<'PY'
import sys
name, blocks, nbytes, req, iblocks, ibytes = sys.argv[1], *map(int, sys.argv[2:])
req = max(1, req)
print(f"{name:<10} {req:>10} {(blocks - iblocks) / req:>14.1f} {(nbytes - ibytes) / req:>12.0f} {blocks:>10} - {iblocks}")
PY
done
echo
cat "$RUN/table"
