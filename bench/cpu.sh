#!/usr/bin/env bash
# CPU per proxied request: `shoal gateway` against nginx at W worker
# threads/processes, same three upstreams, max rate, two pairs of 6 s
# runs. Prints req/s, user and system CPU microseconds per request (from
# /proc, all threads and child processes) and context switches per
# request, which gateway.sh's wall-clock ratios do not show.
# A third contender, shoal-hyper, is the same gateway with hyper's
# HTTP/1.1 server (`http1_server = "hyper"`) in place of its own codec.
#   W=2 bench/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-2}
echo "==> building shoal, loadgen and bench-upstream (release)" >&2
bench/setup.sh >&2   # nginx (Debian package) and the release build
BIN=target/release
. bench/lib.sh
bench_init cpubench
start_upstreams
SERVERS=""
for p in "${UPSTREAM_PORTS[@]}"; do SERVERS+="    server 127.0.0.1:$p;"$'\n'; done
SP=$(free_port); NP=$(free_port)
sed -e "s|@WORKERS@|$W|; s|@PORT@|$NP|; s|@RUN@|$RUN|g" -e "/@SERVERS@/{
r /dev/stdin
d
}" bench/peers/nginx.conf.in <<<"$SERVERS" > "$RUN/nginx.conf"
SHOAL_LOG__LEVEL=warn $BIN/shoal gateway --listen "127.0.0.1:$SP" --workers "$W" "${UPS[@]}" >"$RUN/shoal.log" 2>&1 &
S=$!; PIDS+=($S)
HP=$(free_port)
SHOAL_GATEWAY__HTTP1_SERVER=hyper SHOAL_LOG__LEVEL=warn $BIN/shoal gateway --listen "127.0.0.1:$HP" --workers "$W" "${UPS[@]}" >"$RUN/shoal-hyper.log" 2>&1 &
H=$!; PIDS+=($H)
nginx -c "$RUN/nginx.conf" -p "$RUN" & N=$!; PIDS+=($N)
wait_http "http://127.0.0.1:$SP/_gateway/readyz"
wait_http "http://127.0.0.1:$HP/_gateway/readyz"
sleep 1
HZ=$(getconf CLK_TCK)
for round in 1 2; do
  for name in "shoal:$SP:$S" "nginx:$NP:$N" "shoal-hyper:$HP:$H"; do
    n=${name%%:*}; rest=${name#*:}; port=${rest%%:*}; pid=${rest#*:}
    read -r u0 s0 v0 i0 < <(cpu_ticks "$pid")
    out=$($BIN/loadgen --url "http://127.0.0.1:$port/" --connections 64 --duration 6 --threads "$W")
    read -r u1 s1 v1 i1 < <(cpu_ticks "$pid")
    python3 -c "
import json, sys
d = json.loads(sys.argv[1]); r = max(1, d['requests']); hz = int(sys.argv[6])
u, s, v, i = (int(x) for x in sys.argv[2:6])
print(f'round $round $n: {d[\"rps\"]:.0f} req/s, user {u*1e6/hz/r:.2f} us/req, system {s*1e6/hz/r:.2f} us/req, '
      f'switches {v/r:.3f} voluntary + {i/r:.3f} involuntary per request')" \
      "$out" $((u1-u0)) $((s1-s0)) $((v1-v0)) $((i1-i0)) "$HZ"
  done
done
