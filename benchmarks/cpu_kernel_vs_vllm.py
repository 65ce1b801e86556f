"""CPU kernel targets of issue 13, measured side by side in one run, with this machine's roofline.

1. Monitoring cost vs vLLM: T = 256, d = 2048, K = 16, fp32 and bf16 (residual, x, V, weight), monitor + fused RMSNorm (no
   steering) against vLLM's own CPU ``fused_add_rms_norm`` (``torch.ops._C``, registered by
   ``import vllm._custom_ops``; in place: ``x <- rmsnorm(x + r) * w``, ``r <- x + r``).  The
   kernel runs twice: with ``out = x`` (the same in-place contract and memory traffic as vLLM's
   op) and with a separate preallocated ``out`` (one more write stream, plus its
   read-for-ownership); its plain add + RMSNorm (``V = None``) runs alongside as the floor.
2. K = 171 vs the unfused eager torch chain (``steerkernel.bench.cases.make_chain``: add,
   fp32 matmul, clamp, add, rmsnorm) at T in {64, 256, 2048}, d in {576, 2048, 4096}, for
   monitoring (monitor_norm) and steering every row (steer_norm).

Roofline figures measured in the same run: the single-core FMA peak (a hand-written loop of 12
independent AVX-512 / AVX2 FMA chains, compiled here with the system C compiler; ``torch.mm``
of a 1024^3 fp32 product as a second reference) and the copy bandwidth (``dst.copy_(src)`` on
256 MiB, read + write counted, steerkernel.bench.roofline).  Per K = 171 case: FLOPs =
2·T·K·d (projection) + the same again when steering (update), bytes as counted by
``steerkernel.bench.roofline.junction_work``; roofline time = max(FLOPs / FMA peak, bytes /
copy bandwidth); ``serial`` = their sum (what a core that cannot overlap its FMAs with its DRAM
traffic can reach).

Every implementation is timed interleaved call by call (one call of each, round after round;
wall clock, and the calling thread's CPU time, which leaves out the time the thread sat
descheduled behind other jobs on a shared machine) on its own pool of input copies, rotating
over enough copies that one rotation moves at least twice the last-level cache ("cold": every
call reads DRAM); the T = 256 vLLM comparison is also run "warm" (one copy per
implementation, each timed call right after an untimed call on the same copy, so its data
sits in L2/L3).  Times are medians.  Each implementation's outputs are
checked against the float64 reference before timing.

    python benchmarks/cpu_kernel_vs_vllm.py [--threads 1] [--budget 4] [--quick] [--out DIR]

writes ``benchmarks/results/cpu-kernel-vs-vllm-<machine>-<UTC date>.json``.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from steerkernel import backends  # noqa: E402
from steerkernel.bench import cases as bc  # noqa: E402
from steerkernel.bench import runner as br  # noqa: E402
from steerkernel.bench.roofline import copy_bandwidth, junction_work  # noqa: E402
from steerkernel.bench.timing import time_cpu  # noqa: E402
from steerkernel.ops import JunctionArgs  # noqa: E402
from steerkernel.ops.junction import junction, prepare_junction  # noqa: E402
from steerkernel.testing import Tol, assert_close  # noqa: E402

EPS = 1e-6
CHECK_TOL = Tol(rtol=1e-3, atol=1e-3)

_FMA_C = r"""
#include <immintrin.h>
#include <stdint.h>
#define CHAINS(T, SET, FMA, RED)                                                          \
  T a0 = SET(1.0f), a1 = SET(1.1f), a2 = SET(1.2f), a3 = SET(1.3f), a4 = SET(1.4f),      \
    a5 = SET(1.5f), a6 = SET(1.6f), a7 = SET(1.7f), a8 = SET(1.8f), a9 = SET(1.9f),      \
    a10 = SET(2.0f), a11 = SET(2.1f);                                                    \
  const T m = SET(0.999999f), c = SET(1e-7f);                                            \
  for (int64_t i = 0; i < n; ++i) {                                                       \
    a0 = FMA(a0, m, c); a1 = FMA(a1, m, c); a2 = FMA(a2, m, c); a3 = FMA(a3, m, c);       \
    a4 = FMA(a4, m, c); a5 = FMA(a5, m, c); a6 = FMA(a6, m, c); a7 = FMA(a7, m, c);       \
    a8 = FMA(a8, m, c); a9 = FMA(a9, m, c); a10 = FMA(a10, m, c); a11 = FMA(a11, m, c);   \
  }                                                                                       \
  return RED(a0) + RED(a1) + RED(a2) + RED(a3) + RED(a4) + RED(a5) + RED(a6) + RED(a7)   \
       + RED(a8) + RED(a9) + RED(a10) + RED(a11);
