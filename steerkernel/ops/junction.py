"""``steerkernel.ops.junction``: the public, validated entry to the fused junction op.

Every argument is checked (shape, dtype, device, strides, memory aliasing, autograd and, by
default, values; :mod:`.checks`) before any backend runs, so bad input raises a
``ValueError``/``TypeError`` naming the problem and nothing is written.  Hot paths validate
their buffers once with :func:`prepare_junction` and then call the raw op of their backend
(:func:`junction_op`) directly.  The backend comes from the registry in :mod:`.library`, which
:mod:`steerkernel.backends` fills (this layer never imports the backends).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import checks, library
from .args import JunctionArgs
from .checks import MODEL_DTYPES, fail

__all__ = ["junction", "prepare_junction", "junction_op", "PreparedJunction", "MODEL_DTYPES"]


class PreparedJunction(NamedTuple):
    """A validated, completed call: the ``backend`` that runs it, that backend's raw ``op``
    and the op's ``args`` (run it as ``p.op(*p.args)``)."""

    backend: str
    op: object
    args: JunctionArgs


def junction(
    residual: Tensor,
    V: Optional[Tensor],
    x: Optional[Tensor] = None,
    slot: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    lo: Optional[Tensor] = None,
    hi: Optional[Tensor] = None,
    gate_concept: Optional[Tensor] = None,
    gate_threshold: Optional[Tensor] = None,
    gate_above: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    backend: Optional[str] = None,
    *,
    latch: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    norms: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    check_values: bool = True,
) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    """The junction operation of docs/design.md §2 on ``residual``, in place.

    Args:
        residual: ``[T, d]`` fp32/bf16/fp16 (float64 with the reference backend), updated in
            place; rows contiguous, any row stride.
        V: ``[K, d]`` unit concept directions, fp32 or residual's dtype, contiguous; None for
            a plain fused add + RMSNorm (no readout, no steering).
        x: optional ``[T, d]`` sublayer output added to the residual (residual's dtype).
        slot: optional int32 ``[T]``, values in ``[0, P)``; 0 is the identity slot.  Without
            it the call only monitors and the update pass is skipped.
        shift, lo, hi: fp32 ``[P, K]`` per-slot tables (row 0 is never applied).  With a slot,
            missing tables default to 0, -inf and +inf.
        gate_concept: int32 ``[P]``, -1 = ungated.  gate_threshold: fp32 ``[P]``.
            gate_above: bool ``[P]`` (default all True).
        weight: optional ``[d]`` RMSNorm weight (residual's dtype or fp32); gives ``out``.
        eps: RMSNorm epsilon.
        backend: "reference", "cpu", "triton", "cuda" or None (automatic; see
            :mod:`steerkernel.backends`).
        latch: optional int32 ``[P]`` gate latch, updated in place.
        scores, norms, out: optional preallocated outputs (``scores`` may be a strided view of
            a larger monitor buffer).
        check_values: also check slot and gate values and table contents (reads them on the
            host: a sync on CUDA; skipped while torch.compile traces).  Kernels treat
            out-of-range slots as slot 0 regardless.

    Returns:
        ``(scores fp32 [T, K] or None without V, norms fp32 [T], out [T, d] or None)``
        (float64 scores and norms for a float64 residual).

    Memory: no written tensor (``residual``, ``scores``, ``norms``, ``out``, ``latch``) may
    overlap itself or share a byte with another argument, except ``x`` *being* the residual and
    ``out`` *being* ``x`` (the same view); none may require grad (the op is inference-only).
    A meta residual is refused outside torch.compile tracing.
    """
    prepared = prepare_junction(
        residual, V, x, slot, shift, lo, hi, gate_concept, gate_threshold, gate_above, weight,
        eps, backend, latch=latch, scores=scores, norms=norms, out=out,
        check_values=check_values)
    call = prepared.args
    if residual.shape[0] > 0:
        prepared.op(*call)
    return call.scores, call.norms, call.out


def prepare_junction(residual, V, x=None, slot=None, shift=None, lo=None, hi=None,
                     gate_concept=None, gate_threshold=None, gate_above=None, weight=None,
                     eps=1e-6, backend=None, *, latch=None, scores=None, norms=None, out=None,
                     check_values=True) -> PreparedJunction:
    """Validate and complete the arguments of :func:`junction` (same signature).

    Returns the :class:`PreparedJunction` to run: missing tables, ``gate_above`` and outputs
    allocated; with no slot, the tables, gates and latch dropped.  Raises before anything is
    written.
    """
    if not isinstance(residual, Tensor):
        fail(f"residual must be a torch.Tensor, got {type(residual).__name__}", TypeError)
    device = residual.device
    checks.check_tensor("residual", residual, device, 2)
    name, op = library.choose_backend(device, backend)
    # traced (torch.compile, or fake tensors under export / make_fx): no data to check
    tracing = torch.compiler.is_compiling() or (type(residual) is not Tensor
                                                and is_fake(residual))
    if device.type == "meta" and not tracing:
        fail("residual is on the meta device: meta tensors carry no data, so the op cannot run "
             "on them (they are only valid through torch.compile / fake-tensor tracing, which "
             "uses the op's fake implementation); pass real CPU or CUDA tensors")
    given = JunctionArgs(residual=residual, V=V, x=x, slot=slot, shift=shift, lo=lo, hi=hi,
                         gate_concept=gate_concept, gate_threshold=gate_threshold,
                         gate_above=gate_above, latch=latch, weight=weight, eps=eps,
                         scores=scores, norms=norms, out=out)
    dtypes = MODEL_DTYPES + ((torch.float64,) if name == "reference" else ())
    dims = checks.check_structure(given, dtypes)
    call, fresh = _complete(given, dims)
    checks.check_grad(call)
    if check_values and not tracing:
        checks.check_values(call, dims)
    if dims.T and not tracing:
        checks.check_aliasing(call, fresh)
    return PreparedJunction(name, op, call)


def _complete(a: JunctionArgs, dims) -> Tuple[JunctionArgs, frozenset]:
    """``a`` with the buffers the caller left out allocated (and, without a slot, the tables,
    gates and latch dropped); also the names of the arguments allocated here."""
    T, d, K, P = dims
    dev = a.residual.device
    acc = torch.float64 if a.residual.dtype == torch.float64 else torch.float32
    fill = {}
    if a.slot is None:
        fill.update(shift=None, lo=None, hi=None, gate_concept=None, gate_threshold=None,
                    gate_above=None, latch=None)
    else:
        if a.shift is None:
            fill["shift"] = torch.zeros(P, K, device=dev, dtype=torch.float32)
        if a.lo is None:
            fill["lo"] = torch.full((P, K), -math.inf, device=dev, dtype=torch.float32)
        if a.hi is None:
            fill["hi"] = torch.full((P, K), math.inf, device=dev, dtype=torch.float32)
        if a.gate_concept is not None and a.gate_above is None:
            fill["gate_above"] = torch.ones(P, device=dev, dtype=torch.bool)
    if a.V is not None and a.scores is None:
        fill["scores"] = torch.empty(T, K, device=dev, dtype=acc)
    if a.norms is None:
        fill["norms"] = torch.empty(T, device=dev, dtype=acc)
    if a.weight is not None and a.out is None:
        fill["out"] = torch.empty(T, d, device=dev, dtype=a.residual.dtype)
    return a._replace(eps=float(a.eps), **fill), frozenset(fill)


def junction_op(backend: Optional[str] = None, device: torch.device = torch.device("cpu")):
    """The raw torch op (no validation) that ``backend`` resolves to on ``device``."""
    return library.choose_backend(device, backend)[1]
