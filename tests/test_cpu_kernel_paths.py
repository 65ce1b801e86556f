"""The CPU kernel's code paths (csrc/junction_cpu_kernel.h), under every instruction set.

The kernel picks, per call, things that must never change a result: the concept-block width
(6 or 4 with AVX-512, narrower where the rows' stride would alias in L1), the fp32 row copy of
pass A (from 64 concepts and 16 rows at a stride of a multiple of 1 KiB), partial row and
concept blocks, the bf16 x bf16 vdpbf16ps projection.  Here every such path is compared with
the float64 reference (tolerances of steerkernel/testing.py) and, bit for bit, with itself
across batch sizes, positions and thread counts, for each instruction set this CPU has
(``STEERKERNEL_CPU_ISA`` is read once per process: each runs in a subprocess).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from steerkernel import backends

pytestmark = pytest.mark.skipif(not backends.backend_status()["cpu"][0],
                                reason="the C++ CPU backend is unavailable")

CHECKS = textwrap.dedent(r'''
    import itertools, sys
    import torch
    from steerkernel.backends import native
    from steerkernel.ops import junction
    from steerkernel.testing import check_backend, make_case

    print(native.load("_C").simd_description().split()[0], flush=True)

    def strided(case, pad):
        """The same case with residual / x / out rows ``pad`` elements apart beyond d."""
        kw = case.kwargs
        for name in ("residual", "x"):
            t = kw.get(name)
            if t is not None:
                wide = torch.empty(t.shape[0], t.shape[1] + pad, dtype=t.dtype)
                wide[:, :t.shape[1]] = t
                kw[name] = wide[:, :t.shape[1]]
        return case

    # 1. against the float64 reference
    shapes = [  # (T, d, K): tails, aliasing strides, block remainders, copy threshold
        (1, 64, 1), (3, 100, 5), (5, 256, 7), (17, 2048, 16), (16, 1024, 64), (15, 1024, 64),
        (20, 2051, 70), (9, 576, 171), (70, 512, 6), (33, 2048, 3)]
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
              (torch.bfloat16, "model"), (torch.float16, torch.float32),
              (torch.float16, "model")]
    n = 0
    for (T, d, K), (dt, vdt), slots in itertools.product(shapes, dtypes, ("none", "random")):
        case = make_case(T, d, K, dt, v_dtype=vdt, slots=slots, seed=T * 1000 + d + K,
                         kinds=("add", "ablate", "cap_above", "pin"))
        check_backend(case, "cpu")
        n += 1
    for pad in (0, 3, 256):  # row strides d, d + 3, d + 256 (aliasing or not)
        for (T, d, K) in ((17, 768, 64), (6, 1024, 9)):
            check_backend(strided(make_case(T, d, K, torch.float32, slots="random", seed=pad),
                                  pad), "cpu")
            n += 1
    for T, d in ((1, 64), (7, 2048), (40, 100)):  # no V: plain add + RMSNorm
        check_backend(make_case(T, d, 0, torch.float32, slots="none", seed=d), "cpu")
        check_backend(make_case(T, d, 0, torch.bfloat16, slots="none", seed=d), "cpu")
        n += 2
    print("reference ok", n, flush=True)

    # 2. batch invariance: a row's outputs alone vs in batches of every size / position,
    #    across the copy (T >= 16) and tile thresholds, with 1 and 2 threads
    def run(pool, rows, steer):
        kw = {k: v for k, v in pool.items()}
        for name in ("residual", "x", "slot"):
            if name in kw:
                kw[name] = pool[name][rows].clone()
        if not steer:
            for name in ("slot", "shift", "lo", "hi"):
                kw.pop(name, None)
        s, nm, out = junction(**kw, backend="cpu", check_values=False)
        return s, nm, out, kw["residual"]

    checked = 0
    for (d, K, dt, vdt) in ((1024, 64, torch.float32, torch.float32),
                            (2048, 16, torch.float32, torch.float32),
                            (576, 171, torch.float32, torch.float32),
                            (1024, 70, torch.bfloat16, torch.bfloat16),
                            (256, 0, torch.float32, torch.float32)):
        g = torch.Generator().manual_seed(d + K)
        Tmax, P = 90, 4
        pool = dict(residual=torch.randn(Tmax, d, generator=g).to(dt),
                    x=torch.randn(Tmax, d, generator=g).to(dt),
                    weight=(torch.rand(d, generator=g) + 0.5).to(dt))
        if K:
            pool.update(V=torch.nn.functional.normalize(torch.randn(K, d, generator=g),
                                                        dim=1).to(vdt),
                        slot=torch.randint(0, P, (Tmax,), generator=g).to(torch.int32),
                        shift=torch.randn(P, K, generator=g), lo=torch.full((P, K), -0.5),
                        hi=torch.full((P, K), 0.5))
        else:
            pool["V"] = None
        probe = 5
        for steer in ((False, True) if K else (False,)):
            ref = run(pool, torch.tensor([probe]), steer)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for T in (1, 2, 15, 16, 17, 65, 90):
                    for pos in {0, T // 2, T - 1}:
                        others = [i for i in range(Tmax) if i != probe][:T - 1]
                        rows = torch.tensor(others[:pos] + [probe] + others[pos:])
                        got = run(pool, rows, steer)
                        what = f"d={d} K={K} {dt} steer={steer} T={T} pos={pos} thr={threads}"
                        for a, b, name in zip(got, ref, ("scores", "norms", "out", "residual")):
                            if a is None:
                                assert b is None, (name, what)
                                continue
                            assert torch.equal(a[pos], b[0]), f"{name} differs: {what}"
                        checked += 1
            torch.set_num_threads(1)
    print("batch invariance ok", checked, flush=True)

    # 3. 16-bit stores bit for bit: the stored residual equals torch's rounding of r + x for
    #    every kind of value (ties, subnormal sums, values that round to inf, inf, NaN), in the
    #    SIMD body and the scalar tail, with and without V (vcvtneps2bf16 path and fallback)
    f32 = torch.tensor([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -1.0 - 2 ** -8, 3e38, -3.3e38,
                        1e-39, -1e-40, 2 ** -126, 2 ** -149, 0.0, -0.0, float("inf"),
                        float("-inf"), float("nan"), 65504.0, 65520.0, 6e-8, 1.5e-5, 1e-45,
                        3.4e38, 1.17e-38, 5.9e-39, 123.456])
    g = torch.Generator().manual_seed(7)
    for dt in (torch.bfloat16, torch.float16):
        for d in (48, 53):  # all SIMD vectors / a scalar tail
            vals = f32[torch.randint(0, len(f32), (6, d), generator=g)]
            # one vector in every row stays free of special values (the fast path runs)
            vals[:, :16] = torch.randn(6, 16, generator=g)
            r = vals.to(dt)
            x = (vals * torch.rand(6, d, generator=g)).to(dt)
            want = (r.float() + x.float()).to(dt)
            for K in (0, 3):
                V = (torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=1).to(dt)
                     if K else None)
                res = r.clone()
                junction(res, V, x=x.clone(), weight=torch.ones(d, dtype=dt), eps=1e-6,
                         backend="cpu", check_values=False)
                nan = want.isnan()
                assert torch.equal(res.isnan(), nan), (dt, d, K)
                got_bits = res.view(torch.int16)[~nan]
                assert torch.equal(got_bits, want.view(torch.int16)[~nan]), (dt, d, K)
    print("16-bit stores ok", flush=True)
''')


def _isas():
    """Instruction sets to run: the detected one and every lower one."""
    from steerkernel.backends import native

    best = native.load("_C").simd_description().split()[0]
    order = ["portable", "avx2", "avx512", "avx512bf16"]
    have = order[: order.index(best) + 1] if best in order else [best]
    # avx512bf16 is what STEERKERNEL_CPU_ISA unset gives on such a CPU; "avx512" forces the
    # plain AVX-512 kernels (fp32 dot for bf16 x bf16)
    return [i for i in have]


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512", "avx512bf16"])
def test_kernel_paths_under_each_isa(isa):
    if isa not in _isas():
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ)
    env.pop("STEERKERNEL_CPU_ISA", None)
    if isa != "avx512bf16":
        env["STEERKERNEL_CPU_ISA"] = isa
    r = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, f"{isa}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    lines = r.stdout.split("\n")
    assert lines[0] == isa, f"asked for {isa}, the kernel says {lines[0]}"
    assert "reference ok" in r.stdout and "batch invariance ok" in r.stdout
    assert "16-bit stores ok" in r.stdout
