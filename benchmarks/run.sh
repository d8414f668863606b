#!/usr/bin/env bash
# Runs the CPU benchmarks and writes benchmarks/RESULTS.md.
#
#   benchmarks/run.sh [BUILD_DIR]      (default: build)
#
# BUILD_DIR must hold a Release build with the benchmarks, e.g.
#   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEREG_BENCH_TORCH=ON && cmake --build build --target moereg_bench moereg_bench_torch
# Extra Google Benchmark flags can be passed through MOEREG_BENCH_ARGS (default: three
# repetitions, medians reported). The hand-written analysis at the end of RESULTS.md is kept.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${1:-build}"
bench="$build/benchmarks/moereg_bench"
torch="$build/benchmarks/moereg_bench_torch"
[[ -x "$bench" ]] || { echo "run.sh: $bench not found; build the moereg_bench target first" >&2; exit 1; }
args=${MOEREG_BENCH_ARGS:---benchmark_repetitions=3 --benchmark_report_aggregates_only=true --benchmark_min_time=0.3}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
cmd="moereg_bench $args --benchmark_out=bench.json --benchmark_out_format=json"
# shellcheck disable=SC2086
"$bench" $args --benchmark_out="$tmp/bench.json" --benchmark_out_format=json
torch_cmd=""
torch_note="moereg_bench_torch was not built (LibTorch not found by CMake)"
if [[ -x "$torch" ]]; then
  torch_cmd="moereg_bench_torch $args --benchmark_out=torch.json --benchmark_out_format=json"
  # shellcheck disable=SC2086
  "$torch" $args --benchmark_out="$tmp/torch.json" --benchmark_out_format=json
fi
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

export META_CPU="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
export META_CORES="$(nproc)"
export META_L3="$(lscpu | sed -n 's/^L3 cache: *//p' | head -1)"
export META_MEM="$(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
export META_DATE="$(date -u '+%Y-%m-%d %H:%M')"
export META_COMPILER="$(c++ --version | head -1)"
export META_GBENCH="$( (dpkg-query -W -f='${Version}' libbenchmark-dev 2>/dev/null) || echo '?')"
export META_LOAD_BEFORE="$load_before" META_LOAD_AFTER="$load_after"
export META_COMMAND="$cmd" META_TORCH_COMMAND="$torch_cmd" META_TORCH_NOTE="$torch_note"
python3 - "$tmp/meta.json" <<'PY'
import json, os, sys
keys = ["cpu", "cores", "l3", "mem", "date", "compiler", "gbench", "load_before", "load_after", "command",
        "torch_command", "torch_note"]
json.dump({k: os.environ.get("META_" + k.upper(), "") for k in keys}, open(sys.argv[1], "w"))
PY
torch_json=""
[[ -f "$tmp/torch.json" ]] && torch_json="$tmp/torch.json"
python3 "$here/report.py" "$here/RESULTS.md" "$tmp/meta.json" "$tmp/bench.json" $torch_json
echo "wrote $here/RESULTS.md"
