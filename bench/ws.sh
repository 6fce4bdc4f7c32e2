#!/usr/bin/env bash
# Memory per idle WebSocket (issue 21): one `shoal serve` against a
# Node.js 20 WebSocket server (bench/ws/server.js, the `ws` package), in
# the same run. Each server's resident memory (VmRSS) before and 2 s after
# COUNT logged-in WebSockets are open and idle (held by bench/ws-hold.py:
# raw handshakes, no library), per socket: Shoal's on
# /api/notifications/ws (session looked up in its store, socket joined to
# the user's hub), Node's on /ws (session checked in a Map, socket kept in
# the user's set).
#   bench/ws.sh                        # COUNTS="5000 10000"
# Below a few thousand sockets the figure is noise: the allocator gives
# back freed memory between the readings (1,000 once read -9 KiB each).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-5000 10000}
if [ "${BUILD:-1}" = 1 ]; then
  echo "==> building shoal (release)"
  cargo build --release -q -p shoal
fi
. bench/lib.sh
ulimit -n "$(ulimit -Hn)"
echo "==> installing the Node.js peer (npm ci)" >&2
(cd bench/ws && npm ci --no-audit --no-fund --silent)
bench_init ws
# held NAME PID URL COOKIE N: prints "before held" (KiB) of PID around
# N idle sockets held on URL.
held() {
  local name=$1 pid=$2 url=$3 cookie=$4 n=$5 before after hold
  # Warm-up: the first sockets' one-time allocations are not counted.
  python3 bench/ws-hold.py --url "$url" --cookie "$cookie" -n 50 --seconds 0.5 >/dev/null
  sleep 1
  before=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  python3 bench/ws-hold.py --url "$url" --cookie "$cookie" -n "$n" --seconds 6 > "$RUN/hold-$name" &
  hold=$!
  for _ in $(seq 1 600); do grep -q opened "$RUN/hold-$name" 2>/dev/null && break; sleep 0.1; done
  grep -q opened "$RUN/hold-$name" || { echo "$name: the sockets did not open" >&2; exit 1; }
  sleep 2
  after=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  wait "$hold"
  echo "$before $after"
}
echo "| sockets | Shoal VmRSS | Shoal KiB per socket | Node VmRSS | Node KiB per socket | Node / Shoal |"
echo "|---|---|---|---|---|---|"
for n in $COUNTS; do
  port=$(free_port)
  SHOAL_LOG__LEVEL=warn SHOAL_NOTIFICATIONS__MAX_CONNECTIONS_PER_USER=$((n + 100)) target/release/shoal serve \
    --development --listen "127.0.0.1:$port" --data-dir "$RUN/serve-$n" > "$RUN/serve-$n.log" 2>&1 &
  serve=$!; PIDS+=("$serve")
  wait_http "http://127.0.0.1:$port/readyz"
  token=$(login "http://127.0.0.1:$port")
  # The sign-up and login hash the password (Argon2, 19 MiB each) on
  # tokio's blocking threads, whose memory goes back to the system when
  # they exit, 10 s idle later: read "before" after that, or the memory
  # given back falls inside the measurement (it read -2.08 KiB a socket
  # at 5,000, 2026-12-08).
  sleep 12
  read -r s_before s_held < <(held shoal "$serve" "ws://127.0.0.1:$port/api/notifications/ws" "shoal_session=$token" "$n")
  kill -TERM "$serve"; wait "$serve" || true
  nport=$(free_port)
  node bench/ws/server.js "$nport" bench-token > "$RUN/node-$n.log" 2>&1 &
  node_pid=$!; PIDS+=("$node_pid")
  wait_http "http://127.0.0.1:$nport/readyz"
  read -r n_before n_held < <(held node "$node_pid" "ws://127.0.0.1:$nport/ws" "shoal_session=bench-token" "$n")
  kill -TERM "$node_pid"; wait "$node_pid" || true
  python3 - "$n" "$s_before" "$s_held" "$n_before" "$n_held" <<'PY'
import sys
n, sb, sh, nb, nh = map(int, sys.argv[1:])
s, d = (sh - sb) / n, (nh - nb) / n
print(f"| {n} | {sb} → {sh} KiB | {s:.2f} | {nb} → {nh} KiB | {d:.2f} | {d / s:.2f}× |" if s > 0 else
      f"| {n} | {sb} → {sh} KiB | {s:.2f} | {nb} → {nh} KiB | {d:.2f} | - |")
PY
done
