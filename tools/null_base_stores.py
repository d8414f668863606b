#!/usr/bin/env python3
"""Looks for the code shape behind the GCC 12 wrong-code bug of docs/compiler-bugs.md.

Compiles each source with GCC's -fdump-tree-optimized and lists, per function, the stores
through a TARGET_MEM_REF with a literal null base ("MEM[(T *)0B + ...] = ..."), the form in
which GCC 12's induction-variable optimisation hides the real pointer in the index. Such a
store is what the late pure-const and mod-ref analyses misread as writing nothing the caller
can see. A function that also holds a compiler barrier (MOEREG_KEEP_STORES: an empty volatile
asm with a "memory" clobber) is reported as protected; any other moereg function with such a
store is reported as unprotected, and the exit status is 1.

Usage: python3 tools/null_base_stores.py [--cxx g++] [--flags="-O1 -march=native"] FILE.cpp...
Run from the repository root (the include paths are the repository's include/ and tests/).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

STORE = re.compile(r'MEM\[\([^)]*\)0B \+ [^\]]*\] = ')
BARRIER = re.compile(r'__asm__ __volatile__\(""')
FUNC = re.compile(r';; Function (.*?) \(')


def scan(dump_path):
    functions = {}  # name -> [null-base stores, barriers]
    name = None
    with open(dump_path, errors="replace") as f:
        for line in f:
            m = FUNC.match(line)
            if m:
                name = m.group(1)
                functions.setdefault(name, [0, 0])
                continue
            if name is None:
                continue
            if STORE.search(line):
                functions[name][0] += 1
            if BARRIER.search(line):
                functions[name][1] += 1
    return {k: v for k, v in functions.items() if v[0] > 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cxx", default="g++")
    ap.add_argument("--flags", default="-O1")
    ap.add_argument("sources", nargs="+")
    args = ap.parse_args()
    pc = subprocess.run(["pkg-config", "--cflags-only-I", "eigen3"], capture_output=True, text=True)
    eigen = pc.stdout.split()[0][2:] if pc.returncode == 0 and pc.stdout.split() else "/usr/include/eigen3"
    unprotected = 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.sources:
            dump = os.path.join(tmp, "dump")
            cmd = [args.cxx, "-std=c++17", "-DNDEBUG", "-fopenmp", "-Iinclude", "-Itests", "-Itools", "-isystem", eigen,
                   *args.flags.split(), "-fdump-tree-optimized=" + dump, "-c", src, "-o", os.devnull]
            subprocess.run(cmd, check=True)
            for name, (stores, barriers) in sorted(scan(dump).items()):
                if "moereg" not in name:
                    continue
                state = "protected" if barriers else "UNPROTECTED"
                unprotected += 0 if barriers else 1
                print(f"{src} [{args.flags}]: {state}: {stores} null-base store(s) in {name[:160]}")
            os.remove(dump)
    print(f"null_base_stores: {unprotected} unprotected moereg function(s)")
    return 1 if unprotected else 0


if __name__ == "__main__":
    sys.exit(main())
