#!/usr/bin/env bash
# Installs the Debian packages moereg's build, tests, examples and benchmarks use, when
# any is missing. Needs root (or sudo) only when something is missing. The fortunes packages
# are the demo's training text and gnuplot draws its figure (examples/text_moe).
set -euo pipefail
pkgs=(g++ cmake ninja-build libeigen3-dev catch2 libomp-dev libopenmpi-dev openmpi-bin libbenchmark-dev python3 clang clang-format clang-tidy libclang-rt-14-dev doxygen pkg-config
  fortunes fortunes-de fortunes-es fortunes-it fortunes-cs fortunes-pl fortunes-ru gnuplot-nox)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "moereg: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
