"""torch.library registration of the junction ops, and the registry of backend implementations.

Ops (all mutate their outputs in place and return nothing, so a captured CUDA graph or a
``torch.compile``d model sees static buffers), all with the schema of :mod:`.args`:

* ``steerkernel::junction``            C++ op, defined by the native extension (csrc/ops.cpp):
                                       its CPU kernel and, from the CUDA extension, its CUDA one.
* ``steerkernel::junction_reference``  the pure-torch oracle (any device, float64 too), here.
* ``steerkernel::junction_triton``     the Triton kernel; defined here, implemented by
                                       :mod:`steerkernel.backends.triton_junction` when it loads.

The registry points the other way than the imports: :mod:`steerkernel.backends` (which imports
this package, never the reverse) registers each backend's op when that backend loads
(:func:`register_backend`) and installs its chooser (:func:`set_chooser`) when it is imported,
which importing the ``steerkernel`` package always does.  The public
:func:`steerkernel.ops.junction` asks the chooser for a backend and runs its registered op.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Set, Tuple

import torch

from .args import SCHEMA, TENSOR_NAMES, JunctionArgs
from .reference import junction_reference_

_lib = torch.library.Library("steerkernel", "FRAGMENT")
_lib.define("junction_reference" + SCHEMA)
_lib.define("junction_triton" + SCHEMA)


def _reference_kernel(*args) -> None:
    """The oracle run as a kernel: under inference mode, like the C++ and Triton kernels it
    records no autograd history on the buffers it writes (an ``x`` or ``V`` that requires grad
    would otherwise give ``residual`` a grad_fn) and may write inference-mode buffers."""
    with torch.inference_mode():
        junction_reference_(*args)


_lib.impl("junction_reference", _reference_kernel, "CompositeExplicitAutograd")


def _fake(*args, **kwargs) -> None:
    """Fake (meta) implementation: the ops only write into buffers they were given.

    It also runs as the ops' Meta kernel, which the dispatcher picks whenever *any* argument is
    a meta tensor, so a raw call mixing a meta tensor with CPU / CUDA tensors lands here: that
    is refused (as the real kernels refuse mixed devices) instead of silently doing nothing.
    All-meta calls and fake tensors on one device (torch.compile tracing) pass.
    """
    call = JunctionArgs(*args, **kwargs)
    device = call.residual.device
    for name in TENSOR_NAMES[1:]:
        t = getattr(call, name)
        if t is not None and t.device != device:
            raise RuntimeError(
                f"steerkernel.junction: {name} is on {t.device} but residual is on {device}; "
                "all tensors must be on one device (meta tensors only in all-meta calls or "
                "fake-tensor tracing)")
    return None


_FAKES: Set[str] = set()


def _register_fake(qualname: str) -> None:
    if qualname not in _FAKES:
        torch.library.register_fake(qualname, _fake, lib=_lib)
        _FAKES.add(qualname)


_register_fake("steerkernel::junction_reference")
_register_fake("steerkernel::junction_triton")

# ----------------------------------------------------------------------------- registry
_BACKEND_OPS: Dict[str, torch._ops.OpOverload] = {
    "reference": torch.ops.steerkernel.junction_reference.default}


def register_backend(name: str, op: torch._ops.OpOverload) -> None:
    """Make ``op`` (a junction op overload with this module's schema) backend ``name``'s
    implementation; called by a backend when it loads.  Gives the op its fake implementation
    if it has none yet (the C++ op is defined by the native extension).  Raises
    ``RuntimeError`` for an op with another schema (e.g. an extension built from other
    sources)."""
    if str(op._schema) != f"{op._schema.name}{SCHEMA}":
        raise RuntimeError(f"{op._schema.name} has the schema {op._schema}, not the junction "
                           f"arguments {SCHEMA} (steerkernel/ops/args.py)")
    _register_fake(op._schema.name)
    _BACKEND_OPS[name] = op


def registered_op(name: str) -> Optional[torch._ops.OpOverload]:
    """The op of backend ``name``, or None when that backend has not loaded (yet)."""
    return _BACKEND_OPS.get(name)


#: ``chooser(device, requested) -> backend name``, installed by steerkernel.backends
_CHOOSER: Optional[Callable[[torch.device, Optional[str]], str]] = None


def set_chooser(chooser: Callable[[torch.device, Optional[str]], str]) -> None:
    """Install the function that picks a call's backend (:func:`steerkernel.backends.resolve`:
    it loads, and so registers, the backend it returns)."""
    global _CHOOSER
    _CHOOSER = chooser


@torch.compiler.assume_constant_result
def _choose_at_trace_time(device_type: str, index: Optional[int], requested: Optional[str]
                          ) -> str:
    """The chooser run by torch.compile at trace time, its answer a constant of the graph: the
    first call of a process may come from compiled code, where probing a backend (loading the
    extension, reading files) cannot be traced."""
    device = torch.device(device_type) if index is None else torch.device(device_type, index)
    return _CHOOSER(device, requested)


def choose_backend(device: torch.device, requested: Optional[str] = None
                   ) -> Tuple[str, torch._ops.OpOverload]:
    """``(name, op)`` of the backend a call on ``device`` uses (``requested`` if given)."""
    if _CHOOSER is None:
        raise RuntimeError("steerkernel.junction: no backend chooser installed; "
                           "import steerkernel.backends (importing steerkernel does)")
    if torch.compiler.is_compiling():  # traced: choose (probe, load, read the table) eagerly
        name = _choose_at_trace_time(device.type, device.index, requested)
    else:
        name = _CHOOSER(device, requested)
    op = _BACKEND_OPS.get(name)
    if op is None:
        raise RuntimeError(f"steerkernel.junction: backend {name!r} was chosen but has not "
                           "registered its op")
    return name, op

