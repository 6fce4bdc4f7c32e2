#!/usr/bin/env bash
# Service-path benchmark (issue 20): Shoal's services against the Node.js
# peer in bench/api/ (a Fastify 5 cluster doing the same work: lru-cache,
# ioredis sessions, SQLite; see bench/api/server.mjs), in one run, with the
# headers a browser sends (Chrome's User-Agent, Accept, Accept-Language,
# `Accept-Encoding: gzip, deflate, br`, sec-ch-ua and Sec-Fetch-*; the
# session cookie, Origin and a JSON body where the path needs them; the
# scripts are bench/api/*.lua). Four paths:
#   product  GET /api/catalog/products/{id}, one id: a cache hit (~370 B)
#   list     GET /api/catalog/products?page=1&per_page=PER_PAGE (~10 KiB)
#   me       GET /api/accounts/me, session in Redis
#   order    POST /api/orders (a new Idempotency-Key each request): the
#            product's price over HTTP from the catalog, the order and its
#            payment job in one SQLite transaction
# Part A: one `shoal serve` (SQLite, Redis sessions; its multi-threaded
#   runtime uses both cores) against the Fastify cluster with 2 workers;
#   then /healthz through Shoal's standard middleware against a bare hyper
#   server (bench-upstream, 2 threads, a body of the same size) and the
#   Fastify cluster, with no headers and with the browser's.
# Part B: `shoal up` (the gateway and 3 instances; no worker and no payment
#   sandbox, so nothing drains the payment jobs, as on the Node side)
#   against nginx (bench/peers/nginx.conf.in, 2 worker processes as the
#   gateway has 2 threads here) in front of the Fastify cluster with 3
#   workers. Each side's orders call its catalog instances directly.
# Each measurement is `wrk -t1 -cCONNECTIONS -dSECONDS_PER --latency`
# (keep-alive, closed loop), Shoal and Node in turn (who goes first
# alternates by round), ROUNDS rounds, after a 2 s warm-up of each. Prints,
# per path, the medians of Shoal's and Node's req/s and p99, req/s Shoal /
# Node and p99 Node / Shoal (both above 1 when Shoal is ahead; the goal is
# 3), and each round's ratios; writes bench/results/api-latest.md.
# Needs Redis (SHOAL_TEST_REDIS_URL, default redis://127.0.0.1:6379);
# installs wrk and nginx (Debian) if missing, and the peer with `npm ci`.
#   bench/api.sh                       # SECONDS_PER=10 ROUNDS=3 PRODUCTS=10000 CONNECTIONS=64
#   SECONDS_PER=2 ROUNDS=1 bench/api.sh
# Env: SECONDS_PER (10) seconds per measurement; ROUNDS (3); PRODUCTS
# (10000) seeded on each side; CONNECTIONS (64) wrk connections; PER_PAGE
# (27, a page of ~10 KiB); PARTS ("A B") which parts to run; API_PATHS
# ("product list me order"; "" leaves only part A's /healthz); BUILD (1; 0
# uses target/release as it is); BEFORE (unset; the path of another build's
# shoal, e.g. from a `git worktree` of an earlier commit: its `serve` is
# measured on /healthz beside this build's, for a change to the middleware);
# QUOTA (unset; as root, a percent of one core): each side's server
# processes (and the bare hyper server, and BEFORE) are held to QUOTA% of
# a core by a cgroup (v1 cpu controller, CFS period PERIOD_MS, 10), so
# that wrk, on the same two cores, no longer caps the servers' req/s: with
# QUOTA=100 each side has one core and wrk the other, a one-core machine
# per side (the servers are measured in turn, never at once).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${SECONDS_PER:-10}
ROUNDS=${ROUNDS:-3}
PRODUCTS=${PRODUCTS:-10000}
CONNECTIONS=${CONNECTIONS:-64}
PER_PAGE=${PER_PAGE:-27}
PARTS=${PARTS:-A B}
REDIS_URL=${SHOAL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
QUOTA=${QUOTA:-}
PERIOD_MS=${PERIOD_MS:-10}
export QUOTA PERIOD_MS
CG=/sys/fs/cgroup/cpu
if [ -n "$QUOTA" ]; then
  [ "$(id -u)" = 0 ] || { echo "QUOTA needs root (cgroups)" >&2; exit 1; }
  [ -w "$CG" ] || { echo "QUOTA: no writable cgroup v1 cpu controller at $CG" >&2; exit 1; }
fi

if [ "${BUILD:-1}" = 1 ]; then
  echo "==> building shoal, loadgen and bench-upstream (release)"
  cargo build --release -q -p shoal -p shoal-bench
fi
. bench/lib.sh
install_missing wrk:wrk nginx:nginx
PATH="$PATH:/usr/sbin"
echo "==> installing the Node.js peer (npm ci)"
(cd bench/api && npm ci --no-audit --no-fund --silent)
redis-cli -u "$REDIS_URL" ping >/dev/null || { echo "bench/api.sh needs Redis at $REDIS_URL" >&2; exit 1; }

BIN=target/release
bench_init apibench
# Every Redis key of this run starts with $PREFIX; removed at the end.
PREFIX="shoal-apibench-$$"
api_cleanup() {
  bench_cleanup
  redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX*" 2>/dev/null | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
}
CGROUPS=()
cgroups_cleanup() {
  for c in "${CGROUPS[@]}"; do
    [ -d "$c" ] || continue
    while read -r p; do echo "$p" > "$CG/cgroup.procs" 2>/dev/null || true; done < "$c/cgroup.procs"
    rmdir "$c" 2>/dev/null || true
  done
}
trap 'api_cleanup; cgroups_cleanup' EXIT

SHOAL_ENV=(SHOAL_LOG__LEVEL=warn SHOAL_SESSIONS__BACKEND=redis SHOAL_SESSIONS__REDIS_URL="$REDIS_URL"
  SHOAL_SESSIONS__REDIS_PREFIX="$PREFIX-shoal")
ADMIN_TOKEN="apibench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

echo "==> seeding $PRODUCTS products on each side"
# Checkouts hold stock: enough for every order the run places.
SHOAL_LOG__LEVEL=warn $BIN/shoal seed --products "$PRODUCTS" --stock 1000000000 --data-dir "$RUN/shoal" >&2
DB="$RUN/node/api.db" PRODUCTS="$PRODUCTS" STOCK=1000000000 node bench/api/seed.mjs

# start_node PORT WORKERS: the Fastify cluster (appends its pid to PIDS).
start_node() {
  env PORT="$1" WORKERS="$2" DB="$RUN/node/api.db" REDIS_URL="$REDIS_URL" REDIS_PREFIX="$PREFIX-node" \
    node bench/api/server.mjs > "$RUN/node-$1.log" 2>&1 &
  PIDS+=($!)
  NODE_PID=$!
}
stop() { kill -TERM "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }

# first_id BASE: the id of the first product of the first page.
first_id() {
  curl -sf "$1/api/catalog/products?per_page=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])'
}

RESULTS="$RUN/results.tsv"; : > "$RESULTS"
CHECKS="$RUN/checks.tsv"; : > "$CHECKS"
# run_wrk SECONDS SCRIPT URL [ARGS...]: prints wrk's WRKJSON line.
run_wrk() {
  local out
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$1s" --timeout 5s --latency -s "$2" "$3" -- "${@:4}" 2>&1) || true
  if ! grep -q '^WRKJSON ' <<<"$out"; then echo "wrk failed on $3: $out" >&2; return 1; fi
  grep '^WRKJSON ' <<<"$out" | sed 's/^WRKJSON //'
}
# The wrk script and URL suffix and arguments of each path, for one side:
# target PATH SIDE sets SCRIPT URL ARGS from BASE_<side>, TOKEN_<side>,
# PRODUCT_<side> (and KEY, the Idempotency-Key prefix).
target() {
  local v base token product
  v="BASE_$2"; base=${!v}; v="TOKEN_$2"; token=${!v:-}; v="PRODUCT_$2"; product=${!v:-}
  ARGS=()
  case $1 in
    product) SCRIPT=bench/api/product.lua; URL="$base/api/catalog/products/$product" ;;
    list) SCRIPT=bench/api/list.lua; URL="$base/api/catalog/products?page=1&per_page=$PER_PAGE" ;;
    me) SCRIPT=bench/api/me.lua; URL="$base/api/accounts/me"; ARGS=("$token") ;;
    order) SCRIPT=bench/api/order.lua; URL="$base/api/orders"; ARGS=("$token" "$product" "$KEY") ;;
    healthz-plain) SCRIPT=bench/api/plain.lua; URL="$base/healthz" ;;
    healthz-browser) SCRIPT=bench/api/product.lua; URL="$base/healthz" ;;
  esac
}
# check PART PATH SIDE: one request with the browser's headers; records
# status, Content-Type, Content-Encoding and bytes on the wire.
check() {
  local h=(-H "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
    -H "Accept-Encoding: gzip, deflate, br" -H "Accept: */*")
  KEY="check-$$-$1-$3"; target "$2" "$3"
  [ "$2" = healthz-plain ] && h=()
  case $2 in
    me) h+=(-H "Cookie: shoal_session=${ARGS[0]}") ;;
    order) h+=(-H "Cookie: shoal_session=${ARGS[0]}" -H "Content-Type: application/json" -H "Sec-Fetch-Site: same-origin"
      -H "Idempotency-Key: $KEY" --data "{\"items\":[{\"product_id\":\"${ARGS[1]}\",\"quantity\":1}],\"payment_method\":\"pm_card_visa\"}") ;;
  esac
  curl -s -o /dev/null -D "$RUN/headers" "${h[@]}" -w '%{http_code}\t%{size_download}' "$URL" > "$RUN/status"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(cut -f1 "$RUN/status")" "$(cut -f2 "$RUN/status")" \
    "$(python3 -c 'import sys
h = {}
for line in open(sys.argv[1], errors="replace"):
    k, _, v = line.partition(":")
    h[k.strip().lower()] = v.strip()
print(h.get("content-type", "-") + "\t" + h.get("content-encoding", "identity"))' "$RUN/headers")" >> "$CHECKS"
}
# tree_pids PID...: these processes and all their descendants (a side's
# server: serve; `shoal up` with its gateway and instances; the Node
# cluster's primary and workers; nginx).
tree_pids() {
  local queue=("$@") p kids
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}; queue=("${queue[@]:1}")
    echo "$p"
    kids=$(ps -o pid= --ppid "$p" 2>/dev/null || true)
    for k in $kids; do queue+=("$k"); done
  done
}
# tree_ticks PID...: user + system CPU ticks so far of tree_pids PID...
tree_ticks() {
  for p in $(tree_pids "$@"); do cat "/proc/$p/stat" 2>/dev/null || true; done \
    | awk '{ s += $14 + $15 } END { print s + 0 }'
}
# limit NAME PID...: with QUOTA, puts tree_pids PID... in a cgroup of their
# own held to QUOTA% of one core.
limit() {
  [ -n "$QUOTA" ] || return 0
  local c="$CG/shoal-apibench-$$-$1" p
  mkdir -p "$c"; CGROUPS+=("$c")
  echo $(( PERIOD_MS * 1000 )) > "$c/cpu.cfs_period_us"
  echo $(( PERIOD_MS * QUOTA * 10 )) > "$c/cpu.cfs_quota_us"
  for p in $(tree_pids "${@:2}"); do
    # A process that cannot be moved and still runs would be measured
    # without the quota the report names: stop instead.
    echo "$p" > "$c/cgroup.procs" 2>/dev/null || ! [ -d "/proc/$p" ] \
      || { echo "QUOTA: could not move process $p into $c" >&2; exit 1; }
  done
}
CLK_TCK=$(getconf CLK_TCK)

