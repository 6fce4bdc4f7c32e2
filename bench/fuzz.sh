#!/usr/bin/env bash
# Fuzzes the HTTP/1.1 codec (crates/h1) with AFL++ through cargo-afl, on
# the pinned stable toolchain: each target for a set time, one after the
# other, starting from the committed corpus; prints executions, paths
# found, crashes and hangs per target. Exits non-zero on any crash or hang.
#   bench/fuzz.sh                      # 600 s per target, all three
#   SECONDS_PER=60 bench/fuzz.sh chunked
#   MERGE=1 bench/fuzz.sh              # also keeps the inputs that found
#                                      # new coverage in the committed corpus
# Targets (crates/h1/src/fuzzing.rs): request_head, chunked, response.
# Needs cargo-afl: `cargo install cargo-afl --locked` (its AFL++ is built
# on first use by `cargo afl config --build`). Crashes are kept under
# bench/results/tmp/fuzz-*/<target>/default/crashes: replay one with
#   crates/h1/fuzz/target/release/<target> < that-file
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${SECONDS_PER:-600}
MERGE=${MERGE:-0}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(request_head chunked response)
if ! cargo afl --version >/dev/null 2>&1; then
  echo "cargo-afl is not installed: cargo install cargo-afl --locked" >&2
  exit 1
fi
cargo afl config --build >/dev/null 2>&1 || true  # no-op once built
FUZZ=crates/h1/fuzz
echo "==> building the fuzz targets (cargo afl build --release)" >&2
(cd "$FUZZ" && cargo afl build --release -q)
OUT="bench/results/tmp/fuzz-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
failed=0
printf '%-14s %10s %12s %10s %8s %8s %6s\n' target seconds execs execs/s corpus crashes hangs >"$OUT/summary"
for t in "${TARGETS[@]}"; do
  [ -d "$FUZZ/corpus/$t" ] || { echo "no such target: $t" >&2; exit 2; }
  echo "==> fuzzing $t for ${SECONDS_PER}s" >&2
  # No UI; core dumps and the CPU governor are this machine's business,
  # not the fuzzer's (it may not change either in a container).
  AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
    AFL_NO_AFFINITY=1 AFL_SKIP_CRASHES=1 \
    cargo afl fuzz -i "$FUZZ/corpus/$t" -o "$OUT/$t" -V "$SECONDS_PER" \
    "$FUZZ/target/release/$t" >"$OUT/$t.log" 2>&1 || {
      echo "afl-fuzz failed for $t; see $OUT/$t.log" >&2
      tail -20 "$OUT/$t.log" >&2
      exit 1
    }
  stats="$OUT/$t/default/fuzzer_stats"
  get() { awk -F' *: *' -v k="$1" '$1==k {print $2}' "$stats"; }
  crashes=$(get saved_crashes)
  hangs=$(get saved_hangs)
  printf '%-14s %10s %12s %10s %8s %8s %6s\n' "$t" "$(get run_time)" "$(get execs_done)" \
    "$(get execs_per_sec)" "$(get corpus_count)" "$crashes" "$hangs" >>"$OUT/summary"
  [ "$crashes" = 0 ] && [ "$hangs" = 0 ] || failed=1
  if [ "$MERGE" = 1 ]; then
    # The inputs that found new edges (AFL marks them +cov), up to 2 KiB
    # each, replace the corpus's earlier finds (the seeds stay). afl-cmin
    # would pick fewer, but cannot run these persistent-mode targets here
    # (it sees them time out).
    echo "==> keeping $t's new-coverage inputs in $FUZZ/corpus/$t" >&2
    find "$FUZZ/corpus/$t" -type f -name 'id-*' -delete
    find "$OUT/$t/default/queue" -maxdepth 1 -type f -name '*+cov*' -size -2049c |
      while read -r f; do
        cp "$f" "$FUZZ/corpus/$t/id-$(sha256sum "$f" | cut -c1-16)"
      done
  fi
done
echo
cat "$OUT/summary"
echo "(afl-fuzz output under $OUT)"
exit $failed
