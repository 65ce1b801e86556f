"""One junction location of a served model: what the HF and vLLM integrations share.

A :class:`JunctionSite` owns, for one place in the residual stream, everything the raw junction
op reads there — the bank's directions at that layer, that layer's plane of the per-slot tables
(shift / lo / hi / gate / latch, :class:`~steerkernel.steering.SlotTables`) — plus the scratch
outputs nobody reads, and makes the call, including the per-forward choice of which gate and
latch tables to pass.  The integrations only adapt their framework's tensors and request
bookkeeping to it: the HF fused forwards and hooks (:mod:`.hf.layers`) and vLLM's RMSNorm call
sites (:mod:`.vllm.worker`).

It lives here, above :mod:`steerkernel.ops` and :mod:`steerkernel.steering`, because it joins
the two (the op knows nothing of programs and slots; the tables know nothing of the op).

The call adds no host synchronisation and allocates only ``out`` (and scratch for a forward
larger than reserved), so it runs inside captured CUDA graphs and ``torch.compile``d forwards.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops import JunctionArgs, prepare_junction
from ..steering import SlotTables


class Steering(NamedTuple):
    """The steering of one forward, shared by every site of a model: the slot of each token row
    (int32 ``[T]``), and whether any row's program has a gate (``gated``) and a latching gate
    (``latched``).  Without a gate the gate tables are not passed, so the op skips them."""

    slot: Tensor
    gated: bool = False
    latched: bool = False


class Scratch:
    """Outputs the op writes that nobody reads (``norms [T]``; ``scores [T, K]`` where no
    monitor buffer is given), shared by a model's sites (calls are sequential).  Sized by
    :meth:`reserve` between forwards; a larger call gets fresh buffers instead, so the views
    handed out never move under a captured graph."""

    def __init__(self, K: int, device: torch.device, rows: int = 0):
        self.K, self.device = K, torch.device(device)
        self._norms = torch.empty(0, device=self.device)
        self._scores = torch.empty(0, K, device=self.device)
        self.reserve(rows)

    @property
    def rows(self) -> int:
        return self._norms.shape[0]

    def reserve(self, T: int) -> None:
        """Hold at least ``T`` rows (doubling, so a growing batch reallocates rarely)."""
        if T > self.rows:
            n = max(T, 2 * self.rows)
            self._norms = torch.empty(n, device=self.device)
            self._scores = torch.empty(n, self.K, device=self.device)

    def norms(self, T: int) -> Tensor:
        if T > self.rows:
            return torch.empty(T, device=self.device)
        return self._norms[:T]

    def scores(self, T: int) -> Tensor:
        if T > self.rows:
            return torch.empty(T, self.K, device=self.device)
        return self._scores[:T]


class JunctionSite:
    """One junction location: ``residual (+= x)``, readout, per-slot steering, fused RMSNorm.

    Args:
        op: the raw junction op of the chosen backend (:func:`steerkernel.ops.junction_op`).
        scratch: the model's :class:`Scratch`.
        V: ``[K, d]`` fp32 directions on the model's device; None for a plain add (+ RMSNorm)
            site (no readout, no steering).
        tables: the model's :class:`SlotTables` and ``layer``, this site's plane in them
            (needed for steering).
    """

    def __init__(self, op, scratch: Scratch, V: Optional[Tensor] = None,
                 tables: Optional[SlotTables] = None, layer: int = 0):
        self.op, self.scratch, self.V = op, scratch, V
        self.shift = self.lo = self.hi = None
        self.gate_concept = self.gate_threshold = self.gate_above = self.latch = None
        if V is not None and tables is not None:
            (self.shift, self.lo, self.hi, self.gate_concept, self.gate_threshold,
             self.gate_above, self.latch) = tables.layer_args(layer)

    def args(self, residual: Tensor, x: Optional[Tensor] = None, *,
             steering: Optional[Steering] = None, scores: Optional[Tensor] = None,
             weight: Optional[Tensor] = None, eps: float = 0.0,
             out: Optional[Tensor] = None) -> JunctionArgs:
        """The op's arguments for one call (see :meth:`__call__`)."""
        T = residual.shape[0]
        if weight is not None and out is None:
            out = torch.empty_like(residual)
        if self.V is None:
            return JunctionArgs(residual=residual, x=x, weight=weight, eps=eps,
                                norms=self.scratch.norms(T), out=out)
        if scores is None:
            scores = self.scratch.scores(T)
        if steering is None or self.shift is None:  # monitoring only: no update pass
            return JunctionArgs(residual=residual, V=self.V, x=x, weight=weight, eps=eps,
                                scores=scores, norms=self.scratch.norms(T), out=out)
        gated = steering.gated
        latch = self.latch if gated and steering.latched else None
        return JunctionArgs(
            residual=residual, V=self.V, x=x, slot=steering.slot, shift=self.shift,
            lo=self.lo, hi=self.hi, gate_concept=self.gate_concept if gated else None,
            gate_threshold=self.gate_threshold if gated else None,
            gate_above=self.gate_above if gated else None, latch=latch, weight=weight,
            eps=eps, scores=scores, norms=self.scratch.norms(T), out=out)

    def __call__(self, residual: Tensor, x: Optional[Tensor] = None, *,
                 steering: Optional[Steering] = None, scores: Optional[Tensor] = None,
                 weight: Optional[Tensor] = None, eps: float = 0.0,
                 out: Optional[Tensor] = None) -> Optional[Tensor]:
        """One call on ``[T, d]`` rows, in place: ``residual += x`` (if given), readout into
        ``scores`` (a monitor view; scratch if None), steering with ``steering`` (None:
        monitor only) and, with ``weight``, the RMSNorm into ``out`` (allocated if None),
        which is returned."""
        call = self.args(residual, x, steering=steering, scores=scores, weight=weight, eps=eps,
                         out=out)
        self.op(*call)
        return call.out

    def validate(self, hidden_size: int, dtype: torch.dtype, backend: str, *,
                 weight: Optional[Tensor] = None, eps: float = 0.0,
                 scores: Optional[Tensor] = None) -> None:
        """Run the public op's checks once on everything the hot path hands the raw op here
        (one row of ``dtype``, every table, gate and the latch, the scratch and ``scores``), so
        that the unchecked calls later can only differ in the activations' shapes."""
        r = torch.zeros(1, hidden_size, device=self.scratch.device, dtype=dtype)
        every_table = Steering(torch.zeros(1, dtype=torch.int32, device=r.device), gated=True,
                               latched=True)
        call = self.args(r, r.clone(), steering=every_table, scores=scores, weight=weight,
                         eps=eps)
        prepare_junction(**call._asdict(), backend=backend)
