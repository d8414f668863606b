#!/usr/bin/env bash
# Mutation check: plants each bug listed in tools/mutants.txt in include/moereg, one at a
# time, rebuilds the loss test binary (moereg_loss_tests, the tests in tests/losses), runs it,
# and restores the header. A mutant is "killed" when the tests fail, "survived" when they
# pass. Prints one line per mutant, the kill rate and the run time.
#
#   tools/mutation-check.sh [-b BUILD_DIR] [-j JOBS] [-l LIST] [ID ...]
#
#   -b  build directory (default: build-mutation in the repository root; configured on first
#       use with the Release flags of the README, -O2)
#   -j  parallel compile jobs (default 2)
#   -l  mutant list (default tools/mutants.txt)
#   ID  run only these mutants (default: all)
#
# Every header is restored on exit, also on Ctrl-C or an error. A mutant whose text does not
# occur exactly once in its file stops the script (exit 2): the list has gone stale. A mutant
# that does not compile is reported as "invalid" and counts as neither. Exit status: 0 when
# every mutant was killed, 1 when one survived, 2 on an error. The test output of each mutant
# is kept as BUILD_DIR/mutation-ID.log.
#
# Not run in CI: each mutant recompiles the loss tests that include its header (about one to
# three minutes each on two cores).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-mutation"
jobs=2
list="$root/tools/mutants.txt"
while getopts "b:j:l:h" opt; do
  case "$opt" in
    b) build=$OPTARG ;;
    j) jobs=$OPTARG ;;
    l) list=$OPTARG ;;
    h) sed -n '2,20p' "$0"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
wanted=("$@")

command -v python3 > /dev/null || { echo "mutation-check: needs python3" >&2; exit 2; }
[ -f "$list" ] || { echo "mutation-check: no mutant list $list" >&2; exit 2; }

work=$(mktemp -d)
planted=""  # the header currently mutated (relative to root), empty when none
restore() {
  if [ -n "$planted" ]; then
    cp "$work/original" "$root/$planted"
    planted=""
  fi
}
cleanup() {
  restore
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "mutation-check: interrupted, headers restored" >&2; exit 130' INT TERM

# The list as records "id<US>file<US>find<US>replace<US>why", one a line (US = \x1f).
python3 - "$list" > "$work/records" <<'EOF'
import sys
blocks, cur = [], {}
def flush():
    global cur
    if cur:
        for key in ("id", "file", "find", "replace", "why"):
            if key not in cur:
                sys.exit("mutation-check: mutant %r has no %s: line" % (cur.get("id", "?"), key))
        blocks.append(cur)
    cur = {}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.rstrip("\n")
    if line.startswith("#"):
        continue
    if not line.strip():
        flush()
        continue
    key, sep, value = line.partition(": ")
    if not sep:
        sys.exit("mutation-check: cannot read line %r" % line)
    cur[key] = value
flush()
for b in blocks:
    print("\x1f".join(b[k] for k in ("id", "file", "find", "replace", "why")))
EOF

if [ ! -f "$build/build.ninja" ]; then
  echo "mutation-check: configuring $build"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
    -DMOEREG_WERROR=ON -DMOEREG_ENABLE_CUDA=OFF -DMOEREG_BUILD_BENCHMARKS=OFF -DMOEREG_BUILD_EXAMPLES=OFF \
    -DMOEREG_BUILD_TOOLS=OFF > "$work/configure.log" 2>&1 || { cat "$work/configure.log" >&2; exit 2; }
fi
bin="$build/tests/moereg_loss_tests"
build_tests() { cmake --build "$build" --target moereg_loss_tests -j "$jobs" > "$work/build.log" 2>&1; }
run_tests() { timeout 900 "$bin" > "$work/run.log" 2>&1; }

start=$(date +%s)
echo "mutation-check: building and running the unmutated loss tests"
build_tests || { tail -40 "$work/build.log" >&2; echo "mutation-check: the unmutated tree does not build" >&2; exit 2; }
if ! run_tests; then
  tail -40 "$work/run.log" >&2
  echo "mutation-check: the loss tests fail on the unmutated tree" >&2
  exit 2
fi

killed=0 survived=0 invalid=0
survivors=()
while IFS=$'\x1f' read -r id file find replace why; do
  if [ ${#wanted[@]} -gt 0 ]; then
    skip=1
    for w in "${wanted[@]}"; do [ "$w" = "$id" ] && skip=0; done
    [ $skip -eq 1 ] && continue
  fi
  [ -f "$root/$file" ] || { echo "mutation-check: $id: no file $file" >&2; exit 2; }
  cp "$root/$file" "$work/original"
  planted=$file
  if ! python3 - "$root/$file" "$find" "$replace" <<'EOF'; then
import sys
path, find, replace = sys.argv[1:4]
text = open(path, encoding="utf-8").read()
n = text.count(find)
if n != 1:
    sys.exit("the text to replace occurs %d times (must be exactly once)" % n)
open(path, "w", encoding="utf-8").write(text.replace(find, replace))
EOF
    echo "mutation-check: mutant $id does not apply to $file" >&2
    exit 2
  fi
  t0=$(date +%s)
  detail=""
  rm -f "$work/run.log"
  if ! build_tests; then
    status="invalid"
    detail="does not compile: $(grep -m1 -E 'error' "$work/build.log" || true)"
    invalid=$((invalid + 1))
  elif run_tests; then
    status="SURVIVED"
    survived=$((survived + 1))
    survivors+=("$id")
  else
    status="killed"
    # The failing test cases: Catch2 prints each one's name after a line of dashes (the loss
    # tests print nothing else in such blocks; a second dashes line is followed by file:line).
    detail=$(awk '/^--------------------+$/ { if ((getline n) > 0 && n !~ /^[ .-]/ && n !~ /\.(cpp|hpp):[0-9]+$/ && !(n in seen)) {
                                 seen[n] = 1; names[++k] = n } }
                  END { if (k) { printf "failing test cases (%d): %s", k, names[1];
                                 for (i = 2; i <= k && i <= 4; ++i) printf "; %s", names[i];
                                 if (k > 4) printf "; ..." } }' "$work/run.log")
    killed=$((killed + 1))
  fi
  restore
  [ -f "$work/run.log" ] && cp "$work/run.log" "$build/mutation-$id.log"
  printf '%-34s %-9s %5ss  %s\n' "$id" "$status" "$(( $(date +%s) - t0 ))" "$why"
  [ -z "$detail" ] || echo "      $detail"
done < "$work/records"

# Leave the build matching the restored headers.
build_tests || true
total=$((killed + survived))
elapsed=$(( $(date +%s) - start ))
echo
echo "mutation-check: $killed of $total mutants killed$( [ $total -gt 0 ] && echo " ($((100 * killed / total))%)" ), $survived survived, $invalid invalid; ${elapsed}s"
[ $survived -eq 0 ] || echo "mutation-check: survivors: ${survivors[*]}"
[ $invalid -eq 0 ] || exit 2
[ $survived -eq 0 ]
