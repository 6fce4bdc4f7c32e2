#!/usr/bin/env bash
# Scale-out (issue "Many machines"): does adding `serve` instances add
# capacity? Each instance is held to a fixed CPU share by a cgroup (cpu
# controller, CFS quota: QUOTA percent of one core in periods of PERIOD_MS,
# short so a throttled instance waits milliseconds, not 90), standing for one small
# machine; a gateway (1 thread), a worker, the payment sandbox, PostgreSQL
# (a fresh database) and Redis (sessions, bus) are shared, unlimited. The
# load is a realistic mix through the gateway (bench/src/bin/mixgen.rs:
# product reads by a Zipf law, /me with a Redis session, a checkout every
# 50 requests), closed loop with CONNS connections, for 1, 2, 4 and 8
# instances. Prints req/s, p50/p99, scaling efficiency (req/s with N /
# (N x req/s with 1)), and what each shared part spent (CPU seconds per
# 1,000 requests of the gateway, PostgreSQL, Redis; the share of periods
# in which the instances used up their quota; how busy the whole machine
# was), to say what serialises when efficiency falls.
#
# Needs root (cgroups), PostgreSQL on 127.0.0.1:5432 (trust, user root),
# Redis on 127.0.0.1:6379. Usage: sudo bench/scale.sh  (QUOTA=5
# PERIOD_MS=20 SECONDS_PER=10 CONNS=32 COUNTS="1 2 4 8" CONNS_PER_INSTANCE=
# to change).
set -euo pipefail
cd "$(dirname "$0")/.."
QUOTA=${QUOTA:-5}
PERIOD_MS=${PERIOD_MS:-20}
SECONDS_PER=${SECONDS_PER:-10}
CONNS=${CONNS:-32}
# With CONNS_PER_INSTANCE set, each count N gets N x that many connections
# instead (a closed loop's fixed CONNS leaves many throttled instances idle
# between their quota periods, and drowns one).
CONNS_PER_INSTANCE=${CONNS_PER_INSTANCE:-}
COUNTS=${COUNTS:-1 2 4 8}
PRODUCTS=${PRODUCTS:-1000}
[ "$(id -u)" = 0 ] || { echo "bench/scale.sh needs root (cgroups)" >&2; exit 1; }
CG=/sys/fs/cgroup/cpu
[ -w "$CG" ] || { echo "no writable cgroup v1 cpu controller at $CG" >&2; exit 1; }

echo "building release binaries ..." >&2
cargo build --release -q -p shoal -p shoal-bench
BIN=target/release
. bench/lib.sh
bench_init scale
DB="shoal_scale_$$"
CGROUPS=()
cleanup_scale() {
  for c in "${CGROUPS[@]}"; do
    [ -d "$c" ] && { cat "$c/cgroup.procs" 2>/dev/null | while read -r p; do echo "$p" > "$CG/cgroup.procs" 2>/dev/null || true; done; rmdir "$c" 2>/dev/null || true; }
  done
  psql -q -h 127.0.0.1 -U root -d test -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  redis-cli -h 127.0.0.1 --scan --pattern "scale$$*" 2>/dev/null | xargs -r redis-cli -h 127.0.0.1 del >/dev/null 2>&1 || true
  bench_cleanup
}
trap cleanup_scale EXIT
psql -q -h 127.0.0.1 -U root -d test -c "CREATE DATABASE $DB" >/dev/null

TOKEN="scale-admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SHOAL_LOG__LEVEL=warn
export SHOAL_DATABASE__BACKEND=postgres SHOAL_DATABASE__URL="postgres://root@127.0.0.1:5432/$DB"
export SHOAL_DATABASE__MAX_CONNECTIONS=8
export SHOAL_SESSIONS__BACKEND=redis SHOAL_SESSIONS__REDIS_URL=redis://127.0.0.1:6379 SHOAL_SESSIONS__REDIS_PREFIX="scale$$"
export SHOAL_CACHE__BUS=redis SHOAL_CACHE__BUS_REDIS_URL=redis://127.0.0.1:6379 SHOAL_CACHE__REDIS_PREFIX="scale$$"
export SHOAL_GATEWAY__ADMIN_TOKEN="$TOKEN" SHOAL_METRICS__TOKEN="$TOKEN"
# Every user of the load logs in from 127.0.0.1.
export SHOAL_ACCOUNTS__LOGIN_ATTEMPTS_PER_ADDRESS=1000000
export SHOAL_PAYMENTS__API_KEY="sk_test_$TOKEN" SHOAL_PAYMENTS__WEBHOOK_SECRET="whsec_$TOKEN"
export SHOAL_SANDBOX__API_KEY="sk_test_$TOKEN" SHOAL_SANDBOX__WEBHOOK_SECRET="whsec_$TOKEN"
export SHOAL_CLIENTS__TOKEN="svc_$TOKEN"
DATA="$RUN/data"

