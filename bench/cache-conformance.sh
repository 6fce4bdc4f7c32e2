#!/usr/bin/env bash
# Runs the HTTP caching test suite of cache-tests.fyi (npm http-cache-tests,
# pinned in bench/cache-tests/) against Shoal's gateway with `--cache` and
# otherwise default settings (its origin has no health path: a 404 there
# counts as up), and
# scores the required tests beside the results the suite ships for
# Varnish, Squid, Apache Traffic Server, nginx and httpd.
#   bench/cache-conformance.sh            # the whole suite (a few minutes)
#   TEST=freshness-max-age bench/cache-conformance.sh   # one test, verbose
# Results: bench/results/cache-conformance.json (raw) and
# bench/results/cache-conformance.md (the scores).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init cache-conformance
echo "==> building shoal (release) and installing the suite (npm)"
cargo build --release -q -p shoal
(cd bench/cache-tests && npm ci --no-audit --no-fund --silent)
SUITE=bench/cache-tests/node_modules/http-cache-tests
ORIGIN=$(free_port); GW=$(free_port)
(cd "$SUITE" && npm_config_protocol=http npm_config_port=$ORIGIN npm_config_pidfile="$RUN/origin.pid" \
  exec node server/server.mjs >"$RUN/origin.log" 2>&1) &
PIDS+=($!)
target/release/shoal --data-dir "$RUN/gw" gateway --listen "127.0.0.1:$GW" \
  --to "http://127.0.0.1:$ORIGIN" --cache >"$RUN/gateway.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN/index.html"
wait_http "http://127.0.0.1:$GW/_gateway/readyz"
if [[ -n "${TEST:-}" ]]; then
  (cd "$SUITE" && npm_config_base="http://127.0.0.1:$GW" npm_config_id="$TEST" node --no-warnings cli.mjs)
  exit 0
fi
echo "==> running the suite through the gateway (127.0.0.1:$GW -> origin :$ORIGIN)"
OUT=bench/results/cache-conformance.json
(cd "$SUITE" && npm_config_base="http://127.0.0.1:$GW" npm_config_id="" npm_package_config_id="" node --no-warnings cli.mjs) >"$OUT"
(cd bench/cache-tests && node score.mjs "../../$OUT") | tee bench/results/cache-conformance.md
