"""Correctness of every GPU kernel variant against the float64 reference, in one call.

    python benchmarks/gpu_check.py --out DIR [--budget SECONDS]     # on a GPU machine
    python benchmarks/gpu_check.py --dry-run --out DIR              # rehearsal on the CPU

Stages (each case is a fresh random draw, outputs poisoned with NaN before the call, compared
with the fp64 reference within steerkernel.testing's per-dtype tolerances):

1. ``matrix``   every backend variant (``cuda``; ``triton`` with each of its kernels forced) at
                T in {0, 1, 64, 65, 1056, 8192} x d in {4096, 8192, 16384} x K in {16, 171, 512},
                bf16 residual with fp32 V, steering with gates and latch; plus fp16/fp32 at one
                shape per variant.
2. ``layouts``  x aliasing the residual (``x is residual``), scores as a strided view of a
                ``[T, layers, K]`` monitor buffer, monitor-only calls, a call on a side stream.
3. ``graph``    one captured CUDA graph replayed 4 times with the slot tables, the gate
                thresholds and the latch changed in place between replays; each replay is
                compared with the reference run on the same inputs.
4. ``sanitize`` (``--small``) a handful of small cases only, for compute-sanitizer runs.

``--dry-run`` runs every stage that can run without a GPU: the CPU backend, and the Triton
kernels under ``TRITON_INTERPRET=1`` (set by this script before triton is imported), at small
shapes; the CUDA-only stages report "skipped: needs CUDA".  Results: ``gpu_check.json`` (one
row per case: variant, shape, dtype, pass/fail, message, seconds) and a summary table on
stdout; exit status 1 if any case failed.  The whole run stops starting cases when
``--budget`` seconds are spent and says which were not run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import steerkernel  # noqa: E402,F401
from steerkernel import backends  # noqa: E402
from steerkernel.testing import check_backend, make_case, run_case  # noqa: E402

FULL_T = (0, 1, 64, 65, 1056, 8192)
FULL_D = (4096, 8192, 16384)
FULL_K = (16, 171, 512)
DRY_T = (0, 1, 64, 65)
DRY_D = (96,)
DRY_K = (16, 40)
DRY_SHAPE = (65, 96, 40)  # one shape for the dtype and layout checks


def triton_paths():
    """The Triton kernels that can be forced one by one (empty if Triton cannot run)."""
    try:
        from steerkernel.backends import triton_junction as tj
    except Exception:  # noqa: BLE001 - no triton here
        return None, ()
    paths = getattr(tj, "PATHS", None) or ("row", "chunked", "tile")
    return tj, tuple(paths)


def variants(device: str):
    """``[(label, backend, forced triton path or None)]`` runnable on ``device``."""
    out = []
    status = backends.backend_status()
    native = "cuda" if device == "cuda" else "cpu"
    if status[native][0]:
        out.append((native, native, None))
    if status["triton"][0]:
        tj, paths = triton_paths()
        out.extend((f"triton:{p}", "triton", p) for p in paths)
    return out


class Runner:
    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.rows = []
        self.skipped = 0

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, stage: str, label: str, fn, **meta) -> None:
        if self.left() <= 0:
            self.skipped += 1
            return
        t = time.perf_counter()
        try:
            fn()
            ok, msg = True, ""
        except Exception as e:  # noqa: BLE001 - every failure is a row of the report
            ok, msg = False, f"{type(e).__name__}: {e}"[:600]
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
        self.rows.append(dict(stage=stage, variant=label, ok=ok, message=msg,
                              seconds=round(time.perf_counter() - t, 3), **meta))
        if not ok:
            print(f"FAIL {stage} {label} {meta}: {msg}", flush=True)


def _with_path(backend: str, path, fn):
    """Run ``fn`` with the Triton kernel ``path`` forced (no-op for other backends)."""
    if backend != "triton" or path is None:
        return fn()
    tj, _ = triton_paths()
    old = tj.FORCE_PATH
    tj.FORCE_PATH = path
    try:
        return fn()
    finally:
        tj.FORCE_PATH = old


def _applicable(path, T, d, K) -> bool:
    tj, _ = triton_paths()
    ok = getattr(tj, "path_applies", None)
    return True if (path is None or ok is None) else bool(ok(path, T, d, K))


def stage_matrix(r: Runner, device: str, dry: bool, seed: int) -> None:
    Ts, ds, Ks = (DRY_T, DRY_D, DRY_K) if dry else (FULL_T, FULL_D, FULL_K)
    for (label, backend, path), T, d, K in itertools.product(variants(device), Ts, ds, Ks):
        if not _applicable(path, T, d, K):
            continue
        seed += 1
        case = make_case(T, d, K, torch.bfloat16, gate="mixed", latch=True, seed=seed,
                         device=device)
        r.run("matrix", label, lambda: _with_path(backend, path,
                                                  lambda: check_backend(case, backend)),
              T=T, d=d, K=K, dtype="bf16")
    T, d, K = DRY_SHAPE if dry else (1056, 4096, 171)
    for (label, backend, path), dtype in itertools.product(variants(device),
                                                           (torch.float16, torch.float32)):
        if not _applicable(path, T, d, K):
            continue
        seed += 1
        case = make_case(T, d, K, dtype, gate="above", latch=True, seed=seed, device=device)
        r.run("matrix", label, lambda: _with_path(backend, path,
                                                  lambda: check_backend(case, backend)),
              T=T, d=d, K=K, dtype=str(dtype).replace("torch.", ""))


def _check_x_is_residual(case, backend) -> None:
    """``x`` *being* the residual: h = 2·residual."""
    kw = dict(case.kwargs)
    results = []
    for b in (backend, "reference"):
        r = kw["residual"].clone()
        args = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}
        args.update(residual=r, x=r)
        results.append(steerkernel.ops.junction(**args, backend=b) + (r,))
    (s, n, o, res), (s_ref, n_ref, o_ref, res_ref) = results
    from steerkernel.testing import SCORE_TOLERANCES, TOLERANCES, assert_close

    dt = kw["residual"].dtype
    assert_close(s, s_ref, SCORE_TOLERANCES[dt], "scores (x is residual)")
    assert_close(res, res_ref, TOLERANCES[dt], "residual (x is residual)")
    if o_ref is not None:
        assert_close(o, o_ref, TOLERANCES[dt], "out (x is residual)")


def stage_layouts(r: Runner, device: str, dry: bool, seed: int) -> None:
    T, d, K = DRY_SHAPE if dry else (1056, 4096, 171)
    for label, backend, path in variants(device):
        if not _applicable(path, T, d, K):
            continue
        seed += 10
        c1 = make_case(T, d, K, torch.bfloat16, gate="mixed", seed=seed, device=device)
        r.run("layouts", label, lambda: _with_path(backend, path,
                                                   lambda: _check_x_is_residual(c1, backend)),
              T=T, d=d, K=K, what="x is residual")
        c2 = make_case(T, d, K, torch.bfloat16, strided_scores=True, seed=seed + 1,
                       device=device)
        r.run("layouts", label, lambda: _with_path(backend, path,
                                                   lambda: check_backend(c2, backend)),
              T=T, d=d, K=K, what="strided scores view")
        c3 = make_case(T, d, K, torch.bfloat16, slots="none", seed=seed + 2, device=device)
        r.run("layouts", label, lambda: _with_path(backend, path,
                                                   lambda: check_backend(c3, backend)),
              T=T, d=d, K=K, what="monitor only")
        if device == "cuda":
            c4 = make_case(T, d, K, torch.bfloat16, gate="above", latch=True, seed=seed + 3,
                           device=device)

            def on_side_stream():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    _with_path(backend, path, lambda: check_backend(c4, backend))
                torch.cuda.current_stream().wait_stream(side)

            r.run("layouts", label, on_side_stream, T=T, d=d, K=K, what="side stream")
        else:
            r.rows.append(dict(stage="layouts", variant=label, ok=None, what="side stream",
                               message="skipped: needs CUDA", seconds=0.0))


def _graph_replays(backend: str, path, T: int, d: int, K: int, seed: int) -> None:
    """Capture one call with static buffers; change tables and latch in place between
    replays; each replay must equal the reference on the same inputs."""
    from steerkernel.testing import SCORE_TOLERANCES, TOLERANCES, assert_close

    case = make_case(T, d, K, torch.bfloat16, gate="mixed", latch=True, seed=seed,
                     device="cuda")
    kw = case.kwargs
    base_res = kw["residual"].clone()
    static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}
    static["scores"] = torch.empty(T, K, device="cuda")
    static["norms"] = torch.empty(T, device="cuda")
    static["out"] = torch.empty_like(static["residual"])

    def call():
        steerkernel.ops.junction(**static, backend=backend, check_values=False)

    def fresh_inputs():
        static["residual"].copy_(base_res)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fresh_inputs()
            _with_path(backend, path, call)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    fresh_inputs()
    with torch.cuda.graph(g):
        _with_path(backend, path, call)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for replay in range(4):
        # new programs, thresholds and latch state, written into the captured buffers
        static["shift"].copy_(torch.randn(static["shift"].shape, generator=gen))
        static["gate_threshold"].copy_(torch.randn(static["gate_threshold"].shape,
                                                   generator=gen) * 0.1)
        static["latch"].copy_((torch.rand(static["latch"].shape, generator=gen) < 0.3)
                              .to(torch.int32))
        inputs = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in static.items()}
        inputs.pop("scores"); inputs.pop("norms"); inputs.pop("out")
        inputs["residual"] = base_res.clone()
        s_ref, n_ref, o_ref = steerkernel.ops.junction(**inputs, backend="reference")
        fresh_inputs()
        g.replay()
        torch.cuda.synchronize()
        dt = base_res.dtype
        assert_close(static["scores"], s_ref, SCORE_TOLERANCES[dt], f"replay {replay} scores")
        assert_close(static["residual"], inputs["residual"], TOLERANCES[dt],
                     f"replay {replay} residual")
        assert_close(static["out"], o_ref, TOLERANCES[dt], f"replay {replay} out")
        assert torch.equal(static["latch"].cpu(), inputs["latch"].cpu()), f"replay {replay} latch"


def stage_graph(r: Runner, device: str, dry: bool, seed: int) -> None:
    for label, backend, path in variants(device):
        if device != "cuda":
            r.rows.append(dict(stage="graph", variant=label, ok=None,
                               message="skipped: needs CUDA", seconds=0.0))
            continue
        for T in (1, 64, 1056):
            if _applicable(path, T, 4096, 171):
                r.run("graph", label, lambda: _graph_replays(backend, path, T, 4096, 171,
                                                             seed + T), T=T, d=4096, K=171)


def stage_sanitize(r: Runner, device: str, seed: int) -> None:
    for label, backend, path in variants(device):
        for T, d, K in ((1, 4096, 16), (65, 4096, 171), (130, 256, 40)):
            if not _applicable(path, T, d, K):
                continue
            seed += 1
            case = make_case(T, d, K, torch.bfloat16, gate="mixed", latch=True, seed=seed,
                             device=device)
            r.run("sanitize", label, lambda: _with_path(backend, path,
                                                        lambda: run_case(case, backend)),
                  T=T, d=d, K=K)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU rehearsal: CPU backend + Triton interpreter, small shapes")
    ap.add_argument("--small", action="store_true",
                    help="only a few small cases (for compute-sanitizer)")
    ap.add_argument("--out", default=None, help="directory for gpu_check.json")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds (default 150)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to rehearse on the CPU)",
              file=sys.stderr)
        return 2
    r = Runner(args.budget)
    if args.small:
        stage_sanitize(r, device, args.seed)
    else:
        stage_matrix(r, device, args.dry_run, args.seed)
        stage_layouts(r, device, args.dry_run, args.seed + 10_000)
        stage_graph(r, device, args.dry_run, args.seed + 20_000)
    failed = [x for x in r.rows if x["ok"] is False]
    passed = [x for x in r.rows if x["ok"] is True]
    skipped = [x for x in r.rows if x["ok"] is None]
    report = dict(device=(torch.cuda.get_device_name() if device == "cuda" else "cpu"),
                  dry_run=args.dry_run, torch=torch.__version__, passed=len(passed),
                  failed=len(failed), skipped=len(skipped), not_run_budget=r.skipped,
                  seconds=round(time.perf_counter() - r.t0, 1), cases=r.rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
    by = {}
    for x in r.rows:
        key = (x["stage"], x["variant"])
        p, f_, s = by.get(key, (0, 0, 0))
        by[key] = (p + (x["ok"] is True), f_ + (x["ok"] is False), s + (x["ok"] is None))
    print(f"{'stage':<9} {'variant':<16} passed failed skipped")
    for (stage, variant), (p, f_, s) in by.items():
        print(f"{stage:<9} {variant:<16} {p:>6} {f_:>6} {s:>7}")
    print(f"gpu_check: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped, "
          f"{r.skipped} not run (budget) in {report['seconds']} s on {report['device']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
