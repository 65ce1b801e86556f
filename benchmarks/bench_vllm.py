"""vLLM throughput with the steerkernel plugin, side by side (vLLM's CPU build or a GPU build).

Model: the embedded SmolLM2-135M-Instruct (30 layers, d = 576) served by vLLM.  Variants, all
on the same prompts and the same number of generated tokens (``ignore_eos``):

* ``plugin_off``      — an engine without a steerkernel config (the plugin is loaded but
  dormant: vLLM's own RMSNorm everywhere);
* ``monitor``         — an engine with a K-concept bank at every layer: every junction reads out
  all K projections for every token and rank 0 records per-request traces and aggregates;
  no request is steered;
* ``monitor_steer``   — the same engine, every request steered by one program (add on one
  concept at every layer, a cap on another);
* ``programs_1/8/64`` — the same engine, requests cycling through 1, 8 or 64 *distinct* programs
  (different concepts and strengths), i.e. that many steering configurations in flight at once.

Each variant is one ``llm.generate`` over all prompts (one continuous batch).  Both engines
stay up and the variants are interleaved round by round (the order alternating), ``--repeats``
rounds, so the drifting load of a shared machine hits all of them alike.  Reported: output
tokens/s per run and their median, and per variant the median over rounds of its throughput
divided by ``plugin_off``'s in the same round.

Run: ``python benchmarks/bench_vllm.py [--prompts 64 --max-tokens 64 --K 32 --repeats 3]``;
writes ``benchmarks/results/vllm-<device>-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = ["the sea", "a long train journey", "learning to cook", "an old library", "winter",
          "a city at night", "a garden", "the first day at a new job"]


def machine() -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        info["cpu"] = names[0] if names else None
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def make_bank(path: str, K: int) -> None:
    """K random unit directions at every layer (timing does not depend on their values)."""
    import torch

    import steerkernel

    L, d = 30, 576
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(L, K, d, generator=g), dim=-1)
    steerkernel.ConceptBank(
        names=[f"c{k}" for k in range(K)], layers=list(range(L)), directions=dirs,
        baseline_mean=torch.zeros(L, K), baseline_std=torch.ones(L, K),
        vector_norms=torch.ones(L, K), resid_norm=torch.full((L,), 50.0), default_layer=15,
        metadata={"benchmark": "random"}).save(path)


def programs(n: int, K: int):
    """n distinct programs: an add on one concept (strength varies) and a cap on another."""
    out = []
    for j in range(n):
        a, b = j % K, (j + 1) % K
        out.append(f"c{a}=+{0.01 + 0.002 * j:.3f}@4-25; c{b}<=1.0")
    return out


def prompts(n: int):
    return [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


def component_costs(K: int, batch: int, L: int = 30, d: int = 576, iters: int = 300) -> dict:
    """In-process timings of the plugin's per-step pieces at a decode step of ``batch``
    requests (one token each), less sensitive to machine noise than end-to-end throughput:
    the junction op vs vLLM's fused add+RMSNorm at T = batch (its C++ kernel
    ``torch.ops._C.fused_add_rms_norm``, and the native IR op that vLLM's CPU RMSNorm actually
    runs), the monitor's per-step record, and one program compilation.
    ``est_overhead_ms_per_step_vs_*`` = L x (junction - that add+RMSNorm) + record."""
    import torch

    import steerkernel
    from steerkernel import backends
    from steerkernel.monitor import MonitorEngine
    from steerkernel.ops import JunctionArgs
    from steerkernel.steering import compile_program

    dev = torch.device("cpu")
    op = backends.op_for(backends.resolve(dev, None))
    g = torch.Generator().manual_seed(0)
    V = torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=-1)
    x, r, w = torch.randn(batch, d), torch.randn(batch, d), torch.ones(d)
    sc, nm, out = torch.empty(batch, K), torch.empty(batch), torch.empty(batch, d)
    P = 2 * batch + 1
    shift, lo, hi = torch.zeros(P, K), torch.full((P, K), -1e30), torch.full((P, K), 1e30)
    slot = torch.arange(1, batch + 1, dtype=torch.int32)

    def t(fn):
        for _ in range(10):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e6

    res = {"T": batch, "K": K, "d": d}
    monitor = JunctionArgs(residual=r, V=V, x=x, weight=w, eps=1e-5, scores=sc, norms=nm,
                           out=out)
    steer = monitor._replace(slot=slot, shift=shift, lo=lo, hi=hi)
    res["junction_monitor_us"] = t(lambda: op(*monitor))
    res["junction_steer_us"] = t(lambda: op(*steer))
    try:
        import vllm._custom_ops  # noqa: F401 - registers torch.ops._C

        res["vllm_fused_add_rms_norm_us"] = t(
            lambda: torch.ops._C.fused_add_rms_norm(x, r, w, 1e-5))
    except Exception as e:  # noqa: BLE001
        res["vllm_fused_add_rms_norm_us"] = None
        res["vllm_error"] = str(e)
    try:  # what vLLM's RMSNorm(x, residual) runs on CPU: the native IR op (torch ops)
        from vllm import ir

        native = ir.ops.fused_add_rms_norm.impls["native"].impl_fn
        res["vllm_native_fused_add_rms_norm_us"] = t(lambda: native(x, r, w, 1e-5))
    except Exception as e:  # noqa: BLE001
        res["vllm_native_fused_add_rms_norm_us"] = None
        res["vllm_native_error"] = str(e)
    bank = steerkernel.ConceptBank(
        names=[f"c{k}" for k in range(K)], layers=list(range(L)),
        directions=torch.nn.functional.normalize(torch.randn(L, K, d, generator=g), dim=-1),
        baseline_mean=torch.zeros(L, K), baseline_std=torch.ones(L, K),
        vector_norms=torch.ones(L, K), resid_norm=torch.full((L,), 50.0), default_layer=15)
    m = MonitorEngine(bank.names, bank.layers, max_tokens=4096, max_requests=2 * batch + 8)
    rows = [(f"r{i}", 1) for i in range(batch)]
    res["monitor_record_us"] = t(lambda: m.record(rows)) if iters else None
    progs = programs(64, K)
    t0 = time.perf_counter()
    for p in progs:
        compile_program(p, bank)
    res["compile_program_us"] = (time.perf_counter() - t0) / len(progs) * 1e6
    for name, key in (("kernel", "vllm_fused_add_rms_norm_us"),
                      ("native", "vllm_native_fused_add_rms_norm_us")):
        base = res.get(key)
        if base is not None:
            res[f"est_overhead_ms_per_step_vs_{name}"] = (
                L * (res["junction_steer_us"] - base) + res["monitor_record_us"]) / 1e3
    return res


def timed_generate(llm, ps, sp, progs=None) -> dict:
    """One ``llm.generate`` over all prompts, timed; with ``progs`` (steerkernel engine) every
    request carries its program and a report id, and the reports are fetched afterwards
    (timed separately: the engine's throughput is the generate call)."""
    import uuid

    from steerkernel.integrations import vllm as skv

    params, ids = sp, None
    if progs is not None:
        ids = [f"b-{uuid.uuid4().hex[:12]}" for _ in ps]
        params = [skv.steer_params(sp, prog, request_id=i) for prog, i in zip(progs, ids)]
    t0 = time.perf_counter()
    outs = llm.generate(ps, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    r = {"seconds": dt, "output_tokens": toks, "tokens_per_s": toks / dt, "errors": 0}
    if ids is not None:
        t0 = time.perf_counter()
        reps = skv.fetch_raw(llm, ids)
        r["fetch_reports_s"] = time.perf_counter() - t0
        r["errors"] = sum(1 for d in reps.values() if d is None or d.get("error"))
    return r


def engine(model_dir, args, additional_config=None):
    from vllm import LLM

    kw = dict(dtype=args.dtype, seed=0, enable_prefix_caching=False, max_model_len=512,
              max_num_seqs=max(args.prompts, 1), enforce_eager=not args.compile)
    if additional_config:
        kw["additional_config"] = additional_config
    t0 = time.perf_counter()
    llm = LLM(model_dir, **kw)
    return llm, time.perf_counter() - t0


def close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--K", type=int, default=32, help="concepts in the bank (every layer)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile (default: eager)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import steerkernel
    from vllm import SamplingParams

    from steerkernel.integrations import vllm as skv

    info = machine()
    model_dir = steerkernel.default_model_dir()
    ps = prompts(args.prompts)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    tmp = tempfile.mkdtemp(prefix="bench-vllm-")
    bank = os.path.join(tmp, "bank.safetensors")
    make_bank(bank, args.K)
    runs = {}
    loads = {}

    def warm(llm, progs=None):
        timed_generate(llm, ps[:8], SamplingParams(max_tokens=8, temperature=0),
                       progs[:8] if progs is not None else None)

    def measure(llm, name, progs=None):
        r = timed_generate(llm, ps, sp, progs)
        runs.setdefault(name, []).append(r)
        print(f"{name:>15}: {r['tokens_per_s']:8.1f} tok/s ({r['output_tokens']} tokens in "
              f"{r['seconds']:.2f} s)", flush=True)

    costs = component_costs(args.K, args.prompts)
    print("component costs:", json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                          for k, v in costs.items()}), flush=True)
    # both engines stay up; variants are interleaved round by round (the order alternates),
    # so a shared machine's drifting load hits every variant alike.  An idle engine polls
    # lightly (~0.1 core measured), the same for every variant.
    off, loads["plugin_off"] = engine(model_dir, args)
    sk, loads["steerkernel"] = engine(model_dir, args, skv.engine_config(bank))
    variants = [("plugin_off", off, None), ("monitor", sk, [None] * args.prompts),
                ("monitor_steer", sk, [programs(1, args.K)[0]] * args.prompts)]
    for n in (1, 8, 64):
        progs = programs(n, args.K)
        variants.append((f"programs_{n}", sk, [progs[i % n] for i in range(args.prompts)]))
    for name, llm, progs in variants:
        warm(llm, progs)
    rounds = []
    for rep in range(args.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for name, llm, progs in order:
            measure(llm, name, progs)
        rounds.append({name: runs[name][-1]["tokens_per_s"] for name, _, _ in variants})
    status = skv.status(sk)[0]
    close(sk)
    close(off)

    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    results = []
    for k, v in runs.items():
        paired = [rd[k] / rd["plugin_off"] for rd in rounds]
        results.append({"variant": k, "tokens_per_s_median": med[k],
                        "tokens_per_s_runs": [r["tokens_per_s"] for r in v],
                        "ratio_to_plugin_off_per_round": paired,
                        "ratio_to_plugin_off_median": statistics.median(paired),
                        "fetch_reports_s_median": statistics.median(
                            [r.get("fetch_reports_s", 0.0) for r in v]),
                        "errors": sum(r["errors"] for r in v)})
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    device = "gpu" if "gpu" in info else "cpu"
    out = {"benchmark": "vllm_throughput", "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "machine": info,
           "setup": {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
                     "prompts": args.prompts, "max_tokens": args.max_tokens,
                     "ignore_eos": True, "K": args.K, "bank_layers": 30,
                     "repeats": args.repeats, "enforce_eager": not args.compile,
                     "prefix_caching": False, "engine_load_s": loads,
                     "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")}},
           "results": results, "rounds": rounds, "component_costs": costs,
           "plugin_status": status,
           "notes": ("Output tokens per second of one llm.generate over all prompts (one "
                     "continuous batch). Medians over repeats; "
                     "ratio_to_plugin_off_median = median over rounds of variant / plugin_off "
                     "in the same round (both engines up, variants interleaved). Shared "
                     "machine: see the per-run figures for the noise.")}
    path = args.out or os.path.join(
        HERE, "results", f"vllm-{device}-{_dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(json.dumps({r["variant"]: [round(r["tokens_per_s_median"], 1),
                                     round(r["ratio_to_plugin_off_median"], 3)]
                      for r in results}))
    print("wrote", path)
    return out


if __name__ == "__main__":
    main()
