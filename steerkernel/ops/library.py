"""torch.library registration of every junction backend.

Ops (all mutate their outputs in place and return nothing, so a captured CUDA graph or a
``torch.compile``d model sees static buffers):

* ``steerkernel::junction``            C++ op: CPU kernel from ``steerkernel._C``, CUDA kernel
                                       from ``steerkernel._C_cuda`` (schema defined in csrc/).
* ``steerkernel::junction_reference``  the pure-torch oracle (any device, float64 too).
* ``steerkernel::junction_triton``     the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

All three share one argument list, in this order (see ``SCHEMA``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import junction_reference_

#: The schema every junction backend shares.  csrc/ops.cpp defines the C++ op with this text.
SCHEMA = (
    "(Tensor(a!) residual, Tensor V, Tensor? x, Tensor? slot, Tensor? shift, Tensor? lo, "
    "Tensor? hi, Tensor? gate_concept, Tensor? gate_threshold, Tensor? gate_above, "
    "Tensor(b!)? latch, Tensor? weight, float eps, Tensor(c!) scores, Tensor(d!) norms, "
    "Tensor(e!)? out) -> ()"
)
MUTATED = ("residual", "latch", "scores", "norms", "out")

_lib = torch.library.Library("steerkernel", "FRAGMENT")
_lib.define("junction_reference" + SCHEMA)
_lib.define("junction_triton" + SCHEMA)
_lib.impl("junction_reference", junction_reference_, "CompositeExplicitAutograd")


def _junction_triton(*args) -> None:
    from ..backends.triton_junction import junction_triton_

    junction_triton_(*args)


# Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
_lib.impl("junction_triton", _junction_triton, "CUDA")
_lib.impl("junction_triton", _junction_triton, "CPU")


def _fake(
    residual: Tensor, V: Tensor, x: Optional[Tensor], slot: Optional[Tensor],
    shift: Optional[Tensor], lo: Optional[Tensor], hi: Optional[Tensor],
    gate_concept: Optional[Tensor], gate_threshold: Optional[Tensor],
    gate_above: Optional[Tensor], latch: Optional[Tensor], weight: Optional[Tensor],
    eps: float, scores: Tensor, norms: Tensor, out: Optional[Tensor],
) -> None:
    """Fake (meta) implementation: the ops only write into buffers they were given.

    It also runs as the ops' Meta kernel, which the dispatcher picks whenever *any* argument is
    a meta tensor, so a raw call mixing a meta tensor with CPU / CUDA tensors lands here: that
    is refused (as the real kernels refuse mixed devices) instead of silently doing nothing.
    All-meta calls and fake tensors on one device (torch.compile tracing) pass.
    """
    device = residual.device
    for name, t in (("V", V), ("x", x), ("slot", slot), ("shift", shift), ("lo", lo),
                    ("hi", hi), ("gate_concept", gate_concept),
                    ("gate_threshold", gate_threshold), ("gate_above", gate_above),
                    ("latch", latch), ("weight", weight), ("scores", scores), ("norms", norms),
                    ("out", out)):
        if t is not None and t.device != device:
            raise RuntimeError(
                f"steerkernel.junction: {name} is on {t.device} but residual is on {device}; "
                "all tensors must be on one device (meta tensors only in all-meta calls or "
                "fake-tensor tracing)")
    return None


for _name in ("junction_reference", "junction_triton"):
    torch.library.register_fake("steerkernel::" + _name, _fake, lib=_lib)

_native_fake_registered = False


def register_native_fake() -> None:
    """Register the fake impl of the C++ op once ``steerkernel._C`` has defined it."""
    global _native_fake_registered
    if not _native_fake_registered:
        torch.library.register_fake("steerkernel::junction", _fake, lib=_lib)
        _native_fake_registered = True
