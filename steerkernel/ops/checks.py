"""Validation of junction calls, shared by the public op and the raw Triton op.

* :func:`check_structure` — types, devices, shapes, dtypes, strides and which arguments go
  together (metadata only: no device sync, fine on fake tensors).  The public op calls it on
  what the caller passed; the raw Triton op on its complete argument list (``complete=True``,
  the same checks csrc/checks.cpp makes for the C++ op).
* :func:`check_grad`, :func:`check_values`, :func:`check_aliasing` — what only the public op
  checks: autograd, table contents and slot ranges (read on the host), memory overlaps.

Failures raise ``TypeError`` / ``ValueError`` naming the argument (``RuntimeError`` for raw
calls), always before anything is written.
"""
from __future__ import annotations

import math
from typing import FrozenSet, NamedTuple, Tuple

import torch
from torch import Tensor

from .args import ARGS, TENSOR_NAMES, WRITTEN, JunctionArgs

MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: eps is added in float32 by the kernels: a nonzero eps must survive that conversion
FLOAT32_TRUE_MIN = 2.0 ** -149  # smallest positive (subnormal) float32, about 1.4e-45
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class Dims(NamedTuple):
    """Sizes of a validated call: ``T`` rows of ``d``, ``K`` concepts (0 without V), ``P``
    slots (0 without slot)."""

    T: int
    d: int
    K: int
    P: int


def fail(msg: str, kind=ValueError):
    raise kind(f"steerkernel.junction: {msg}")


