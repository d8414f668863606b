#!/usr/bin/env bash
# clang, -std=c++17, moereg's warning set as errors, OpenMP on:
#   1. every public header compiled alone (twice in one unit: the include guard holds), so no
#      header leans on what another one happened to include first;
#   2. every test, example and tool source of the CPU build (-fsyntax-only: no code generation,
#      but every template a source uses is instantiated and checked).
# GCC builds everything in tools/test.sh; this catches what only clang rejects (for example a
# lambda capturing a structured binding, which is C++20). The CUDA headers and sources
# (backend/cuda*, dist/nccl.hpp, tests/cuda) are compiled by nvcc in CI instead; sources that
# need a package this machine lacks (LibTorch, MPI) are reported as not checked, never passed.
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG=${CLANG:-clang++}
command -v "$CLANG" >/dev/null || { echo "clang-check: $CLANG not found (apt-get install clang)" >&2; exit 1; }
eigen=$(pkg-config --cflags-only-I eigen3 2>/dev/null | sed 's/-I/-isystem /g')
[ -n "$eigen" ] || eigen="-isystem /usr/include/eigen3"
mpi=""
if command -v mpicxx >/dev/null 2>&1; then mpi=$(mpicxx --showme:compile 2>/dev/null | sed 's/-I/-isystem /g' || true); fi
flags="-std=c++17 -fsyntax-only -fopenmp -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion -Werror \
  -Iinclude -Isingle_include -Itests -Itools -Itools/moereg-eval -Iexamples $eigen $mpi"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CLANG flags work

check_one() {  # $1 = header (include/...) or source file
  local f=$1 log
  log="$work/$(echo "$f" | tr '/' '_').log"
  if [[ $f == include/* ]]; then
    local h=${f#include/}
    printf '#include <%s>\n#include <%s>\nint main() { return 0; }\n' "$h" "$h" | $CLANG $flags -x c++ - >"$log" 2>&1
  elif [[ $f == tests/compiled/* || $f == src/compiled/* ]]; then  # as the moereg::compiled target builds them
    $CLANG $flags -Isrc -DMOEREG_COMPILED=1 -DMOEREG_COMPILED_OPENMP=1 -DMOEREG_COMPILED_AVX512=0 -DMOEREG_NO_AVX512 \
      "$f" >"$log" 2>&1
  elif [[ $f == tests/single_include/* ]]; then
    $CLANG ${flags/-Iinclude /} "$f" >"$log" 2>&1  # the amalgamation alone, never include/
  else
    $CLANG $flags "$f" >"$log" 2>&1
  fi || { echo "FAIL $f"; head -n 20 "$log"; return 1; }
}
export -f check_one

# Public headers only: backend/cpu/ and backend/cuda/ hold internal headers that refuse to be
# included alone (tests/compile_fail checks that they do).
headers=$(find include/moereg -name '*.hpp' ! -path '*/backend/cuda*' ! -path '*/backend/cpu/*' ! -name nccl.hpp | sort)
sources=$(find src tests examples tools benchmarks -name '*.cpp' ! -path '*/fuzz/*' ! -path '*/compile_fail/*' \
            ! -path '*/cuda/*' ! -name '*nccl*' | sort)
skipped=""
keep=""
for f in $sources; do
  if grep -q '#include <torch/' "$f" || { [ -z "$mpi" ] && grep -q '#include <mpi.h>' "$f"; }; then
    skipped="$skipped $f"
  else
    keep="$keep $f"
  fi
done
start=$(date +%s)
rc=0
printf '%s\n' $headers $keep | xargs -P "$(nproc)" -I{} bash -c 'check_one "$@"' _ {} || rc=1
n_h=$(echo $headers | wc -w); n_s=$(echo $keep | wc -w)
echo "clang-check: $n_h headers alone and $n_s sources with $($CLANG --version | head -n 1), $(( $(date +%s) - start )) s"
[ -z "$skipped" ] || echo "clang-check: not checked (needs LibTorch or MPI headers):$skipped"
if [ $rc -ne 0 ]; then echo "clang-check: FAILED" >&2; exit 1; fi
echo "clang-check: passed"
