#!/usr/bin/env bash
# CPU per proxied request: `shoal gateway` against nginx and HAProxy at W
# worker threads/processes, the same three upstreams, in three parts:
#   1. max rate with loadgen (closed loop, 64 connections);
#   2. the same offered rate for all (RATE req/s, loadgen's open loop): CPU
#      per request where each does the same work per second, which is the
#      comparison issue 20 asks for (gateway CPU per request <= nginx's);
#   3. max rate with wrk (-t1 -c64), the tool of the service benchmarks.
# Each part takes the contenders in turn, ROUNDS rounds, and reports
# medians. CPU is user + system time of all the server's threads and child
# processes from /proc over the measured seconds; context switches too.
# With HYPER=1 a fourth contender, shoal-hyper, is the same gateway with
# hyper's HTTP/1.1 server (`http1_server = "hyper"`).
#   W=1 bench/cpu.sh
#   W=2 RATE=30000 ROUNDS=3 bench/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-2}
RATE=${RATE:-20000}
ROUNDS=${ROUNDS:-2}
SECONDS_PER=${SECONDS_PER:-6}
if [ "${BUILD:-1}" = 1 ]; then
  echo "==> building shoal, loadgen and bench-upstream (release)" >&2
  bench/setup.sh >&2   # nginx, HAProxy (Debian packages) and the release build
fi
command -v wrk >/dev/null || { echo "==> installing wrk" >&2; apt-get install -y -q wrk >/dev/null; }
BIN=target/release
. bench/lib.sh
bench_init cpubench
start_upstreams
SERVERS=""; SERVERS_HA=""
for p in "${UPSTREAM_PORTS[@]}"; do
  SERVERS+="    server 127.0.0.1:$p;"$'\n'
  SERVERS_HA+="  server u$p 127.0.0.1:$p"$'\n'
done
SP=$(free_port); NP=$(free_port); HAP=$(free_port)
sed -e "s|@WORKERS@|$W|; s|@PORT@|$NP|; s|@RUN@|$RUN|g" -e "/@SERVERS@/{
r /dev/stdin
d
}" bench/peers/nginx.conf.in <<<"$SERVERS" > "$RUN/nginx.conf"
sed -e "s|@WORKERS@|$W|; s|@PORT@|$HAP|" -e "/@SERVERS@/{
r /dev/stdin
d
}" bench/peers/haproxy.cfg.in <<<"$SERVERS_HA" > "$RUN/haproxy.cfg"
SHOAL_LOG__LEVEL=warn $BIN/shoal gateway --listen "127.0.0.1:$SP" --workers "$W" "${UPS[@]}" >"$RUN/shoal.log" 2>&1 &
S=$!; PIDS+=($S)
nginx -c "$RUN/nginx.conf" -p "$RUN" & N=$!; PIDS+=($N)
haproxy -f "$RUN/haproxy.cfg" & HA=$!; PIDS+=($HA)
CONTENDERS=("shoal:$SP:$S" "nginx:$NP:$N" "haproxy:$HAP:$HA")
if [ "${HYPER:-0}" = 1 ]; then
  HP=$(free_port)
  SHOAL_GATEWAY__HTTP1_SERVER=hyper SHOAL_LOG__LEVEL=warn $BIN/shoal gateway --listen "127.0.0.1:$HP" --workers "$W" "${UPS[@]}" >"$RUN/shoal-hyper.log" 2>&1 &
  H=$!; PIDS+=($H)
  CONTENDERS+=("shoal-hyper:$HP:$H")
  wait_http "http://127.0.0.1:$HP/_gateway/readyz"
fi
wait_http "http://127.0.0.1:$SP/_gateway/readyz"
wait_port "$NP"; wait_port "$HAP"
sleep 1
HZ=$(getconf CLK_TCK)
LINES="$RUN/lines.jsonl"; : > "$LINES"

