"""The live monitor: one preallocated device buffer per forward, asynchronous host copies,
per-request aggregates and alarm rules evaluated on the device.

Data flow for one forward of T tokens (rows of one continuous batch)::

    junction op at layer i  --scores=-->  buffer[i, :T, :]          (device, [L, max_tokens, K])
    engine.record(rows)     --on device-> aggregates [R, L, K], alarm state [R, N]
                            --side stream, non_blocking--> pinned host ring entry + event
    engine.poll()           --when the event is done--> per-request traces, alarm callbacks,
                                                      JSONL / Prometheus sinks

Nothing inside the forward synchronises with the host: the junction writes into a fixed
buffer (valid under CUDA graphs), and the copy is queued after the forward on a side stream
that the next forward waits for on the device (``wait_event``), not on the host.  If the host
falls behind by more than ``ring_size`` forwards, ``on_full="wait"`` blocks on the oldest copy
(a host sync only under overload) and ``on_full="drop"`` drops that forward's samples and
counts them (``stats()['dropped_tokens']`` and per request ``report.dropped``) — never silently.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import SpecError, UnknownConceptError
from ..limits import quote_input
from .alarms import AlarmRule, AlarmState, parse_rules


@dataclass
class AlarmEvent:
    """An alarm that fired: ``token`` counts the request's monitored tokens from 0."""

    request_id: Hashable
    rule: str
    concept: str
    layer: int
    token: int
    value: float
    time: float

    def to_dict(self) -> dict:
        return {"event": "alarm", "request_id": str(self.request_id), "rule": self.rule,
                "concept": self.concept, "layer": self.layer, "token": self.token,
                "value": self.value, "time": self.time}


@dataclass
class RequestReport:
    """Everything the monitor knows about one request.

    ``trace``: raw projections ``[n_tokens, L, K]`` (None with ``keep_traces=False``);
    ``mean``, ``max``, ``ema``: ``[L, K]`` over the request's tokens; ``above``: ``[L, K]``
    count of tokens whose z-score exceeded the engine's ``above_z``.
    """

    request_id: Hashable
    names: List[str]
    layers: List[int]
    tokens: int
    mean: Tensor
    max: Tensor
    ema: Tensor
    above: Tensor
    trace: Optional[Tensor]
    alarms: List[AlarmEvent]
    dropped: int
    baseline_mean: Tensor
    baseline_std: Tensor

    @property
    def z(self) -> Optional[Tensor]:
        """z-scored trace ``[n_tokens, L, K]`` against the bank's baseline."""
        if self.trace is None:
            return None
        return (self.trace - self.baseline_mean) / self.baseline_std

    def to_dict(self, layer: Optional[int] = None) -> dict:
        li = self.layers.index(layer) if layer is not None else None
        def pick(t):
            t = t if li is None else t[li]
            return t.tolist()
        return {"request_id": str(self.request_id), "tokens": self.tokens,
                "names": self.names, "layers": self.layers if li is None else [layer],
                "mean": pick(self.mean), "max": pick(self.max), "ema": pick(self.ema),
                "above": pick(self.above), "dropped": self.dropped,
                "alarms": [a.to_dict() for a in self.alarms]}


