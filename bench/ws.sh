#!/usr/bin/env bash
# Memory per idle WebSocket on one `shoal serve` (issue 21): the
# instance's resident memory (VmRSS) before and 2 s after COUNT logged-in
# WebSockets on /api/notifications/ws are open and idle (held by
# bench/ws-hold.py: raw handshakes, no library), per socket. Not yet a
# comparison: the Node.js peer has no WebSocket server (bench/sse/).
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
bench_init ws
for n in $COUNTS; do
  port=$(free_port)
  SHOAL_LOG__LEVEL=warn SHOAL_NOTIFICATIONS__MAX_CONNECTIONS_PER_USER=$((n + 100)) target/release/shoal serve \
    --development --listen "127.0.0.1:$port" --data-dir "$RUN/serve-$n" > "$RUN/serve-$n.log" 2>&1 &
  serve=$!; PIDS+=("$serve")
  wait_http "http://127.0.0.1:$port/readyz"
  token=$(login "http://127.0.0.1:$port")
  url="ws://127.0.0.1:$port/api/notifications/ws"
  # Warm-up: the first sockets' one-time allocations are not counted.
  python3 bench/ws-hold.py --url "$url" --cookie "shoal_session=$token" -n 50 --seconds 0.5 >/dev/null
  sleep 1
  before=$(awk '/VmRSS/{print $2}' "/proc/$serve/status")
  python3 bench/ws-hold.py --url "$url" --cookie "shoal_session=$token" -n "$n" --seconds 6 > "$RUN/hold" &
  hold=$!
  for _ in $(seq 1 600); do grep -q opened "$RUN/hold" 2>/dev/null && break; sleep 0.1; done
  sleep 2
  held=$(awk '/VmRSS/{print $2}' "/proc/$serve/status")
  wait "$hold"
  kill -TERM "$serve"; wait "$serve" || true
  echo "| $n | $before → $held KiB | $(python3 -c "print(f'{($held - $before) / $n:.2f}')") |"
done
