#!/usr/bin/env bash
# Push delivery against BullMQ with a Node.js worker (issue 23): Shoal's
# queue delivering each job by HTTP to a Node.js endpoint
# (bench/queue/push-receiver.mjs, which checks the signature and answers
# 204), beside Shoal's own in-process worker on the same store and BullMQ
# with its Node.js worker on the same machine's Redis, in one run.
# JOBS no-op jobs drained with CONCURRENCY slots, then enqueue-to-handler
# latency on idle workers, ROUNDS times each in turn; medians printed.
#   bench/push.sh                      # JOBS=10000 CONCURRENCY=50 ROUNDS=3
#   BACKENDS="sqlite postgres" BUILD=0 bench/push.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export JOBS=${JOBS:-10000} CONCURRENCY=${CONCURRENCY:-50}
ROUNDS=${ROUNDS:-3}
BACKENDS=${BACKENDS:-sqlite postgres}
PGBASE=${SHOAL_TEST_POSTGRES_URL:-postgres://root@127.0.0.1:5432/test}
BENCHDB=shoal_pbench_$$
PG="${PGBASE%/*}/$BENCHDB"
export REDIS_URL=${SHOAL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
SECRET=shoal-bench-push-secret
if [ "${BUILD:-1}" = 1 ]; then
  echo "==> building shoal (release)" >&2
  cargo build --release -q -p shoal
fi
echo "==> installing the Node.js peers (npm ci)" >&2
(cd bench/queue && npm ci --no-audit --no-fund --silent)
RUN=$(mktemp -d /tmp/shoal-pbench.XXXXXX)
RECV=""
cleanup() {
  [ -n "$RECV" ] && kill "$RECV" 2>/dev/null
  rm -rf "$RUN"
  psql "$PGBASE" -qc "DROP DATABASE IF EXISTS $BENCHDB WITH (FORCE)" 2>/dev/null || true
}
trap cleanup EXIT
psql "$PGBASE" -qc "CREATE DATABASE $BENCHDB"
PUSH_SECRET=$SECRET node bench/queue/push-receiver.mjs >"$RUN/recv.out" &
RECV=$!
for _ in $(seq 1 50); do grep -q port "$RUN/recv.out" 2>/dev/null && break; sleep 0.1; done
PORT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$RUN/recv.out")
RECEIVER=http://127.0.0.1:$PORT

shoal_bench() { # round, backend, extra arguments
  local r=$1 b=$2; shift 2
  local env=(SHOAL_LOG__LEVEL=error)
  [ "$b" = postgres ] && env+=(SHOAL_DATABASE__BACKEND=postgres SHOAL_DATABASE__URL="$PG")
  env "${env[@]}" target/release/shoal --data-dir "$RUN/$b-$r" jobs bench --backend "$b" \
    --jobs "$JOBS" --concurrency "$CONCURRENCY" --json "$@" | tail -1
}
results=()
for r in $(seq 1 "$ROUNDS"); do
  for b in $BACKENDS; do
    echo "  round $r: shoal/$b (in-process worker) ..." >&2
    results+=("$(shoal_bench "$r" "$b")")
    echo "  round $r: shoal/$b, pushed to Node.js ..." >&2
    curl -sf -X POST "$RECEIVER/reset"
    line=$(shoal_bench "$r" "$b" --push "$RECEIVER/jobs" --push-secret "$SECRET")
    stats=$(curl -sf "$RECEIVER/stats")
    results+=("$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); s=json.loads(sys.argv[2]); r["handler_p50_ms"]=s["p50_ms"]; r["handler_p99_ms"]=s["p99_ms"]; print(json.dumps(r))' "$line" "$stats")")
  done
  echo "  round $r: bullmq (Node.js worker) ..." >&2
  results+=("$(cd bench/queue && node bullmq.mjs | tail -1)")
done
REPORT=bench/results/push-latest.md
python3 - "$REPORT" "$ROUNDS" "${results[@]}" <<'PY'
import json, sys, datetime, os, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
rows = [json.loads(r) for r in sys.argv[3:]]
peers = []
for r in rows:
    if r["peer"] not in peers:
        peers.append(r["peer"])
med = lambda p, k: statistics.median(r[k] for r in rows if r["peer"] == p and r.get(k) is not None) \
    if any(r.get(k) is not None for r in rows if r["peer"] == p) else None
bull = med("bullmq", "complete_per_sec")
first = rows[0]
lines = [
    "# Push delivery benchmark", "",
    f"Run: `bench/push.sh` on {os.cpu_count()} cores, {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}; "
    f"{first['jobs']} no-op jobs, concurrency {first['concurrency']}, medians of {rounds} rounds taken in turn.", "",
    "`+push`: every job POSTed by Shoal's worker to a Node.js endpoint (signature checked, 204).",
    "`handler p50/p99`: enqueue to the Node.js handler's start (measured in the handler, as BullMQ's row is);",
    "`worker p50/p99`: for `+push`, enqueue to the endpoint's answer as Shoal's worker saw it; otherwise to handler start.", "",
    "| system | complete jobs/s | vs BullMQ | vs Shoal in-process, same store | handler p50 | handler p99 | worker p50 | worker p99 |",
    "|---|---|---|---|---|---|---|---|",
]
fmt = lambda v, unit="": "—" if v is None else f"{v:.1f}{unit}" if isinstance(v, float) and v < 100 else f"{v:.0f}{unit}"
for p in peers:
    c = med(p, "complete_per_sec")
    local = med(p.replace("+push", ""), "complete_per_sec") if p.endswith("+push") else None
    hp50 = med(p, "handler_p50_ms") if p.endswith("+push") else med(p, "start_latency_p50_ms")
    hp99 = med(p, "handler_p99_ms") if p.endswith("+push") else med(p, "start_latency_p99_ms")
    ratio = "—" if not local else f"{c / local:.2f}x"
    lines.append(f"| {p} | {c:.0f} | {c / bull:.2f}x | {ratio} | "
                 f"{fmt(hp50, ' ms')} | {fmt(hp99, ' ms')} | {fmt(med(p, 'start_latency_p50_ms'), ' ms')} | {fmt(med(p, 'start_latency_p99_ms'), ' ms')} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