echo "migrating and seeding $PRODUCTS products ..." >&2
$BIN/shoal migrate --data-dir "$DATA" >/dev/null
$BIN/shoal seed --products "$PRODUCTS" --stock 1000000000 --data-dir "$DATA" >/dev/null 2>&1

SP=$(free_port); GP=$(free_port)
$BIN/shoal sandbox --listen "127.0.0.1:$SP" --data-dir "$DATA" > "$RUN/sandbox.log" 2>&1 &
PIDS+=($!)
export SHOAL_PAYMENTS__PROVIDER_URL="http://127.0.0.1:$SP"
$BIN/shoal gateway --registered --workers 1 --listen "127.0.0.1:$GP" --data-dir "$DATA" > "$RUN/gateway.log" 2>&1 &
GW=$!; PIDS+=($GW)
$BIN/shoal worker --listen "127.0.0.1:$(free_port)" --data-dir "$DATA" > "$RUN/worker.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SP/healthz"
wait_http "http://127.0.0.1:$GP/_gateway/healthz"

# available N: waits until the gateway's pool has exactly N available.
available() {
  for _ in $(seq 1 300); do
    n=$(curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GP/_gateway/pools" \
      | python3 -c 'import json,sys; print(sum(1 for i in json.load(sys.stdin)["pools"][0]["instances"] if i["available"]))' 2>/dev/null || echo 0)
    [ "$n" = "$1" ] && return 0
    sleep 0.1
  done
  echo "the pool never had $1 available instances" >&2; return 1
}
pg_pids() { pgrep -d' ' -x postgres || pgrep -d' ' postgres; }
# throttled N: periods in which the N instances ran out of quota, and all
# their periods.
throttled() {
  local t=0 p=0 i
  for i in $(seq 1 "$1"); do
    t=$((t + $(awk '/^nr_throttled/ {print $2}' "$CG/shoal-scale-$$-$1-$i/cpu.stat")))
    p=$((p + $(awk '/^nr_periods/ {print $2}' "$CG/shoal-scale-$$-$1-$i/cpu.stat")))
  done
  echo "$t $p"
}
# machine: busy and total jiffies of all cores since boot.
machine() { awk '/^cpu / {b=$2+$3+$4+$7+$8; print b, b+$5+$6}' /proc/stat; }
redis_pids() { pgrep -d' ' redis-server; }
# instance_requests: the gateway's request count of each instance, as JSON.
instance_requests() {
  curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GP/_gateway/pools" \
    | python3 -c 'import json,sys; print(json.dumps({i["url"]: i["requests"] for i in json.load(sys.stdin)["pools"][0]["instances"]}))'
}

echo "Run: \`bench/scale.sh\` on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ); each serve instance in a cgroup of ${QUOTA}% of a core (CFS period ${PERIOD_MS} ms); ${SECONDS_PER}s per count after 2 s warm-up, ${CONNS_PER_INSTANCE:+$CONNS_PER_INSTANCE connections per instance}${CONNS_PER_INSTANCE:-$CONNS connections}; mix: product by id (Zipf 1.0 over $PRODUCTS products) 80% / /me 20%, a checkout every 50."
echo
echo "| instances | req/s | p50 ms | p99 ms | efficiency | errors | gateway CPU s/1k req | PostgreSQL CPU s/1k | Redis CPU s/1k | periods at quota | machine busy | requests per instance, least–most (of an even share) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
BASE=""
for N in $COUNTS; do
  SERVE=()
  for i in $(seq 1 "$N"); do
    port=$(free_port)
    SHOAL_SERVE__REGISTER_AT="http://127.0.0.1:$GP" SHOAL_SERVE__ADVERTISE_URL="http://127.0.0.1:$port" \
      $BIN/shoal serve --listen "127.0.0.1:$port" --instance "serve-$i" --data-dir "$DATA" > "$RUN/serve-$N-$i.log" 2>&1 &
    pid=$!; SERVE+=($pid); PIDS+=($pid)
    c="$CG/shoal-scale-$$-$N-$i"; mkdir -p "$c"; CGROUPS+=("$c")
    echo $(( PERIOD_MS * 1000 )) > "$c/cpu.cfs_period_us"; echo $(( PERIOD_MS * QUOTA * 10 )) > "$c/cpu.cfs_quota_us"
    echo "$pid" > "$c/cgroup.procs"
  done
  available "$N"
  # shellcheck disable=SC2046
  read -r gu gs _ _ < <(cpu_ticks "$GW")
  # shellcheck disable=SC2046
  read -r pu ps _ _ < <(cpu_ticks $(pg_pids))
  # shellcheck disable=SC2046
  read -r ru rs _ _ < <(cpu_ticks $(redis_pids))
  read -r thr0 per0 < <(throttled "$N")
  read -r busy0 all0 < <(machine)
  REQ0=$(instance_requests)
  C=$CONNS; [ -n "$CONNS_PER_INSTANCE" ] && C=$((N * CONNS_PER_INSTANCE))
  OUT=$($BIN/mixgen --addr "127.0.0.1:$GP" --connections "$C" --duration "$SECONDS_PER" --warmup 2 --products 500)
  read -r gu2 gs2 _ _ < <(cpu_ticks "$GW")
  # shellcheck disable=SC2046
  read -r pu2 ps2 _ _ < <(cpu_ticks $(pg_pids))
  # shellcheck disable=SC2046
  read -r ru2 rs2 _ _ < <(cpu_ticks $(redis_pids))
  read -r thr1 per1 < <(throttled "$N")
  read -r busy1 all1 < <(machine)
  REQ1=$(instance_requests)
  python3 - "$N" "$OUT" "${BASE:-0}" "$((gu2 + gs2 - gu - gs))" "$((pu2 + ps2 - pu - ps))" "$((ru2 + rs2 - ru - rs))" "$((thr1 - thr0))/$((per1 - per0))" "$SECONDS_PER" "$(getconf CLK_TCK)" "$((busy1 - busy0))/$((all1 - all0))" "$REQ0" "$REQ1" <<'PY'
import json, sys
n = int(sys.argv[1]); r = json.loads(sys.argv[2]); base = float(sys.argv[3])
gw, pg, rd, secs, tck = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[8]), int(sys.argv[9])
ratio = lambda s: int(s.split("/")[0]) / max(1, int(s.split("/")[1]))
thr, busy = ratio(sys.argv[7]), ratio(sys.argv[10])
rps = r["rps"]; base = base or rps
# CPU over warm-up + measured seconds, per 1,000 measured-rate requests.
total = rps * (secs + 2) / 1000
per = lambda ticks: f"{ticks / tck / max(total, 1e-9):.3f}"
eff = rps / (n * base)
# Does the balancer leave throttled instances idle? Each instance's share
# of the requests over the run, against an even 1/n.
before, after = json.loads(sys.argv[11]), json.loads(sys.argv[12])
counts = [after[u] - before.get(u, 0) for u in after]
even = sum(counts) / max(1, len(counts))
spread = f"{min(counts) / max(even, 1):.0%}–{max(counts) / max(even, 1):.0%}" if counts else "-"
print(f"| {n} | {rps:,.0f} | {r['p50_us']/1000:.2f} | {r['p99_us']/1000:.2f} | {eff:.2f} | {r['errors']} | {per(gw)} | {per(pg)} | {per(rd)} | {thr:.0%} | {busy:.0%} | {spread} |")
PY
  [ -z "$BASE" ] && BASE=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["rps"])' "$OUT")
  kill "${SERVE[@]}" 2>/dev/null || true
  wait "${SERVE[@]}" 2>/dev/null || true
  available 0
done
