#!/usr/bin/env bash
# Installs the peers the benchmarks compare against (Debian packages) and
# builds the release binaries. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
install_missing nginx:nginx haproxy:haproxy varnishd:varnish
echo "==> cargo build --release"
cargo build --release -q -p shoal -p shoal-bench
