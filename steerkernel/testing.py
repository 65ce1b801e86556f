"""Test helpers shared by the test suite, the property tests and the benchmarks.

* :data:`TOLERANCES` — the per-dtype tolerances every backend is held to, in one place.
* :func:`make_case` — random junction inputs covering every intervention kind of docs/design.md §2.
* :func:`run_case` — run a backend on fresh clones with every output poisoned (NaN) first.
* :func:`check_backend` — run a backend and the float64 reference on the same case and compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch
from torch import Tensor

from .ops.junction import junction


@dataclass(frozen=True)
class Tol:
    """``|actual - expected| <= atol * scale + rtol * |expected|`` with ``scale = max(1, max|expected|)``."""

    rtol: float
    atol: float


#: Model-dtype outputs (residual, out) per residual dtype.  bf16/fp16: one rounding of the
#: stored value may land on the other side of a tie between fp32 and float64 arithmetic, so
#: one ulp (2^-8 / 2^-11 relative) of slack is allowed.
TOLERANCES: Dict[torch.dtype, Tol] = {
    torch.float64: Tol(rtol=1e-10, atol=1e-10),
    torch.float32: Tol(rtol=2e-5, atol=2e-5),
    torch.float16: Tol(rtol=2e-3, atol=2e-4),
    torch.bfloat16: Tol(rtol=1.6e-2, atol=2e-3),
}
#: scores and norms are fp32 accumulations whatever the model dtype (float64 for float64).
SCORE_TOLERANCES: Dict[torch.dtype, Tol] = {
    torch.float64: Tol(rtol=1e-10, atol=1e-10),
    torch.float32: Tol(rtol=2e-5, atol=2e-5),
    torch.float16: Tol(rtol=2e-5, atol=2e-5),
    torch.bfloat16: Tol(rtol=2e-5, atol=2e-5),
}

#: Intervention kinds of docs/design.md §2 (name -> how to draw (shift, lo, hi) for one concept).
KINDS = ("add", "ablate", "cap_above", "cap_below", "pin", "noop")


@dataclass
class JunctionCase:
    """Inputs of one junction call (``kwargs`` feed :func:`steerkernel.ops.junction`)."""

    kwargs: Dict[str, object]
    scores_buffer: Optional[Tensor] = None  # larger buffer when scores is a strided view
    scores_index: int = 0
    meta: Dict[str, object] = field(default_factory=dict)


def _directions(K: int, d: int, dtype, gen, orthogonal: bool) -> Tensor:
    if orthogonal:
        assert K <= d, "orthogonal directions need K <= d"
        q, _ = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))
        V = q.T.contiguous()
    else:
        V = torch.randn(K, d, generator=gen, dtype=torch.float64)
        V = V / V.norm(dim=1, keepdim=True)
    return V.to(dtype)


def make_case(
    T: int, d: int, K: int, dtype: torch.dtype = torch.float32, *, P: int = 5,
    with_x: bool = True, with_norm: bool = True, slots: str = "random",
    kinds=KINDS, gate: Optional[str] = None, latch: bool = False,
    strided_scores: bool = False, orthogonal: bool = False, v_dtype=torch.float32,
    weight_dtype=None, seed: Optional[int] = None, device="cpu",
) -> JunctionCase:
    """Random junction inputs.

    Shapes: residual/x ``[T, d]`` (dtype), V ``[K, d]`` unit rows (``v_dtype``; None for
    ``K = 0``: a plain add + RMSNorm, only with ``slots="none"``), slot int32
    ``[T]``, shift/lo/hi fp32 ``[P, K]`` (row 0 filled with garbage that must never apply),
    gates ``[P]``.  ``slots``: "random" (includes 0), "none" (monitor only), "zero" (all 0),
    "all" (all active).  ``gate``: None, "above", "below" or "mixed"; thresholds sit in gaps
    of the projections so fp32 and float64 agree on every gate decision.
    """
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    f64 = torch.float64
    residual = torch.randn(T, d, generator=gen, dtype=f64).to(dtype)
    x = torch.randn(T, d, generator=gen, dtype=f64).to(dtype) if with_x else None
    V = _directions(K, d, v_dtype if v_dtype != "model" else dtype, gen, orthogonal) if K \
        else None
    if V is None and (slots != "none" or strided_scores):
        raise ValueError("K = 0 (no V) takes slots='none' and no strided scores")
    kw: Dict[str, object] = dict(residual=residual, V=V, x=x)
    if with_norm:
        wd = weight_dtype or dtype
        kw["weight"] = (torch.rand(d, generator=gen, dtype=f64) + 0.5).to(wd)
        kw["eps"] = 1e-6
    # Projections as every backend will see them (post-add, dtype-rounded), for gate margins.
    h = residual.clone()
    if x is not None:
        h.add_(x)
    p = h.to(f64) @ V.to(f64).T if V is not None else h.new_zeros(T, 0, dtype=f64)  # [T, K]
    scale = float(p.abs().max()) if p.numel() else 1.0
    if slots != "none":
        if slots == "random":
            slot = torch.randint(0, P, (T,), generator=gen)
        elif slots == "zero":
            slot = torch.zeros(T, dtype=torch.long)
        elif slots == "all":
            slot = torch.randint(1, P, (T,), generator=gen) if P > 1 else torch.zeros(T)
        else:
            raise ValueError(f"unknown slots mode {slots!r}")
        shift = torch.zeros(P, K, dtype=f64)
        lo = torch.full((P, K), -math.inf, dtype=f64)
        hi = torch.full((P, K), math.inf, dtype=f64)
        choice = torch.randint(0, len(kinds), (P, K), generator=gen)
        for s in range(1, P):
            for k in range(K):
                kind = kinds[int(choice[s, k])]
                tau = float(torch.randn((), generator=gen, dtype=f64)) * max(scale, 1) / 3
                if kind == "add":
                    shift[s, k] = float(torch.empty((), dtype=f64).uniform_(-3, 3, generator=gen))
                elif kind == "ablate":
                    lo[s, k] = hi[s, k] = 0.0
                elif kind == "cap_above":
                    hi[s, k] = tau
                elif kind == "cap_below":
                    lo[s, k] = tau
                elif kind == "pin":
                    lo[s, k] = hi[s, k] = tau
        # Row 0 is never applied: fill it with values that would show if it were.
        shift[0] = 100.0
        lo[0] = 50.0
        hi[0] = 60.0
        kw.update(slot=slot.to(torch.int32), shift=shift.float(), lo=lo.float(), hi=hi.float())
        if gate is not None:
            gc = torch.randint(-1, K, (P,), generator=gen)
            above = {"above": torch.ones(P, dtype=torch.bool),
                     "below": torch.zeros(P, dtype=torch.bool),
                     "mixed": torch.rand(P, generator=gen) < 0.5}[gate]
            thr = torch.zeros(P, dtype=f64)
            for s in range(P):
                c = int(gc[s])
                col = p[:, max(c, 0)].sort().values if T else torch.zeros(1, dtype=f64)
                thr[s] = _gap_threshold(col, gen)
            kw.update(gate_concept=gc.to(torch.int32), gate_threshold=thr.float(),
                      gate_above=above)
            if latch:
                kw["latch"] = (torch.rand(P, generator=gen) < 0.3).to(torch.int32)
    if strided_scores:
        L = 3
        buf = torch.full((T, L, K), math.nan, dtype=f64 if dtype == f64 else torch.float32)
        idx = 1
        case = JunctionCase(kw, buf, idx)
    else:
        case = JunctionCase(kw)
    case.meta.update(T=T, d=d, K=K, dtype=dtype, P=P, gate=gate, latch=latch, slots=slots)
    if device != "cpu":
        case = to_device(case, device)
    return case


def _gap_threshold(sorted_col: Tensor, gen) -> float:
    """A threshold in the middle of a gap between sorted projections (never within 1e-3·scale)."""
    n = sorted_col.numel()
    if n == 1:
        return float(sorted_col[0]) + (1.0 if torch.rand((), generator=gen) < 0.5 else -1.0)
    gaps = sorted_col[1:] - sorted_col[:-1]
    # prefer a gap near the middle so roughly half the tokens open the gate
    lo, hi = n // 4, max(n // 4 + 1, (3 * n) // 4)
    i = lo + int(torch.argmax(gaps[lo:hi]))
    return float((sorted_col[i] + sorted_col[i + 1]) / 2)


def to_device(case: JunctionCase, device) -> JunctionCase:
    kw = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in case.kwargs.items()}
    buf = case.scores_buffer.to(device) if case.scores_buffer is not None else None
    return replace(case, kwargs=kw, scores_buffer=buf)


def run_case(case: JunctionCase, backend: Optional[str]):
    """Run ``backend`` on clones of the case's inputs with every output poisoned with NaN.

    Returns ``dict(residual, scores, norms, out, latch, scores_buffer)``.
    """
    kw = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in case.kwargs.items()}
    T = kw["residual"].shape[0]
    acc = torch.float64 if kw["residual"].dtype == torch.float64 else torch.float32
    dev = kw["residual"].device
    buf = None
    if case.scores_buffer is not None:
        buf = case.scores_buffer.clone()
        kw["scores"] = buf[:, case.scores_index, :]
    elif kw["V"] is not None:
        kw["scores"] = torch.full((T, kw["V"].shape[0]), math.nan, dtype=acc, device=dev)
    kw["norms"] = torch.full((T,), math.nan, dtype=acc, device=dev)
    if kw.get("weight") is not None:
        kw["out"] = torch.full_like(kw["residual"], math.nan)
    scores, norms, out = junction(**kw, backend=backend)
    return dict(residual=kw["residual"], scores=scores, norms=norms, out=out,
                latch=kw.get("latch"), scores_buffer=buf)


def assert_close(actual: Tensor, expected: Tensor, tol: Tol, what: str) -> None:
    """Compare with NaN/Inf positions required to match exactly; message names the worst element."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())})"
    fin = torch.isfinite(e)
    assert torch.equal(a[~fin & ~nan_e], e[~fin & ~nan_e]), f"{what}: Inf entries differ"
    if not fin.any():
        return
    scale = max(1.0, float(e[fin].abs().max()))
    err = (a[fin] - e[fin]).abs()
    bound = tol.atol * scale + tol.rtol * e[fin].abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance; worst "
            f"|{float(a[fin][i]):.8g} - {float(e[fin][i]):.8g}| = {float(err[i]):.3g} > "
            f"{float(bound[i]):.3g} (rtol={tol.rtol}, atol={tol.atol}*{scale:.3g})")


