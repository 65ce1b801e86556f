"""What readings in the response cost on vLLM's OpenAI-compatible server (issue 12).

Three variants, driven by concurrent streaming clients in this process (``openai`` async):

* ``plugin_off``: vLLM without the plugin loaded (``VLLM_PLUGINS=""``, no steerkernel config);
* ``monitor``: the plugin with a bank of K concepts at every layer; requests record their
  scores (the JSONL-free monitor) but ask for nothing back;
* ``readings``: the same server; every request asks for ``steerkernel_report`` (``--report``,
  default ``all``: K z-scores per token) and every client receives them with each token.

``monitor`` and ``readings`` run on one server, interleaved round by round, so the readings
cost is measured against the same machine state; ``plugin_off`` needs its own server (run
first).  Per request: TPOT = (last token time - first token time) / (tokens - 1), at the
client; per round: output tokens / wall time.  The readings cost is the median over rounds
of (readings TPOT p50 / monitor TPOT p50) - 1.

    python benchmarks/bench_vllm_server_readings.py            # writes benchmarks/results/...
    python benchmarks/bench_vllm_server_readings.py --rounds 3 --clients 8 --max-tokens 32
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["Tell me about your day.", "Describe a quiet morning in the mountains.",
           "What should I cook tonight?", "Explain how rain forms.",
           "Write a short note to a friend.", "List some things that make people calm.",
           "Why do cats purr?", "Give me advice for a job interview."]
NAMES = ["calm", "joy", "fear", "anger", "sad", "desperate", "curious", "bold"]


def pct(xs: List[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def one_request(client, model: str, prompt: str, max_tokens: int,
                      report: Optional[str]) -> dict:
    extra: Dict[str, object] = {"ignore_eos": True}
    if report is not None:
        extra["vllm_xargs"] = {"steerkernel_report": report}
    t0 = time.perf_counter()
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True, extra_body=extra)
    times: List[float] = []
    rows = 0
    async for chunk in stream:
        now = time.perf_counter()
        for ch in chunk.choices:
            if ch.text:
                times.append(now)
            sk = (ch.model_extra or {}).get("steerkernel")
            if sk:
                rows += len(sk["z"])
    n = len(times)
    return {"tokens": n, "ttft": times[0] - t0 if times else None,
            "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else None, "rows": rows}


async def one_round(url: str, model: str, clients: int, max_tokens: int,
                    report: Optional[str]) -> dict:
    from openai import AsyncOpenAI

    ac = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[
            one_request(ac, model, PROMPTS[i % len(PROMPTS)], max_tokens, report)
            for i in range(clients)])
        wall = time.perf_counter() - t0
    finally:
        await ac.close()
    tpots = [r["tpot"] for r in res if r["tpot"] is not None]
    return {"wall_s": round(wall, 3), "output_tokens": sum(r["tokens"] for r in res),
            "tok_s": round(sum(r["tokens"] for r in res) / wall, 2),
            "tpot_ms": [round(t * 1e3, 3) for t in tpots],
            "tpot_p50_ms": round(pct(tpots, 0.5) * 1e3, 3),
            "tpot_p99_ms": round(pct(tpots, 0.99) * 1e3, 3),
            "ttft_p50_ms": round(pct([r["ttft"] for r in res], 0.5) * 1e3, 1),
            "rows_received": sum(r["rows"] for r in res)}


def component_costs(report: str, clients: int, reps: int = 2000) -> dict:
    """The readings' own work per token, timed in this process (no noise from the server's
    neighbours): the worker's row pick and channel push, and the middleware's rewrite of one
    streamed chunk (parse, attach the row, serialise)."""
    import timeit

    import torch

    from steerkernel.integrations.vllm import readings as rd
    from steerkernel.integrations.vllm import server as sv
    from steerkernel.integrations.vllm.worker import ReadingsPick

    L, K = 30, len(NAMES)
    spec = rd.parse_report_spec(report, NAMES, list(range(L)))
    pick = ReadingsPick(spec.cols, torch.zeros(L, K), torch.ones(L, K))
    rows = torch.randn(L, 1, K)
    t_pick = timeit.timeit(lambda: pick(rows, 0), number=reps) / reps
    book = rd.ReadingsBook()
    pub = rd.Publisher(book.addr)
    msg = {"t": "bench", "id": "cmpl-1-0", "rid": "cmpl-1-0-00000000", "key": "cmpl-1-0",
           "j0": 0, "z": pick(rows, 0), "alarms": []}
    t_push = timeit.timeit(lambda: pub.send(msg), number=reps) / reps
    chunk = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1,
                        "model": "smollm2", "choices": [{"index": 0, "text": " word",
                                                         "logprobs": None,
                                                         "finish_reason": None,
                                                         "stop_reason": None,
                                                         "token_ids": [1234]}]}).encode()

    async def rewrite_many() -> float:
        book.open("bench", spec)
        ch = book._streams["bench"].choices.setdefault("cmpl-1-0", rd._Choice())
        ch.rows = [msg["z"][0]] * reps
        plan = sv._Plan("bench", spec, strip_ids=True)
        old = rd._BOOK.get("book")
        rd._BOOK["book"] = book
        try:
            t0 = time.perf_counter()
            for _ in range(reps):
                doc = json.loads(chunk[6:] if chunk.startswith(b"data: ") else chunk)
                doc = await sv.annotate(plan, doc, whole=False)
                json.dumps(doc, separators=(",", ":")).encode()
            return (time.perf_counter() - t0) / reps
        finally:
            rd._BOOK["book"] = old
            book.close("bench")

    t_rewrite = asyncio.run(rewrite_many())
    pub.close()
    book.shutdown()
    per_token = t_pick + t_push + t_rewrite
    return {"report": report, "columns": len(spec.cols), "pick_us": round(t_pick * 1e6, 2),
            "push_us": round(t_push * 1e6, 2), "rewrite_us": round(t_rewrite * 1e6, 2),
            "per_token_us": round(per_token * 1e6, 2),
            "per_step_ms_at_clients": round(per_token * clients * 1e3, 3)}


def summarize(rounds: List[dict]) -> dict:
    tpots = [t for r in rounds for t in r["tpot_ms"]]
    return {"rounds": len(rounds), "requests": len(tpots),
            "tok_s_median": statistics.median(r["tok_s"] for r in rounds),
            "tpot_p50_ms": pct(tpots, 0.5), "tpot_p99_ms": pct(tpots, 0.99),
            "ttft_p50_ms_median": statistics.median(r["ttft_p50_ms"] for r in rounds),
            "rows_received": sum(r["rows_received"] for r in rounds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--report", default="all", help="steerkernel_report of the readings runs")
    p.add_argument("--out", default=None)
    p.add_argument("--components-only", action="store_true",
                   help="only the in-process per-token costs (no server)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    if args.components_only:
        for r in (args.report, "all@*"):
            print(json.dumps(component_costs(r, args.clients)))
        return 0
    from steerkernel.bench import runner as br
    from steerkernel.bench.vllm_server import MODEL_NAME, ApiServer, make_bank

    work = args.workdir or tempfile.mkdtemp(prefix="sk-bench-readings-")
    os.makedirs(work, exist_ok=True)
    bank = make_bank(os.path.join(work, "bank.safetensors"), NAMES)
    info = br.machine_info("cpu")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M")
    out = args.out or os.path.join(
        HERE, "results", f"vllm-server-readings-{br.slug(info.get('cpu_model') or 'cpu')}-"
        f"{info.get('cores')}c-{stamp}.json")

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    variants: Dict[str, List[dict]] = {"plugin_off": [], "monitor": [], "readings": []}
    warm = dict(clients=args.clients, max_tokens=8)
    for plugin_cfg in (None, {"bank": bank}):
        srv = ApiServer(plugin_cfg, os.path.join(work, "server.log"),
                        max_num_seqs=max(16, args.clients)).start()
        try:
            log(f"server up ({'plugin off' if plugin_cfg is None else 'steerkernel'})")
            asyncio.run(one_round(srv.url, MODEL_NAME, report=None, **warm))
            for r in range(args.rounds):
                kinds = ["plugin_off"] if plugin_cfg is None else (
                    ["monitor", "readings"] if r % 2 == 0 else ["readings", "monitor"])
                for kind in kinds:
                    got = asyncio.run(one_round(
                        srv.url, MODEL_NAME, args.clients, args.max_tokens,
                        args.report if kind == "readings" else None))
                    variants[kind].append(got)
                    log(f"  round {r} {kind:10s} {got['tok_s']:7.1f} tok/s  TPOT p50 "
                        f"{got['tpot_p50_ms']:.1f} ms p99 {got['tpot_p99_ms']:.1f} ms")
        finally:
            srv.stop()
    summary = {k: summarize(v) for k, v in variants.items()}
    summary["component_costs"] = [component_costs(r, args.clients) for r in (args.report,
                                                                             "all@*")]
    for c in summary["component_costs"]:
        c["share_of_monitor_tpot_p50_pct"] = round(
            100 * c["per_step_ms_at_clients"] / summary["monitor"]["tpot_p50_ms"], 3)
    ratios = [rd["tpot_p50_ms"] / mo["tpot_p50_ms"]
              for rd, mo in zip(variants["readings"], variants["monitor"])]
    summary["readings_vs_monitor_tpot_p50"] = {
        "per_round": [round(x, 4) for x in ratios], "median": statistics.median(ratios),
        "cost_pct": round(100 * (statistics.median(ratios) - 1), 2), "target_pct": 3.0}
    summary["monitor_vs_plugin_off_tpot_p50"] = (
        summary["monitor"]["tpot_p50_ms"] / summary["plugin_off"]["tpot_p50_ms"])
    doc = {"benchmark": "vllm_server_readings", "machine": info, "versions": br.versions(),
           "git": br.git_revision(), "settings": {
               "clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "report": args.report, "concepts": len(NAMES), "bank_layers": 30,
               "model": "SmolLM2-135M-Instruct fp32, eager", "server_flags": " ".join(
                   __import__("steerkernel.bench.vllm_server", fromlist=["x"]).SERVER_FLAGS)},
           "summary": summary, "rounds": variants}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    log(f"wrote {out}")
    for k in ("plugin_off", "monitor", "readings"):
        s = summary[k]
        log(f"  {k:10s} tok/s {s['tok_s_median']:7.1f}  TPOT p50 {s['tpot_p50_ms']:.1f} ms  "
            f"p99 {s['tpot_p99_ms']:.1f} ms")
    c = summary["readings_vs_monitor_tpot_p50"]
    log(f"  readings cost (TPOT p50, median of rounds): {c['cost_pct']:+.2f} % "
        f"(target <= {c['target_pct']} %)")
    for c in summary["component_costs"]:
        log(f"  in-process, per token ({c['report']}, {c['columns']} columns): pick "
            f"{c['pick_us']} us + push {c['push_us']} us + rewrite {c['rewrite_us']} us = "
            f"{c['per_step_ms_at_clients']} ms per step of {args.clients} tokens "
            f"({c['share_of_monitor_tpot_p50_pct']} % of TPOT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
