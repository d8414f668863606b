#!/usr/bin/env bash
# Builds and runs the moereg demo: a byte-level MoE language model trained on fortune cookies
# in seven languages with and without each paper's losses (examples/text_moe, docs/demo.md),
# after the quickstart (both router losses and their gradient check). Installs what is missing
# first (the fortunes packages and gnuplot among it). Writes the table, the CSV files and the
# figure to build-demo/. Usage: bash tools/demo.sh [text_moe arguments, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
cmake -S . -B build-demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEREG_BUILD_TESTS=OFF -DMOEREG_BUILD_BENCHMARKS=OFF \
  -DMOEREG_BUILD_TOOLS=OFF -DMOEREG_ENABLE_CUDA=OFF -DMOEREG_NATIVE=ON >/dev/null
cmake --build build-demo --target example_quickstart text_moe
./build-demo/examples/example_quickstart
./build-demo/examples/text_moe/text_moe --out-dir build-demo "$@"
