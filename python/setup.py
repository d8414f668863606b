"""Build of moereg_torch: moereg's header-only losses as PyTorch ops (CPU).

    python3 -m venv --system-site-packages VENV
    VENV/bin/pip install --no-build-isolation --no-deps ./python

The extension compiles moereg's headers. They are found, in this order, in
$MOEREG_INCLUDE_DIR, in python/moereg_include (a vendored copy, for an sdist) and in
../include (this repository). Environment options:

    MAX_JOBS=2              parallel compile jobs (ninja); the extension has 5 translation units
    MOEREG_TORCH_ARCH=...   adds -march=... (for example native: AVX-512 kernels where the CPU has them)
    MOEREG_TORCH_CUDA=1     reserved for the CUDA build, which is not available yet (fails clearly)
"""
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def moereg_include():
    candidates = [os.environ.get("MOEREG_INCLUDE_DIR"), os.path.join(HERE, "moereg_include"),
                  os.path.join(HERE, os.pardir, "include")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "moereg", "moereg.hpp")):
            return os.path.abspath(c)
    sys.exit("moereg_torch: moereg's headers not found; set MOEREG_INCLUDE_DIR to the directory that holds "
             "moereg/moereg.hpp (the repository's include/), or vendor it as python/moereg_include")


def eigen_include():
    for c in [os.environ.get("EIGEN_INCLUDE_DIR"), "/usr/include/eigen3", "/usr/local/include/eigen3"]:
        if c and os.path.isfile(os.path.join(c, "Eigen", "Core")):
            return c
    sys.exit("moereg_torch: Eigen 3 not found (Debian: apt-get install libeigen3-dev); or set EIGEN_INCLUDE_DIR")


if os.environ.get("MOEREG_TORCH_CUDA", "0") not in ("", "0"):
    sys.exit("moereg_torch: MOEREG_TORCH_CUDA=1 was given, but the CUDA build of the extension is not "
             "available yet; build without it (CPU backend)")

# Torch's own headers are system headers here, so -Werror applies to moereg and to csrc only.
torch_system = []
for d in cpp_extension.include_paths():
    torch_system += ["-isystem", d]

# -O2 plus three of -O3's loop passes: the full vectorizer cost model, loop unswitching and
# versioning for unit strides (moereg's strided gradient loops run vectorised for contiguous
# tensors with them). Full -O3 is left out to keep the compile time of the specialization and
# orthogonality translation units down; -g0 because Python's default CFLAGS add -g.
cxx = ["-std=c++17", "-O2", "-fvect-cost-model=dynamic", "-funswitch-loops", "-fversion-loops-for-strides", "-g0", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"] + torch_system
arch = os.environ.get("MOEREG_TORCH_ARCH")
if arch:
    cxx.append("-march=" + arch)

sources = ["csrc/module.cpp", "csrc/router.cpp", "csrc/coupling.cpp", "csrc/specialization.cpp",
           "csrc/orthogonality.cpp"]

setup(
    name="moereg_torch",
    version="0.1.0",
    description="moereg's Mixture-of-Experts regularization losses as differentiable PyTorch ops",
    packages=["moereg_torch"],
    ext_modules=[
        cpp_extension.CppExtension(
            name="moereg_torch._C",
            sources=sources,
            include_dirs=[moereg_include(), eigen_include(), os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