__attribute__((target("avx512f"))) static inline float r512(__m512 v) {
  return _mm512_reduce_add_ps(v);
}
__attribute__((target("avx"))) static inline float r256(__m256 v) {
  float o[8];
  _mm256_storeu_ps(o, v);
  return o[0] + o[7];
}
__attribute__((target("avx512f"))) float fma512(int64_t n) {
  CHAINS(__m512, _mm512_set1_ps, _mm512_fmadd_ps, r512)
}
__attribute__((target("avx2,fma"))) float fma256(int64_t n) {
  CHAINS(__m256, _mm256_set1_ps, _mm256_fmadd_ps, r256)
}
"""


def fma_peak(reps: int = 40, n: int = 2_000_000) -> dict:
    """Single-thread FMA peak: 12 independent FMA chains (no loads), GFLOP/s max and median."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return {"error": "no C compiler to build the FMA loop"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "fma.c"), os.path.join(tmp, "fma.so")
        with open(src, "w") as f:
            f.write(_FMA_C)
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", src, "-o", lib],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return {"error": f"compiling the FMA loop failed: {r.stderr[-500:]}"}
        so = ctypes.CDLL(lib)
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        for name, lanes, need in (("avx512", 16, " avx512f"), ("avx2", 8, " fma")):
            if need not in flags:
                continue
            fn = getattr(so, f"fma{lanes * 32}")
            fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_int64]
            fn(n // 10)
            xs = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(n)
                xs.append(time.perf_counter() - t0)
            flop = n * 12 * lanes * 2
            out[name] = {"gflops_max": flop / min(xs) / 1e9,
                         "gflops_median": flop / statistics.median(xs) / 1e9, "reps": reps}
    return out


def sgemm_gflops(reps: int = 10, n: int = 1024) -> dict:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        xs.append(time.perf_counter() - t0)
    return {"gflops_max": 2 * n ** 3 / min(xs) / 1e9,
            "gflops_median": 2 * n ** 3 / statistics.median(xs) / 1e9, "shape": [n, n, n]}


# ----------------------------------------------------------------------------- timing

def interleaved(fns, budget_s: float, min_rounds: int = 7, max_rounds: int = 2000,
                warm_first: bool = False) -> list:
    """Per function, ``(wall, cpu)`` seconds per call: one call of each per round (the order
    rotating), rounds until ``budget_s`` (at least ``min_rounds``); ``cpu`` is the calling
    thread's CPU time (``time.thread_time``: leaves out the time the thread sat descheduled
    behind other jobs; meaningful with one thread).  ``warm_first``: each timed call right
    after an untimed call of the same function (its data then in the caches)."""
    for f in fns:  # warm-up
        f()
        f()
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    t_end = time.perf_counter() + budget_s
    r = 0
    while r < min_rounds or (time.perf_counter() < t_end and r < max_rounds):
        for i in range(len(fns)):
            k = (i + r) % len(fns)
            if warm_first:
                fns[k]()
            c0 = time.thread_time()
            t0 = time.perf_counter()
            fns[k]()
            t1 = time.perf_counter()
            c1 = time.thread_time()
            wall[k].append(t1 - t0)
            cpu[k].append(c1 - c0)
        r += 1
    return list(zip(wall, cpu))


def summary(samples) -> dict:
    """Median, p10, p90 of the wall-clock samples, and the median thread CPU time."""
    wall, cpu = samples
    s = sorted(wall)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"median_s": statistics.median(s), "p10_s": q(0.1), "p90_s": q(0.9), "n": len(s),
            "cpu_median_s": statistics.median(cpu)}


def rotating(fn, items):
    state = [0]

    def run():
        i = state[0]
        state[0] = (i + 1) % len(items)
        fn(items[i])
    return run


