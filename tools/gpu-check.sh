#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU, nvcc and (for the peers)
# PyTorch 2.x with CUDA, no network needed. Steps, each with a time limit so that the whole
# run ends within 8 minutes, each reported in one line (and in OUTDIR/summary.txt):
#   info        nvidia-smi and nvcc versions
#   configure   CMake, the CUDA backend on, for this GPU's architecture only
#   build       the CUDA tests and the CUDA benchmark
#   ctest       ctest -L cuda (every CUDA loss against the CPU backend)
#   memcheck    compute-sanitizer --tool memcheck on the CUDA tests
#   racecheck   compute-sanitizer --tool racecheck on the CUDA tests
#   bench       benchmarks/cuda/bench_cuda.cu: copy bandwidth, specialization bf16/f32
#               T=16384 k=8 d=2048, the five router losses fused T=65536 E=256
#   peers       benchmarks/cuda/torch_peers.py: PyTorch eager and torch.compile, same cases
# Everything goes into OUTDIR (default gpu-check-results/): one log per step, bench_cuda.jsonl,
# torch_peers.jsonl, summary.txt.
#
#   bash tools/gpu-check.sh [OUTDIR]
#   bash tools/gpu-check.sh --pack DIR   (on a Debian machine with libeigen3-dev and catch2:
#                                         copies their headers and CMake files into DIR, for a
#                                         GPU machine that has neither; then run there with
#                                         MOEREG_GPU_DEPS=DIR, default .gpu-deps)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--pack" ]; then
  dir=${2:?usage: tools/gpu-check.sh --pack DIR}
  mkdir -p "$dir"
  for p in /usr/include/eigen3 /usr/share/eigen3/cmake /usr/include/catch2 /usr/lib/cmake/Catch2; do
    [ -e "$p" ] || { echo "gpu-check --pack: $p is missing (apt-get install libeigen3-dev catch2)" >&2; exit 1; }
    cp -r --parents "$p" "$dir/"
  done
  echo "gpu-check --pack: Eigen and Catch2 copied into $dir ($(du -sh "$dir" | cut -f1))"
  exit 0
fi

out=${1:-gpu-check-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
: >"$summary"
start=$(date +%s)
build=${MOEREG_GPU_BUILD:-build-gpu}
deps=${MOEREG_GPU_DEPS:-.gpu-deps}
command -v nvcc >/dev/null 2>&1 || export PATH="/usr/local/cuda/bin:$PATH"

# step NAME LIMIT_S COMMAND...: runs it with its output in OUTDIR/NAME.log, prints one line.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc status
  t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    77) status="skipped" ;;
    124) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "gpu-check: $name: $status, $(($(date +%s) - t0)) s; log $out/$name.log" | tee -a "$summary"
  return $rc
}

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
arch=${arch:-90}
step info 15 bash -c 'nvidia-smi; nvcc --version; python3 -c "import torch; print(\"torch\", torch.__version__, torch.version.cuda)"'

prefix=()
[ -d "$deps/usr" ] && prefix=(-DCMAKE_PREFIX_PATH="$(cd "$deps/usr" && pwd)")
step configure 30 cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEREG_ENABLE_CUDA=ON \
  -DMOEREG_CUDA_ARCHITECTURES="$arch" -DMOEREG_WERROR=OFF -DMOEREG_BUILD_BENCHMARKS=OFF \
  -DMOEREG_BUILD_EXAMPLES=OFF -DMOEREG_BUILD_TOOLS=OFF -DMOEREG_BUILD_COMPILED=OFF "${prefix[@]}" || exit 1
step build 150 cmake --build "$build" -j "$(nproc)" --target moereg_cuda_tests moereg_cuda_host_tests moereg_bench_cuda ||
  exit 1

tests="$build/tests/cuda/moereg_cuda_tests"
step ctest 30 ctest --test-dir "$build" -L cuda --output-on-failure
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 "$tests"
step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 "$tests" "[specialization],[fused],[coupling],[entropy]"
step bench 40 "$build/benchmarks/cuda/moereg_bench_cuda" --out "$out/bench_cuda.jsonl"
step peers 90 python3 benchmarks/cuda/torch_peers.py --out "$out/torch_peers.jsonl"
echo "gpu-check: done in $(($(date +%s) - start)) s; results in $out" | tee -a "$summary"
