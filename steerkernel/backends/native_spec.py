"""What the native extensions are built from, and with which flags: one description shared by
``setup.py`` (ahead-of-time build, when torch is present at build time) and
:mod:`steerkernel.backends.native` (compiled on first use otherwise).

This module imports nothing but the standard library, so ``setup.py`` can load it by path in a
build environment that has no torch.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Dict, List, Optional

#: extension name (inside the ``steerkernel`` package) -> its sources in ``csrc/``
EXTENSIONS: Dict[str, List[str]] = {
    "_C": ["ops.cpp", "checks.cpp", "junction_cpu.cpp"],
    "_C_cuda": ["cuda_ops.cpp", "checks.cpp", "junction_cuda.cu"],
}
CUDA_EXTENSIONS = ("_C_cuda",)

#: Files of ``csrc/`` that a build reads (sources and headers); their hash names a build.
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")

#: Where an installed (non-editable) package keeps its copy of ``csrc/`` for first-use builds.
PACKAGED_CSRC = "_csrc"

#: Sidecar file written next to ahead-of-time built extensions.
BUILD_INFO = "_native_build.json"


def cxx_flags() -> List[str]:
    """Host compiler flags.  The C++ standard is left to torch (C++20 from torch 2.10 on).

    ``-fopenmp``: ``at::parallel_for`` is a header template and only runs threads in a file
    compiled with OpenMP (torch's own build uses it; the process keeps torch's one libgomp).
    """
    # -ffp-contract=off: a scalar ``a += b * c`` stays two roundings in every template
    # instantiation (GCC would fuse it into an FMA in some and not others), so results never
    # depend on which path a call takes (tests/test_properties.py aliasing laws; AVX2 hosts)
    flags = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    if os.environ.get("STEERKERNEL_CPU_NATIVE") == "1":
        flags.append("-march=native")
    return flags + openmp_flags()


def openmp_flags() -> List[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def nvcc_flags() -> List[str]:
    return ["-O3", "-lineinfo"]


def source_files(csrc: str) -> List[str]:
    """The build inputs in ``csrc`` (sorted file names)."""
    return sorted(f for f in os.listdir(csrc) if f.endswith(SOURCE_SUFFIXES))


def source_hash(csrc: str) -> str:
    """A short digest of every build input's name and bytes, plus the flags that matter."""
    h = hashlib.sha256()
    for name in source_files(csrc):
        h.update(name.encode() + b"\0")
        with open(os.path.join(csrc, name), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    h.update(" ".join(cxx_flags() + nvcc_flags()).encode())
    return h.hexdigest()[:16]


def find_csrc(package_dir: str) -> Optional[str]:
    """``csrc/`` for a package at ``package_dir``: the packaged copy of an installed wheel, or
    the repository's own folder for a source checkout / editable install; None if neither."""
    for cand in (os.path.join(package_dir, PACKAGED_CSRC),
                 os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.isfile(os.path.join(cand, "ops.cpp")):
            return cand
    return None