def nsets_for(work_bytes: int, cold: bool) -> int:
    if not cold:
        return 1
    return bc.num_sets(work_bytes, br.llc_bytes(), max_sets=64, mem_cap=1 << 30)


# ----------------------------------------------------------------------------- target 1

def vllm_op():
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
        return torch.ops._C.fused_add_rms_norm, None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def target_vllm(op, budget: float, T=256, d=2048, K=16, dtype=torch.float32,
                peak_gflops=None) -> dict:
    """Kernel (monitor, and plain add + RMSNorm) vs vLLM's fused_add_rms_norm at one shape;
    residual, x, V and weight all in ``dtype`` (fp32, or bf16 as a bf16 model serves)."""
    vop, why = vllm_op()
    if vop is None:
        return {"skipped": f"vLLM's fused_add_rms_norm is not importable: {why}"}
    gen = torch.Generator().manual_seed(0)
    V = torch.nn.functional.normalize(torch.randn(K, d, generator=gen), dim=1).to(dtype)
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    esz = torch.finfo(dtype).bits // 8
    tol = CHECK_TOL if dtype == torch.float32 else Tol(rtol=2e-2, atol=2e-2)

    def mk():
        return {"r": torch.randn(T, d, generator=gen).to(dtype),
                "x": torch.randn(T, d, generator=gen).to(dtype),
                "out": torch.empty(T, d, dtype=dtype), "sc": torch.empty(T, K),
                "nm": torch.empty(T)}

    def call(s, v, inplace):
        return JunctionArgs(residual=s["r"], V=v, x=s["x"], weight=w, eps=EPS,
                            scores=s["sc"] if v is not None else None, norms=s["nm"],
                            out=s["x"] if inplace else s["out"])

    impls = {  # name -> (fn(set), bytes moved)
        "vllm_fused_add_rms_norm": (lambda s: vop(s["x"], s["r"], w, EPS), 4 * T * d * esz),
        "kernel_monitor_out_is_x": (lambda s: op(*call(s, V, True)),
                                    4 * T * d * esz + K * d * esz),
        "kernel_monitor_out_separate": (lambda s: op(*call(s, V, False)),
                                        4 * T * d * esz + K * d * esz),
        "kernel_addnorm_out_is_x": (lambda s: op(*call(s, None, True)), 4 * T * d * esz),
        "kernel_addnorm_out_separate": (lambda s: op(*call(s, None, False)), 4 * T * d * esz),
    }
    # check vLLM's op and the kernel (out = x) against the float64 reference on one set
    s0 = mk()
    sc, nm, out = junction(s0["r"].double(), V.double(), s0["x"].double(), weight=w.double(),
                           eps=EPS, backend="reference")
    # the stored residual is rounded to dtype; out is computed from the stored value
    h = (s0["r"].double() + s0["x"].double()).to(dtype).double()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w.double()
    a = {k: v.clone() for k, v in s0.items()}
    vop(a["x"], a["r"], w, EPS)
    b = {k: v.clone() for k, v in s0.items()}
    op(*call(b, V, True))
    for name, got, want in (("vllm out", a["x"], out), ("vllm residual", a["r"], h),
                            ("kernel out", b["x"], out), ("kernel residual", b["r"], h),
                            ("kernel scores", b["sc"], sc), ("kernel norms", b["nm"], nm)):
        assert_close(got.double(), want, tol, name)
    res = {"shape": {"T": T, "d": d, "K": K, "dtype": str(dtype).replace("torch.", ""),
                     "mode": "monitor_norm"},
           "checked": True, "regimes": {}}
    if peak_gflops:  # the projection's 2*T*K*d FLOPs alone at the measured fp32 FMA peak
        res["projection_at_fma_peak_s"] = 2 * T * K * d / (peak_gflops * 1e9)
    for regime in ("cold", "warm"):
        n = nsets_for(4 * T * d * esz, regime == "cold")
        if regime == "cold":
            fns = [rotating(f, [mk() for _ in range(n)]) for f, _ in impls.values()]
            times = interleaved(fns, budget)
        else:  # one set per impl, each timed call right after an untimed one on the same set
            sets = [mk() for _ in impls]
            fns = [(lambda f=f, s=s: f(s)) for (f, _), s in zip(impls.values(), sets)]
            times = interleaved(fns, budget, warm_first=True)
        rows = {}
        for (name, (_, nbytes)), xs in zip(impls.items(), times):
            rows[name] = dict(summary(xs), bytes=nbytes)
        base = rows["vllm_fused_add_rms_norm"]
        for r in rows.values():
            r["ratio_to_vllm"] = r["median_s"] / base["median_s"]
            r["ratio_to_vllm_cpu_time"] = r["cpu_median_s"] / base["cpu_median_s"]
        res["regimes"][regime] = {"sets": n, "impls": rows}
    return res


