#!/usr/bin/env bash
# Product-by-id benchmark (issue 4): `shoal up --cache` on the embedded
# default with PRODUCTS seeded products; GET /api/catalog/products/{id} with
# ids picked by a Zipf law (exponent ZIPF) over a random order of all ids.
# In one run, the same load (CONNECTIONS keep-alive connections, closed
# loop, SECONDS each):
#   - through the gateway with its HTTP cache on at its default size (every
#     product fits): latency and hit ratio;
#   - through the gateway with its HTTP cache sized CACHE_BYTES (2 MiB:
#     room for roughly a tenth of the products, so the hit ratio shows
#     what the admission and eviction policy keeps): latency and hit ratio;
#   - straight to one instance (no HTTP cache; the service's query cache
#     still in front of SQLite): latency;
#   - straight to one instance with the query cache off (cache.l1_max_bytes
#     = 0; single flight still joins identical concurrent reads): latency.
# Prints the table and writes bench/results/catalog-latest.md.
#   bench/catalog.sh                  # PRODUCTS=10000 ZIPF=1.0
set -euo pipefail
cd "$(dirname "$0")/.."
PRODUCTS=${PRODUCTS:-10000}
ZIPF=${ZIPF:-1.0}
CONNECTIONS=${CONNECTIONS:-32}
SECONDS_PER=${SECONDS_PER:-10}
CACHE_BYTES=${CACHE_BYTES:-2097152}
echo "==> building shoal and loadgen (release)"
cargo build --release -q -p shoal -p shoal-bench
BIN=target/release
. bench/lib.sh
bench_init catbench

echo "==> seeding $PRODUCTS products"
SHOAL_LOG__LEVEL=warn $BIN/shoal seed --products "$PRODUCTS" --data-dir "$RUN/data" >&2
up() { # extra env...
  local port; port=$(free_port)
  env SHOAL_LOG__LEVEL=warn "$@" $BIN/shoal up --cache --port "$port" --instances 2 \
    --data-dir "$RUN/data" > "$RUN/up.log" 2>&1 &
  SUP=$!; PIDS+=("$SUP")
  wait_http "http://127.0.0.1:$port/readyz"
  GATEWAY=127.0.0.1:$port
  INSTANCE=$(python3 -c 'import json,sys; print({c["name"]: c for c in json.load(open(sys.argv[1]))["children"]}["serve-1"]["address"])' "$RUN/data/run/stack.json")
}
down() { kill -TERM "$SUP"; wait "$SUP" || true; }

up
# Every id, in a random order: rank 1 of the Zipf law is an arbitrary
# product, not the first seeded.
python3 - "$GATEWAY" "$PRODUCTS" > "$RUN/paths" <<'PY'
import json, random, sys, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
ids, page = [], 1
while len(ids) < n:
    with urllib.request.urlopen(f"http://{base}/api/catalog/products?per_page=100&page={page}") as r:
        items = json.load(r)["items"]
    if not items:
        break
    ids += [p["id"] for p in items]
    page += 1
random.seed(7)
random.shuffle(ids)
print("\n".join(f"/api/catalog/products/{i}" for i in ids))
PY
echo "  $(wc -l < "$RUN/paths") product paths, Zipf s=$ZIPF" >&2
load() { # label, host:port
  echo "  $1 ..." >&2
  $BIN/loadgen --url "http://$2/" --paths "$RUN/paths" --zipf "$ZIPF" \
    --connections "$CONNECTIONS" --duration "$SECONDS_PER" --threads 1 --warmup 2 \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); d["label"]=sys.argv[1]; print(json.dumps(d))' "$1"
}
results=()
results+=("$(load "gateway, HTTP cache (default size)" "$GATEWAY")")
results+=("$(load "one instance, query cache on" "$INSTANCE")")
down
up SHOAL_GATEWAY__CACHE__MAX_BYTES="$CACHE_BYTES" SHOAL_GATEWAY__CACHE__MAX_OBJECT_BYTES=65536
results+=("$(load "gateway, HTTP cache of $((CACHE_BYTES / 1024)) KiB" "$GATEWAY")")
down
up SHOAL_CACHE__L1_MAX_BYTES=0
results+=("$(load "one instance, no cache (SQLite)" "$INSTANCE")")
down

REPORT=bench/results/catalog-latest.md
python3 - "$REPORT" "$PRODUCTS" "$ZIPF" "$CONNECTIONS" "${results[@]}" "$CACHE_BYTES" <<'PY'
import json, sys, datetime, os
out, products, zipf, conns = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [json.loads(r) for r in sys.argv[5:-1]]
base = rows[-1]
lines = [
    "# Product-by-id benchmark", "",
    f"Run: `bench/catalog.sh` on {os.cpu_count()} cores, {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}; "
    f"{products} products, ids by Zipf s={zipf}, {conns} keep-alive connections, closed loop, 1 client thread; "
    "each row its own 10 s after a 2 s warm-up; rows 1-2 and 3 and 4 are three `shoal up` runs on the same data.", "",
    "| path | req/s | p50 | p99 | p99.9 | gateway hit ratio | p99 vs no cache | errors |",
    "|---|---|---|---|---|---|---|---|",
]
for r in rows:
    ratio = r["p99_us"] / base["p99_us"] if base["p99_us"] else float("nan")
    hit = f"{100*r['hit_ratio']:.1f}%" if r["label"].startswith("gateway") else "-"
    lines.append(f"| {r['label']} | {r['rps']:.0f} | {r['p50_us']/1000:.2f} ms | {r['p99_us']/1000:.2f} ms | "
                 f"{r['p999_us']/1000:.2f} ms | {hit} | {ratio:.2f}x | {r['errors']} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
