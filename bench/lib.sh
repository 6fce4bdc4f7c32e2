# Shared by bench/*.sh (sourced): a scratch folder and the processes to stop
# on exit, a free loopback port, and waiting for an HTTP endpoint.

# bench_init NAME: makes $RUN (removed on exit) and $PIDS (killed on exit).
bench_init() {
  RUN=$(mktemp -d "/tmp/shoal-$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL: up to 30 s for a 2xx answer.
wait_http() {
  for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "$0: $1 did not answer" >&2
  return 1
}