# measure PART PATHS SIDES: warms each path up on each side, then ROUNDS
# rounds of every path on every side (the sides' order turns each round).
measure() {
  local part=$1 paths=$2 sides=$3 path side r order json
  for path in $paths; do
    for side in $sides; do
      check "$part" "$path" "$side"
      KEY="warm-$$-$part-$side"; target "$path" "$side"
      run_wrk 2 "$SCRIPT" "$URL" "${ARGS[@]}" >/dev/null
    done
  done
  for r in $(seq 1 "$ROUNDS"); do
    order=$sides
    [ $((r % 2)) = 0 ] && order=$(tr ' ' '\n' <<<"$sides" | tac | tr '\n' ' ')
    for path in $paths; do
      for side in $order; do
        echo "  part $part, round $r/$ROUNDS: $path on $side ..." >&2
        KEY="$PREFIX-$part-$side-r$r"; target "$path" "$side"
        v="ROOTS_$side"; t0=$(tree_ticks ${!v})
        json=$(run_wrk "$SECONDS_PER" "$SCRIPT" "$URL" "${ARGS[@]}")
        t1=$(tree_ticks ${!v})
        # The server side's CPU over the measurement, in µs (wrk's own is not counted).
        json="${json%\}},\"cpu_us\":$(( (t1 - t0) * 1000000 / CLK_TCK ))}"
        printf '%s\t%s\t%s\t%s\t%s\n' "$part" "$path" "$side" "$r" "$json" >> "$RESULTS"
      done
    done
  done
}
PATHS=${API_PATHS-product list me order}

