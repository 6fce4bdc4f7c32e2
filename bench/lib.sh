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

# wait_port PORT: up to 10 s for 127.0.0.1:PORT to accept a connection.
wait_port() {
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2
  return 1
}

# start_upstreams [ARGS...]: three bench-upstreams ($BIN/bench-upstream,
# 1 KiB answers, ARGS added) on free ports; sets UPSTREAM_PORTS and UPS
# (the `--to` flags of `shoal gateway`).
start_upstreams() {
  UPSTREAM_PORTS=(); UPS=()
  local p
  for _ in 1 2 3; do
    p=$(free_port)
    "$BIN/bench-upstream" --listen "127.0.0.1:$p" --size 1024 "$@" >/dev/null 2>&1 &
    PIDS+=($!); UPSTREAM_PORTS+=("$p"); UPS+=(--to "http://127.0.0.1:$p")
  done
}

# cpu_ns PID: nanoseconds the process's threads have run, from each
# thread's /proc/PID/task/TID/schedstat (finer than the 10 ms clock ticks
# of cpu_ticks: for small costs over idle seconds). Threads that ended
# are not counted.
cpu_ns() {
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%d\n", s }'
}

# cpu_ticks PID...: user and system clock ticks and voluntary and
# involuntary context switches, summed over every thread of the pids and
# of their children.
cpu_ticks() {
  python3 - "$@" <<'PY'
import sys, os, glob
u = s = v = i = 0
pids = set(sys.argv[1:])
for p in sys.argv[1:]:
    pids.update(os.popen(f"pgrep -P {p}").read().split())
for p in pids:
    for t in glob.glob(f"/proc/{p}/task/*"):
        try:
            st = open(t + "/stat").read().rsplit(")", 1)[1].split()
            u += int(st[11]); s += int(st[12])
            for line in open(t + "/status"):
                if line.startswith("voluntary_ctxt_switches"): v += int(line.split()[1])
                if line.startswith("nonvoluntary_ctxt_switches"): i += int(line.split()[1])
        except OSError:
            pass
print(u, s, v, i)
PY
}

# login BASE [EMAIL]: signs up (once) and logs in; prints the session
# token (bench/api.sh, bench/allocs.sh).
login() {
  python3 - "$1" "${2:-bench@example.com}" <<'PY'
import json, sys, urllib.request, urllib.error
base = sys.argv[1]
def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        return e
user = {"email": sys.argv[2], "password": "correct horse battery staple"}
r = post("/api/accounts/signup", dict(user, name="Bench"))
if r.status not in (201, 409):
    sys.exit(f"signup at {base}: {r.status} {r.read()[:300]!r}")
r = post("/api/accounts/login", user)
if r.status != 200:
    sys.exit(f"login at {base}: {r.status} {r.read()[:300]!r}")
for c in r.headers.get_all("Set-Cookie"):
    if c.startswith("shoal_session="):
        print(c.split(";")[0].split("=", 1)[1])
        break
else:
    sys.exit(f"login at {base}: no session cookie")
PY
}

# install_missing BIN:PACKAGE...: installs the Debian packages whose
# command is not on PATH (nor in /usr/sbin), without letting them start
# their default services.
install_missing() {
  local need=() pair bin pkg
  for pair in "$@"; do
    bin=${pair%%:*}; pkg=${pair##*:}
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  echo "==> installing ${need[*]}" >&2
  apt-get update -qq
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}
