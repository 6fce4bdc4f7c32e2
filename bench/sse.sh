#!/usr/bin/env bash
# SSE benchmark (issue 5): N open Server-Sent Events streams on one
# instance; events published on a second instance and fanned out to every
# stream through the bus. Reports the stream-holding process's resident
# memory per connection (and, in a third Shoal run, the gateway's per
# stream passing through it to the instances) and the fan-out delay (publish -> arrival on every
# stream) p50/p99 with the CPU each delivery cost, for Shoal (its default SQLite bus, and the Redis bus)
# and a Node.js SSE server with Redis pub/sub fan-out (bench/sse/server.js),
# in one run, with the same client (target/release/sse-fanout).
# With ME_LOAD=1, a `GET /api/accounts/me` load (wrk -t1 -c4, browser
# headers, the bench user's session) runs on the instance holding the
# streams for 4 s before they open and again throughout their opening
# and the fan-out; its p99 alone and during are reported (issue 21: the
# instance keeps answering). Off by default: the load shares the two
# cores and raises the fan-out figures.
#   bench/sse.sh                      # CONNECTIONS=10000 EVENTS=20
#   CONNECTIONS=2000 bench/sse.sh
#   ME_LOAD=1 CONNECTIONS=19000 bench/sse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS=${CONNECTIONS:-10000}
EVENTS=${EVENTS:-20}
REDIS=${SHOAL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "==> building shoal and sse-fanout (release), installing the Node.js peer (npm)"
cargo build --release -q -p shoal -p shoal-bench
(cd bench/sse && npm ci --no-audit --no-fund --silent)
. bench/lib.sh
bench_init ssebench
results=()

run_shoal() { # label, extra env...
  local label=$1; shift
  local port; port=$(free_port)
  echo "  $label ..." >&2
  # Every stream is the one bench user's: lift the per-user cap (16).
  env SHOAL_LOG__LEVEL=warn SHOAL_NOTIFICATIONS__MAX_CONNECTIONS_PER_USER=$((CONNECTIONS + 10)) "$@" target/release/shoal up --port "$port" --instances 2 \
    --data-dir "$RUN/$label" > "$RUN/$label.log" 2>&1 &
  local sup=$!; PIDS+=("$sup")
  wait_http "http://127.0.0.1:$port/readyz"
  sleep 1
  local creds='{"email":"sse@example.com","password":"correct horse"}'
  curl -sf -o /dev/null -X POST "http://127.0.0.1:$port/api/accounts/signup" -H 'content-type: application/json' -d "$creds"
  local cookie
  cookie=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$port/api/accounts/login" \
    -H 'content-type: application/json' -d "$creds" | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\).*/\1/p' | head -1)
  # The sign-up and login hash the password (Argon2, 19 MiB each) on an
  # instance's blocking threads, which give that memory back when they
  # exit, 10 s idle later: the "before" reading comes after that (as in
  # bench/ws.sh), not inside the measurement.
  sleep 12
  read -r a b pid gpid < <(python3 - "$RUN/$label/run/stack.json" <<'PY'
import json, sys
c = {x["name"]: x for x in json.load(open(sys.argv[1]))["children"]}
print(c["serve-1"]["address"], c["serve-2"]["address"], c["serve-1"]["pid"], c["gateway"]["pid"])
PY
)
  if [ "${THROUGH_GATEWAY:-0}" = 1 ]; then
    # The streams pass through the gateway (spread over both instances);
    # the memory is the gateway's, client and upstream side of each.
    # Each stream costs the gateway two descriptors (client, instance):
    # at most 9,000 under the 20,000 open-files limit.
    results+=("$(target/release/sse-fanout --label "$label" --connections "$((CONNECTIONS < 9000 ? CONNECTIONS : 9000))" --events "$EVENTS" \
      --stream-url "http://127.0.0.1:$port/api/notifications/stream" --publish-url "http://$b/api/notifications/test" \
      --cookie "$cookie" --pid "$gpid")")
  else
    local wrkpid=""
    if [ "${ME_LOAD:-0}" = 1 ]; then
      me_wrk 4 "http://$a" "${cookie#shoal_session=}" > "$RUN/me-alone.txt"
      # Long enough for the opening and every event (EVENTS x 250 ms).
      me_wrk $((EVENTS / 4 + 8)) "http://$a" "${cookie#shoal_session=}" > "$RUN/me-during.txt" &
      wrkpid=$!
    fi
    results+=("$(target/release/sse-fanout --label "$label" --connections "$CONNECTIONS" --events "$EVENTS" \
      --stream-url "http://$a/api/notifications/stream" --publish-url "http://$b/api/notifications/test" \
      --cookie "$cookie" --pid "$pid")")
    if [ -n "$wrkpid" ]; then
      wait "$wrkpid" || true
      me_rows+=("| $label | $(me_p99 "$RUN/me-alone.txt") | $(me_p99 "$RUN/me-during.txt") |")
    fi
  fi
  kill -TERM "$sup"; wait "$sup" || true
}

# me_wrk SECONDS BASE TOKEN: a /me load on BASE, wrk's WRKJSON line.
me_wrk() {
  wrk -t1 -c4 -d"$1s" --timeout 5s --latency -s bench/api/me.lua "$2/api/accounts/me" -- "$3" 2>&1 | grep '^WRKJSON ' || echo 'WRKJSON {}'
}
# me_p99 FILE: "p99 ms (req/s, non-2xx)" from a me_wrk line.
me_p99() {
  sed 's/^WRKJSON //' "$1" | python3 -c 'import json, sys
r = json.load(sys.stdin)
print("%.1f ms (%d req/s, %d non-2xx)" % (r["p99_us"] / 1000, r["rps"], r["non_2xx_3xx"]) if r else "wrk failed")'
}
me_rows=()

run_shoal "shoal (SQLite bus)"
run_shoal "shoal (Redis bus)" SHOAL_CACHE__BUS=redis SHOAL_CACHE__BUS_REDIS_URL="$REDIS"
# The gateway's memory per stream it passes through; one client address
# holds them all, so no per-address cap.
THROUGH_GATEWAY=1 run_shoal "shoal gateway, streams passing through (Redis bus)" SHOAL_CACHE__BUS=redis \
  SHOAL_CACHE__BUS_REDIS_URL="$REDIS" SHOAL_GATEWAY__MAX_CONNECTIONS=40000 SHOAL_GATEWAY__MAX_CONNECTIONS_PER_CLIENT=0

echo "  node.js ..." >&2
p1=$(free_port); p2=$(free_port)
export SSE_CHANNEL="sse-bench-$$"
node bench/sse/server.js "$p1" "$REDIS" > "$RUN/node1.log" 2>&1 & n1=$!; PIDS+=("$n1")
node bench/sse/server.js "$p2" "$REDIS" > "$RUN/node2.log" 2>&1 & n2=$!; PIDS+=("$n2")
for p in "$p1" "$p2"; do
  for _ in $(seq 1 100); do grep -q "sse peer" "$RUN/node$([ "$p" = "$p1" ] && echo 1 || echo 2).log" && break; sleep 0.1; done
done
results+=("$(target/release/sse-fanout --label "node.js $(node --version) + ioredis" --connections "$CONNECTIONS" \
  --events "$EVENTS" --stream-url "http://127.0.0.1:$p1/stream" --publish-url "http://127.0.0.1:$p2/publish" --pid "$n1")")

REPORT=bench/results/sse-latest.md
python3 - "$REPORT" "${results[@]}" <<'PY'
import json, sys, datetime, os
out = sys.argv[1]
rows = [json.loads(r) for r in sys.argv[2:]]
node = rows[-1]
lines = [
    "# SSE fan-out benchmark", "",
    f"Run: `bench/sse.sh` on {os.cpu_count()} cores, {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}; "
    f"{rows[0]['connections']} streams on one instance, {rows[0]['events']} events published on another.", "",
    "| server | streams open | KiB per stream | vs Node.js | delivered | first | fan-out p50 | fan-out p99 | p99 vs Node.js | max | server CPU µs/delivery (user + sys) | vs Node.js | client CPU µs/delivery |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
def cpu(r):
    return r["server_user_us_per_delivery"] + r["server_system_us_per_delivery"]
for r in rows:
    mem = r["kib_per_connection"] / node["kib_per_connection"] if node["kib_per_connection"] else float("nan")
    lat = r["p99_ms"] / node["p99_ms"] if node["p99_ms"] else float("nan")
    work = cpu(r) / cpu(node) if cpu(node) else float("nan")
    lines.append(f"| {r['label']} | {r['opened']} | {r['kib_per_connection']:.1f} | {mem:.2f}x | "
                 f"{r['delivered']}/{r['expected']} | {r['min_ms']:.1f} ms | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {lat:.2f}x | {r['max_ms']:.1f} ms | "
                 f"{cpu(r):.1f} ({r['server_user_us_per_delivery']:.1f} + {r['server_system_us_per_delivery']:.1f}) | {work:.2f}x | {r['client_us_per_delivery']:.1f} |")
lines += ["", "Lower is better in the ratio columns (memory, p99 and CPU relative to the Node.js server). "
          "\"first\" is the earliest arrival of all (the bus's delay); CPU is the stream-holding process's "
          "(the gateway's in its row) and the client's, from /proc while the events went out (10 ms ticks)."]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
if [ ${#me_rows[@]} -gt 0 ]; then
  {
    echo
    echo "\`GET /api/accounts/me\` on the instance holding the streams (wrk -t1 -c4, browser headers):"
    echo
    echo "| server | p99 alone (4 s, before the streams) | p99 during the opening and the fan-out |"
    echo "|---|---|---|"
    printf '%s\n' "${me_rows[@]}"
  } | tee -a "$REPORT"
fi
