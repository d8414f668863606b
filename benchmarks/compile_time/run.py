#!/usr/bin/env python3
"""Compile-time probe: how long one translation unit that calls every loss takes to compile.

    python3 benchmarks/compile_time/run.py [--cxx g++] [--repeat 3] [--native] [--out FILE]

Compiles benchmarks/compile_time/every_loss_float.cpp (value_and_grad of all eight losses,
float storage, token-major layout, the default CPU backend) to an object file with the given
compiler, OpenMP on, at -O2 and -O3, and reports for each the best wall time of --repeat runs
and the compiler's peak resident memory. --native adds the same with -march=native (the
AVX-512 kernels where the CPU has them). Two more rows compile the probe as a user of
moereg::compiled does (its extern declarations: the kernels come from the library). The targets (README, "Compile time") are <= 10 s at
-O2, <= 20 s at -O3 and <= 1 GiB; the exit status is 1 when a measurement misses one, so the
script can gate a change, but it is never run inside a test: a timing depends on the machine
and its load. With --out, a Markdown table is appended to FILE with the command and the
machine.
"""
import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROBE = os.path.join(HERE, "every_loss_float.cpp")
TARGETS = {"-O2": 10.0, "-O3": 20.0}
MEMORY_TARGET_MIB = 1024.0
COMPILED_DEFINES = ["-DMOEREG_COMPILED=1", "-DMOEREG_COMPILED_OPENMP=1", "-DMOEREG_COMPILED_AVX512=0", "-DMOEREG_NO_AVX512"]


def eigen_flags():
    try:
        out = subprocess.run(["pkg-config", "--cflags-only-I", "eigen3"], capture_output=True, text=True, check=True)
        flags = out.stdout.split()
        if flags:
            return ["-isystem" + f[2:] if f.startswith("-I") else f for f in flags]
    except (OSError, subprocess.CalledProcessError):
        pass
    return ["-isystem/usr/include/eigen3"]


def compile_once(cmd):
    """Wall seconds and peak resident MiB of one compiler run (the largest child process)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("compile failed: " + shlex.join(cmd))
    return wall, usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--native", action="store_true", help="also measure with -march=native")
    ap.add_argument("--out", help="append a Markdown table to this file")
    args = ap.parse_args()

    version = subprocess.run([args.cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    rows = []
    missed = False
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "probe.o")
        configs = [(level, arch, []) for arch in (([], ["-march=native"]) if args.native else ([],))
                   for level in ("-O2", "-O3")]
        # A user of moereg::compiled: the defines that target gives its users (portable, OpenMP).
        configs += [(level, [], COMPILED_DEFINES) for level in ("-O2", "-O3")]
        for level, arch, defines in configs:
            cmd = [args.cxx, "-std=c++17", level, *arch, *defines, "-fopenmp", "-I" + os.path.join(ROOT, "include"),
                   *eigen_flags(), "-c", PROBE, "-o", obj]
            runs = [compile_once(cmd) for _ in range(args.repeat)]
            wall = min(r[0] for r in runs)
            mem = max(r[1] for r in runs)
            ok = wall <= TARGETS[level] and mem <= MEMORY_TARGET_MIB
            missed = missed or not ok
            label = level + (" -march=native" if arch else "") + (" (moereg::compiled user)" if defines else "")
            rows.append((label, wall, mem, TARGETS[level], ok))
            print(f"{label:<20} {wall:6.2f} s  {mem:6.0f} MiB  (target <= {TARGETS[level]:.0f} s, "
                  f"<= {MEMORY_TARGET_MIB:.0f} MiB) {'ok' if ok else 'MISSED'}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores, {version}\n\n")
            f.write(f"Command: `python3 benchmarks/compile_time/run.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
                    f"(best of {args.repeat}; load average before the run "
                    f"{' '.join(open('/proc/loadavg').read().split()[:3])})\n\n")
            f.write("| flags | wall time | peak memory | target | |\n|---|---|---|---|---|\n")
            for label, wall, mem, target, ok in rows:
                f.write(f"| `{label}` | {wall:.2f} s | {mem:.0f} MiB | <= {target:.0f} s, <= 1 GiB | "
                        f"{'met' if ok else 'missed'} |\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
