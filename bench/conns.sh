#!/usr/bin/env bash
# Memory per open connection (issue 21): resident memory a server adds
# per idle keep-alive client, measured at several counts in one run, for
# `shoal gateway` and nginx in front of the same upstreams, each with one
# worker thread/process. Each count: the server fresh, warmed up with
# 2,000 requests, its resident memory (VmRSS of the process and its
# children) read, then COUNT clients connected, one request each, held
# idle (`loadgen --idle`), memory read again after 2 s; per connection =
# the difference / COUNT. Prints a table and the slope to 100,000; writes
# bench/results/conns-latest.md.
#   bench/conns.sh                     # COUNTS="1000 10000 19000"
#   COUNTS=2000 bench/conns.sh
# The hard open-files limit here is 20,000 per process: 19,000 is the
# most one server can hold with room for its own files.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-1000 10000 19000}
if [ "${BUILD:-1}" = 1 ]; then
  echo "==> building shoal, loadgen and bench-upstream (release)"
  cargo build --release -q -p shoal -p shoal-bench
fi
. bench/lib.sh
install_missing nginx:nginx
PATH="$PATH:/usr/sbin"
ulimit -n "$(ulimit -Hn)"
BIN=target/release
bench_init conns
start_upstreams

rss_kb() { # VmRSS of the pids and their children, KiB
  local total=0 p q
  for p in "$@"; do
    for q in $p $(pgrep -P "$p" || true); do
      total=$((total + $(awk '/VmRSS/{print $2}' "/proc/$q/status" 2>/dev/null || echo 0)))
    done
  done
  echo "$total"
}
stop() { kill -TERM "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }

# start SERVER PORT: starts it; sets SERVER_PID.
start() {
  case $1 in
    shoal)
      # One client address holds them all: no per-address cap, and a total
      # cap far enough above them that no pressure shortens idle timeouts.
      SHOAL_LOG__LEVEL=warn SHOAL_GATEWAY__MAX_CONNECTIONS=40000 SHOAL_GATEWAY__MAX_CONNECTIONS_PER_CLIENT=0 $BIN/shoal gateway --development \
        --listen "127.0.0.1:$2" --workers 1 "${UPS[@]}" --health-path '' \
        --data-dir "$RUN/gw" > "$RUN/shoal.log" 2>&1 &
      SERVER_PID=$! ;;
    nginx)
      local servers="" p
      for p in "${UPSTREAM_PORTS[@]}"; do servers+="    server 127.0.0.1:$p;"$'\n'; done
      mkdir -p "$RUN/nginx"
      sed -e "s|@WORKERS@|1|; s|@RUN@|$RUN/nginx|g; s|@PORT@|$2|" \
        -e "s|worker_connections 4096;|worker_connections 30000; multi_accept on;|" \
        bench/peers/nginx.conf.in | python3 -c 'import sys; print(sys.stdin.read().replace("@SERVERS@", sys.argv[1].rstrip()))' "$servers" \
        | sed '1a worker_rlimit_nofile 30000;' > "$RUN/nginx.conf"
      nginx -c "$RUN/nginx.conf" > "$RUN/nginx.log" 2>&1 &
      SERVER_PID=$! ;;
  esac
}

RESULTS="$RUN/results.tsv"; : > "$RESULTS"
for n in $COUNTS; do
  for server in shoal nginx; do
    port=$(free_port)
    start "$server" "$port"
    for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
    $BIN/loadgen --url "http://127.0.0.1:$port/" --connections 8 --duration 1 >/dev/null
    sleep 1
    before=$(rss_kb "$SERVER_PID")
    $BIN/loadgen --url "http://127.0.0.1:$port/" --idle "$n" --duration 4 > "$RUN/idle.json" & L=$!
    for _ in $(seq 1 600); do [ -s "$RUN/idle.json" ] && break; sleep 0.1; done
    sleep 2
    held=$(rss_kb "$SERVER_PID")
    open=$(sed 's/.*"idle_connections":\([0-9]*\).*/\1/' "$RUN/idle.json" 2>/dev/null || echo 0)
    wait "$L" || true
    stop "$SERVER_PID"
    per=$(python3 -c "print(f'{($held - $before) / max(1, $open):.2f}')")
    echo "  $server, $n idle clients: $open held, RSS $before -> $held KiB, $per KiB each" >&2
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$n" "$open" "$before" "$held" "$per" >> "$RESULTS"
  done
done

REPORT=bench/results/conns-latest.md
python3 - "$RESULTS" > "$REPORT" <<'PY'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = collections.defaultdict(dict)
for server, n, opened, before, held, per in rows:
    by[int(n)][server] = (int(opened), int(before), int(held), float(per))
print("# Memory per idle keep-alive client: shoal gateway against nginx (one worker each)")
print()
print("| clients | Shoal held | Shoal RSS before → with them | Shoal KiB each | nginx held | nginx RSS before → with them | nginx KiB each | Shoal / nginx |")
print("|---|---|---|---|---|---|---|---|")
for n in sorted(by):
    s, x = by[n].get("shoal"), by[n].get("nginx")
    ratio = f"{s[3] / x[3]:.2f}x" if s and x and x[3] > 0 else "-"
    cell = lambda v: (f"{v[0]:,}", f"{v[1]:,} → {v[2]:,} KiB", f"{v[3]:.2f}") if v else ("-", "-", "-")
    print(f"| {n:,} | " + " | ".join(cell(s)) + " | " + " | ".join(cell(x)) + f" | {ratio} |")
print()
if len(by) >= 2:
    lo, hi = min(by), max(by)
    for server in ("shoal", "nginx"):
        a, b = by[lo].get(server), by[hi].get(server)
        if a and b and b[0] > a[0]:
            slope = (b[2] - b[1] - (a[2] - a[1])) / (b[0] - a[0])
            print(f"- {server}: {slope:.2f} KiB per added client between {lo:,} and {hi:,}; "
                  f"100,000 idle clients would add about {slope * 100000 / 1024:,.0f} MiB.")
PY
cat "$REPORT"