def check_backend(case: JunctionCase, backend: str) -> None:
    """Assert ``backend`` matches the float64 reference on ``case``, outputs fully written."""
    got = run_case(case, backend)
    ref = run_case(case, "reference")
    dtype = case.kwargs["residual"].dtype
    tol, stol = TOLERANCES[dtype], SCORE_TOLERANCES[dtype]
    if ref["scores"] is None:
        assert got["scores"] is None, f"[{backend}] scores without V"
    else:
        assert_close(got["scores"], ref["scores"], stol, f"[{backend}] scores")
    assert_close(got["norms"], ref["norms"], stol, f"[{backend}] norms")
    assert_close(got["residual"], ref["residual"], tol, f"[{backend}] residual")
    if ref["out"] is not None:
        assert_close(got["out"], ref["out"], tol, f"[{backend}] out")
    if ref["latch"] is not None:
        assert torch.equal(got["latch"].cpu(), ref["latch"].cpu()), f"[{backend}] latch"
    if case.scores_buffer is not None:
        # the rest of the monitor buffer is untouched; our slice was fully written
        other = torch.ones(case.scores_buffer.shape[1], dtype=torch.bool)
        other[case.scores_index] = False
        assert torch.isnan(got["scores_buffer"][:, other]).all(), f"[{backend}] wrote outside scores"


def host_matmul_is_shape_invariant() -> bool:
    """Whether numpy's fp32 matmul on this host gives a row the same bits whatever the number
    of rows it is multiplied with.  Triton's CPU interpreter runs ``tl.dot`` as numpy matmul,
    so the Triton kernel's bit-identity across row tiles and paths (a property of the GPU's
    MMA, docs/design.md §2) can only be checked under the interpreter where this holds: BLAS
    kernels on some CPUs (OpenBLAS without AVX-512, seen on an AMD EPYC) sum a row in an
    order that depends on the matrix shape."""
    import numpy as np

    rng = np.random.default_rng(0)
    for k, n in ((96, 16), (576, 64), (200, 176)):
        a = rng.standard_normal((128, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        ref = a[:16] @ b
        for m in (32, 64, 128):
            if not np.array_equal((a[:m] @ b)[:16], ref):
                return False
    return True
