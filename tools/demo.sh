#!/usr/bin/env bash
# Builds and runs the moereg demo: a small MoE trained with and without the specialization
# losses (examples/toy_moe, docs/demo.md), after the quickstart (both router losses and their
# gradient check). Usage: bash tools/demo.sh [toy_moe arguments, e.g. --quick or --plot]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
cmake -S . -B build-demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEREG_BUILD_TESTS=OFF -DMOEREG_BUILD_BENCHMARKS=OFF \
  -DMOEREG_BUILD_TOOLS=OFF -DMOEREG_ENABLE_CUDA=OFF -DMOEREG_NATIVE=ON >/dev/null
cmake --build build-demo --target example_quickstart toy_moe
./build-demo/examples/example_quickstart
./build-demo/examples/toy_moe/toy_moe --out-dir build-demo "$@"
