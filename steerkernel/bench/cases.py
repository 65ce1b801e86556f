"""The benchmark registry: cases (what is computed, at which shape) and their implementations.

A *case* is one junction shape (T x d x K, dtype, with/without steering, with/without the fused
RMSNorm) or one end-to-end decode setting.  Every case is measured with several *impls* side by
side in one run:

* ``fused_cpu`` / ``fused_cuda`` / ``fused_triton`` (role ``kernel``): steerkernel's op, called
  through the raw torch op with validated, preallocated buffers (as the model integrations do).
* ``chain_eager`` (role ``baseline``): the unfused torch chain a forward hook runs
  (add, matmul, clamp, add, rmsnorm) — :func:`make_chain`.
* ``chain_compiled`` (role ``baseline``): the same chain under ``torch.compile``.
* ``addnorm_eager`` / ``addnorm_compiled`` / ``vllm_fused_add_rms_norm`` (role ``floor``): a
  plain residual add + RMSNorm with no monitoring or steering, the floor the kernel approaches.

:data:`FAMILIES` maps a family name to ``cases(device, size)``; sizes are ``smoke`` (tiny, for
the test suite), ``quick`` and ``full``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .. import backends
from ..ops.junction import prepare_junction
from ..testing import make_case
from .roofline import Work, add_rmsnorm_work, junction_work

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: mode -> (steer, norm, slots): "steer" steers every token (slots 1..P-1), "idle" passes slots
#: that are all 0 (identity: must cost nearly nothing), "monitor" passes no slot at all.
MODES = {
    "steer_norm": (True, True, "all"),
    "monitor_norm": (False, True, "none"),
    "idle_norm": (True, True, "zero"),
    "steer": (True, False, "all"),
    "monitor": (False, False, "none"),
}
P_SLOTS = 5
EPS = 1e-6
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class JunctionCase:
    T: int
    d: int
    K: int
    mode: str = "steer_norm"
    dtype: str = "fp32"
    family: str = "junction"

    @property
    def name(self) -> str:
        return f"junction_T{self.T}_d{self.d}_K{self.K}_{self.mode}_{self.dtype}"

    @property
    def steer(self) -> bool:
        return MODES[self.mode][0]

    @property
    def norm(self) -> bool:
        return MODES[self.mode][1]

    def params(self) -> dict:
        return dict(T=self.T, d=self.d, K=self.K, mode=self.mode, dtype=self.dtype,
                    steer=self.steer, norm=self.norm, P=P_SLOTS)


@dataclass(frozen=True)
class Unavailable:
    """A registered family that cannot run here; recorded as skipped, with the reason."""

    name: str
    reason: str
    family: str = "unavailable"

    def params(self) -> dict:
        return {}


@dataclass
class Impl:
    """One way to compute a case.  ``prepare(set) -> args`` once per input set (untimed);
    ``call(args)`` is what is timed; ``outputs(args, ret)`` names the results for checking."""

    name: str
    role: str
    work: Work
    prepare: Callable[[dict], tuple]
    call: Callable[[tuple], object]
    outputs: Optional[Callable[[tuple, object], dict]] = None
    compile_key: Optional[tuple] = None
    extra: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------- case lists

def junction_cases(device: str, size: str) -> List[JunctionCase]:
    """The T x d x K sweep.  docs/design.md §6's CPU target grid (d in {576, 2048, 4096}, T in {1, 64,
    2048}, K in {16, 171}) is inside ``full``; ``quick`` keeps d in {576, 4096}."""
    if size == "smoke":
        out = [JunctionCase(T, 64, 4, m) for T in (1, 8) for m in MODES]
        return out + [JunctionCase(8, 64, 4, "steer_norm", "bf16")]
    dt = "fp32" if device == "cpu" else "bf16"
    if size == "quick":
        Ts = (64, 2048, 1)
        out = [JunctionCase(T, d, K, "steer_norm", dt) for T in Ts for d in (576, 4096)
               for K in (16, 171)]
        return out + [JunctionCase(T, d, 171, "monitor_norm", dt) for T in Ts for d in (576, 4096)]
    if size != "full":
        raise ValueError(f"unknown size {size!r} (smoke, quick, full)")
    Ts = (1, 64, 256, 2048) if device == "cpu" else (1, 16, 64, 256, 2048, 8192)
    ds = (576, 2048, 4096) if device == "cpu" else (576, 2048, 4096, 8192)
    out = [JunctionCase(T, d, K, m, dt) for T in Ts for d in ds for K in (16, 171)
           for m in ("steer_norm", "monitor_norm", "steer", "monitor")]
    out += [JunctionCase(T, d, 171, "idle_norm", dt) for T in Ts for d in ds]
    other = "bf16" if dt == "fp32" else "fp16"
    return out + [JunctionCase(T, 2048, 171, "steer_norm", other) for T in (1, 64, 2048)]


@dataclass(frozen=True)
class HFDecodeCase:
    """End-to-end HF decode TPOT, measured by ``benchmarks/bench_hf_decode.py``'s ``run()``:
    stock model vs steerkernel-attached (fused and generic paths) vs naive forward hooks."""

    steps: int
    rounds: int
    family: str = "hf_decode"

    @property
    def name(self) -> str:
        return f"hf_decode_smollm2_{self.steps}steps_x{self.rounds}"

    def params(self) -> dict:
        return dict(steps=self.steps, rounds=self.rounds, batch=1)

    ROLES = {"stock": "stock", "naive_hooks": "baseline"}

    def run(self, threads: int) -> List[dict]:
        mod = load_benchmarks_module("bench_hf_decode")
        doc = mod.run(steps=self.steps, rounds=self.rounds, threads=threads)
        params = dict(self.params(), model=doc.get("model"), steer=doc.get("steer"),
                      monitored=doc.get("settings", {}).get("monitored"))
        out = []
        for impl, r in doc["results"].items():
            med = r["median_ms"] / 1e3
            rec = dict(case=self.name, family=self.family, params=params, impl=impl,
                       role=self.ROLES.get(impl, "kernel"), status="ok", median_s=med,
                       p10_s=r["p10_ms"] / 1e3, p90_s=r["p90_ms"] / 1e3, n=r["samples"],
                       inner=1, tokens_per_s=1.0 / med)
            if "paired_ratio_to_stock_median" in r:
                rec["ratio_to_stock"] = r["paired_ratio_to_stock_median"]
            out.append(rec)
        return out


def hf_decode_cases(device: str, size: str) -> list:
    """End-to-end HF decode; the measurement lives in ``benchmarks/bench_hf_decode.py``."""
    if size == "smoke":
        return []
    if load_benchmarks_module("bench_hf_decode") is None:
        return [Unavailable("hf_decode", "benchmarks/bench_hf_decode.py is not in this checkout")]
    if device != "cpu":
        return [Unavailable("hf_decode", "benchmarks/bench_hf_decode.py measures CPU decode only")]
    if importlib.util.find_spec("transformers") is None:
        return [Unavailable("hf_decode", "transformers is not installed")]
    return [HFDecodeCase(16, 2) if size == "quick" else HFDecodeCase(48, 4)]


def vllm_decode_cases(device: str, size: str) -> list:
    """End-to-end vLLM decode.  Registry hook: needs vLLM and steerkernel's vLLM plugin."""
    if size == "smoke":
        return []
    if importlib.util.find_spec("vllm") is None:
        return [Unavailable("vllm_decode", "vllm is not importable here")]
    return [Unavailable("vllm_decode", "vLLM throughput starts its own engines and is "
                        "measured by `python benchmarks/bench_vllm.py` (results: "
                        "benchmarks/results/vllm-cpu-*.json), not inside this runner")]


