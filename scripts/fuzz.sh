#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each
# (default 30), after one build of them all. Installs cargo-fuzz and a C++
# compiler (libFuzzer is C++) when missing. Fails when a target crashes or
# breaks one of its assertions, naming the input that did it.
#
# The checked-in seeds (fuzz/corpus/<target>) are only read; what a run
# finds goes to fuzz/corpus-run/<target> (gitignored), crashes to
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
if [ "$seconds" = 0 ]; then
  echo "fuzz: skipped (0 seconds)"
  exit 0
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v c++ >/dev/null; then
  echo "installing: g++"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

# cargo-fuzz passes nightly flags (-Zsanitizer, sancov); the stable
# toolchain takes them with RUSTC_BOOTSTRAP. Overflow checks and debug
# assertions on. No AddressSanitizer: our code has no `unsafe`, and it
# made the build 28 % longer and every execution about half as fast
# (docs/TESTING.md); a panic, an overflow, a stack overflow, a timeout or
# memory over libFuzzer's limit still fails a target.
export RUSTC_BOOTSTRAP=1
build_start=$SECONDS
cargo fuzz build --sanitizer none --debug-assertions --target-dir fuzz/target
echo "fuzz: targets built in $((SECONDS - build_start)) s"

host="$(rustc -vV | sed -n 's/^host: //p')"
bin="fuzz/target/$host/release"
# One target per core at a time (each is one process).
parallel="$(nproc)"

run_target() { # TARGET: runs it, leaves its exit status in its artifacts folder
  local target=$1 status=0
  "$bin/$target" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$target/" \
    "fuzz/corpus-run/$target" "fuzz/corpus/$target" >"fuzz/artifacts/$target/last-run.log" 2>&1 || status=$?
  echo "$status" >"fuzz/artifacts/$target/last-run.status"
}

targets=()
for src in fuzz/fuzz_targets/*.rs; do
  target="$(basename "$src" .rs)"
  targets+=("$target")
  mkdir -p "fuzz/corpus-run/$target" "fuzz/artifacts/$target"
  rm -f "fuzz/artifacts/$target/last-run.status"
  while (($(jobs -rp | wc -l) >= parallel)); do wait -n || true; done
  run_target "$target" &
done
wait

passed=0
failed=()
for target in "${targets[@]}"; do
  log="fuzz/artifacts/$target/last-run.log"
  status="$(cat "fuzz/artifacts/$target/last-run.status" 2>/dev/null || echo missing)"
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  [ -n "$runs" ] || runs="$(sed -n 's/^#\([0-9]*\).*DONE.*/\1/p' "$log" | tail -1)"
  if [ "$status" = 0 ]; then
    echo "fuzz: $target: ok, ${runs:-?} executions in ${seconds} s"
    passed=$((passed + 1))
  else
    echo "fuzz: $target: FAILED (exit $status) after ${runs:-?} executions; log $log"
    grep -E "panicked at|ERROR: |SUMMARY: " "$log" | head -5 || true
    grep -E "Test unit written to|^artifact_prefix" "$log" || true
    failed+=("$target")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: failed: ${failed[*]} (replay: RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>)"
fi
echo "fuzz: $passed passed, ${#failed[@]} failed"
((${#failed[@]} == 0))
