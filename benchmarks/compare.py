#!/usr/bin/env python3
"""Side-by-side timing of two moereg_bench binaries (an old and a new commit) in one run.

  python3 benchmarks/compare.py OLD/moereg_bench NEW/moereg_bench [--filter REGEX ...] [--reps N]

The two binaries take turns, one benchmark family at a time (old, new, then the next family),
so slow drifts of the machine (load, frequency) fall on both alike. Every case that both
binaries register is compared: the median real time of N repetitions each, and the ratio
new / old (below 1: the new commit is faster). Prints a Markdown table and the worst ratio.
Nothing here asserts a time: it is a measurement to read.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

FAMILIES = [
    "load_balancing", "z_loss", "entropy", "importance", "variance", "coupling_token", "coupling_batch",
    "specialization", "orthogonality",
]


def run(binary, regex, reps, min_time):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [binary, f"--benchmark_filter={regex}", f"--benchmark_repetitions={reps}",
               f"--benchmark_min_time={min_time}", f"--benchmark_out={out}", "--benchmark_out_format=json"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            data = json.load(f)
    times = {}
    for b in data["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        name = b.get("run_name", b["name"])
        times.setdefault(name, []).append(b["real_time"])
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--filter", action="append", help="benchmark families (regexes); default: every loss family")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", default="0.3")
    a = ap.parse_args()
    rows = []
    for fam in a.filter or FAMILIES:
        regex = f"^{fam}/" if a.filter is None else fam
        old = run(a.old, regex, a.reps, a.min_time)
        new = run(a.new, regex, a.reps, a.min_time)
        for name in sorted(set(old) & set(new)):
            rows.append((name, old[name], new[name], new[name] / old[name]))
        print(f"{fam}: {len(set(old) & set(new))} common cases", file=sys.stderr)
    print("| case | old ms | new ms | new / old |")
    print("| --- | ---: | ---: | ---: |")
    for name, o, n, r in rows:
        print(f"| {name} | {o:.3f} | {n:.3f} | {r:.3f} |")
    if rows:
        worst = max(rows, key=lambda x: x[3])
        best = min(rows, key=lambda x: x[3])
        print(f"\n{len(rows)} cases; new / old from {best[3]:.3f} ({best[0]}) to {worst[3]:.3f} ({worst[0]}); "
              f"median {statistics.median(r[3] for r in rows):.3f}")


if __name__ == "__main__":
    main()