if [[ " $PARTS " == *" A "* ]]; then
  echo "==> part A: one shoal serve against the Fastify cluster (2 workers)"
  SP=$(free_port); NP=$(free_port); HP=$(free_port)
  env "${SHOAL_ENV[@]}" $BIN/shoal serve --development --listen "127.0.0.1:$SP" --data-dir "$RUN/shoal" > "$RUN/serve.log" 2>&1 &
  SERVE=$!; PIDS+=($SERVE)
  start_node "$NP" 2
  wait_http "http://127.0.0.1:$SP/readyz"
  wait_http "http://127.0.0.1:$NP/readyz"
  BASE_shoal="http://127.0.0.1:$SP"; BASE_node="http://127.0.0.1:$NP"
  TOKEN_shoal=$(login "$BASE_shoal"); TOKEN_node=$(login "$BASE_node")
  PRODUCT_shoal=$(first_id "$BASE_shoal"); PRODUCT_node=$(first_id "$BASE_node")
  ROOTS_shoal=$SERVE; ROOTS_node=$NODE_PID
  limit A-shoal $ROOTS_shoal; limit A-node $ROOTS_node
  measure A "$PATHS" "shoal node"
  # /healthz: the standard middleware against a bare hyper server whose
  # body is as long as Shoal's /healthz answer.
  HEALTHZ_BYTES=$(curl -sf "$BASE_shoal/healthz" | wc -c)
  $BIN/bench-upstream --listen "127.0.0.1:$HP" --size "$HEALTHZ_BYTES" --threads 2 >/dev/null 2>&1 &
  HYPER=$!; PIDS+=($HYPER)
  wait_http "http://127.0.0.1:$HP/healthz"
  BASE_hyper="http://127.0.0.1:$HP"; ROOTS_hyper=$HYPER
  limit A-hyper $ROOTS_hyper
  H_SIDES="shoal hyper node"; OLD=""
  if [ -n "${BEFORE:-}" ]; then
    BP=$(free_port)
    env "${SHOAL_ENV[@]}" "$BEFORE" serve --development --listen "127.0.0.1:$BP" --data-dir "$RUN/before" > "$RUN/before.log" 2>&1 &
    OLD=$!; PIDS+=($OLD)
    wait_http "http://127.0.0.1:$BP/readyz"
    BASE_before="http://127.0.0.1:$BP"; ROOTS_before=$OLD; H_SIDES="$H_SIDES before"
    limit A-before $ROOTS_before
  fi
  measure H "healthz-plain healthz-browser" "$H_SIDES"
  stop "$SERVE" "$NODE_PID" "$HYPER" $OLD
