"""The pure-torch junction: the oracle every other backend is tested against.

Implements docs/design.md §2 as literally as torch allows.  Every read of ``h`` after a store
sees the stored (dtype-rounded) value, which is exactly what the next layer sees; all other
arithmetic is float64 here, whatever the input dtype, which is what makes this the oracle.
What the kernels do with values the public wrapper rejects, so that all backends agree on
them: slots outside ``[0, P)`` behave as slot 0, and gate concepts outside ``[-1, K)`` never
fire (so such a slot is steered only once latched).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def junction_reference_(
    residual: Tensor,
    V: Optional[Tensor],
    x: Optional[Tensor],
    slot: Optional[Tensor],
    shift: Optional[Tensor],
    lo: Optional[Tensor],
    hi: Optional[Tensor],
    gate_concept: Optional[Tensor],
    gate_threshold: Optional[Tensor],
    gate_above: Optional[Tensor],
    latch: Optional[Tensor],
    weight: Optional[Tensor],
    eps: float,
    scores: Optional[Tensor],
    norms: Tensor,
    out: Optional[Tensor],
) -> None:
    """Reference junction; writes ``residual``, ``scores``, ``norms``, ``out`` and ``latch``.

    Arguments and shapes: :data:`steerkernel.ops.args.ARGS` (V None: no readout, no steering).
    """
    f64 = torch.float64
    if x is not None:
        residual.add_(x)  # rounds exactly as the model's own `residual + x` would
    h = residual.to(f64)
    norms.copy_(torch.linalg.vector_norm(h, dim=1))
    if V is not None:
        Vd = V.to(f64)
        p = h @ Vd.T  # [T, K]
        scores.copy_(p)

    if V is not None and slot is not None and shift is not None and h.shape[0] > 0:
        P = shift.shape[0]
        s = slot.long()
        in_range = (s >= 0) & (s < P)
        s = torch.where(in_range, s, torch.zeros_like(s))
        apply = s != 0
        if gate_concept is not None:
            K = V.shape[0]
            gc = gate_concept.long()[s]  # [T]
            gated = gc != -1
            valid = (gc >= 0) & (gc < K)
            pg = p.gather(1, gc.clamp(0, max(K - 1, 0)).unsqueeze(1)).squeeze(1)
            thr = gate_threshold.to(f64)[s]
            above = gate_above.bool()[s]
            fires = torch.where(above, pg > thr, pg < thr) & valid & gated & apply
            open_ = ~gated | fires
            if latch is not None:
                open_ = open_ | (latch[s] != 0)
                fired_slots = s[fires]
                if fired_slots.numel():
                    latch.index_fill_(0, fired_slots, 1)
            apply = apply & open_
        rows = apply.nonzero().squeeze(1)
        if rows.numel():
            sr = s[rows]
            pr = p[rows]
            q = pr + shift.to(f64)[sr]
            q = torch.clamp(q, min=lo.to(f64)[sr], max=hi.to(f64)[sr])
            # NaN p must stay NaN: torch.clamp propagates NaN, and so do the kernels
            hr = h[rows] + (q - pr) @ Vd
            residual[rows] = hr.to(residual.dtype)
            h[rows] = residual[rows].to(f64)

    if out is not None:
        w = weight.to(f64) if weight is not None else 1.0
        inv = torch.rsqrt(h.pow(2).mean(dim=1, keepdim=True) + eps)
        out.copy_(h * inv * w)
