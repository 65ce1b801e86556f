"""Which junction backends exist on this machine, and which one a call uses.

This package only discovers and chooses: probing a backend loads it, and a loaded backend
registers its op with :mod:`steerkernel.ops.library` (the native extensions define theirs in C++;
:mod:`.triton_junction` implements ``steerkernel::junction_triton`` when imported).  Importing
it installs :func:`resolve` as the chooser that :func:`steerkernel.ops.junction` consults.

Automatic choice: the shape-aware table of :mod:`.dispatch` (data: :mod:`.dispatch_table`)
names, for the call's device and, when the caller gives them, ``T``, ``K``, ``d`` and dtype,
the backends to try, best first; the first one available here wins, then the built-in order
(CUDA tensors -> ``cuda`` (C++ extension) > ``triton``; CPU tensors -> ``cpu`` (C++
extension)), then ``reference``.  The environment variable ``STEERKERNEL_BACKEND`` (or the
``backend=`` argument, which wins) forces one without consulting the table; a forced backend
that cannot run gives an error saying why.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional, Tuple

import torch

from ..ops import library
from . import dispatch, native

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "STEERKERNEL_BACKEND"


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here; the message says why."""


# Availability is probed once per process and kept in a plain dict (not functools.lru_cache),
# so torch.compile traces a dict lookup instead of the probe.
_PROBED: Dict[str, Tuple[bool, str]] = {}


def _probe(name: str, fn) -> Tuple[bool, str]:
    hit = _PROBED.get(name)
    if hit is None:
        hit = _PROBED[name] = fn()
    return hit


def _cpu_ext() -> Tuple[bool, str]:
    return _probe("_cpu_ext", _probe_cpu_ext)


def _how(name: str) -> str:
    st = native.build_status().get(name, {})
    return "built ahead of time" if st.get("mode") == "ahead-of-time" else "built on first use"


def _probe_cpu_ext() -> Tuple[bool, str]:
    try:
        mod = native.load("_C")
    except native.NativeUnavailable as e:
        return False, f"C++ extension steerkernel._C unavailable: {e}"
    try:
        library.register_backend("cpu", torch.ops.steerkernel.junction.default)
    except RuntimeError as e:
        return False, f"C++ extension steerkernel._C does not fit this package: {e}"
    return True, f"{mod.simd_description()}; {_how('_C')}"


def _cuda_ext() -> Tuple[bool, str]:
    return _probe("_cuda_ext", _probe_cuda_ext)


def _probe_cuda_ext() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    ok, why = _cpu_ext()
    if not ok:
        return False, why
    try:
        native.load("_C_cuda")
    except native.NativeUnavailable as e:
        return False, f"CUDA extension steerkernel._C_cuda unavailable: {e}"
    library.register_backend("cuda", torch.ops.steerkernel.junction.default)  # (checked: _C)
    return True, f"GPU: {torch.cuda.get_device_name()}; {_how('_C_cuda')}"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton() -> Tuple[bool, str]:
    return _probe("_triton", _probe_triton)


def _probe_triton() -> Tuple[bool, str]:
    try:
        import triton
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if torch.cuda.is_available():
        where = f"on {torch.cuda.get_device_name()}"
    elif triton_interpreted():
        where = "under TRITON_INTERPRET=1 (CPU, for tests)"
    else:
        return False, ("no GPU for triton; set TRITON_INTERPRET=1 before importing triton to "
                       "run its kernels on CPU (slow; for tests)")
    try:
        importlib.import_module(".triton_junction", __name__)  # registers its op
    except Exception as e:  # noqa: BLE001 - e.g. a triton release without a needed API
        return False, f"the triton kernels do not load with triton {triton.__version__}: {e}"
    return True, f"triton {triton.__version__} {where}"


def backend_status() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (available, why)}`` for every backend, for ``steerkernel doctor``."""
    return {
        "reference": (True, "pure torch, always available (the oracle; float64-capable)"),
        "cpu": _cpu_ext(),
        "triton": _triton(),
        "cuda": _cuda_ext(),
    }


def _runs_on(name: str, device: torch.device) -> Tuple[bool, str]:
    if name == "reference":
        return True, ""
    if name == "cpu":
        if device.type != "cpu":
            return False, f"backend 'cpu' takes CPU tensors, got {device.type} tensors"
        return _cpu_ext()
    if name == "cuda":
        if device.type != "cuda":
            return False, f"backend 'cuda' takes CUDA tensors, got {device.type} tensors"
        return _cuda_ext()
    ok, why = _triton()
    if ok and device.type == "cpu" and not triton_interpreted():
        return False, "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1"
    if ok and device.type not in ("cpu", "cuda"):
        return False, f"backend 'triton' cannot run on {device.type} tensors"
    return ok, why


_BUILTIN_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def resolve(device: torch.device, requested: Optional[str] = None, *, T=None, d=None, K=None,
            dtype=None) -> str:
    """The backend a call on ``device`` uses: ``requested``, else $STEERKERNEL_BACKEND, else
    the dispatch table's choice for the call's shape (``T`` rows of width ``d``, ``K``
    concepts, residual ``dtype``; any of them None = not known), then the built-in order.

    Cheap enough for every call (a dict lookup per distinct shape once the backends are
    probed) and reads no tensor data, so it traces under torch.compile."""
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")
        ok, why = _runs_on(name, device)
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is unavailable: {why}")
        return name
    kind = device.type
    # T only when the caller opted out of batch invariance (dispatch.by_batch_size): the
    # backends differ in their last bits, so a T-dependent choice would make a row's scores
    # depend on the rows it shares a call with.
    T_key = T if dispatch.by_batch_size() else None
    for cand in dispatch.active().choose(kind, T_key, d, K, dtype):
        if _runs_on(cand, device)[0]:
            return cand
    for cand in _BUILTIN_ORDER.get(kind, ()):
        if _runs_on(cand, device)[0]:
            return cand
    return "reference"


def dispatch_table() -> dict:
    """The active dispatch table, for ``steerkernel doctor`` (:meth:`.dispatch.Table.describe`)."""
    return dispatch.active().describe()


_PROBES = {"cpu": _cpu_ext, "cuda": _cuda_ext, "triton": _triton}


def op_for(name: str):
    """The torch op overload that implements backend ``name`` (loading the backend first).

    Raises :class:`BackendUnavailable` when it cannot run here."""
    op = library.registered_op(name)
    if op is None:
        if name not in _PROBES:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
        ok, why = _PROBES[name]()
        op = library.registered_op(name)
        if not ok or op is None:
            raise BackendUnavailable(f"backend {name!r} is unavailable: {why}")
    return op


library.set_chooser(resolve)
