"""Simple score storage for an attached HF model: one device buffer per forward, host traces.

The junction at bank layer position ``i`` writes the ``[T, K]`` scores of a forward's ``T``
token rows into ``buffer[i, :T]`` (a layer-major ``[L, capacity, K]`` fp32 buffer, so every
layer's view is a strided slice of one allocation).  After the forward, :meth:`record` copies
the buffer to the host once and files each row's tokens under its request id.

This store has the same forward-side interface as :class:`steerkernel.monitor.MonitorEngine`
(``scores_view(layer_pos, T)`` and ``record([(request_id, n_tokens), ...])``), which can be
passed to ``attach(monitor=...)`` instead for asynchronous copies, aggregates and alarms.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class TraceStore:
    """Per-request traces ``[n_tokens, L, K]`` of raw projections.

    Args:
        num_layers: monitored layers ``L`` (buffer order = bank layer order).
        K: concepts.  device: where the junction writes.  capacity: initial token rows.
    """

    def __init__(self, num_layers: int, K: int, device, capacity: int = 256):
        self.L, self.K, self.device = int(num_layers), int(K), torch.device(device)
        self.buffer = torch.zeros(self.L, capacity, self.K, device=self.device)
        self._traces: Dict[Hashable, List[Tensor]] = {}

    def reserve(self, T: int) -> None:
        """Make room for a forward of ``T`` rows (between forwards only: views go stale)."""
        if T > self.buffer.shape[1]:
            cap = max(T, 2 * self.buffer.shape[1])
            self.buffer = torch.zeros(self.L, cap, self.K, device=self.device)

    def scores_view(self, layer_pos: int, num_tokens: int) -> Tensor:
        """``[num_tokens, K]`` view of the buffer at monitored layer number ``layer_pos``."""
        return self.buffer[layer_pos, :num_tokens]

    def record(self, rows: Sequence[Tuple[Optional[Hashable], int]]) -> None:
        """After a forward: ``rows`` lists ``(request_id, n_tokens)`` in buffer row order;
        ``request_id`` None marks rows to skip (padding)."""
        T = sum(n for _, n in rows)
        if T == 0:
            return
        host = self.buffer[:, :T].transpose(0, 1).to("cpu", copy=True)  # [T, L, K]
        start = 0
        for rid, n in rows:
            if rid is not None and n > 0:
                self._traces.setdefault(rid, []).append(host[start:start + n])
            start += n

    def trace(self, request_id: Hashable) -> Tensor:
        """The request's ``[n_tokens, L, K]`` projections (``n_tokens`` may be 0)."""
        chunks = self._traces.get(request_id)
        if not chunks:
            return torch.zeros(0, self.L, self.K)
        if len(chunks) > 1:
            chunks[:] = [torch.cat(chunks)]
        return chunks[0]

    def reset(self) -> None:
        self._traces.clear()