fi

if [[ " $PARTS " == *" B "* ]]; then
  echo "==> part B: shoal up (gateway + 3 instances) against nginx + the Fastify cluster (3 workers)"
  GP=$(free_port); NP=$(free_port); XP=$(free_port)
  env "${SHOAL_ENV[@]}" SHOAL_UP__WORKERS=0 SHOAL_UP__SANDBOX=false SHOAL_GATEWAY__ADMIN_TOKEN="$ADMIN_TOKEN" \
    $BIN/shoal up --port "$GP" --instances 3 --data-dir "$RUN/shoal" > "$RUN/up.log" 2>&1 &
  SUP=$!; PIDS+=($SUP)
  start_node "$NP" 3
  sed -e "s|@WORKERS@|2|; s|@PORT@|$XP|; s|@RUN@|$RUN|g" -e "s|@SERVERS@|    server 127.0.0.1:$NP;|" \
    bench/peers/nginx.conf.in > "$RUN/nginx.conf"
  nginx -c "$RUN/nginx.conf" -p "$RUN" &
  NGINX=$!; PIDS+=($NGINX)
  wait_http "http://127.0.0.1:$GP/readyz"
  # Every instance registered and available before measuring.
  for _ in $(seq 1 300); do
    n=$(curl -s -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$GP/_gateway/pools" \
      | python3 -c 'import json,sys; print(sum(1 for p in json.load(sys.stdin)["pools"] for i in p["instances"] if i["available"]))' 2>/dev/null || echo 0)
    [ "$n" -ge 3 ] && break
    sleep 0.1
  done
  [ "$n" -ge 3 ] || { echo "the gateway never had 3 available instances" >&2; exit 1; }
  wait_http "http://127.0.0.1:$XP/readyz"
  BASE_shoal="http://127.0.0.1:$GP"; BASE_node="http://127.0.0.1:$XP"
  TOKEN_shoal=$(login "$BASE_shoal"); TOKEN_node=$(login "$BASE_node")
  PRODUCT_shoal=$(first_id "$BASE_shoal"); PRODUCT_node=$(first_id "$BASE_node")
  ROOTS_shoal=$SUP; ROOTS_node="$NODE_PID $NGINX"
  limit B-shoal $ROOTS_shoal; limit B-node $ROOTS_node
  measure B "$PATHS" "shoal node"
  stop "$SUP" "$NODE_PID"
fi

REPORT=bench/results/api-latest.md
python3 - "$REPORT" "$RESULTS" "$CHECKS" "$SECONDS_PER" "$ROUNDS" "$PRODUCTS" "$CONNECTIONS" "$PER_PAGE" \
  "$(node --version)" "$(node -p 'require("./bench/api/node_modules/fastify/package.json").version')" \
  "$(nginx -v 2>&1 | sed 's/.*\///')" "$(wrk -v 2>&1 | head -1 | awk '{print $2}')" <<'PY'
import json, statistics, sys, datetime, os
out, results, checks, secs, rounds, products, conns, per_page, node_v, fastify_v, nginx_v, wrk_v = sys.argv[1:]
rows = {}
for line in open(results):
    part, path, side, r, j = line.rstrip("\n").split("\t", 4)
    rows.setdefault((part, path, side), []).append((int(r), json.loads(j)))
names = {
    "product": "`GET /api/catalog/products/{id}` (cache hit)",
    "list": f"`GET /api/catalog/products?page=1&per_page={per_page}`",
    "me": "`GET /api/accounts/me` (session in Redis)",
    "order": "`POST /api/orders` (job in the transaction)",
    "healthz-plain": "`GET /healthz`, no headers",
    "healthz-browser": "`GET /healthz`, browser headers",
}
med = lambda xs: statistics.median(xs)
def fmt_ms(us): return f"{us / 1000:.2f} ms"
def stats(key):
    rs = sorted(rows.get(key, []))
    return rs, med([d["rps"] for _, d in rs]), med([d["p99_us"] for _, d in rs]), \
        sum(d["non_2xx_3xx"] + d["socket_errors"] for _, d in rs)
def cpu(key):
    # Server-side CPU (user + system, all its processes) per request, µs.
    return med([d["cpu_us"] / max(1, d["requests"]) for _, d in rows.get(key, [])])
lines = [
    "# Service-path benchmark: Shoal against a Fastify cluster", "",
    f"Run: `bench/api.sh` on {os.cpu_count()} cores, {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}; "
    f"`wrk {wrk_v} -t1 -c{conns} -d{secs}s` per measurement (keep-alive, closed loop, same machine), "
    f"Shoal and Node in turn, {rounds} round(s) after a 2 s warm-up; medians of the rounds. "
    f"{products} products seeded on each side; Node.js {node_v}, Fastify {fastify_v}, nginx {nginx_v}. "
    + (f"Each side's server processes held to {os.environ['QUOTA']}% of one core by a cgroup (CFS period "
       f"{os.environ.get('PERIOD_MS', '10')} ms; `QUOTA`), wrk not. " if os.environ.get("QUOTA") else "") +
    "Requests carry Chrome's headers (`Accept-Encoding: gzip, deflate, br`; bench/api/browser.lua).", "",
    "req/s ratio = Shoal / Node; p99 ratio = Node p99 / Shoal p99 (above 1: Shoal ahead; the goal of issue 20 is 3 for both). "
    "CPU/req: user + system CPU of the side's server processes (all of them: serve; `shoal up`'s gateway and instances; "
    "the Node cluster's primary and workers, and nginx) over the measured seconds, divided by the requests; CPU ratio = "
    "Node / Shoal, what each request costs, which wrk (on the same 2 cores) does not cap as it caps req/s.", "",
]
parts = {
    "A": "Part A: one `shoal serve` (SQLite, Redis sessions) against the Fastify cluster of 2 workers",
    "B": "Part B: `shoal up` (gateway + 3 instances) against nginx in front of the Fastify cluster of 3 workers",
}
for part, title in parts.items():
    if not any(k[0] == part for k in rows):
        continue
    lines += [f"## {title}", "",
              "| path | Shoal req/s | Shoal p99 | Shoal CPU/req | Node req/s | Node p99 | Node CPU/req | req/s ratio | p99 ratio | CPU ratio | ratios by round (req/s; p99) | errors (Shoal/Node) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in ["product", "list", "me", "order"]:
        if (part, path, "shoal") not in rows:
            continue
        srs, s_rps, s_p99, s_err = stats((part, path, "shoal"))
        nrs, n_rps, n_p99, n_err = stats((part, path, "node"))
        by_round = ", ".join(f"{s['rps'] / n['rps']:.2f}; {n['p99_us'] / max(1, s['p99_us']):.2f}"
                             for (_, s), (_, n) in zip(srs, nrs))
        s_cpu, n_cpu = cpu((part, path, "shoal")), cpu((part, path, "node"))
        lines.append(f"| {names[path]} | {s_rps:,.0f} | {fmt_ms(s_p99)} | {s_cpu:.1f} µs | {n_rps:,.0f} | {fmt_ms(n_p99)} | "
                     f"{n_cpu:.1f} µs | {s_rps / n_rps:.2f}x | {n_p99 / max(1, s_p99):.2f}x | {n_cpu / max(0.001, s_cpu):.2f}x | "
                     f"{by_round} | {s_err}/{n_err} |")
    lines.append("")
if any(k[0] == "H" for k in rows):
    lines += ["## /healthz: Shoal's standard middleware against a bare hyper server (part A's machine state)", "",
              "bench-upstream (hyper's HTTP/1.1 server, 2 threads, no middleware) answering a body as long as Shoal's; "
              "the Fastify cluster (2 workers) beside them.", "",
              "| request | Shoal req/s | Shoal p99 | Shoal CPU/req | bare hyper req/s | bare hyper p99 | hyper CPU/req | Shoal / hyper (req/s) | middleware's share of Shoal's CPU | Node req/s | Node p99 | Node CPU/req | errors (Shoal/hyper/Node) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in ["healthz-plain", "healthz-browser"]:
        _, s_rps, s_p99, s_err = stats(("H", path, "shoal"))
        _, h_rps, h_p99, h_err = stats(("H", path, "hyper"))
        _, n_rps, n_p99, n_err = stats(("H", path, "node"))
        s_cpu, h_cpu, n_cpu = cpu(("H", path, "shoal")), cpu(("H", path, "hyper")), cpu(("H", path, "node"))
        lines.append(f"| {names[path]} | {s_rps:,.0f} | {fmt_ms(s_p99)} | {s_cpu:.1f} µs | {h_rps:,.0f} | {fmt_ms(h_p99)} | "
                     f"{h_cpu:.1f} µs | {s_rps / h_rps:.2f}x | {(s_cpu - h_cpu) / max(0.001, s_cpu):.0%} | "
                     f"{n_rps:,.0f} | {fmt_ms(n_p99)} | {n_cpu:.1f} µs | {s_err}/{h_err}/{n_err} |")
    lines.append("")
if any(k[0] == "H" and k[2] == "before" for k in rows):
    lines += ["### The build before (`BEFORE`), same rounds", "",
              "| request | before req/s | before CPU/req | middleware's share, before | this build req/s | this build CPU/req | middleware's share, this build | CPU/req this / before | errors (before) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for path in ["healthz-plain", "healthz-browser"]:
        _, b_rps, _, b_err = stats(("H", path, "before"))
        _, s_rps, _, _ = stats(("H", path, "shoal"))
        b_cpu, s_cpu, h_cpu = cpu(("H", path, "before")), cpu(("H", path, "shoal")), cpu(("H", path, "hyper"))
        lines.append(f"| {names[path]} | {b_rps:,.0f} | {b_cpu:.1f} µs | {(b_cpu - h_cpu) / max(0.001, b_cpu):.0%} | "
                     f"{s_rps:,.0f} | {s_cpu:.1f} µs | {(s_cpu - h_cpu) / max(0.001, s_cpu):.0%} | "
                     f"{s_cpu / max(0.001, b_cpu):.2f}x | {b_err} |")
    lines.append("")
lines += ["## Responses (one request each before measuring, browser headers)", "",
          "| part | path | side | status | Content-Type | Content-Encoding | bytes on the wire |", "|---|---|---|---|---|---|---|"]
for line in open(checks):
    part, path, side, status, size, ctype, enc = line.rstrip("\n").split("\t")
    lines.append(f"| {part} | {path} | {side} | {status} | {ctype} | {enc} | {size} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