# measure PART NAME PID REQUESTS-COMMAND...: runs the command, which prints
# "<requests> <req/s> <errors>", and records the server's CPU over it.
measure() {
  local part=$1 n=$2 pid=$3; shift 3
  read -r u0 s0 v0 i0 < <(cpu_ticks "$pid")
  read -r reqs rps errors < <("$@")
  read -r u1 s1 v1 i1 < <(cpu_ticks "$pid")
  python3 - "$part" "$n" "$reqs" "$rps" "$errors" $((u1-u0)) $((s1-s0)) $((v1-v0)) $((i1-i0)) "$HZ" >>"$LINES" <<'PY'
import json, sys
part, n = sys.argv[1], sys.argv[2]
reqs, rps, errors = max(1, int(float(sys.argv[3]))), float(sys.argv[4]), int(float(sys.argv[5]))
u, s, v, i, hz = (int(x) for x in sys.argv[6:11])
print(json.dumps({"part": part, "name": n, "rps": rps, "errors": errors,
                  "user_us": u * 1e6 / hz / reqs, "system_us": s * 1e6 / hz / reqs,
                  "switches": (v + i) / reqs}))
PY
  tail -1 "$LINES" | python3 -c "
import json, sys
d = json.loads(sys.stdin.read())
print(f\"  {d['part']} {d['name']}: {d['rps']:.0f} req/s, CPU {d['user_us']:.2f} user + {d['system_us']:.2f} system µs/req, \"
      f\"{d['switches']:.3f} switches/req, {d['errors']} errors\")" >&2
}
loadgen_max() {
  $BIN/loadgen --url "http://127.0.0.1:$1/" --connections 64 --duration "$SECONDS_PER" --threads "$W" |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(d['requests'], d['rps'], d['errors'])"
}
loadgen_rate() {
  $BIN/loadgen --url "http://127.0.0.1:$1/" --connections 64 --duration "$SECONDS_PER" --rate "$RATE" --threads "$W" |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(d['requests'], d['rps'], d['errors'])"
}
wrk_max() {
  wrk -t1 -c64 -d"${SECONDS_PER}s" "http://127.0.0.1:$1/" | python3 -c "
import re, sys
t = sys.stdin.read()
reqs = int(re.search(r'(\d+) requests in', t).group(1))
rps = float(re.search(r'Requests/sec:\s+([\d.]+)', t).group(1))
m = re.search(r'Non-2xx or 3xx responses: (\d+)', t)
e = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', t)
errors = (int(m.group(1)) if m else 0) + (sum(int(x) for x in e.groups()) if e else 0)
print(reqs, rps, errors)"
}

for part in "max-loadgen:loadgen_max" "rate-$RATE:loadgen_rate" "max-wrk:wrk_max"; do
  p=${part%%:*}; cmd=${part#*:}
  for round in $(seq 1 "$ROUNDS"); do
    for c in "${CONTENDERS[@]}"; do
      n=${c%%:*}; rest=${c#*:}; port=${rest%%:*}; pid=${rest#*:}
      measure "$p" "$n" "$pid" "$cmd" "$port"
    done
  done
done

REPORT=bench/results/cpu-latest.md
python3 - "$LINES" "$W" "$RATE" "$ROUNDS" "$SECONDS_PER" "$(nproc)" > "$REPORT" <<'PY'
import json, statistics, sys
from collections import defaultdict
lines = [json.loads(l) for l in open(sys.argv[1])]
w, rate, rounds, secs, cores = sys.argv[2:7]
by = defaultdict(list)
for d in lines:
    by[(d["part"], d["name"])].append(d)
parts = list(dict.fromkeys(d["part"] for d in lines))
names = list(dict.fromkeys(d["name"] for d in lines))
med = lambda xs: statistics.median(xs)
print("# Gateway CPU per request")
print()
print(f"Run: `W={w} RATE={rate} bench/cpu.sh` on {cores} cores; {w} worker thread(s)/process(es) each, "
      f"{rounds} rounds of {secs} s per part, medians; three bench-upstreams (1 KiB answers); "
      "CPU = user + system of the server's threads from /proc over the measured seconds.")
print()
print("| part | server | req/s | CPU µs/req (user + system) | switches/req | errors |")
print("|---|---|---|---|---|---|")
for p in parts:
    for n in names:
        ds = by[(p, n)]
        u = med([d["user_us"] for d in ds]); s = med([d["system_us"] for d in ds])
        print(f"| {p} | {n} | {med([d['rps'] for d in ds]):,.0f} | {u + s:.2f} ({u:.2f} + {s:.2f}) | "
              f"{med([d['switches'] for d in ds]):.3f} | {sum(d['errors'] for d in ds)} |")
print()
for p in parts:
    cpu = {n: med([d["user_us"] + d["system_us"] for d in by[(p, n)]]) for n in names}
    rps = {n: med([d["rps"] for d in by[(p, n)]]) for n in names}
    for peer in ("nginx", "haproxy"):
        if peer in names:
            print(f"- {p}: Shoal / {peer}: {rps['shoal'] / rps[peer]:.2f}x req/s, "
                  f"CPU per request {cpu['shoal'] / cpu[peer]:.2f}x of {peer}'s "
                  f"({cpu['shoal']:.2f} against {cpu[peer]:.2f} µs)")
PY
cat "$REPORT"
