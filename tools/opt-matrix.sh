#!/usr/bin/env bash
# Builds and runs the correctness tests of tests/matrix (every loss against the float64
# reference, plus tests/regression) in a set of configurations that covers every pair of
#   compiler      gcc, clang
#   optimisation  -O0, -O1, -O2, -O3, -Os
#   instructions  portable (the compiler's default x86-64), native (-march=native: AVX-512 here)
#   OpenMP        on, off
# at least once. The README's test build (tools/test.sh: gcc -O2, portable, OpenMP) is one more
# configuration; the rows below cover the pairs it does not. A header-only library is compiled
# with its users' flags, and GCC 12 once miscompiled the Gram losses at -O1 only
# (docs/compiler-bugs.md).
#
# Usage: bash tools/opt-matrix.sh [ROW...]   (rows by name, e.g. gcc-O1-portable-noomp; default: all)
# Exit status: non-zero when any configuration fails to build or any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
jobs=$(nproc 2>/dev/null || echo 2)

rows=(
  gcc-O0-native-noomp   clang-O0-portable-omp
  gcc-O1-portable-noomp clang-O1-native-omp
  clang-O2-native-noomp
  gcc-O3-native-omp     clang-O3-portable-noomp
  gcc-Os-portable-omp   clang-Os-native-noomp
)
[ $# -gt 0 ] && rows=("$@")

failed=()
for row in "${rows[@]}"; do
  IFS=- read -r cc opt isa omp <<<"$row"
  case "$cc" in gcc) cxx=g++ ;; clang) cxx=clang++ ;; *) echo "unknown compiler in $row" >&2; exit 2 ;; esac
  native=OFF; [ "$isa" = native ] && native=ON
  openmp=ON; [ "$omp" = noomp ] && openmp=OFF
  dir="build-matrix/$row"
  t0=$(date +%s)
  echo "== $row: $cxx -$opt, MOEREG_NATIVE=$native, MOEREG_USE_OPENMP=$openmp"
  if cmake -S . -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS="-$opt" \
       -DMOEREG_WERROR=ON -DMOEREG_NATIVE="$native" -DMOEREG_USE_OPENMP="$openmp" -DMOEREG_ENABLE_CUDA=OFF \
       -DMOEREG_BUILD_EXAMPLES=OFF -DMOEREG_BUILD_BENCHMARKS=OFF -DMOEREG_BUILD_TOOLS=OFF -DMOEREG_INSTALL=OFF >/dev/null &&
     cmake --build "$dir" -j "$jobs" --target moereg_matrix_tests >"$dir.log" 2>&1 &&
     "./$dir/tests/moereg_matrix_tests" >>"$dir.log" 2>&1; then
    echo "   passed: $(grep -E '^All tests passed' "$dir.log" | tail -n 1) ($(( $(date +%s) - t0 )) s)"
  else
    echo "   FAILED ($(( $(date +%s) - t0 )) s); the last lines of $dir.log:" >&2
    tail -n 40 "$dir.log" >&2
    failed+=("$row")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "opt-matrix: ${#failed[@]} of ${#rows[@]} configurations failed: ${failed[*]}" >&2
  exit 1
fi
echo "opt-matrix: all ${#rows[@]} configurations passed"