# ----------------------------------------------------------------------------- target 2

def target_chain(op, budget: float, Ts, ds, modes, peak_gflops: float, copy_gbps: float,
                 K=171) -> list:
    out = []
    for mode in modes:
        for d in ds:
            for T in Ts:
                case = bc.JunctionCase(T, d, K, mode, "fp32")
                work = bc.case_work(case)
                n = nsets_for(work.bytes, True)
                pools = [bc.input_sets(case, "cpu", n, seed=i) for i in range(2)]
                kargs = [prepare_junction(**s, eps=bc.EPS, backend="cpu",
                                          check_values=False).args for s in pools[0]]
                chain = bc.make_chain(case.steer, case.norm)
                cargs = [bc._chain_args(s) for s in pools[1]]
                # check both against the float64 reference on private copies
                s = pools[0][0]
                ref = {k: (v.double() if k in ("residual", "x", "V", "weight") else v.clone())
                       for k, v in s.items() if v is not None}
                rs, rn, ro = junction(**ref, eps=bc.EPS, backend="reference")
                ka = prepare_junction(**bc.clone_set(s), eps=bc.EPS, backend="cpu").args
                op(*ka)
                ch = chain(*bc._chain_args(bc.clone_set(s)))
                for who, got in (("kernel", (ka.scores, ka.norms, ka.out, ka.residual)),
                                 ("chain", (ch[1], ch[2], ch[3], ch[0]))):
                    for nm_, g, want in zip(("scores", "norms", "out", "residual"), got,
                                            (rs, rn, ro, ref["residual"])):
                        assert_close(g.double(), want, CHECK_TOL, f"{who} {nm_} {case.name}")
                times = interleaved([rotating(lambda a: op(*a), kargs),
                                     rotating(lambda a: chain(*a), cargs)], budget, min_rounds=5)
                k, c = summary(times[0]), summary(times[1])
                flops = 2 * T * K * d * (2 if case.steer else 1)
                t_fma = flops / (peak_gflops * 1e9)
                t_mem = work.bytes / (copy_gbps * 1e9)
                roof = max(t_fma, t_mem)
                row = {
                    "case": case.name, "T": T, "d": d, "K": K, "mode": mode, "dtype": "fp32",
                    "sets": n, "checked": True, "bytes": work.bytes, "flops": flops,
                    "kernel": k, "chain_eager": c,
                    "roofline_s": roof, "roofline_bound": "compute" if t_fma >= t_mem else "memory",
                    "serial_bound_s": t_fma + t_mem}
                for clock, key in (("", "median_s"), ("_cpu_time", "cpu_median_s")):
                    row[f"speedup_vs_chain{clock}"] = c[key] / k[key]
                    row[f"kernel_gflops{clock}"] = flops / k[key] / 1e9
                    row[f"chain_gflops{clock}"] = flops / c[key] / 1e9
                    row[f"frac_of_roofline{clock}"] = roof / k[key]
                    row[f"frac_of_serial_bound{clock}"] = (t_fma + t_mem) / k[key]
                out.append(row)
                print(f"  {case.name:<42} kernel {k['median_s'] * 1e3:8.3f} ms "
                      f"(cpu {k['cpu_median_s'] * 1e3:8.3f}) chain {c['median_s'] * 1e3:8.3f} ms "
                      f"(cpu {c['cpu_median_s'] * 1e3:8.3f})  speedup "
                      f"{row['speedup_vs_chain']:.2f}x ({row['speedup_vs_chain_cpu_time']:.2f}x)"
                      f"  {row['kernel_gflops_cpu_time']:5.1f} GF/s, "
                      f"{100 * row['frac_of_roofline_cpu_time']:3.0f}% of roofline, "
                      f"{100 * row['frac_of_serial_bound_cpu_time']:3.0f}% of serial (cpu time)",
                      flush=True)
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of rounds per case")
    ap.add_argument("--quick", action="store_true",
                    help="T in {64, 256}, d in {576, 2048} only, 1.5 s per case")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default=None, help="result file name (default: derived)")
    ap.add_argument("--label", default=None, help="free-text label stored in the result")
    ap.add_argument("--system-allocator", action="store_true",
                    help="keep the default allocator (no re-exec with the runner's ALLOC_ENV)")
    args = ap.parse_args(argv)
    if not args.system_allocator and not all(k in os.environ for k in br.ALLOC_ENV):
        env = dict(os.environ, **br.ALLOC_ENV)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
    torch.set_num_threads(args.threads)
    budget = 1.5 if args.quick else args.budget
    Ts = (64, 256) if args.quick else (64, 256, 2048)
    ds = (576, 2048) if args.quick else (576, 2048, 4096)
    op = backends.op_for("cpu")
    info = br.machine_info("cpu")
    start = time.time()
    load0 = os.getloadavg()
    print(f"# {info['cpu_model']}, {info['cores']} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); kernel: {info['cpu_kernel_simd']}")
    peak = fma_peak()
    gemm = sgemm_gflops()
    bw = copy_bandwidth("cpu", lambda fn: time_cpu(fn, warmup_s=0.05, budget_s=1.0))
    peak_g = (peak.get("avx512") or peak.get("avx2") or {}).get("gflops_max")
    if peak_g is None:
        peak_g = gemm["gflops_max"]
    print(f"# FMA peak (1 core): {peak}; torch.mm 1024^3: {gemm['gflops_max']:.1f} GF/s; "
          f"copy bandwidth {bw['gbps']:.1f} GB/s")
    t1 = {}
    for dtype in (torch.float32, torch.bfloat16):
        print(f"# target 1: kernel vs vLLM fused_add_rms_norm, T=256 d=2048 K=16 monitor_norm "
              f"{dtype}")
        t1[dtype] = r1 = target_vllm(op, budget, dtype=dtype, peak_gflops=peak_g)
        for regime, r in r1.get("regimes", {}).items():
            for name, row in r["impls"].items():
                print(f"  {regime:<4} {name:<30} {row['median_s'] * 1e6:9.1f} us  "
                      f"{row['ratio_to_vllm']:.2f}x vLLM   (cpu time "
                      f"{row['cpu_median_s'] * 1e6:9.1f} us  {row['ratio_to_vllm_cpu_time']:.2f}x)")
        if "skipped" in r1:
            print(f"  skipped: {r1['skipped']}")
    print("# target 2: kernel vs unfused eager chain, K=171")
    t2 = target_chain(op, budget, Ts, ds, ("monitor_norm", "steer_norm"), peak_g, bw["gbps"])
    bw2 = copy_bandwidth("cpu", lambda fn: time_cpu(fn, warmup_s=0.05, budget_s=1.0))
    doc = {
        "benchmark": "cpu_kernel_vs_vllm",
        "label": args.label,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "machine": info, "versions": br.versions(), "git": br.git_revision(),
        "settings": {"torch_threads": torch.get_num_threads(), "budget_s": budget,
                     "allocator_env": {k: os.environ.get(k) for k in br.ALLOC_ENV},
                     "check_tol": [CHECK_TOL.rtol, CHECK_TOL.atol],
                     "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())},
        "roofline": {"fma_peak": peak, "fma_peak_gflops_used": peak_g, "torch_mm": gemm,
                     "copy_bandwidth_gbps": max(bw["gbps"], bw2["gbps"]),
                     "copy_bandwidth": {"start": bw, "end": bw2}},
        "target_vllm": t1[torch.float32],
        "target_vllm_bf16": t1[torch.bfloat16],
        "target_chain_k171": t2,
        "elapsed_s": round(time.time() - start, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M")
    machine = f"{br.slug(info['cpu_model'])}-{info['cores']}c"
    name = args.name or f"cpu-kernel-vs-vllm-{machine}-{stamp}.json"
    path = os.path.join(args.out, name)
    br.write_json(path, doc)
    print(f"wrote {path} ({doc['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
