#!/usr/bin/env bash
# Builds moereg's tests, tools and examples (warnings are errors) and runs them with CTest.
# Usage: bash tools/test.sh [extra cmake arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
jobs=$(nproc 2>/dev/null || echo 2)
# The CUDA backend is built only on request (-DMOEREG_ENABLE_CUDA=ON) until its tests have run on a GPU.
# -O2 rather than CMake's Release -O3: the same code paths, a third less compile time.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" -DMOEREG_WERROR=ON \
  -DMOEREG_ENABLE_CUDA=OFF -DMOEREG_INSTALL_COMPILED=ON "$@"
cmake --build build -j "$jobs"
ctest --test-dir build --output-on-failure -j "$jobs"
# The PyTorch package (python/): built with pip against Debian's torch and tested with pytest.
bash tools/python-test.sh build-python
