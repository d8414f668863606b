#!/usr/bin/env bash
# Checks that every tracked C++ and CUDA source follows .clang-format (clang-format --dry-run
# -Werror); single_include/ is generated and left out. With --fix, reformats them instead.
# The one whole-tree reformat is listed in .git-blame-ignore-revs
# (git config blame.ignoreRevsFile .git-blame-ignore-revs).
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG_FORMAT=${CLANG_FORMAT:-clang-format}
command -v "$CLANG_FORMAT" >/dev/null || { echo "format-check: $CLANG_FORMAT not found (apt-get install clang-format)" >&2; exit 1; }
mapfile -t files < <(git ls-files '*.hpp' '*.cpp' '*.h' '*.cuh' '*.cu' | grep -v '^single_include/')
if [ "${1:-}" = "--fix" ]; then
  "$CLANG_FORMAT" -i "${files[@]}"
  echo "format-check: reformatted ${#files[@]} files"
  exit 0
fi
bad=()
for f in "${files[@]}"; do
  "$CLANG_FORMAT" --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done
if [ ${#bad[@]} -gt 0 ]; then
  echo "format-check: ${#bad[@]} of ${#files[@]} files do not follow .clang-format ($($CLANG_FORMAT --version)):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  echo "format-check: run bash tools/format-check.sh --fix" >&2
  exit 1
fi
echo "format-check: ${#files[@]} files follow .clang-format ($($CLANG_FORMAT --version))"
