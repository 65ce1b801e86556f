"""Worker-side state of the vLLM plugin: buffers, slots, requests, monitor.

One :class:`WorkerState` per model runner, created after the model is loaded when the engine's
``additional_config`` has a ``steerkernel`` section.  Everything the junction reads on the
device is allocated here once and only ever written in place:

* ``V[i]``: the bank's ``[K, d]`` directions at bank layer position ``i``, read by
  ``junctions[i]``, the :class:`~steerkernel.integrations.site.JunctionSite` that makes the
  call at that layer;
* ``tables``: :class:`~steerkernel.steering.SlotTables` ``[L, P, K]`` (+ gates, latch);
* ``slot_buf``: int32 ``[T_max]``, the slot of every token row of the current forward (rows
  past the forward's real tokens, e.g. CUDA-graph padding, are 0: the identity);
* ``monitor.buffer`` (rank 0) or ``scratch`` (other ranks): the ``[T, K]`` score views.

so a captured CUDA graph or a compiled model stays valid while requests come and go.

Per engine step (host side, before the forward; see :mod:`.patches` for where it is called):

1. finished requests release their slots (rows reset to the identity) and close their monitor
   report; new requests are admitted: their ``extra_args`` are parsed and their program compiled
   against the bank (a bad one is reported and the request runs unsteered — the front end
   normally rejects it before it gets here);
2. the runner's batch layout (request order, scheduled tokens, computed tokens) gives every
   token row its slot: the request's prompt slot for positions ``< prompt_len``, its generated
   slot after (one slot for both when the program does not depend on the phase);
3. after the forward, rank 0 records the rows' scores per request (positions already recorded,
   e.g. recomputed after a preemption, are skipped).
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from os import environ as _environ
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ... import backends
from ...errors import SpecError
from ...ops import MODEL_DTYPES
from ...steering import CompiledProgram, SlotTables
from ..site import JunctionSite, Scratch, Steering
from . import readings
from .config import (PluginConfig, RequestArgs, check_bank_fits, compile_cached, external_id,
                     load_bank, request_args, request_options, slot_count, slots_needed)
from .norm import site_modules

log = logging.getLogger("steerkernel.vllm")


@dataclass
class _Request:
    rid: str                       # vLLM's (internal) request id
    key: Hashable                  # monitor key: steerkernel_id or the caller's request id
    prompt_len: int
    program: Optional[str] = None
    compiled: Optional[CompiledProgram] = None
    slot_prompt: int = 0
    slot_gen: int = 0
    owned: List[int] = field(default_factory=list)
    monitor: bool = True
    error: Optional[str] = None
    next_pos: int = 0              # positions [0, next_pos) have been recorded
    skipped: int = 0               # positions never computed here (prefix-cache hits)
    latch_copied: bool = False
    opened: bool = False           # has rows in the monitor
    fetched: bool = False          # the caller already took the report
    # readings and alarm actions (.readings): asked for in the request's extra_args
    report_cols: Optional[Tuple[Tuple[int, int], ...]] = None  # (layer pos, concept) columns
    report_pick: Any = None        # ReadingsPick for those columns
    stream: Optional[str] = None   # the server's response tag (rows go out only with one)
    action: Any = None             # AlarmAction
    switched: Optional[CompiledProgram] = None  # program once a steer action fires
    fired: Optional[str] = None    # label of the rule whose action was taken
    rows_sent: int = 0             # generated-token rows pushed so far
    outbox_rows: List[list] = field(default_factory=list)
    outbox_j0: int = 0
    outbox_alarms: List[dict] = field(default_factory=list)

    @property
    def live(self) -> bool:
        """Needs its readings / alarms as soon as they exist (not later in a batch)."""
        return self.report_cols is not None or self.action is not None


@dataclass
class _Forward:
    T: int
    steered: bool
    gated: bool
    latched: bool
    rows: List[Tuple[Optional[Hashable], int]]


_DTYPES = {"float32": torch.float32, "int32": torch.int32, "float64": torch.float64}
#: the engine request id of sample i of a parallel-sampling (n > 1) request: "i_<parent id>"
_CHILD_ID = re.compile(r"^(\d+)_")


def pack_tensor(t: Optional[Tensor]) -> Optional[dict]:
    """A CPU tensor as plain data (``collective_rpc`` results cross process boundaries)."""
    if t is None:
        return None
    t = t.detach().to("cpu").contiguous()
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPES:
        t, name = t.float(), "float32"
    return {"dtype": name, "shape": list(t.shape), "data": t.numpy().tobytes()}


def report_bytes(report: dict) -> int:
    """The tensor bytes a kept report holds (its packed tensors' data; the rest is small)."""
    return sum(len(v["data"]) for v in report.values()
               if isinstance(v, dict) and isinstance(v.get("data"), bytes))


def unpack_tensor(d) -> Optional[Tensor]:
    if d is None:
        return None
    if isinstance(d, Tensor):
        return d
    dt = _DTYPES[d["dtype"]]
    arr = np.frombuffer(bytes(d["data"]), dtype=str(dt).replace("torch.", ""))
    return torch.from_numpy(arr.copy()).reshape(d["shape"]).to(dt)


class ReadingsPick:
    """The z rows a request asked for, from monitor rows: ``pick(rows [L, n, K], lo)`` ->
    ``n - lo`` lists of C z-scores (6 decimals), columns ``cols`` = (layer pos, concept).
    numpy on the host copy: a decode step's row costs a few microseconds."""

    __slots__ = ("li", "ci", "mu", "sd")

    def __init__(self, cols, mu: Tensor, sd: Tensor):
        self.li = np.array([c[0] for c in cols], dtype=np.int64)
        self.ci = np.array([c[1] for c in cols], dtype=np.int64)
        self.mu = mu.numpy()[self.li, self.ci][:, None]
        self.sd = sd.numpy()[self.li, self.ci][:, None]

    def __call__(self, rows: Tensor, lo: int = 0) -> List[list]:
        raw = rows.numpy()[self.li, lo:, self.ci]  # [C, m]: the index arrays broadcast first
        return np.round(((raw - self.mu) / self.sd).T, 6).tolist()


class _Site:
    """The callable a :class:`SteerRMSNorm` instance hands its ``(x, residual)`` calls to."""

    __slots__ = ("state", "i")

    def __init__(self, state: "WorkerState", i: int):
        self.state, self.i = state, i

    def __call__(self, norm, x: Tensor, residual: Tensor):
        return self.state.junction(self.i, norm, x, residual)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialised (unit tests): a single rank
        return 0


class WorkerState:
    """See the module docstring.  ``model`` is the loaded vLLM model on ``device``."""

    def __init__(self, cfg: PluginConfig, vllm_config, model: torch.nn.Module,
                 device: torch.device, tp_rank: Optional[int] = None):
        self.cfg = cfg
        hf = vllm_config.model_config.hf_text_config
        self.num_layers = int(hf.num_hidden_layers)
        self.d = int(hf.hidden_size)
        bank = load_bank(cfg.bank)
        archs = [type(model).__name__] + list(
            getattr(vllm_config.model_config, "architectures", None) or [])
        check_bank_fits(bank, hf, cfg.check_fingerprint, archs)
        self.bank = bank
        self.names = list(bank.names)
        self.layers = [int(x) for x in bank.layers]
        L, K = len(self.layers), len(self.names)
        self.L, self.K = L, K
        self.device = torch.device(device)
        self.dtype = vllm_config.model_config.dtype
        if self.dtype not in MODEL_DTYPES:
            raise SpecError(f"steerkernel: model dtype {self.dtype} is not supported")
        sched = vllm_config.scheduler_config
        self.max_num_seqs = int(sched.max_num_seqs)
        cc = vllm_config.compilation_config
        capture = max(list(getattr(cc, "cudagraph_capture_sizes", None) or [0]) + [
            int(getattr(cc, "max_cudagraph_capture_size", 0) or 0)])
        self.T_max = max(int(sched.max_num_batched_tokens), capture, self.max_num_seqs, 1)
        self.tp_rank = _tp_rank() if tp_rank is None else int(tp_rank)

        self.backend = backends.resolve(self.device, cfg.backend)
        self.op = backends.op_for(self.backend)
        self.V = [bank.directions[i].detach().to(self.device, torch.float32).contiguous()
                  for i in range(L)]
        P = slot_count(cfg, self.max_num_seqs)
        self.P = P
        self.tables = SlotTables(L, P, K, self.device)
        self.slot_buf = torch.zeros(self.T_max, dtype=torch.int32, device=self.device)
        self.scratch = Scratch(K, self.device, rows=self.T_max)
        self.junctions = [JunctionSite(self.op, self.scratch, V=v, tables=self.tables, layer=i)
                          for i, v in enumerate(self.V)]
        self._ones: Dict[Tuple, Tensor] = {}
        self._free = list(range(P - 1, 0, -1))
        self.reqs: Dict[str, _Request] = {}
        self.finished: "OrderedDict[Hashable, dict]" = OrderedDict()
        self._finished_bytes = 0  # report_bytes of the kept reports
        self.fwd: Optional[_Forward] = None
        self._hw = 0  # slot_buf rows written by the last forward
        self._keys: Dict[Hashable, str] = {}  # monitor key -> rid (open requests)
        self.stats = {"admitted": 0, "steered": 0, "rejected": 0, "finished": 0,
                      "forwards": 0, "slot_exhausted": 0, "alarm_stops": 0,
                      "alarm_switches": 0, "readings_sent": 0, "readings_dropped": 0}
        self._stops: Dict[str, str] = {}  # vLLM request id -> rule label, this step

        self.reporter = bool(cfg.monitor) and self.tp_rank == 0
        self.monitor = None
        self.sinks: list = []
        if self.reporter:
            from ...monitor import MonitorEngine
            from ...monitor.sinks import JSONLSink, PrometheusSink

            if cfg.jsonl:
                self.sinks.append(JSONLSink(cfg.jsonl))
            if cfg.prometheus_port is not None:
                self.sinks.append(PrometheusSink(port=cfg.prometheus_port))
            self.monitor = MonitorEngine(
                self.names, self.layers, max_tokens=self.T_max,
                max_requests=2 * self.max_num_seqs + 8, device=self.device,
                baseline_mean=bank.baseline_mean.nan_to_num(0.0),
                baseline_std=bank.baseline_std.nan_to_num(1.0), rules=list(cfg.rules),
                sinks=self.sinks, keep_traces=cfg.keep_traces, above_z=cfg.above_z,
                ema_alpha=cfg.ema_alpha, default_layer=bank.default_layer)
            self.monitor.on_rows(self._tap_rows)
            self.monitor.on_alarm(self._tap_alarm)
        # readings go to the API server that started this engine (.readings); none offline
        self.publisher = None
        addr = _environ.get(readings.ENV_ADDR)
        if self.reporter and addr:
            try:
                self.publisher = readings.Publisher(addr)
            except Exception as e:  # noqa: BLE001 - the engine runs; readings say "missing"
                log.error("steerkernel: cannot reach the API server's readings channel %s "
                          "(%s); responses will carry no readings", addr, e)
        self._mu = bank.baseline_mean.nan_to_num(0.0).float()
        self._sd = bank.baseline_std.nan_to_num(1.0).float().clamp_min(1e-6)

        # the modules whose (x, residual) calls become junctions; validate every buffer the
        # hot path hands the raw op once, here, before anything runs
        self.sites = site_modules(model, self.layers, self.num_layers)
        for i, norm in enumerate(self.sites):
            if norm is not None:
                self.junctions[i].validate(self.d, self.dtype, self.backend,
                                           weight=self._weight(norm),
                                           eps=float(norm.variance_epsilon),
                                           scores=self._scores(i, 1))
        for i, norm in enumerate(self.sites):
            if norm is not None:
                norm._sk_site = _Site(self, i)
        log.info("steerkernel: bank %s (K=%d, layers %s) on %d junction sites, backend %s, "
                 "%d slots, monitor %s", cfg.bank, K, self.layers,
                 sum(s is not None for s in self.sites), self.backend, P,
                 "on" if self.reporter else "off (not rank 0)" if cfg.monitor else "off")

    # ------------------------------------------------------------------ the forward side
    def _weight(self, norm) -> Tensor:
        w = norm.weight
        if getattr(norm, "has_weight", True) and isinstance(w, Tensor) \
                and w.device == self.device:
            return w.data if isinstance(w, torch.nn.Parameter) else w
        key = (norm.hidden_size,)
        if key not in self._ones:
            self._ones[key] = torch.ones(norm.hidden_size, device=self.device,
                                         dtype=self.dtype)
        return self._ones[key]

    def _scores(self, i: int, T: int) -> Tensor:
        if self.monitor is not None:
            return self.monitor.buffer[i, :T]
        return self.scratch.scores(T)

    def junction(self, i: int, norm, x: Tensor, residual: Tensor):
        """``residual += x``; readout at bank layer ``i``; per-slot steering; RMSNorm.  Returns
        ``(normed, residual)`` like vLLM's fused add+RMSNorm."""
        shape = x.shape
        d = shape[-1]
        if not residual.is_contiguous():
            residual = residual.contiguous()
        r2 = residual.view(-1, d)
        x2 = x.reshape(-1, d)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        T = r2.shape[0]
        site = self.junctions[i]
        w = self._weight(norm)
        eps = float(norm.variance_epsilon)
        if torch.compiler.is_compiling():
            # compiled (and graph-captured) forwards read the static buffers every time:
            # no host-side branch on per-step state can be baked into the graph
            every_table = Steering(self.slot_buf[:T], gated=True, latched=True)
            out = site(r2, x2, steering=every_table, scores=self._scores(i, T), weight=w,
                       eps=eps)
            return out.view(shape), residual
        f = self.fwd
        if T > self.T_max:  # never in a scheduled forward (T <= max_num_batched_tokens)
            return site(r2, x2, weight=w, eps=eps).view(shape), residual
        scores = steering = None
        if f is not None:
            scores = self._scores(i, T)
            if f.steered:  # (else monitoring only: the update pass is skipped)
                # rows past the layout's (e.g. CUDA-graph padding) have slot 0
                steering = Steering(self.slot_buf[:T], f.gated, f.latched)
        out = site(r2, x2, steering=steering, scores=scores, weight=w, eps=eps)
        return out.view(shape), residual

    # ------------------------------------------------------------------ requests
    def _alloc(self) -> int:
        if not self._free:
            return 0
        return self._free.pop()

    def _release(self, r: _Request) -> None:
        for s in r.owned:
            self.tables.clear(s)
            self._free.append(s)
        r.owned = []
        r.slot_prompt = r.slot_gen = 0

    def admit(self, rid: str, sampling_params, prompt_len: int) -> _Request:
        """Register a request (idempotent: a resumed or re-sent request keeps its state)."""
        r = self.reqs.get(rid)
        if r is not None:
            return r
        extra = getattr(sampling_params, "extra_args", None) if sampling_params else None
        self.stats["admitted"] += 1
        try:
            args = request_args(extra)
        except Exception as e:  # noqa: BLE001 - a bad request must not take the engine down
            args, err = RequestArgs(), f"{type(e).__name__}: {e}"
        else:
            err = None
        key = self._unique_key(args.tag if args.tag is not None else external_id(rid), rid)
        r = _Request(rid, key, int(prompt_len), program=args.program,
                     monitor=args.monitor and self.monitor is not None, error=err)
        self.reqs[rid] = r
        if err is None and args.program is not None:
            try:
                r.compiled = compile_cached(args.program, self.bank)
            except Exception as e:  # noqa: BLE001
                r.error = f"{type(e).__name__}: {e}"
        if r.error is None and (args.report is not None or args.on_alarm is not None):
            try:
                opts = request_options(args, self.bank, self.cfg)
            except Exception as e:  # noqa: BLE001 - the front end normally refuses it first
                r.error = f"{type(e).__name__}: {e}"
            else:
                if self.monitor is not None and r.monitor:
                    if opts.report is not None:
                        r.report_cols = opts.report.cols
                        r.report_pick = ReadingsPick(opts.report.cols, self._mu, self._sd)
                    r.action, r.switched = opts.action, opts.switched
                    r.stream = args.stream
        if r.error is not None:
            self.stats["rejected"] += 1
            log.error("steerkernel: request %s: bad steering arguments, running it unsteered: "
                      "%s", rid, r.error)
        elif r.compiled is not None:
            self._assign(r)
        return r

    def _assign(self, r: _Request) -> None:
        c = r.compiled
        n = slots_needed(c)
        if not n:
            return
        shared = n == 1
        slots = [self._alloc() for _ in range(n)]
        if not all(slots):
            # behind the API server this cannot happen: AsyncLLM admission (.patches) refuses
            # a steered request with HTTP 429 unless every in-flight one can hold its slots
            for s in slots:
                if s:
                    self._free.append(s)
            self.stats["slot_exhausted"] += 1
            r.error = (f"no free steering slot (all {self.P - 1} in use; raise the plugin's "
                       "max_slots): this request ran UNSTEERED")
            log.error("steerkernel: request %s: %s", r.rid, r.error)
            return
        r.owned = slots
        if shared:
            ph = "prompt" if not c.identity["prompt"] else "generated"
            self.tables.assign(slots[0], c, ph)
            r.slot_prompt = slots[0] if not c.identity["prompt"] else 0
            r.slot_gen = slots[0] if not c.identity["generated"] else 0
        else:
            self.tables.assign(slots[0], c, "prompt")
            self.tables.assign(slots[1], c, "generated")
            r.slot_prompt, r.slot_gen = slots
        self.stats["steered"] += 1

    def _unique_key(self, key: Hashable, rid: str) -> Hashable:
        """``key`` unless a running request holds it: then ``key#i`` for sample ``i`` of a
        parallel-sampling request (vLLM runs sample ``i`` of an ``n > 1`` request as
        ``i_<id>``, sample 0 first, all with the same steerkernel_id), else ``key#<rid>``."""
        if key in self._keys and self._keys[key] != rid:
            m = _CHILD_ID.match(rid)
            alt = f"{key}#{m.group(1)}" if m else None
            key = alt if alt is not None and alt not in self._keys else f"{key}#{rid}"
        self._keys[key] = rid
        return key

    def finish(self, rid: str) -> None:
        """A finished (or aborted) request: free its slots, close its report."""
        r = self.reqs.pop(rid, None)
        if r is None:
            return
        readings.drop_stop(rid)
        self._stops.pop(rid, None)
        self._release(r)
        self._keys.pop(r.key, None)
        self.stats["finished"] += 1
        rep = None
        if r.opened and self.monitor is not None:
            try:
                rep = self.monitor.close(r.key)
            except KeyError:
                rep = None
        if r.fetched:
            return
        if rep is not None or r.program is not None or r.error is not None:
            report = self._report_dict(r, rep, final=True)
            self.finished[r.key] = report
            self._finished_bytes += report_bytes(report)
            while self.finished and (len(self.finished) > self.cfg.max_finished
                                     or self._finished_bytes > self.cfg.max_finished_bytes):
                self._finished_bytes -= report_bytes(self.finished.popitem(last=False)[1])

    def _report_dict(self, r: _Request, rep, final: bool) -> dict:
        out = {"request_id": r.key, "vllm_request_id": r.rid, "program": r.program,
               "error": r.error, "final": final, "skipped": r.skipped,
               "names": self.names, "layers": self.layers}
        if rep is not None:
            t = pack_tensor
            out.update(tokens=rep.tokens, mean=t(rep.mean), max=t(rep.max), ema=t(rep.ema),
                       above=t(rep.above), trace=t(rep.trace), dropped=rep.dropped,
                       alarms=[a.to_dict() for a in rep.alarms],
                       baseline_mean=t(rep.baseline_mean), baseline_std=t(rep.baseline_std))
        return out

    # ------------------------------------------------------------------ per step
    def begin_step(self, scheduler_output) -> None:
        """Finished requests out, new requests in (before the runner updates its batch)."""
        done = set(getattr(scheduler_output, "finished_req_ids", None) or ())
        for rid in sorted(done):  # same order on every rank: same slots everywhere
            self.finish(rid)
        for new in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
            ids = getattr(new, "prompt_token_ids", None)
            emb = getattr(new, "prompt_embeds", None)
            n = len(ids) if ids is not None else (int(emb.shape[0]) if emb is not None else 0)
            self.admit(new.req_id, getattr(new, "sampling_params", None), n)

    def set_layout(self, req_ids: Sequence[str], num_scheduled: Sequence[int],
                   num_computed: Sequence[int], lookup=None) -> None:
        """The batch of the coming forward: token rows are the requests' scheduled tokens in
        ``req_ids`` order; request ``j``'s rows sit at positions ``num_computed[j] + 0..n-1``.
        ``lookup(rid) -> (sampling_params, prompt_len)`` admits a request not seen yet."""
        counts = [int(n) for n in num_scheduled[:len(req_ids)]]
        T = sum(counts)
        if T > self.T_max:
            raise RuntimeError(f"steerkernel: a forward of {T} tokens exceeds the buffers "
                               f"({self.T_max}); raise max_num_batched_tokens consistently")
        slot_np = np.zeros(T, dtype=np.int32)
        rows: List[Tuple[Optional[Hashable], int]] = []
        steered = gated = latched = False
        off = 0
        for rid, n, c in zip(req_ids, counts, num_computed):
            c = int(c)
            r = self.reqs.get(rid)
            if r is None and lookup is not None:
                got = lookup(rid)
                if got is not None:
                    r = self.admit(rid, *got)
            if r is not None and (r.slot_prompt or r.slot_gen):
                npr = min(max(r.prompt_len - c, 0), n)
                if npr and r.slot_prompt:
                    slot_np[off:off + npr] = r.slot_prompt
                if n - npr and r.slot_gen:
                    if (not r.latch_copied and r.slot_prompt and r.slot_gen != r.slot_prompt
                            and r.compiled.latched):
                        self.tables.latch[:, r.slot_gen].copy_(
                            self.tables.latch[:, r.slot_prompt])
                        r.latch_copied = True
                    slot_np[off + npr:off + n] = r.slot_gen
                if (npr and r.slot_prompt) or (n - npr and r.slot_gen):
                    steered = True
                    gated |= r.compiled.gated
                    latched |= r.compiled.latched
            if r is not None and r.monitor:
                if c > r.next_pos:
                    r.skipped += c - r.next_pos
                dup = min(max(r.next_pos - c, 0), n)
                if dup:
                    rows.append((None, dup))
                if n - dup:
                    rows.append((r.key, n - dup))
                r.next_pos = max(r.next_pos, c + n)
            else:
                rows.append((None, n))
            off += n
        nb = self.device.type == "cuda"
        if T:
            self.slot_buf[:T].copy_(torch.from_numpy(slot_np), non_blocking=nb)
        if self._hw > T:
            self.slot_buf[T:self._hw].zero_()
        self._hw = T
        self.tables.begin_forward()
        self.fwd = _Forward(T, steered, gated, latched, rows)

    def end_forward(self) -> None:
        """After the forward: rank 0 records the scores of this forward's rows."""
        f, self.fwd = self.fwd, None
        if f is None:
            return
        self.stats["forwards"] += 1
        if self._hw:
            self.slot_buf[:self._hw].zero_()  # forwards without a layout (dummy runs) steer nothing
            self._hw = 0
        if self.monitor is None or not any(k is not None for k, _ in f.rows):
            return
        rows = list(f.rows)
        free = len(self.monitor._free)
        for j, (key, n) in enumerate(rows):
            if key is None:
                continue
            r = self.reqs.get(self._keys.get(key, ""))
            if r is None:
                rows[j] = (None, n)
                continue
            if not r.opened:
                if free <= 0:
                    r.monitor = False
                    r.error = r.error or "monitor full: this request was not recorded"
                    rows[j] = (None, n)
                    continue
                free -= 1
                r.opened = True
        try:
            self.monitor.record(rows)
            if any(r.live for r in self.reqs.values()):
                # readings and alarm actions belong to this step's tokens: no lag
                self.monitor.poll(wait=True)
                self._flush()
        except Exception:  # noqa: BLE001 - never take the engine down for a monitor fault
            log.exception("steerkernel: monitor record failed; these tokens are dropped")

    # ------------------------------------------------------------------ readings / actions
    def _req_by_key(self, key: Hashable) -> Optional[_Request]:
        return self.reqs.get(self._keys.get(key, ""))

    def _tap_rows(self, key: Hashable, first: int, rows: Tensor) -> None:
        """Monitor rows ``[L, n, K]`` of one request (monitored tokens ``first..``): keep the
        generated tokens' rows (row ``j`` = position ``prompt_len - 1 + j``) it asked for."""
        r = self._req_by_key(key)
        if r is None or r.report_cols is None or r.stream is None or self.publisher is None:
            return
        n = rows.shape[1]
        start = first + r.skipped - (r.prompt_len - 1)  # generated index of rows[:, 0]
        lo = max(0, -start)
        if lo >= n:
            return
        if not r.outbox_rows:
            r.outbox_j0 = start + lo
        r.outbox_rows.extend(r.report_pick(rows, lo))

    def _tap_alarm(self, ev) -> None:
        r = self._req_by_key(ev.request_id)
        if r is None or not r.live:
            return
        pos = ev.token + r.skipped
        j = pos - (r.prompt_len - 1)
        act = None
        if r.action is not None and r.fired is None and r.action.matches(ev.concept):
            act = r.action.kind
            r.fired = ev.rule
            if act == "stop":
                label = f"steerkernel: {ev.rule}"
                self._stops[r.rid] = label
                readings.add_stop(r.rid, label)
                self.stats["alarm_stops"] += 1
            else:
                self._switch(r)
        if r.report_cols is not None:
            r.outbox_alarms.append({"rule": ev.rule, "concept": ev.concept, "layer": ev.layer,
                                    "token": j if j >= 0 else None, "position": pos,
                                    "value": round(float(ev.value), 6), "action": act})

    def _switch(self, r: _Request) -> None:
        """A steer action fired: the request's generated tokens run ``r.switched`` from the
        next forward on (a slot of its own; the front end reserved it)."""
        c = r.switched
        if c is None or c.identity["generated"]:
            return
        s = self._alloc()
        if not s:
            self.stats["slot_exhausted"] += 1
            r.error = "no free steering slot for the alarm's steer action: it did not run"
            log.error("steerkernel: request %s: %s", r.rid, r.error)
            return
        self.tables.assign(s, c, "generated")
        if r.slot_gen and r.slot_gen != r.slot_prompt and r.slot_gen in r.owned:
            old = r.slot_gen
            r.owned.remove(old)
            self.tables.clear(old)
            self._free.append(old)
        r.owned.append(s)
        r.slot_gen = s
        r.compiled = c
        r.latch_copied = True  # the switched program's gates start closed
        self.stats["alarm_switches"] += 1

    def _flush(self) -> None:
        if self.publisher is None:
            for r in self.reqs.values():
                r.outbox_rows, r.outbox_alarms = [], []
            return
        for r in self.reqs.values():
            if r.stream is None or not (r.outbox_rows or r.outbox_alarms):
                continue
            msg = {"t": r.stream, "id": external_id(r.rid), "rid": r.rid, "key": str(r.key),
                   "j0": r.outbox_j0, "z": r.outbox_rows, "alarms": r.outbox_alarms}
            if self.publisher.send(msg):
                self.stats["readings_sent"] += len(r.outbox_rows)
            else:
                self.stats["readings_dropped"] += len(r.outbox_rows)
            r.rows_sent += len(r.outbox_rows)
            r.outbox_rows, r.outbox_alarms = [], []

    def take_stops(self) -> Dict[str, str]:
        """This step's stop decisions (for the runner output; see .patches)."""
        out, self._stops = self._stops, {}
        return out

    # ------------------------------------------------------------------ RPC (collective_rpc)
    def reports(self, keys: Optional[Sequence[Hashable]] = None, pop: bool = True
                ) -> Dict[Hashable, Optional[dict]]:
        """Reports by monitor key (``steerkernel_id`` or the caller's request id).  Finished
        requests: the final report (removed with ``pop``).  Requests still open: their report
        so far (``final`` False)."""
        if keys is None:
            keys = list(self.finished) + list(self._keys)
        out: Dict[Hashable, Optional[dict]] = {}
        for key in keys:
            if key in self.finished:
                if pop:
                    out[key] = self.finished.pop(key)
                    self._finished_bytes -= report_bytes(out[key])
                else:
                    out[key] = self.finished[key]
                continue
            r = self.reqs.get(self._keys.get(key, ""))
            if r is None:
                out[key] = None
                continue
            rep = None
            if r.opened and self.monitor is not None:
                rep = self.monitor.report(r.key)
            out[key] = self._report_dict(r, rep, final=False)
            if pop:
                r.fetched = True
        return out

    def status(self) -> dict:
        return {"rank": self.tp_rank, "reporter": self.reporter, "backend": self.backend,
                "bank": self.cfg.bank, "K": self.K, "layers": self.layers,
                "sites": [i for i, s in enumerate(self.sites) if s is not None],
                "slots": self.P, "free_slots": len(self._free), "open_requests": len(self.reqs),
                "finished_reports": len(self.finished), "T_max": self.T_max,
                "readings_channel": self.publisher is not None,
                **self.stats,
                "monitor": self.monitor.stats() if self.monitor is not None else None}

    def rpc(self, op: str, *args, **kwargs) -> Any:
        if op == "reports":
            return self.reports(*args, **kwargs)
        if op == "status":
            return self.status()
        if op == "config":
            return self.cfg.to_dict()
        raise ValueError(f"steerkernel: unknown worker call {op!r}")

