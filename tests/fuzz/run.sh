#!/usr/bin/env bash
# Builds the libFuzzer targets with clang in their own build directory and runs each for a
# fixed number of iterations, starting from the seed corpus checked in under
# tests/fuzz/corpus/<target>/ (the seeds, including past crash reproducers, are replayed
# first). New inputs go to a scratch directory, never into the checked-in corpus.
#   FUZZ_RUNS=N      iterations per target (default: npy 2000000, args 1000000, views 1000000,
#                    about a minute and a half in all on 2 cores)
#   FUZZ_BUILD=DIR   build directory (default build-fuzz)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${FUZZ_BUILD:-build-fuzz}
jobs=$(nproc)
[ "$jobs" -gt 2 ] || jobs=2
cxx=$(command -v clang++ || command -v clang++-14 || true)
if [ -z "$cxx" ]; then
  echo "fuzz: clang++ not found (tools/install-deps.sh installs it)" >&2
  exit 1
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
  -DMOEREG_BUILD_FUZZERS=ON -DMOEREG_USE_OPENMP=OFF -DMOEREG_ENABLE_CUDA=OFF \
  -DMOEREG_BUILD_BENCHMARKS=OFF -DMOEREG_BUILD_EXAMPLES=OFF -DMOEREG_WERROR=ON >/dev/null
targets=${FUZZ_TARGETS:-npy args views}
cmake --build "$build" -j "$jobs" --target $(for t in $targets; do printf 'fuzz_%s ' "$t"; done)
declare -A default_runs=([npy]=2000000 [args]=1000000 [views]=1000000)
for target in $targets; do
  runs=${FUZZ_RUNS:-${default_runs[$target]}}
  scratch="$build/fuzz-corpus/$target"
  mkdir -p "$scratch"
  echo "== fuzz_$target: $runs runs from tests/fuzz/corpus/$target"
  start=$(date +%s)
  log="$build/fuzz-$target.log"
  if ! ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$build/tests/fuzz/fuzz_$target" -runs="$runs" -max_len=4096 -seed=1 -print_final_stats=1 \
    -artifact_prefix="$build/fuzz-crash-$target-" "$scratch" "tests/fuzz/corpus/$target" >"$log" 2>&1; then
    cat "$log"
    echo "fuzz_$target failed; the input is in $build/fuzz-crash-$target-*" >&2
    exit 1
  fi
  grep -E "^#[0-9]+ +DONE|^Done" "$log" || tail -n 3 "$log"
  echo "== fuzz_$target took $(( $(date +%s) - start )) s"
done
