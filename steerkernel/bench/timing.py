"""Timers: wall clock on CPU, CUDA events (optionally CUDA-graph replay) on GPU.

Both follow the pattern of ``triton.testing.do_bench``: warm up for a while, estimate the cost
of one call, then take many samples and report the median with the 10th/90th percentiles.
Callers pass a function that rotates through several copies of its inputs (see
:func:`rotating`) so that caches larger than one call's data do not flatter small cases.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Sequence


@dataclass
class Timing:
    """Seconds per call: median, 10th and 90th percentile over ``n`` samples of ``inner`` calls."""

    median_s: float
    p10_s: float
    p90_s: float
    n: int
    inner: int

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty sequence."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(per_call_s: List[float], inner: int) -> Timing:
    xs = sorted(per_call_s)
    return Timing(quantile(xs, 0.5), quantile(xs, 0.1), quantile(xs, 0.9), len(xs), inner)


def rotating(call: Callable, arg_sets: Sequence) -> Callable[[], object]:
    """``fn()`` that calls ``call(arg_sets[i])`` with ``i`` cycling over the sets."""
    state = [0]
    n = len(arg_sets)

    def fn():
        i = state[0]
        state[0] = i + 1 if i + 1 < n else 0
        return call(arg_sets[i])

    return fn


def time_cpu(fn: Callable[[], object], *, warmup_s: float = 0.05, budget_s: float = 0.5,
             min_sample_s: float = 2e-4, min_samples: int = 5, max_samples: int = 500) -> Timing:
    """Time ``fn`` on the CPU.

    Warm up for ``warmup_s``; then each sample runs ``inner`` back-to-back calls (enough for
    ``min_sample_s``, so timer resolution never matters) and samples are taken until
    ``budget_s`` has passed (at least ``min_samples``, at most ``max_samples``).
    """
    clock = time.perf_counter
    t0 = clock()
    calls = 0
    while calls < 2 or clock() - t0 < warmup_s:
        fn()
        calls += 1
    est = (clock() - t0) / calls
    inner = max(1, math.ceil(min_sample_s / max(est, 1e-9)))
    samples: List[float] = []
    start = clock()
    while len(samples) < max_samples and (len(samples) < min_samples or clock() - start < budget_s):
        s = clock()
        for _ in range(inner):
            fn()
        samples.append((clock() - s) / inner)
    return summarize(samples, inner)


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              graph_calls: int = 0, min_samples: int = 10, max_samples: int = 2000) -> Timing:
    """Time ``fn`` on the current CUDA device with CUDA events.

    ``graph_calls == 0``: each sample is one call bracketed by two events (launch overhead
    included, as ``triton.testing.do_bench`` measures it).  ``graph_calls > 0``: capture that
    many back-to-back calls in one CUDA graph and time graph replays, each sample being
    replay time / ``graph_calls`` (decode sizes, where launch latency would otherwise dominate
    and where serving engines replay graphs too).
    """
    import torch

    torch.cuda.synchronize()
    if graph_calls > 0:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture, as the CUDA-graph docs ask
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(graph_calls):
                fn()
        run, inner = g.replay, graph_calls
    else:
        run, inner = fn, 1

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    start.record()
    for _ in range(3):
        run()
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / 3, 1e-4)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        run()
    n = int(min(max(rep_ms / est_ms, min_samples), max_samples))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) * 1e-3 / inner for s, e in zip(starts, ends)], inner)
