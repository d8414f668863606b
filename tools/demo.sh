#!/usr/bin/env bash
# Builds and runs the moereg demo. Usage: bash tools/demo.sh [demo arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
cmake -S . -B build-demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEREG_BUILD_TESTS=OFF -DMOEREG_BUILD_BENCHMARKS=OFF \
  -DMOEREG_ENABLE_CUDA=OFF -DMOEREG_NATIVE=ON >/dev/null
cmake --build build-demo --target example_quickstart
./build-demo/examples/example_quickstart "$@"
