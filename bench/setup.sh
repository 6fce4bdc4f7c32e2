#!/usr/bin/env bash
# Installs the peers the benchmarks compare against (Debian packages) and
# builds the release binaries. Safe to run again.
set -euo pipefail
need=()
for pair in nginx:nginx haproxy:haproxy varnishd:varnish; do
  bin=${pair%%:*}; pkg=${pair##*:}
  command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  apt-get update -qq
  # Do not let the packages start their default services.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
echo "==> cargo build --release"
cd "$(dirname "$0")/.."
cargo build --release -q -p shoal -p shoal-bench
