"""``steerkernel.ops.junction``: the public, validated entry to the fused junction op.

Every argument is checked (shape, dtype, device, strides, memory aliasing, autograd and, by
default, values) before any backend runs, so bad input raises a ``ValueError``/``TypeError``
naming the problem and nothing is written.  Hot paths that have already validated their
buffers call :func:`junction_op` (the raw torch op of a backend) directly.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .. import backends

MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(msg: str, kind=ValueError):
    raise kind(f"steerkernel.junction: {msg}")


def _check_tensor(name: str, t, device: torch.device, ndim: int) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.device != device:
        _fail(f"{name} is on {t.device} but residual is on {device}")
    if t.dim() != ndim:
        _fail(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_rows(name: str, t: Tensor) -> None:
    """A [T, d] tensor whose rows are contiguous and do not overlap."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        _fail(f"{name} must have unit stride along its last dim (got strides {t.stride()}); "
              "call .contiguous() first")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        _fail(f"{name} has overlapping rows (strides {t.stride()})")


def _check_table(name: str, t, device, shape, dtype) -> None:
    _check_tensor(name, t, device, len(shape))
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        _fail(f"{name} must be {dtype}, got {t.dtype}", TypeError)
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def junction(
    residual: Tensor,
    V: Tensor,
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
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fused residual add, concept readout, per-request steering and RMSNorm, in one pass.

    Per row ``t`` (all arithmetic fp32; the reference backend uses float64)::

        h = residual[t] + x[t]; p = V h; scores[t] = p; norms[t] = ||h||
        s = slot[t]; if s != 0 and gate open: h += Vᵀ (clamp(p + shift[s], lo[s], hi[s]) - p)
        residual[t] = h; out[t] = h * rsqrt(mean(h²) + eps) * weight

    Args:
        residual: ``[T, d]`` fp32/bf16/fp16 (float64 with the reference backend), updated in
            place; rows contiguous, any row stride.
        V: ``[K, d]`` unit concept directions, fp32 or residual's dtype, contiguous.
        x: optional ``[T, d]`` sublayer output added to the residual (residual's dtype).
        slot: optional int32 ``[T]``, values in ``[0, P)``; 0 is the identity slot.  Without
            it the call only monitors and the update pass is skipped.
        shift, lo, hi: fp32 ``[P, K]`` per-slot tables (row 0 is never applied).  With a slot,
            missing tables default to 0, -inf and +inf.
        gate_concept: int32 ``[P]``, concept whose projection gates the slot, -1 = ungated.
        gate_threshold: fp32 ``[P]``.  gate_above: bool ``[P]`` (default all True): the gate
            opens when ``p[c] > threshold`` (above) or ``p[c] < threshold`` (below).
        weight: optional ``[d]`` RMSNorm weight (residual's dtype or fp32); gives ``out``.
        eps: RMSNorm epsilon.
        backend: "reference", "cpu", "triton", "cuda" or None (automatic; see
            :mod:`steerkernel.backends`).
        latch: optional int32 ``[P]`` gate latch, updated in place (CAST semantics: a slot
            whose gate fired once stays steered).
        scores, norms, out: optional preallocated outputs (``scores`` may be a strided view of
            a larger monitor buffer).
        check_values: also check slot and gate values and table contents (reads them on the
            host: a sync on CUDA; skipped while torch.compile traces).  Kernels treat
            out-of-range slots as slot 0 regardless.

    Returns:
        ``(scores fp32 [T, K], norms fp32 [T], out [T, d] or None)`` (float64 scores and norms
        for a float64 residual).

    Memory: no written tensor (``residual``, ``scores``, ``norms``, ``out``, ``latch``) may
    overlap itself or share a byte with another argument, except ``x`` *being* the residual and
    ``out`` *being* ``x`` (the same view); none may require grad (the op is inference-only).
    A meta residual is refused outside torch.compile tracing.
    """
    args = prepare_junction(residual, V, x, slot, shift, lo, hi, gate_concept, gate_threshold,
                            gate_above, weight, eps, backend, latch=latch, scores=scores,
                            norms=norms, out=out, check_values=check_values)
    name, call = args[0], args[1:]
    if residual.shape[0] > 0:
        backends.op_for(name)(*call)
    return call[13], call[14], call[15]


def prepare_junction(residual, V, x=None, slot=None, shift=None, lo=None, hi=None,
                     gate_concept=None, gate_threshold=None, gate_above=None, weight=None,
                     eps=1e-6, backend=None, *, latch=None, scores=None, norms=None, out=None,
                     check_values=True):
    """Validate and complete the arguments of :func:`junction`.

    Returns ``(backend_name, *op_args)`` where ``op_args`` is the shared op argument list
    (see :data:`steerkernel.ops.library.SCHEMA`).  Raises before anything is written.
    """
    if not isinstance(residual, Tensor):
        _fail(f"residual must be a torch.Tensor, got {type(residual).__name__}", TypeError)
    given_bufs = (shift, lo, hi, gate_above, scores, norms, out)
    device = residual.device
    _check_tensor("residual", residual, device, 2)
    T, d = residual.shape
    name = backends.resolve(device, backend)
    # traced (torch.compile, or fake tensors under export / make_fx): no data to check
    tracing = torch.compiler.is_compiling() or (type(residual) is not Tensor
                                                and is_fake(residual))
    if device.type == "meta" and not tracing:
        _fail("residual is on the meta device: meta tensors carry no data, so the op cannot run "
              "on them (they are only valid through torch.compile / fake-tensor tracing, which "
              "uses the op's fake implementation); pass real CPU or CUDA tensors")
    allowed = MODEL_DTYPES + ((torch.float64,) if name == "reference" else ())
    if residual.dtype not in allowed:
        _fail(f"residual dtype {residual.dtype} is not supported by backend {name!r} "
              f"(supported: {', '.join(str(t) for t in allowed)})", TypeError)
    if d == 0:
        _fail("residual has hidden size 0")
    _check_rows("residual", residual)
    acc = torch.float64 if residual.dtype == torch.float64 else torch.float32

    _check_tensor("V", V, device, 2)
    K = V.shape[0]
    if V.shape[1] != d:
        _fail(f"V has hidden size {V.shape[1]} but residual has {d} (V must be [K, d])")
    if K == 0:
        _fail("V has no concepts (K = 0)")
    if V.dtype not in (torch.float32, residual.dtype):
        _fail(f"V must be float32 or the residual's dtype {residual.dtype}, got {V.dtype}",
              TypeError)
    if not V.is_contiguous():
        _fail("V must be contiguous")

    if x is not None:
        _check_tensor("x", x, device, 2)
        if tuple(x.shape) != (T, d):
            _fail(f"x has shape {tuple(x.shape)} but residual has {(T, d)}")
        if x.dtype != residual.dtype:
            _fail(f"x is {x.dtype} but residual is {residual.dtype}", TypeError)
        _check_rows("x", x)

    if slot is not None:
        _check_tensor("slot", slot, device, 1)
        if slot.dtype != torch.int32:
            _fail(f"slot must be int32, got {slot.dtype}", TypeError)
        if slot.shape[0] != T:
            _fail(f"slot has {slot.shape[0]} entries but residual has {T} rows")
        if not slot.is_contiguous():
            _fail("slot must be contiguous")
        given = [t for t in (shift, lo, hi) if t is not None]
        if not given:
            _fail("slot given without any of shift / lo / hi: nothing to apply")
        first = given[0]
        if not isinstance(first, Tensor) or first.dim() != 2:
            _fail("shift / lo / hi must be 2-D [P, K] tensors")
        P = first.shape[0]
        if P == 0:
            _fail("intervention tables have no slots (P = 0)")
        for tname, t in (("shift", shift), ("lo", lo), ("hi", hi)):
            if t is not None:
                _check_table(tname, t, device, (P, K), torch.float32)
        if shift is None:
            shift = torch.zeros(P, K, device=device, dtype=torch.float32)
        if lo is None:
            lo = torch.full((P, K), -math.inf, device=device, dtype=torch.float32)
        if hi is None:
            hi = torch.full((P, K), math.inf, device=device, dtype=torch.float32)
        if gate_concept is not None:
            _check_table("gate_concept", gate_concept, device, (P,), torch.int32)
            if gate_threshold is None:
                _fail("gate_concept given without gate_threshold")
            _check_table("gate_threshold", gate_threshold, device, (P,), torch.float32)
            if gate_above is None:
                gate_above = torch.ones(P, device=device, dtype=torch.bool)
            _check_table("gate_above", gate_above, device, (P,), torch.bool)
        elif gate_threshold is not None or gate_above is not None:
            _fail("gate_threshold / gate_above given without gate_concept")
        if latch is not None:
            if gate_concept is None:
                _fail("latch given without a gate (gate_concept)")
            _check_table("latch", latch, device, (P,), torch.int32)
        if check_values and not tracing:
            if T and (int(slot.min()) < 0 or int(slot.max()) >= P):
                _fail(f"slot values must lie in [0, {P}), got range "
                      f"[{int(slot.min())}, {int(slot.max())}]")
            if torch.isnan(shift).any() or torch.isinf(shift).any():
                _fail("shift must be finite")
            if torch.isnan(lo).any() or torch.isnan(hi).any():
                _fail("lo / hi must not be NaN (use -inf / +inf for no bound)")
            if gate_concept is not None:
                gmin, gmax = int(gate_concept.min()), int(gate_concept.max())
                if gmin < -1 or gmax >= K:
                    _fail(f"gate_concept values must lie in [-1, {K}) (-1 = ungated), got "
                          f"range [{gmin}, {gmax}]")
                if torch.isnan(gate_threshold).any():
                    _fail("gate_threshold must not be NaN")
    else:
        # Monitoring only: tables, gates and latch are not used; drop them.
        shift = lo = hi = gate_concept = gate_threshold = gate_above = latch = None

    if weight is not None:
        _check_tensor("weight", weight, device, 1)
        if weight.shape[0] != d:
            _fail(f"weight has {weight.shape[0]} entries but hidden size is {d}")
        if weight.dtype not in (torch.float32, residual.dtype):
            _fail(f"weight must be float32 or {residual.dtype}, got {weight.dtype}", TypeError)
        if not weight.is_contiguous():
            _fail("weight must be contiguous")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        _fail(f"eps must be a finite float >= 0, got {eps!r}")

    if scores is None:
        scores = torch.empty(T, K, device=device, dtype=acc)
    else:
        _check_tensor("scores", scores, device, 2)
        if tuple(scores.shape) != (T, K):
            _fail(f"scores must have shape {(T, K)}, got {tuple(scores.shape)}")
        if scores.dtype != acc:
            _fail(f"scores must be {acc}, got {scores.dtype}", TypeError)
    if norms is None:
        norms = torch.empty(T, device=device, dtype=acc)
    else:
        _check_tensor("norms", norms, device, 1)
        if norms.shape[0] != T:
            _fail(f"norms must have shape {(T,)}, got {tuple(norms.shape)}")
        if norms.dtype != acc:
            _fail(f"norms must be {acc}, got {norms.dtype}", TypeError)
    if weight is None:
        if out is not None:
            _fail("out given without weight: the fused RMSNorm needs its weight")
    elif out is None:
        out = torch.empty(T, d, device=device, dtype=residual.dtype)
    else:
        _check_tensor("out", out, device, 2)
        if tuple(out.shape) != (T, d):
            _fail(f"out must have shape {(T, d)}, got {tuple(out.shape)}")
        if out.dtype != residual.dtype:
            _fail(f"out must be {residual.dtype}, got {out.dtype}", TypeError)
        _check_rows("out", out)
    if (residual.requires_grad or scores.requires_grad or norms.requires_grad
            or (out is not None and out.requires_grad)):  # (latch is int32: never)
        wname = next(n for n, t in (("residual", residual), ("scores", scores),
                                    ("norms", norms), ("out", out))
                     if t is not None and t.requires_grad)
        _fail(f"{wname} requires grad, but the op writes it in place and has no autograd "
              f"formula (inference only); pass {wname}.detach() or a tensor that does not "
              "require grad")
    if T and not tracing:
        # only what the caller passed: the buffers allocated above are fresh
        u_shift, u_lo, u_hi, u_above, u_scores, u_norms, u_out = given_bufs
        if slot is None:
            u_shift = u_lo = u_hi = u_above = None
        _check_aliasing(T, d, (residual, u_out, u_scores, u_norms, latch, x, V, slot, weight,
                               u_shift, u_lo, u_hi, gate_concept, gate_threshold, u_above))

    return (name, residual, V, x, slot, shift, lo, hi, gate_concept, gate_threshold,
            gate_above, latch, weight, float(eps), scores, norms, out)


#: Pairs of arguments that may be the *same* view (same address, shape and strides): ``x`` may
#: be the residual (``residual += residual``) and ``out`` may be ``x`` (each row of ``x`` is read
#: before that row of ``out`` is written, as in vLLM's in-place fused add + RMSNorm).  Any other
#: sharing that involves a written tensor, and any partial overlap, is rejected.
_SAME_VIEW_OK = (frozenset(("x", "residual")), frozenset(("out", "x")))


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


#: argument order of :func:`_check_aliasing`'s tensors; the first five are written
_ALIAS_NAMES = ("residual", "out", "scores", "norms", "latch", "x", "V", "slot", "weight",
                "shift", "lo", "hi", "gate_concept", "gate_threshold", "gate_above")
_WRITTEN = 5


def _check_aliasing(T: int, d: int, ts) -> None:
    """Reject every memory sharing that makes the op ill-defined, before anything is written.

    ``ts``: the caller-provided tensors (None where absent or allocated by
    :func:`prepare_junction`, whose buffers are fresh) in the order of :data:`_ALIAS_NAMES`.
    Pure address arithmetic on byte ranges (no storage objects, no device sync; a few µs):
    ``scores`` and ``norms`` must not overlap themselves, and no written tensor (``residual``,
    ``out``, ``scores``, ``norms``, ``latch``) may share a byte with any other argument, except
    the identical views of :data:`_SAME_VIEW_OK`.  Ranges that intersect only because two views
    interleave in one buffer (e.g. ``scores = buf[:, :K]`` and ``norms = buf[:, K]``) are
    accepted.  Layout checks ran before: ``residual``, ``x`` and ``out`` have unit inner stride
    and non-overlapping rows; ``latch``, ``V`` and the other inputs are contiguous.
    """
    residual, out, scores, norms = ts[0], ts[1], ts[2], ts[3]
    esz = residual.element_size()
    p = residual.data_ptr()
    spans = [(p, p + ((T - 1) * residual.stride()[0] + d) * esz, 0)]
    if out is not None:
        p = out.data_ptr()
        spans.append((p, p + ((T - 1) * out.stride()[0] + d) * esz, 1))
    if scores is not None:
        (n0, n1), (s0, s1) = scores.shape, scores.stride()
        if (n0 > 1 and s0 == 0) or (n1 > 1 and s1 == 0) or (
                n0 > 1 and n1 > 1 and (s0 < (n1 - 1) * s1 + 1 if s0 >= s1
                                       else s1 < (n0 - 1) * s0 + 1)):
            _fail(f"scores overlaps itself in memory (shape {(n0, n1)}, strides {(s0, s1)}, "
                  "e.g. an expanded view): each score needs its own element")
        p = scores.data_ptr()
        spans.append((p, p + ((n0 - 1) * s0 + (n1 - 1) * s1 + 1) * scores.element_size(), 2))
    if norms is not None:
        st = norms.stride()[0]
        if T > 1 and st == 0:
            _fail("norms overlaps itself in memory (stride 0, e.g. an expanded view): each "
                  "row's norm needs its own element")
        p = norms.data_ptr()
        spans.append((p, p + ((T - 1) * st + 1) * norms.element_size(), 3))
    x = ts[5]
    if x is not None:
        p = x.data_ptr()
        spans.append((p, p + ((T - 1) * x.stride()[0] + d) * esz, 5))
    for i in (4, 6, 7, 8, 9, 10, 11, 12, 13, 14):  # contiguous (checked): the span is nbytes
        t = ts[i]
        if t is not None:
            p = t.data_ptr()
            spans.append((p, p + t.nbytes, i))
    spans.sort()
    reach = 0
    for start, end, _ in spans:
        if start < reach:
            break  # some ranges intersect: look closer
        if end > reach:
            reach = end
    else:
        return
    for n, (_, end, ia) in enumerate(spans):
        for start, _, ib in spans[n + 1:]:
            if start >= end:
                break  # sorted by start: every later span begins even later
            aw, bw = ia < _WRITTEN, ib < _WRITTEN
            if not (aw or bw):
                continue  # two inputs may share memory: both are only read
            a, b, an, bn = ts[ia], ts[ib], _ALIAS_NAMES[ia], _ALIAS_NAMES[ib]
            if frozenset((an, bn)) in _SAME_VIEW_OK and _same_view(a, b):
                continue
            if _disjoint_blocks(a, b):
                continue
            # the written one first; of two written ones, in _ALIAS_NAMES order, residual last
            if aw and bw:
                ia, ib = sorted((ia, ib), key=lambda i: (i == 0, i))
            elif bw:
                ia, ib = ib, ia
            w, r = _ALIAS_NAMES[ia], _ALIAS_NAMES[ib]
            why = "both are written" if aw and bw else f"{w} is written while {r} is read"
            _fail(f"{w} overlaps {r} in memory ({why}); pass separate buffers")


def junction_op(backend: Optional[str] = None, device: torch.device = torch.device("cpu")):
    """The raw torch op (no validation) that ``backend`` resolves to on ``device``."""
    return backends.op_for(backends.resolve(device, backend))