FAMILIES: Dict[str, Callable[[str, str], list]] = {
    "junction": junction_cases,
    "hf_decode": hf_decode_cases,
    "vllm_decode": vllm_decode_cases,
}


def all_cases(device: str, size: str) -> list:
    return [c for fam in FAMILIES.values() for c in fam(device, size)]


def load_benchmarks_module(name: str):
    """Import ``benchmarks/<name>.py`` from the repository checkout, or None if absent."""
    path = os.path.join(REPO_ROOT, "benchmarks", f"{name}.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- inputs

def input_sets(case: JunctionCase, device: str, nsets: int, seed: int = 0) -> List[dict]:
    """``nsets`` independent copies (distinct memory) of one random case's inputs.

    The fused op updates ``residual`` in place on every timed call, so the inputs are drawn to
    stay bounded over millions of calls (no inf/NaN creeping into the timing, even in fp16):
    ``x`` is scaled by 1e-3 and interventions are the bounded kinds (ablate, caps, pin; an
    "add" would push the residual further along V on every call).  Every kind costs the same.
    """
    steer, norm, slots = MODES[case.mode]
    base = make_case(case.T, case.d, case.K, DTYPES[case.dtype], P=P_SLOTS, with_x=True,
                     with_norm=norm, slots=slots, kinds=("ablate", "cap_above", "cap_below", "pin"),
                     seed=seed, device=device).kwargs
    base["x"].mul_(1e-3)
    if not steer:
        for k in ("slot", "shift", "lo", "hi"):
            base.pop(k, None)
    base.pop("eps", None)
    return [base] + [clone_set(base) for _ in range(nsets - 1)]


def clone_set(s: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}


def num_sets(work_bytes: int, cache_bytes: int, *, max_sets: int, mem_cap: int) -> int:
    """Enough input copies that one rotation moves twice the last-level cache (so every call
    reads cold data), within ``max_sets`` copies and ``mem_cap`` bytes."""
    want = math.ceil(2 * cache_bytes / max(work_bytes, 1))
    return int(max(1, min(want, max_sets, mem_cap // max(work_bytes, 1))))


def case_work(case: JunctionCase, device: str = "cpu") -> Work:
    steer, norm, slots = MODES[case.mode]
    elem = DTYPES[case.dtype].itemsize
    return junction_work(case.T, case.d, case.K, elem, v_elem=4, with_x=True, norm=norm,
                         steer=steer, P=P_SLOTS, steered_rows=case.T if slots == "all" else 0)


# ----------------------------------------------------------------------------- baselines

def make_chain(steer: bool, norm: bool, eps: float = EPS):
    """The unfused torch chain a forward hook runs: add, matmul, clamp, add, rmsnorm.

    Same semantics as the junction op for ungated interventions (fp32 arithmetic, slot 0 is
    identity); returns ``(residual_new, scores, norms, out)`` in freshly allocated tensors.
    """

    def chain(residual, x, V, slot, shift, lo, hi, weight):
        h = residual + x
        hf = h.float()
        p = hf @ V.T
        norms = torch.linalg.vector_norm(hf, dim=1)
        if steer:
            s = slot.long()
            q = torch.clamp(p + shift[s], lo[s], hi[s])
            delta = torch.where((s != 0).unsqueeze(1), q - p, 0.0)
            h = (hf + delta @ V).to(residual.dtype)
        out = None
        if norm:
            hn = h.float()
            out = (hn * torch.rsqrt(hn.pow(2).mean(1, keepdim=True) + eps)
                   * weight.float()).to(residual.dtype)
        return h, p, norms, out

    return chain


def add_rmsnorm(residual, x, weight, eps: float = EPS):
    """Plain residual add + RMSNorm (no monitoring, no steering): the floor."""
    h = residual + x
    hf = h.float()
    return h, (hf * torch.rsqrt(hf.pow(2).mean(1, keepdim=True) + eps)
               * weight.float()).to(residual.dtype)


_COMPILED: Dict[tuple, Callable] = {}


def compiled(key: tuple, fn: Callable) -> Callable:
    """``torch.compile(fn)`` (static shapes, whole graph), cached by ``key`` across cases."""
    if key not in _COMPILED:
        import torch._dynamo.config as dcfg

        # every cached shape is its own specialisation; never fall back to eager silently
        dcfg.recompile_limit = max(dcfg.recompile_limit, 100_000)
        dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 100_000)
        dcfg.fail_on_recompile_limit_hit = True
        _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[key]


def _chain_args(s: dict) -> tuple:
    return (s["residual"], s["x"], s["V"], s.get("slot"), s.get("shift"), s.get("lo"),
            s.get("hi"), s.get("weight"))


def _chain_outputs(args, ret) -> dict:
    h, p, n, out = ret
    return dict(residual=h, scores=p, norms=n, out=out)


def vllm_fused_add_rms_norm():
    """vLLM's fused add+RMSNorm op when vLLM is importable, else None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        import vllm._C  # noqa: F401  (registers torch.ops._C)
        return torch.ops._C.fused_add_rms_norm
    except (ImportError, AttributeError, RuntimeError):
        return None


def fused_backends(device: str) -> List[str]:
    status = backends.backend_status()
    if device == "cpu":
        return ["cpu"] if status["cpu"][0] else []
    return [b for b in ("cuda", "triton") if status[b][0]]


def junction_impls(case: JunctionCase, device: str, *, compile: bool = True) -> List[Impl]:
    steer, norm, _ = MODES[case.mode]
    work = case_work(case, device)
    impls: List[Impl] = []
    for b in fused_backends(device):
        op = backends.op_for(b)

        def prepare(s, b=b):
            return prepare_junction(**s, eps=EPS, backend=b, check_values=False).args

        impls.append(Impl(f"fused_{b}", "kernel", work, prepare, lambda a, op=op: op(*a),
                          lambda a, ret: dict(residual=a.residual, scores=a.scores,
                                              norms=a.norms, out=a.out)))
    chain = make_chain(steer, norm)
    impls.append(Impl("chain_eager", "baseline", work, _chain_args, lambda a: chain(*a),
                      _chain_outputs))
    if compile:
        key = ("chain", device, case.dtype, case.mode, case.T, case.d, case.K)
        cfn = compiled(key, make_chain(steer, norm))
        impls.append(Impl("chain_compiled", "baseline", work, _chain_args,
                          lambda a, f=cfn: f(*a), _chain_outputs, compile_key=key))
    if norm:
        fw = add_rmsnorm_work(case.T, case.d, DTYPES[case.dtype].itemsize)
        an_args = lambda s: (s["residual"], s["x"], s["weight"])  # noqa: E731
        impls.append(Impl("addnorm_eager", "floor", fw, an_args, lambda a: add_rmsnorm(*a)))
        if compile:
            key = ("addnorm", device, case.dtype, case.T, case.d)
            cfn = compiled(key, add_rmsnorm)
            impls.append(Impl("addnorm_compiled", "floor", fw, an_args, lambda a, f=cfn: f(*a),
                              compile_key=key))
        vop = vllm_fused_add_rms_norm() if device == "cuda" else None
        if vop is not None:
            # in place: x <- rmsnorm(residual + x) * weight, residual <- residual + x
            impls.append(Impl("vllm_fused_add_rms_norm", "floor", fw,
                              lambda s: (s["x"], s["residual"], s["weight"]),
                              lambda a, f=vop: f(*a, EPS)))
    return impls