def check_tensor(name: str, t, device: torch.device, ndim: int) -> None:
    if not isinstance(t, Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.device != device:
        fail(f"{name} is on {t.device} but residual is on {device}")
    if t.dim() != ndim:
        fail(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_rows(name: str, t: Tensor) -> None:
    """A [T, d] tensor whose rows are contiguous and do not overlap."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        fail(f"{name} must have unit stride along its last dim (got strides {t.stride()}); "
             "call .contiguous() first")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        fail(f"{name} has overlapping rows (strides {t.stride()})")


def _check_table(name: str, t, device, shape, dtype) -> None:
    check_tensor(name, t, device, len(shape))
    if tuple(t.shape) != tuple(shape):
        fail(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        fail(f"{name} must be {dtype}, got {t.dtype}", TypeError)
    if not t.is_contiguous():
        fail(f"{name} must be contiguous")


def check_structure(a: JunctionArgs, dtypes: Tuple[torch.dtype, ...], *,
                    complete: bool = False) -> Dims:
    """Check the metadata of a call; returns its :class:`Dims`.

    ``dtypes``: the residual dtypes the backend takes.  ``complete=False`` (the public op)
    lets the buffers that :func:`steerkernel.ops.junction.prepare_junction` fills in be None:
    some of shift / lo / hi, gate_above, scores, norms, out.  ``complete=True`` (a raw op
    call) requires every buffer the kernels read or write and raises ``RuntimeError``.
    With no slot, the tables, gates and latch are not looked at (the call only monitors).
    """
    try:
        return _check_structure(a, dtypes, complete)
    except (TypeError, ValueError) as e:
        if not complete:
            raise
        raise RuntimeError(str(e)) from None


def _check_structure(a: JunctionArgs, dtypes, complete: bool) -> Dims:
    residual = a.residual
    if not isinstance(residual, Tensor):
        fail(f"residual must be a torch.Tensor, got {type(residual).__name__}", TypeError)
    device = residual.device
    check_tensor("residual", residual, device, 2)
    T, d = residual.shape
    if residual.dtype not in dtypes:
        fail(f"residual dtype {residual.dtype} is not supported by this backend "
             f"(supported: {', '.join(str(t) for t in dtypes)})", TypeError)
    if d == 0:
        fail("residual has hidden size 0")
    _check_rows("residual", residual)
    acc = torch.float64 if residual.dtype == torch.float64 else torch.float32

    K = 0
    if a.V is not None:
        V = a.V
        check_tensor("V", V, device, 2)
        if V.shape[1] != d:
            fail(f"V has hidden size {V.shape[1]} but residual has {d} (V must be [K, d])")
        K = V.shape[0]
        if K == 0:
            fail("V has no concepts (K = 0); pass V=None for a plain add + RMSNorm")
        if V.dtype not in (torch.float32, residual.dtype):
            fail(f"V must be float32 or the residual's dtype {residual.dtype}, got {V.dtype}",
                 TypeError)
        if not V.is_contiguous():
            fail("V must be contiguous")

    if a.x is not None:
        check_tensor("x", a.x, device, 2)
        if tuple(a.x.shape) != (T, d):
            fail(f"x has shape {tuple(a.x.shape)} but residual has {(T, d)}")
        if a.x.dtype != residual.dtype:
            fail(f"x is {a.x.dtype} but residual is {residual.dtype}", TypeError)
        _check_rows("x", a.x)

    P = 0
    if a.slot is not None:
        if a.V is None:
            fail("slot given without V: steering acts along V's directions")
        check_tensor("slot", a.slot, device, 1)
        if a.slot.dtype != torch.int32:
            fail(f"slot must be int32, got {a.slot.dtype}", TypeError)
        if a.slot.shape[0] != T:
            fail(f"slot has {a.slot.shape[0]} entries but residual has {T} rows")
        if not a.slot.is_contiguous():
            fail("slot must be contiguous")
        tables = (("shift", a.shift), ("lo", a.lo), ("hi", a.hi))
        given = [t for _, t in tables if t is not None]
        if not given:
            fail("slot given without any of shift / lo / hi: nothing to apply")
        if complete and len(given) < 3:
            fail("slot needs shift, lo and hi")
        if not isinstance(given[0], Tensor) or given[0].dim() != 2:
            fail("shift / lo / hi must be 2-D [P, K] tensors")
        P = given[0].shape[0]
        if P == 0:
            fail("intervention tables have no slots (P = 0)")
        for name, t in tables:
            if t is not None:
                _check_table(name, t, device, (P, K), torch.float32)
        if a.gate_concept is not None:
            _check_table("gate_concept", a.gate_concept, device, (P,), torch.int32)
            if a.gate_threshold is None:
                fail("gate_concept given without gate_threshold")
            _check_table("gate_threshold", a.gate_threshold, device, (P,), torch.float32)
            if a.gate_above is not None:
                _check_table("gate_above", a.gate_above, device, (P,), torch.bool)
            elif complete:
                fail("a gate needs gate_threshold and gate_above")
        elif a.gate_threshold is not None or a.gate_above is not None:
            fail("gate_threshold / gate_above given without gate_concept")
        if a.latch is not None:
            if a.gate_concept is None:
                fail("latch given without a gate (gate_concept)")
            _check_table("latch", a.latch, device, (P,), torch.int32)

    if a.weight is not None:
        check_tensor("weight", a.weight, device, 1)
        if a.weight.shape[0] != d:
            fail(f"weight has {a.weight.shape[0]} entries but hidden size is {d}")
        if a.weight.dtype not in (torch.float32, residual.dtype):
            fail(f"weight must be float32 or {residual.dtype}, got {a.weight.dtype}",
                 TypeError)
        if not a.weight.is_contiguous():
            fail("weight must be contiguous")
    eps = a.eps
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        fail(f"eps must be a finite float >= 0, got {eps!r}")
    if eps > FLOAT32_MAX or 0 < eps < FLOAT32_TRUE_MIN:
        # the kernels add eps in float32: 1e-46 would become 0 there (an all-zero row gives
        # NaN where the float64 reference gives 0), 1e39 would become inf
        fail(f"eps must be 0 or within float32's range [{FLOAT32_TRUE_MIN:.4g}, "
             f"{FLOAT32_MAX:.4g}], got {eps!r}")

    if a.scores is not None:
        if a.V is None:
            fail("scores given without V: there are no concepts to score")
        check_tensor("scores", a.scores, device, 2)
        if tuple(a.scores.shape) != (T, K):
            fail(f"scores must have shape {(T, K)}, got {tuple(a.scores.shape)}")
        if a.scores.dtype != acc:
            fail(f"scores must be {acc}, got {a.scores.dtype}", TypeError)
    elif complete and a.V is not None:
        fail("V given without scores: the readout needs its buffer")
    if a.norms is not None:
        check_tensor("norms", a.norms, device, 1)
        if a.norms.shape[0] != T:
            fail(f"norms must have shape {(T,)}, got {tuple(a.norms.shape)}")
        if a.norms.dtype != acc:
            fail(f"norms must be {acc}, got {a.norms.dtype}", TypeError)
    elif complete:
        fail("norms is required")
    if a.out is not None:
        if a.weight is None:
            fail("out given without weight: the fused RMSNorm needs its weight")
        check_tensor("out", a.out, device, 2)
        if tuple(a.out.shape) != (T, d):
            fail(f"out must have shape {(T, d)}, got {tuple(a.out.shape)}")
        if a.out.dtype != residual.dtype:
            fail(f"out must be {residual.dtype}, got {a.out.dtype}", TypeError)
        _check_rows("out", a.out)
    return Dims(T, d, K, P)


def check_grad(a: JunctionArgs) -> None:
    """No written tensor may require grad: the op writes in place and has no autograd formula."""
    for name in ("residual", "scores", "norms", "out"):  # (latch is int32: never)
        t = getattr(a, name)
        if t is not None and t.requires_grad:
            fail(f"{name} requires grad, but the op writes it in place and has no autograd "
                 f"formula (inference only); pass {name}.detach() or a tensor that does not "
                 "require grad")


def check_values(a: JunctionArgs, dims: Dims) -> None:
    """Slot and gate-concept ranges and table contents (read on the host: a sync on CUDA)."""
    if a.slot is None:
        return
    T, _, K, P = dims
    if T and (int(a.slot.min()) < 0 or int(a.slot.max()) >= P):
        fail(f"slot values must lie in [0, {P}), got range "
             f"[{int(a.slot.min())}, {int(a.slot.max())}]")
    if torch.isnan(a.shift).any() or torch.isinf(a.shift).any():
        fail("shift must be finite")
    if torch.isnan(a.lo).any() or torch.isnan(a.hi).any():
        fail("lo / hi must not be NaN (use -inf / +inf for no bound)")
    if a.gate_concept is not None:
        gmin, gmax = int(a.gate_concept.min()), int(a.gate_concept.max())
        if gmin < -1 or gmax >= K:
            fail(f"gate_concept values must lie in [-1, {K}) (-1 = ungated), got "
                 f"range [{gmin}, {gmax}]")
        if torch.isnan(a.gate_threshold).any():
            fail("gate_threshold must not be NaN")


# ----------------------------------------------------------------------------- aliasing
#: Pairs of arguments that may be the *same* view (same address, shape and strides): ``x`` may
#: be the residual (``residual += residual``) and ``out`` may be ``x`` (each row of ``x`` is read
#: before that row of ``out`` is written, as in vLLM's in-place fused add + RMSNorm).  Any other
#: sharing that involves a written tensor, and any partial overlap, is rejected.
_SAME_VIEW_OK = (frozenset(("x", "residual")), frozenset(("out", "x")))
#: Of two written tensors that overlap, the message names first the one a caller most likely
#: misplaced: the outputs in this order, the residual last.
_BLAME_ORDER = ("out", "scores", "norms", "latch", "residual")
_POSITION = {a.name: i for i, a in enumerate(ARGS)}


def _byte_span(t: Tensor) -> Tuple[int, int]:
    """``[start, end)`` bytes that a non-empty tensor's elements lie in."""
    start = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _blocks(t: Tensor):
    """``(period, width)`` in bytes: ``t``'s elements lie in blocks of ``width`` bytes that
    start every ``period`` bytes from its first element (``period`` None: one dense block).
    ``t`` does not overlap itself (checked before)."""
    dims = [(s, n) for n, s in zip(t.shape, t.stride()) if n > 1]
    esz = t.element_size()
    span = sum((n - 1) * s for s, n in dims) + 1
    if span == t.numel():
        return None, span * esz
    s_out, n_out = max(dims)
    return s_out * esz, (span - (n_out - 1) * s_out) * esz


def _disjoint_blocks(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors whose byte ranges intersect share no byte, when their blocks repeat
    with one period (e.g. column slices of one row-major buffer, or a dense tensor in the gap
    between such slices): then the answer is exact (blocks disjoint modulo the period).  Views
    that interleave with different periods are reported as overlapping (conservative)."""
    (sa, wa), (sb, wb) = _blocks(a), _blocks(b)
    S = sa or sb
    if S is None or (sa and sb and sa != sb) or wa > S or wb > S:
        return False
    gap = (b.data_ptr() - a.data_ptr()) % S
    return gap >= wa and S - gap >= wb


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _check_no_self_overlap(a: JunctionArgs) -> None:
    """``scores`` and ``norms`` may be any strided views, but each element needs its own
    memory (``residual``, ``x`` and ``out`` rows were checked by layout; the rest are
    contiguous)."""
    if a.scores is not None:
        (n0, n1), (s0, s1) = a.scores.shape, a.scores.stride()
        if (n0 > 1 and s0 == 0) or (n1 > 1 and s1 == 0) or (
                n0 > 1 and n1 > 1 and (s0 < (n1 - 1) * s1 + 1 if s0 >= s1
                                       else s1 < (n0 - 1) * s0 + 1)):
            fail(f"scores overlaps itself in memory (shape {(n0, n1)}, strides {(s0, s1)}, "
                 "e.g. an expanded view): each score needs its own element")
    if a.norms is not None and a.norms.shape[0] > 1 and a.norms.stride(0) == 0:
        fail("norms overlaps itself in memory (stride 0, e.g. an expanded view): each "
             "row's norm needs its own element")


def check_aliasing(a: JunctionArgs, fresh: FrozenSet[str] = frozenset()) -> None:
    """Reject every memory sharing that makes the op ill-defined, before anything is written.

    ``fresh``: arguments :func:`~steerkernel.ops.junction.prepare_junction` allocated (they
    share nothing).  Pure address arithmetic on byte ranges (no storage objects, no device
    sync; a few µs): no written tensor may share a byte with any other argument, except the
    identical views of :data:`_SAME_VIEW_OK`.  Ranges that intersect only because two views
    interleave in one buffer (e.g. ``scores = buf[:, :K]`` and ``norms = buf[:, K]``) are
    accepted.  Layout checks ran before; needs ``T > 0``.
    """
    _check_no_self_overlap(a)
    spans = []
    for name in TENSOR_NAMES:
        t = getattr(a, name)
        if t is not None and name not in fresh:
            spans.append((*_byte_span(t), _POSITION[name], name))
    spans.sort()
    reach = 0
    for start, end, _, _ in spans:
        if start < reach:
            break  # some ranges intersect: look closer
        reach = max(reach, end)
    else:
        return
    for n, (_, end, _, an) in enumerate(spans):
        for start, _, _, bn in spans[n + 1:]:
            if start >= end:
                break  # sorted by start: every later span begins even later
            aw, bw = an in WRITTEN, bn in WRITTEN
            if not (aw or bw):
                continue  # two inputs may share memory: both are only read
            ta, tb = getattr(a, an), getattr(a, bn)
            if frozenset((an, bn)) in _SAME_VIEW_OK and _same_view(ta, tb):
                continue
            if _disjoint_blocks(ta, tb):
                continue
            if aw and bw:
                w, r = sorted((an, bn), key=_BLAME_ORDER.index)
            else:
                w, r = (an, bn) if aw else (bn, an)
            why = "both are written" if aw and bw else f"{w} is written while {r} is read"
            fail(f"{w} overlaps {r} in memory ({why}); pass separate buffers")
