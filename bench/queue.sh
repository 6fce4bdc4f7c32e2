#!/usr/bin/env bash
# Queue benchmark: Shoal's job system on each backend against BullMQ on the
# same Redis and graphile-worker on the same PostgreSQL, in one run.
# Each side enqueues N no-op jobs, runs them with C concurrency, and
# measures enqueue-to-start latency with idle workers.
#   bench/queue.sh                 # N=10000, C=50
#   JOBS=20000 CONCURRENCY=100 bench/queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export JOBS=${JOBS:-10000} CONCURRENCY=${CONCURRENCY:-50}
PGBASE=${SHOAL_TEST_POSTGRES_URL:-postgres://root@127.0.0.1:5432/test}
# A fresh database for this run (Shoal and graphile-worker both use it):
# job tables churn, and a server without autovacuum (this CI's has it off)
# would otherwise carry every earlier run's dead rows into this one
# (measured: 13.8k -> 7.6k completions/s for Shoal on a bloated table).
BENCHDB=shoal_qbench_$$
PG="${PGBASE%/*}/$BENCHDB"
export REDIS_URL=${SHOAL_TEST_REDIS_URL:-redis://127.0.0.1:6379}
NATS=${SHOAL_TEST_NATS_URL:-nats://127.0.0.1:4222}
echo "==> building shoal (release) and installing the peers (npm)"
cargo build --release -q -p shoal
(cd bench/queue && npm ci --no-audit --no-fund --silent)
RUN=$(mktemp -d /tmp/shoal-qbench.XXXXXX)
trap 'rm -rf "$RUN"; psql "$PGBASE" -qc "DROP DATABASE IF EXISTS $BENCHDB WITH (FORCE)"' EXIT
psql "$PGBASE" -qc "CREATE DATABASE $BENCHDB"
results=()
run_shoal() { # backend, extra env
  local b=$1; shift
  echo "  shoal/$b ..." >&2
  env SHOAL_LOG__LEVEL=error "$@" target/release/shoal --data-dir "$RUN/$b" jobs bench --backend "$b" --jobs "$JOBS" --concurrency "$CONCURRENCY" --json | tail -1
}
results+=("$(run_shoal sqlite)")
results+=("$(run_shoal postgres SHOAL_DATABASE__BACKEND=postgres SHOAL_DATABASE__URL="$PG")")
if target/release/shoal jobs bench --help 2>/dev/null | grep -q nats; then
  echo "  shoal/nats ..." >&2
  results+=("$(SHOAL_LOG__LEVEL=error target/release/shoal --data-dir "$RUN/nats" jobs bench --backend nats --nats-url "$NATS" --jobs "$JOBS" --concurrency "$CONCURRENCY" --json | tail -1)")
fi
echo "  bullmq ..." >&2
results+=("$(cd bench/queue && node bullmq.mjs | tail -1)")
echo "  bullmq (keeps completed jobs) ..." >&2
results+=("$(cd bench/queue && KEEP=1 node bullmq.mjs | tail -1)")
echo "  graphile-worker ..." >&2
results+=("$(cd bench/queue && DATABASE_URL="$PG" node graphile.mjs | tail -1)")
echo "  graphile-worker (local queue, batched completions) ..." >&2
results+=("$(cd bench/queue && DATABASE_URL="$PG" BATCHED=1 node graphile.mjs | tail -1)")
REPORT=bench/results/queue-latest.md
python3 - "$REPORT" "${results[@]}" <<'PY'
import json, sys, datetime, os
out = sys.argv[1]
rows = [json.loads(r) for r in sys.argv[2:]]
by = {r["peer"]: r for r in rows}
lines = [
    "# Queue benchmark", "",
    f"Run: `bench/queue.sh` on {os.cpu_count()} cores, {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}; "
    f"{rows[0]['jobs']} no-op jobs, concurrency {rows[0]['concurrency']}; peers on the same Redis / PostgreSQL.", "",
    "Shoal keeps finished jobs (until its retention prunes them), as `bullmq-keep` does;",
    "`bullmq` removes each job on completion (`removeOnComplete`), which is less work.", "",
    "`graphile-worker-batched` runs with the options graphile-worker's docs recommend for throughput",
    "(`localQueue.size` = concurrency + 1, `completeJobBatchDelay` = `failJobBatchDelay` = 0);",
    "`vs best peer` compares with the best completion rate of BullMQ and both graphile-worker runs",
    "(issue 20's goal for PostgreSQL: 1.5x).", "",
    "| system | enqueue jobs/s | complete jobs/s | vs BullMQ | vs BullMQ keeping jobs | vs graphile-worker | vs graphile-worker batched | vs best peer | start p50 | start p99 |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
peers = [r for r in rows if not r["peer"].startswith("shoal")]
best = max((r["complete_per_sec"] for r in peers), default=float("nan"))
for r in rows:
    vb = r["complete_per_sec"] / by["bullmq"]["complete_per_sec"] if "bullmq" in by else float("nan")
    vk = r["complete_per_sec"] / by["bullmq-keep"]["complete_per_sec"] if "bullmq-keep" in by else float("nan")
    vg = r["complete_per_sec"] / by["graphile-worker"]["complete_per_sec"] if "graphile-worker" in by else float("nan")
    vgb = r["complete_per_sec"] / by["graphile-worker-batched"]["complete_per_sec"] if "graphile-worker-batched" in by else float("nan")
    lines.append(f"| {r['peer']} | {r['enqueue_per_sec']:.0f} | {r['complete_per_sec']:.0f} | {vb:.2f}x | {vk:.2f}x | {vg:.2f}x | "
                 f"{vgb:.2f}x | {r['complete_per_sec'] / best:.2f}x | {r['start_latency_p50_ms']} ms | {r['start_latency_p99_ms']} ms |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
