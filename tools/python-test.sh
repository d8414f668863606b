#!/usr/bin/env bash
# Builds and tests moereg_torch (python/) against Debian's PyTorch, exactly as users install it:
#
#   python3 -m venv --system-site-packages VENV && VENV/bin/pip install --no-build-isolation --no-deps ./python
#
# then runs its pytest suite. Installs the Debian packages it needs when one is missing (root
# or sudo). Exits nonzero on any failure; the last line of pytest's output is its summary.
#
#   tools/python-test.sh [build-dir] [pytest args...]     (build-dir default: build-python)
#
# Environment: PYTHON (default /usr/bin/python3, Debian's interpreter, which sees python3-torch),
# MAX_JOBS (parallel compile jobs, default 2), MOEREG_SKIP_APT=1 to skip the package check.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-build-python}"
[ $# -gt 0 ] && shift
case "$build" in /*) ;; *) build="$root/$build" ;; esac
py="${PYTHON:-/usr/bin/python3}"
export MAX_JOBS="${MAX_JOBS:-2}"

if [ "${MOEREG_SKIP_APT:-0}" != 1 ]; then
  pkgs=(python3 python3-dev python3-torch libtorch-dev pybind11-dev python3-venv python3-pip python3-setuptools
        python3-wheel python3-pytest ninja-build libeigen3-dev g++)
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
fi

start=$(date +%s)
mkdir -p "$build"
venv="$build/venv"
[ -x "$venv/bin/python" ] || "$py" -m venv --system-site-packages "$venv"
# pip builds in python/build (git-ignored); ninja recompiles only what changed.
(cd "$root" && "$venv/bin/pip" install --no-build-isolation --no-deps ./python) > "$build/pip-install.log" 2>&1 || {
  tail -n 60 "$build/pip-install.log"
  echo "moereg: pip install ./python failed (log: $build/pip-install.log)"
  exit 1
}
built=$(date +%s)
echo "moereg: moereg_torch built and installed in $((built - start)) s"
# Run the tests from outside the source tree so that the installed package is the one imported.
cd "$build"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/python/tests" "$@"
echo "moereg: python tests took $(( $(date +%s) - built )) s (build and install $((built - start)) s)"