def default_rule_layer(layers: Sequence[int], preferred: Optional[int] = None) -> int:
    """The layer an alarm rule or a readings item without ``@layer`` watches: ``preferred``
    (a bank's ``default_layer``), else (None) the middle monitored layer.  A ``preferred``
    layer that is not monitored is a :class:`SpecError`."""
    layers = [int(x) for x in layers]
    if preferred is None:
        return layers[len(layers) // 2]
    if isinstance(preferred, bool) or not isinstance(preferred, int) or preferred not in layers:
        raise SpecError(f"default_layer {preferred!r} is not a monitored layer "
                        f"(monitored: {layers})")
    return int(preferred)


@dataclass
class _Entry:
    """One host ring entry: a pinned copy of buffer[:, :T] and the rows it holds."""

    host: Tensor
    fired: Optional[Tensor]
    event: Optional[object] = None
    rows: List[Tuple[Hashable, int, int, int]] = field(default_factory=list)  # rid, n, row, first token
    T: int = 0
    busy: bool = False


class MonitorEngine:
    """Collects concept scores for every monitored (layer, concept) of every request.

    Args:
        names: K concept names; layers: the L monitored decoder layers (buffer order).
        max_tokens: most tokens in one forward (the buffer is ``[L, max_tokens, K]``).
        max_requests: most requests monitored at once (aggregate / alarm slots).
        baseline_mean, baseline_std: ``[L, K]`` for z-scores (default 0 / 1).
        rules: alarm rules (:class:`AlarmRule` or strings, see :mod:`.alarms`).
        sinks: objects with ``alarm(event)`` and ``request(report)`` (see :mod:`.sinks`).
        ring_size: host copies in flight before ``on_full`` applies.
        ema_alpha: EMA weight of the newest token.  above_z: z level counted by ``above``.
        keep_traces: keep per-token traces on the host (else aggregates only).
        default_layer: the layer a rule without ``@layer`` watches (a bank's
            ``default_layer``; one of ``layers``); None: the middle monitored layer.
    """

    def __init__(self, names: Sequence[str], layers: Sequence[int], *, max_tokens: int = 2048,
                 max_requests: int = 64, device="cpu", baseline_mean: Optional[Tensor] = None,
                 baseline_std: Optional[Tensor] = None, rules: Sequence = (),
                 sinks: Sequence = (), ring_size: int = 4, ema_alpha: float = 0.1,
                 above_z: float = 2.0, keep_traces: bool = True, on_full: str = "wait",
                 default_layer: Optional[int] = None):
        if on_full not in ("wait", "drop"):
            raise SpecError(f"on_full must be 'wait' or 'drop', got {on_full!r}")
        if not (0 < ema_alpha <= 1):
            raise SpecError(f"ema_alpha must be in (0, 1], got {ema_alpha!r}")
        if max_tokens < 1 or max_requests < 1 or ring_size < 1:
            raise SpecError("max_tokens, max_requests and ring_size must be >= 1")
        self.names, self.layers = list(names), list(layers)
        L, K = len(self.layers), len(self.names)
        if L == 0 or K == 0:
            raise SpecError("the monitor needs at least one layer and one concept")
        fallback = default_rule_layer(self.layers, default_layer)  # of rules without @layer
        self.device = torch.device(device)
        self.max_tokens, self.max_requests = max_tokens, max_requests
        self.buffer = torch.zeros(L, max_tokens, K, device=self.device)
        self.mu = (baseline_mean if baseline_mean is not None
                   else torch.zeros(L, K)).to(self.device, torch.float32)
        self.sd = (baseline_std if baseline_std is not None
                   else torch.ones(L, K)).to(self.device, torch.float32).clamp_min(1e-6)
        R = max_requests
        self.sum = torch.zeros(R, L, K, device=self.device)
        self.max = torch.full((R, L, K), -math.inf, device=self.device)
        self.ema = torch.zeros(R, L, K, device=self.device)
        self.above = torch.zeros(R, L, K, device=self.device, dtype=torch.int32)
        self.count = torch.zeros(R, dtype=torch.int64, device=self.device)
        self.ema_alpha, self.above_z = float(ema_alpha), float(above_z)
        self.rules = parse_rules(rules)
        self._rule_layer = []
        self._rule_concept = []
        for r in self.rules:
            if r.concept not in self.names:
                raise UnknownConceptError(f"alarm rule concept {quote_input(r.concept)} is not "
                                          f"monitored; known: {', '.join(self.names)}")
            layer = r.layer if r.layer is not None else fallback
            if layer not in self.layers:
                raise SpecError(f"alarm rule layer {layer} is not monitored "
                                f"(monitored: {self.layers})")
            self._rule_layer.append(self.layers.index(layer))
            self._rule_concept.append(self.names.index(r.concept))
        self._rl = torch.tensor(self._rule_layer, dtype=torch.long, device=self.device)
        self._rc = torch.tensor(self._rule_concept, dtype=torch.long, device=self.device)
        self._rz = torch.tensor([r.zscore for r in self.rules], dtype=torch.bool,
                                device=self.device)
        self.alarm_state = AlarmState(self.rules, R, self.device)
        self.sinks = list(sinks)
        self.callbacks: List[Callable[[AlarmEvent], None]] = []
        self.row_taps: List[Callable[[Hashable, int, Tensor], None]] = []
        self.keep_traces, self.on_full = keep_traces, on_full
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._ring: List[_Entry] = [
            _Entry(host=torch.empty(L, max_tokens, K, pin_memory=cuda),
                   fired=torch.empty(max_tokens, len(self.rules), dtype=torch.bool,
                                     pin_memory=cuda) if self.rules else None)
            for _ in range(ring_size)]
        self._pending: Deque[_Entry] = deque()
        self._slots: Dict[Hashable, int] = {}
        self._free = list(range(R - 1, -1, -1))
        self._tokens: Dict[Hashable, int] = {}
        self._traces: Dict[Hashable, List[Tensor]] = {}
        self._alarms: Dict[Hashable, List[AlarmEvent]] = {}
        self._dropped: Dict[Hashable, int] = {}
        self._stats = {"forwards": 0, "tokens": 0, "dropped_tokens": 0, "alarms": 0}

    # ------------------------------------------------------------------ the forward side
    def scores_view(self, layer_pos: int, num_tokens: int) -> Tensor:
        """``[num_tokens, K]`` view of the buffer for monitored layer number ``layer_pos``."""
        return self.buffer[layer_pos, :num_tokens]

    def open(self, request_id: Hashable) -> int:
        """Start monitoring a request; returns its aggregate slot (state zeroed)."""
        if request_id in self._slots:
            return self._slots[request_id]
        if not self._free:
            raise SpecError(f"monitor is full: {self.max_requests} requests already open")
        s = self._free.pop()
        self._slots[request_id] = s
        self.sum[s] = 0
        self.max[s] = -math.inf
        self.ema[s] = 0
        self.above[s] = 0
        self.count[s] = 0
        self.alarm_state.reset(s)
        self._tokens[request_id] = 0
        self._traces[request_id] = []
        self._alarms[request_id] = []
        self._dropped[request_id] = 0
        return s

    def record(self, rows: Sequence[Tuple[Hashable, int]]) -> None:
        """After a forward: ``rows`` lists ``(request_id, n_tokens)`` in buffer row order.

        Requests not yet open are opened.  Rows with request_id None are padding (skipped).
        """
        T = sum(n for _, n in rows)
        if T > self.max_tokens:
            raise SpecError(f"forward has {T} tokens but the monitor holds {self.max_tokens}")
        if T == 0:
            return
        seg_req, seg_start, seg_len, firsts = [], [], [], []
        start = 0
        for rid, n in rows:
            if rid is not None and n > 0:
                seg_req.append(self.open(rid))
                seg_start.append(start)
                seg_len.append(n)
                firsts.append(self._tokens[rid])
                self._tokens[rid] += n
            start += n
        fired = self._device_update(seg_req, seg_start, seg_len, T) if seg_req else None
        self._enqueue(rows, T, fired, firsts)
        self._stats["forwards"] += 1
        self._stats["tokens"] += sum(seg_len)
        self.poll()

    def _device_update(self, seg_req, seg_start, seg_len, T) -> Optional[Tensor]:
        dev = self.device
        # token -> (request slot, position within its segment), built on the host
        tok_idx = torch.cat([torch.arange(s, s + n) for s, n in zip(seg_start, seg_len)])
        tok_req = torch.cat([torch.full((n,), r) for r, n in zip(seg_req, seg_len)])
        tok_pos = torch.cat([torch.arange(n) for n in seg_len])
        tok_from_end = torch.cat([torch.arange(n - 1, -1, -1) for n in seg_len])
        a = self.ema_alpha
        w = a * (1 - a) ** tok_from_end.double()  # EMA weight of each token in its segment
        decay = torch.tensor([(1 - a) ** n for n in seg_len], dtype=torch.float32)
        tok_idx, tok_req = tok_idx.to(dev), tok_req.to(dev)
        w, decay = w.float().to(dev), decay.to(dev)
        req = torch.tensor(seg_req, device=dev)
        raw = self.buffer[:, :T].index_select(1, tok_idx).transpose(0, 1)  # [M, L, K]
        z = (raw - self.mu) / self.sd
        self.sum.index_add_(0, tok_req, raw)
        M = raw.shape[0]
        self.max.view(self.max_requests, -1).scatter_reduce_(
            0, tok_req[:, None].expand(M, raw[0].numel()), raw.reshape(M, -1), "amax")
        self.ema[req] *= decay[:, None, None]
        self.ema.index_add_(0, tok_req, raw * w[:, None, None])
        self.above.index_add_(0, tok_req, (z > self.above_z).int())
        self.count.index_add_(0, tok_req, torch.ones_like(tok_req))
        if not self.rules:
            return None
        vals = torch.where(self._rz, z[:, self._rl, self._rc], raw[:, self._rl, self._rc])
        fired = torch.zeros(T, len(self.rules), dtype=torch.bool, device=dev)
        # alarms are sequential per request: one position of every segment at a time
        order = torch.argsort(tok_pos, stable=True)
        counts = torch.bincount(tok_pos).tolist()  # host-side layout, no device sync
        off = 0
        order = order.to(dev)
        for c in counts:
            sel = order[off:off + c]
            fired[tok_idx[sel]] = self.alarm_state.step(vals[sel], tok_req[sel])
            off += c
        return fired

    def _enqueue(self, rows, T, fired, firsts) -> None:
        entry = next((e for e in self._ring if not e.busy), None)
        if entry is None:
            self.poll()
            entry = next((e for e in self._ring if not e.busy), None)
        if entry is None and self.on_full == "wait":
            self.poll(wait=True)
            entry = next((e for e in self._ring if not e.busy), None)
        if entry is None:  # on_full == "drop": count, never lose silently
            for rid, n in rows:
                if rid is None or n == 0:
                    continue
                self._dropped[rid] += n
                self._stats["dropped_tokens"] += n
                if self.keep_traces:  # keep token numbering: the gap is NaN in the trace
                    self._traces[rid].append(
                        torch.full((n, len(self.layers), len(self.names)), math.nan))
            return
        entry.busy, entry.T = True, T
        entry.rows, start, i = [], 0, 0
        for rid, n in rows:
            if rid is not None and n > 0:
                entry.rows.append((rid, n, start, firsts[i]))
                i += 1
            start += n
        if self._stream is not None:
            cur = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(cur)
            with torch.cuda.stream(self._stream):
                entry.host[:, :T].copy_(self.buffer[:, :T], non_blocking=True)
                if fired is not None:
                    entry.fired[:T].copy_(fired, non_blocking=True)
                entry.event = torch.cuda.Event()
                entry.event.record(self._stream)
            # the next forward overwrites the buffer only after this copy (device-side wait)
            cur.wait_event(entry.event)
        else:
            entry.host[:, :T].copy_(self.buffer[:, :T])
            if fired is not None:
                entry.fired[:T].copy_(fired)
            entry.event = None
        self._pending.append(entry)

    # ------------------------------------------------------------------ the host side
    def poll(self, wait: bool = False) -> int:
        """Consume finished host copies in order; returns how many forwards were consumed."""
        done = 0
        while self._pending:
            e = self._pending[0]
            if e.event is not None and not e.event.query():
                if not wait:
                    break
                e.event.synchronize()
            self._pending.popleft()
            self._consume(e)
            e.busy = False
            done += 1
            wait = False
        return done

    def _consume(self, e: _Entry) -> None:
        now = time.time()
        for rid, n, start, first in e.rows:
            if rid not in self._traces:  # closed meanwhile
                continue
            for tap in self.row_taps:
                tap(rid, first, e.host[:, start:start + n])
            if self.keep_traces:
                self._traces[rid].append(e.host[:, start:start + n].transpose(0, 1).clone())
            if e.fired is not None:
                f = e.fired[start:start + n]
                if bool(f.any()):
                    for t, j in f.nonzero().tolist():
                        rule = self.rules[j]
                        li, ci = self._rule_layer[j], self._rule_concept[j]
                        v = float(e.host[li, start + t, ci])
                        if rule.zscore:
                            v = (v - float(self.mu[li, ci])) / float(self.sd[li, ci])
                        ev = AlarmEvent(rid, rule.label, rule.concept, self.layers[li],
                                        first + t, v, now)
                        self._alarms[rid].append(ev)
                        self._stats["alarms"] += 1
                        for cb in self.callbacks:
                            cb(ev)
                        for s in self.sinks:
                            s.alarm(ev)

    def on_alarm(self, fn: Callable[[AlarmEvent], None]) -> None:
        """Call ``fn(event)`` for every alarm (from :meth:`poll`, on the host)."""
        self.callbacks.append(fn)

    def on_rows(self, fn: Callable[[Hashable, int, Tensor], None]) -> None:
        """Call ``fn(request_id, first_token, rows)`` for every recorded segment, before its
        alarms (from :meth:`poll`, on the host); ``rows`` is a ``[L, n, K]`` view of raw
        projections valid only during the call."""
        self.row_taps.append(fn)

    def report(self, request_id: Hashable) -> RequestReport:
        """The request's report so far (drains finished copies first)."""
        self.poll(wait=True)
        if request_id not in self._slots:
            raise KeyError(f"request {quote_input(request_id)} is not monitored")
        s = self._slots[request_id]
        n = int(self.count[s])
        tr = self._traces[request_id]
        trace = torch.cat(tr) if (self.keep_traces and tr) else (
            torch.zeros(0, len(self.layers), len(self.names)) if self.keep_traces else None)
        return RequestReport(
            request_id, self.names, self.layers, self._tokens[request_id],
            (self.sum[s] / max(n, 1)).cpu(), self.max[s].cpu(), self.ema[s].cpu(),
            self.above[s].cpu(), trace, list(self._alarms[request_id]),
            self._dropped[request_id], self.mu.cpu(), self.sd.cpu())

    def close(self, request_id: Hashable) -> RequestReport:
        """Final report of a request; frees its slot (the next user starts from zero)."""
        rep = self.report(request_id)
        s = self._slots.pop(request_id)
        for d in (self._tokens, self._traces, self._alarms, self._dropped):
            d.pop(request_id, None)
        self._free.append(s)
        for sink in self.sinks:
            sink.request(rep)
        return rep

    def open_requests(self) -> List[Hashable]:
        return list(self._slots)

    def stats(self) -> dict:
        """Counters: forwards, tokens recorded, dropped_tokens, alarms, in_flight copies."""
        return dict(self._stats, in_flight=len(self._pending), open=len(self._slots))
