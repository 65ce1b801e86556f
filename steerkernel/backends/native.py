"""Load steerkernel's native extensions, however they were built.

Two ways, chosen per extension at first use:

* **ahead of time** — ``pip install`` ran with torch importable in the build environment
  (``pip install --no-build-isolation .``, or ``scripts/bootstrap.sh``): ``steerkernel/_C*.so``
  sits in the package with a ``_native_build.json`` naming the sources' hash and the torch it
  was built against.  Used when both still match.
* **on first use** — a plain ``pip install .`` (build isolation on, so no torch at build time)
  installs the sources (``steerkernel/_csrc``); the first call compiles them once with torch's
  JIT builder (ninja + the system C++ compiler) into
  ``$STEERKERNEL_CACHE/ext/<torch>-<python>-<hash>/`` and later processes load that.  The
  same happens in an editable checkout whose ahead-of-time build is older than ``csrc/``.

``STEERKERNEL_JIT=0`` forbids the first-use build (the backend is then reported unavailable).
:func:`build_status` says which way each extension came, for ``steerkernel doctor``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from types import ModuleType
from typing import Dict, Optional

import torch

from . import native_spec as spec

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NativeUnavailable(RuntimeError):
    """A native extension could not be loaded or built; the message says why and what to do."""


_MODULES: Dict[str, ModuleType] = {}
_STATUS: Dict[str, dict] = {}


def cache_dir() -> str:
    root = os.environ.get("STEERKERNEL_CACHE") or os.path.join("~", ".cache", "steerkernel")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "ext")


def _aot_info(name: str) -> Optional[dict]:
    """The sidecar of an ahead-of-time build of ``steerkernel.<name>``, if there is one."""
    if importlib.util.find_spec(f"steerkernel.{name}") is None:
        return None
    try:
        with open(os.path.join(PACKAGE_DIR, spec.BUILD_INFO)) as f:
            return json.load(f).get(name, {})
    except (OSError, ValueError):
        return {}  # built by an older setup.py or by hand: trust it only without sources


def _load_aot(name: str, csrc: Optional[str], want: Optional[str]) -> Optional[ModuleType]:
    info = _aot_info(name)
    if info is None:
        return None
    stale = None
    if want is not None and info.get("source_hash") != want:
        stale = "it was built from other sources than csrc/ holds now"
    elif info.get("torch") not in (None, torch.__version__):
        stale = f"it was built against torch {info.get('torch')}, this is {torch.__version__}"
    if stale and csrc is not None:
        _STATUS[name] = {"aot_skipped": stale}
        return None
    mod = importlib.import_module(f"steerkernel.{name}")
    _STATUS[name] = {"mode": "ahead-of-time", "path": mod.__file__,
                     "source_hash": info.get("source_hash"), "note": stale}
    return mod


def _compile(name: str, csrc: str, want: str) -> ModuleType:
    from torch.utils import cpp_extension

    if os.environ.get("STEERKERNEL_JIT", "1") == "0":
        raise NativeUnavailable(
            f"steerkernel.{name} is not built ahead of time and STEERKERNEL_JIT=0 forbids "
            "compiling it on first use")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(
            f"no C++ compiler ({cxx!r} not found) to build steerkernel.{name} on first use: "
            "install one (Debian/Ubuntu: apt-get install g++) or set CXX")
    if not cpp_extension.is_ninja_available():
        raise NativeUnavailable(
            f"ninja is needed to build steerkernel.{name} on first use: pip install ninja")
    cuda = name in spec.CUDA_EXTENSIONS
    if cuda and cpp_extension.CUDA_HOME is None:
        raise NativeUnavailable(f"nvcc / CUDA_HOME not found: cannot build steerkernel.{name}")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    folder = os.path.join(cache_dir(), f"torch{torch.__version__}-{py}-{want}")
    os.makedirs(folder, exist_ok=True)
    module_name = f"steerkernel{name}_{want}"
    built = any(f.startswith(module_name) and f.endswith(".so") for f in os.listdir(folder))
    t0 = time.perf_counter()
    if not built:
        print(f"steerkernel: compiling the native {'CUDA' if cuda else 'CPU'} kernel "
              f"(steerkernel.{name}) once for this machine into {folder} "
              "(about a minute)...", file=sys.stderr, flush=True)
    try:
        mod = cpp_extension.load(
            name=module_name,
            sources=[os.path.join(csrc, s) for s in spec.EXTENSIONS[name]],
            extra_cflags=spec.cxx_flags(),
            extra_cuda_cflags=spec.nvcc_flags() if cuda else None,
            extra_ldflags=spec.openmp_flags(),
            extra_include_paths=[csrc],
            build_directory=folder,
            with_cuda=cuda,
            verbose=False,
        )
    except Exception as e:  # the compiler's own output is in the message
        raise NativeUnavailable(
            f"building steerkernel.{name} from {csrc} failed: {str(e)[-2000:]}") from e
    if not built:
        print(f"steerkernel: built steerkernel.{name} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    _STATUS[name] = dict(_STATUS.get(name, {}), mode="first-use build", path=mod.__file__,
                         source_hash=want)
    return mod


def load(name: str) -> ModuleType:
    """The native extension ``name`` ("_C" or "_C_cuda"), loaded or built once per process.

    Raises :class:`NativeUnavailable` saying why when it can be neither loaded nor built.
    """
    mod = _MODULES.get(name)
    if mod is not None:
        return mod
    if name not in spec.EXTENSIONS:
        raise ValueError(f"unknown native extension {name!r}")
    csrc = spec.find_csrc(PACKAGE_DIR)
    want = spec.source_hash(csrc) if csrc is not None else None
    try:
        mod = _load_aot(name, csrc, want)
    except ImportError as e:
        if csrc is None:
            raise NativeUnavailable(f"steerkernel.{name} does not import ({e}) and no sources "
                                    "are installed to rebuild it; reinstall steerkernel") from e
        _STATUS[name] = {"aot_skipped": f"import failed: {e}"}
        mod = None
    if mod is None:
        if csrc is None:
            raise NativeUnavailable(
                f"steerkernel.{name} is not built and its sources are not installed; "
                "reinstall steerkernel (pip install .)")
        mod = _compile(name, csrc, want)
    _MODULES[name] = mod
    return mod


def build_status() -> Dict[str, dict]:
    """How each extension loaded so far came to be: ``mode`` ("ahead-of-time" or
    "first-use build"), ``path``, ``source_hash``, and why an ahead-of-time build was skipped."""
    return {k: dict(v) for k, v in _STATUS.items()}
