"""Quick CPU timing: the fused junction kernel vs the unfused eager-torch chain it replaces.

A developer tool for tuning csrc/junction_cpu*.  It uses the benchmark runner's inputs
(``steerkernel.bench.cases.input_sets``: ablate / cap / pin interventions on every token, V in
fp32, ``x`` scaled by 1e-3) and its eager chain (``make_chain``: add, fp32 matmul, clamp, add,
rmsnorm), the runner's allocator settings (re-exec with ``runner.ALLOC_ENV`` unless
``--system-allocator``) and rotates over enough input copies to move twice the L3 per rotation
(a separate pool of copies per implementation).
For each (dtype, d, T, K, mode) it prints the median (and min) µs per call of

* chain:  ``chain_eager`` (fresh outputs, as a forward hook computes it);
* mm:     torch's matmuls alone on the same shapes (``h @ V.T``, plus ``dq @ V`` when steering;
          fp32, preallocated outputs): the part of the chain a fused kernel cannot avoid doing,
          i.e. the compute-bound bar;
* fused:  ``torch.ops.steerkernel.junction`` (the raw op, preallocated outputs);

the speedup chain / fused (ratio of medians and of mins), and GFLOP/s of the fused kernel and
of the matmuls (2·T·K·d per matmul; fused counts the same matmul FLOPs, nothing else).  All
three run interleaved call by call in one process with ``torch.set_num_threads(threads)``;
mins show the uncontended cost on a shared machine.  ``--cpu-time`` (one thread only) times by
the thread's CPU time, which drops the time the thread sat descheduled behind other jobs.

The fused op splits rows over threads with ``at::parallel_for``, a header template that runs
serially unless the extension is compiled with ``-fopenmp``; with more than one thread, check
that the build has it before comparing (``nm -D steerkernel/_C*.so | grep GOMP``).

    python benchmarks/cpu_kernel_quick.py [--dtypes fp32,bf16] [--ds 576,4096] [--Ts 64,2048]
        [--Ks 16,171] [--modes steer_norm,monitor_norm] [--threads 1] [--cpu-time]
        [--budget 1.0]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

from steerkernel import backends
from steerkernel.backends import native
from steerkernel.bench import cases as bc
from steerkernel.bench import runner as br
from steerkernel.ops import JunctionArgs

L3_BYTES = 32 << 20


def sample_interleaved(fns, budget_s, min_reps=5, max_reps=5000, min_sample_s=2e-4,
                       clock=time.perf_counter):
    """Time each of ``fns`` once per round (``inner`` back-to-back calls for short ones), rounds
    until ``budget_s``; per-fn lists of seconds per call (by ``clock``)."""
    inner = []
    for fn in fns:  # warm-up and per-call estimate
        t0 = time.perf_counter()
        fn()
        fn()
        est = (time.perf_counter() - t0) / 2
        inner.append(max(1, math.ceil(min_sample_s / max(est, 1e-9))))
    samples = [[] for _ in fns]
    t_end = time.perf_counter() + budget_s
    while len(samples[0]) < min_reps or (time.perf_counter() < t_end
                                         and len(samples[0]) < max_reps):
        for fn, n, out in zip(fns, inner, samples):
            t0 = clock()
            for _ in range(n):
                fn()
            out.append((clock() - t0) / n)
    return samples


def rotating(fn, sets):
    state = [0]

    def run():
        i = state[0]
        state[0] = (i + 1) % len(sets)
        return fn(sets[i])
    return run


def bench_case(case: bc.JunctionCase, budget_s: float, clock=time.perf_counter):
    steer = case.steer
    work = bc.case_work(case).bytes
    nsets = bc.num_sets(work, L3_BYTES, max_sets=64, mem_cap=1 << 30)
    T, d, K = case.T, case.d, case.K
    # one pool of input copies per implementation: interleaved calls never find data that
    # another implementation has just pulled into the cache
    pools = [bc.input_sets(case, "cpu", nsets) for _ in range(3)]
    for s in (s for pool in pools for s in pool):
        s["scores"] = torch.empty(T, K)
        s["norms"] = torch.empty(T)
        s["out"] = torch.empty_like(s["residual"]) if case.norm else None
        s["hf"] = s["residual"].float()
        s["p"] = torch.empty(T, K)
        s["dq"] = torch.randn(T, K) * 0.1
        s["upd"] = torch.empty(T, d)
        s["call"] = JunctionArgs(residual=s["residual"], V=s["V"], x=s["x"],
                                 slot=s.get("slot"), shift=s.get("shift"), lo=s.get("lo"),
                                 hi=s.get("hi"), weight=s.get("weight"), eps=bc.EPS,
                                 scores=s["scores"], norms=s["norms"], out=s["out"])
    op = backends.op_for("cpu")

    def fused(s):
        op(*s["call"])

    chain_fn = bc.make_chain(steer, case.norm)

    def chain(s):
        return chain_fn(s["residual"], s["x"], s["V"], s.get("slot"), s.get("shift"),
                        s.get("lo"), s.get("hi"), s.get("weight"))

    def mm(s):
        torch.mm(s["hf"], s["V"].T, out=s["p"])
        if steer:
            torch.mm(s["dq"], s["V"], out=s["upd"])

    fns = [rotating(f, pool) for f, pool in zip((fused, chain, mm), pools)]
    samples = sample_interleaved(fns, budget_s, clock=clock)
    med = [statistics.median(x) for x in samples]
    mins = [min(x) for x in samples]
    flops = 2 * T * K * d * (2 if steer else 1)
    return med, mins, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--ds", default="576,4096")
    ap.add_argument("--Ts", default="64,2048")
    ap.add_argument("--Ks", default="16,171")
    ap.add_argument("--modes", default="steer_norm,monitor_norm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=1.0,
                    help="seconds of interleaved rounds per case")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the calling thread's CPU time (time.thread_time) instead of the "
                         "wall clock: on a shared machine this drops the time the thread was "
                         "descheduled; meaningful with --threads 1 only")
    ap.add_argument("--system-allocator", action="store_true",
                    help="keep the default allocator (no re-exec with the runner's ALLOC_ENV)")
    args = ap.parse_args()
    if not args.system_allocator and not all(k in os.environ for k in br.ALLOC_ENV):
        env = dict(os.environ, **br.ALLOC_ENV)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
    torch.set_num_threads(args.threads)
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1 (it measures the calling thread only)")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {'thread CPU time' if args.cpu_time else 'wall clock'}, "
          f"kernel: {native.load('_C').simd_description()}")
    print("# median (min) µs per call, interleaved; speedup = chain / fused (medians, mins); "
          "GF/s = matmul FLOPs (2TKd per matmul) / median time")
    print(f"{'dtype':>5} {'d':>5} {'T':>5} {'K':>4} {'mode':>12} {'chain_us':>18} "
          f"{'mm_us':>18} {'fused_us':>18} {'speedup':>12} {'fusedGF':>7} {'mmGF':>6}")
    for dt in args.dtypes.split(","):
        for d in map(int, args.ds.split(",")):
            for T in map(int, args.Ts.split(",")):
                for K in map(int, args.Ks.split(",")):
                    for mode in args.modes.split(","):
                        case = bc.JunctionCase(T, d, K, mode, dt)
                        (tf, tc, tm), (mf, mc, mm_), flops = bench_case(
                            case, args.budget, clock)
                        cell = lambda t, m: f"{t * 1e6:.1f} ({m * 1e6:.1f})"  # noqa: E731
                        print(f"{dt:>5} {d:>5} {T:>5} {K:>4} {mode:>12} {cell(tc, mc):>18} "
                              f"{cell(tm, mm_):>18} {cell(tf, mf):>18} "
                              f"{tc / tf:5.2f} ({mc / mf:4.2f}) {flops / tf / 1e9:7.1f} "
                              f"{flops / tm / 1e9:6.1f}", flush=True)


if __name__ == "__main__":
    main()
