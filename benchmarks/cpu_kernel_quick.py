"""Quick CPU timing: the fused junction kernel vs the unfused eager-torch chain it replaces.

For each (dtype, d, T, K) and each mode it prints the median time of

* torch: the unfused chain in eager torch, same dtype, V in that dtype::

      h = residual + x; p = h @ V.T                      # monitor
      q = clamp(p + shift[slot], lo[slot], hi[slot]); h = h + (q - p) @ V   # steer only
      out = rmsnorm(h) * w

  rmsnorm is timed both as ``F.rms_norm`` and as the HF/Llama recipe (upcast to fp32,
  ``x * rsqrt(mean(x^2) + eps)``, downcast, times w); the faster of the two is the baseline.
* fused: ``torch.ops.steerkernel.junction`` (the raw op, preallocated outputs).

Modes: ``steer`` = every row in an active slot, every concept shifted (dense worst case for
the update); ``steer1`` = every row steered along one concept (the common case, fused only;
the torch chain costs the same as ``steer``); ``monitor`` = no slot (readout + add + norm).

GB/s is the fused kernel's bytes moved once over its time: read residual, x and V, write
residual, out, scores and norms.  Both sides run interleaved call by call in the same process
with ``torch.set_num_threads(threads)``; medians (and mins, which show the uncontended cost on a
shared machine) over the rounds.

    python benchmarks/cpu_kernel_quick.py [--dtypes float32,bfloat16] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import steerkernel  # noqa: F401  (registers torch.ops.steerkernel.junction)
import steerkernel._C as _C


def torch_chain(residual, x, V, slot, shift, lo, hi, w, eps, steer, hf_norm):
    h = residual + x
    p = h @ V.T
    if steer:
        q = torch.clamp(p + shift[slot], lo[slot], hi[slot])
        h = h + (q - p).to(h.dtype) @ V
    if hf_norm:
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        out = w * hf.to(h.dtype)
    else:
        out = F.rms_norm(h, (h.shape[-1],), w, eps)
    return p, out


def sample_interleaved(fns, budget_s, min_reps=7, max_reps=2000):
    """Time each of ``fns`` once per round, rounds until ``budget_s``; per-fn sample lists."""
    for fn in fns:  # warm-up
        fn()
    samples = [[] for _ in fns]
    t_end = time.perf_counter() + budget_s
    while len(samples[0]) < min_reps or (time.perf_counter() < t_end
                                         and len(samples[0]) < max_reps):
        for fn, out in zip(fns, samples):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return samples


def bench_shape(dtype, d, T, K, P=5, eps=1e-6, budget_s=0.4):
    g = torch.Generator().manual_seed(0)
    residual0 = torch.randn(T, d, generator=g).to(dtype)
    x = torch.randn(T, d, generator=g).to(dtype)
    V = F.normalize(torch.randn(K, d, generator=g), dim=1).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    slot = torch.randint(1, P, (T,), generator=g, dtype=torch.int32)
    shift = torch.randn(P, K, generator=g) * 0.1            # dense: every concept moves
    lo = torch.full((P, K), -math.inf)
    hi = torch.full((P, K), math.inf)
    shift1 = torch.zeros(P, K)
    shift1[:, 0] = 0.5                                       # one concept moves
    scores = torch.empty(T, K)
    norms = torch.empty(T)
    out = torch.empty(T, d, dtype=dtype)
    op = torch.ops.steerkernel.junction.default
    slot_l = slot.long()
    # the kernel updates residual in place; re-copying would dominate small shapes, and the
    # values drift only by repeated residual += x (+ a small shift), harmless for timing
    res_f = residual0.clone()
    res_t = residual0.clone()

    def fused(sl, sh):
        def run():
            op(res_f, V, x, sl, sh if sl is not None else None, lo if sl is not None else None,
               hi if sl is not None else None, None, None, None, None, w, eps, scores, norms, out)
        return run

    def chain(steer, hf):
        return lambda: torch_chain(res_t, x, V, slot_l, shift, lo, hi, w, eps, steer, hf)

    # bytes moved once by the fused kernel
    es = residual0.element_size()
    nbytes = (3 * T * d * es + V.numel() * V.element_size() + T * d * es + T * K * 4 + T * 4)
    rows = []
    for mode in ("steer", "steer1", "monitor"):
        steer = mode != "monitor"
        fns = [fused(slot if steer else None, shift1 if mode == "steer1" else shift)]
        if mode != "steer1":  # the torch chain does not depend on the table contents
            fns += [chain(steer, False), chain(steer, True)]
        samples = sample_interleaved(fns, budget_s)
        t_fused, m_fused = statistics.median(samples[0]), min(samples[0])
        if len(samples) > 1:  # the faster rmsnorm variant is the baseline
            meds = [statistics.median(x) for x in samples[1:]]
            best = samples[1 + meds.index(min(meds))]
            t_torch, m_torch = statistics.median(best), min(best)
        else:
            t_torch = m_torch = math.nan
        rows.append((mode, t_torch, t_fused, m_torch, m_fused, nbytes / t_fused / 1e9))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ds", default="576,2048,4096")
    ap.add_argument("--Ts", default="1,64,2048")
    ap.add_argument("--Ks", default="16,171")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1.0,
                    help="seconds of interleaved rounds per (shape, mode)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, kernel: {_C.simd_description()}")
    print("# torch / fused: median (min) µs over interleaved rounds; speedup = ratio of medians "
          "(of mins); GB/s: fused kernel at its median, bytes moved once")
    print(f"{'dtype':>8} {'d':>5} {'T':>5} {'K':>4} {'mode':>8} {'torch_us':>18} {'fused_us':>18} "
          f"{'speedup':>14} {'GB/s':>6}")
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for d in map(int, args.ds.split(",")):
            for T in map(int, args.Ts.split(",")):
                for K in map(int, args.Ks.split(",")):
                    for mode, tt, tf, mt, mf, gbs in bench_shape(dtype, d, T, K,
                                                                 budget_s=args.budget):
                        if mode == "steer1":
                            t_s, speed = "", ""
                        else:
                            t_s = f"{tt * 1e6:.1f} ({mt * 1e6:.1f})"
                            speed = f"{tt / tf:.2f} ({mt / mf:.2f})"
                        f_s = f"{tf * 1e6:.1f} ({mf * 1e6:.1f})"
                        print(f"{dt:>8} {d:>5} {T:>5} {K:>4} {mode:>8} {t_s:>18} {f_s:>18} "
                              f"{speed:>14} {gbs:6.1f}", flush=True)


if __name__ == "__main__":
    main()
