"""Roofline accounting: bytes moved and FLOPs of one junction call, and measured copy bandwidth.

The junction is memory-bound on a GPU (docs/design.md §6): its floor is the bytes it must move once
over the copy bandwidth measured on the same machine in the same run.  Every benchmark result
carries ``bytes``, ``flops``, achieved GB/s and the fraction of that copy bandwidth.

Bytes counted (``e`` = element size of the model dtype):

    read residual      T*d*e          write residual   T*d*e
    read x             T*d*e (x)      write out        T*d*e (fused RMSNorm)
    read V             K*d*e_V        write scores     T*K*4     write norms  T*4
    read weight        d*e_w (norm)   read slot        T*4 (steering)
    read shift/lo/hi   3*P*K*4 (steering)

FLOPs counted (nominal; one multiply-add = 2):

    add x              T*d            projection p = V h     2*T*K*d
    ||h||              2*T*d          steer (per steered row) 3*K (shift, clamp, q-p) + 2*K*d
    RMSNorm            4*T*d (square-accumulate, scale by rsqrt and by weight)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from .timing import Timing


@dataclass(frozen=True)
class Work:
    """What one call must move and compute: total ``bytes``, ``flops`` and the named parts."""

    bytes: int
    flops: int
    parts: Dict[str, int] = field(default_factory=dict)


def junction_work(T: int, d: int, K: int, elem: int, *, v_elem: int = 4, with_x: bool = True,
                  norm: bool = True, w_elem: int = None, steered_rows: int = 0,
                  steer: bool = False, P: int = 0) -> Work:
    """Bytes and FLOPs of one junction call (see the module docstring for what is counted).

    ``elem``/``v_elem``/``w_elem``: bytes per element of the residual, of V and of the RMSNorm
    weight (default: ``elem``).  ``steer``: slot and tables are read; ``steered_rows`` of the
    ``T`` rows take the update pass.
    """
    w_elem = elem if w_elem is None else w_elem
    parts = {
        "read_residual": T * d * elem,
        "read_x": T * d * elem if with_x else 0,
        "write_residual": T * d * elem,
        "write_out": T * d * elem if norm else 0,
        "read_V": K * d * v_elem,
        "write_scores": T * K * 4,
        "write_norms": T * 4,
        "read_weight": d * w_elem if norm else 0,
        "read_slot": T * 4 if steer else 0,
        "read_tables": 3 * P * K * 4 if steer else 0,
    }
    flops = ((T * d if with_x else 0) + 2 * T * K * d + 2 * T * d
             + steered_rows * (3 * K + 2 * K * d) + (4 * T * d if norm else 0))
    return Work(sum(parts.values()), flops, {k: v for k, v in parts.items() if v})


def add_rmsnorm_work(T: int, d: int, elem: int, w_elem: int = None) -> Work:
    """A plain fused residual add + RMSNorm (the floor): read residual, x, weight; write both."""
    w_elem = elem if w_elem is None else w_elem
    parts = {"read_residual": T * d * elem, "read_x": T * d * elem,
             "write_residual": T * d * elem, "write_out": T * d * elem, "read_weight": d * w_elem}
    return Work(sum(parts.values()), T * d + 4 * T * d, parts)


def gbps(nbytes: int, seconds: float) -> float:
    """Achieved bandwidth in GB/s (10^9 bytes per second)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def copy_bandwidth(device: str, timer, nbytes: int = None) -> dict:
    """Measure ``dst.copy_(src)`` on buffers far larger than the last-level cache.

    Counts read + write (``2 * nbytes``) per copy, as STREAM's copy does.  ``timer(fn)`` is the
    device's timer (:func:`steerkernel.bench.timing.time_cpu` or ``time_cuda``).
    """
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t: Timing = timer(lambda: dst.copy_(src))
    del src, dst
    return {"gbps": gbps(2 * nbytes, t.median_s), "buffer_bytes": nbytes,
            "bytes_per_copy": 2 * nbytes, **t.as_dict()}
