"""Per-request readings and alarm actions for the vLLM plugin (docs/vllm.md, "Readings in the
response").

Three pieces, all plain data so each side can be tested alone:

* **request options** a client puts in ``vllm_xargs`` (scalars only):

  - ``steerkernel_report``: which readings come back with the reply, ``"all"`` or items
    ``CONCEPT[@LAYERS]`` separated by commas, e.g. ``"calm,desperate@18"``.  ``LAYERS`` is a
    monitored layer (``18``), a range (``10-20``: the monitored layers inside it) or ``*``
    (every monitored layer); without it the item reads the bank's default layer (the middle
    monitored layer, as for alarm rules).  ``all`` stands for every concept.
    :func:`parse_report_spec` turns it into :class:`ReportSpec` columns ``(concept, layer)``.
  - ``steerkernel_on_alarm``: what an alarm rule of the engine does to this request,
    ``"stop"`` (end the request at the token whose reading fired; finish reason ``stop``,
    ``stop_reason`` ``"steerkernel: RULE"``) or ``"steer PROGRAM"`` (switch on PROGRAM for the
    rest of the request, from the next token), optionally only for the rules on some concepts:
    ``"stop@desperate,afraid"``.  :func:`parse_alarm_action`.

* **the channel** from the rank-0 worker to the API server process: the worker
  (:class:`Publisher`) pushes, after each forward, the z-scored rows of the generated tokens of
  every request that asked for readings, and the alarms that fired for it, over a local ZeroMQ
  PUSH socket (never blocking the engine: a full queue drops and counts); the API server
  (:class:`ReadingsBook`) files them by the request's stream tag and choice id and hands them to
  the response middleware (:mod:`.server`) as the tokens go out.

* **row alignment**: generated token ``j``'s row is the residual-stream reading at the position
  the model was at when it chose token ``j`` (the last prompt position for ``j = 0``, token
  ``j - 1``'s position after), so the reading arrives in the same engine step as its token.
  Offline, it is row ``prompt_len - 1 + j`` of the monitor trace
  (:func:`generated_rows`).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import SpecError
from ...limits import quote_input
# the layer an item without @ reads: the one a layer-less alarm rule watches
from ...monitor.engine import default_rule_layer as default_layer

log = logging.getLogger("steerkernel.vllm")

#: ``vllm_xargs`` / ``extra_args`` keys (config.EXTRA_KEYS lists them with the others)
EXTRA_REPORT = "steerkernel_report"      # readings in the HTTP response
EXTRA_ON_ALARM = "steerkernel_on_alarm"  # what an alarm does to this request
EXTRA_STREAM = "steerkernel_stream"      # set by the server's middleware, not by clients

#: the API server process sets it before the engine starts; workers inherit it
ENV_ADDR = "STEERKERNEL_READINGS_ADDR"

MAX_REPORT_CHARS = 4096
MAX_REPORT_COLUMNS = 1024
MAX_ACTION_CHARS = 16384 + 256
MAX_STREAM_TAG = 64


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class ReportSpec:
    """The readings a request asked for: column ``c`` is concept ``concepts[c]`` at monitored
    layer ``layers[c]``; ``cols`` holds the matching ``(layer position, concept index)`` in
    the bank's order."""

    concepts: Tuple[str, ...]
    layers: Tuple[int, ...]
    cols: Tuple[Tuple[int, int], ...]


_ITEM = re.compile(r"^\s*([^@,\s]+)\s*(?:@\s*(\*|\d{1,6}(?:\s*-\s*\d{1,6})?))?\s*$")


def _check_text(key: str, text, limit: int, example: str) -> None:
    """A request option must be a string of at most ``limit`` characters (checked first)."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise SpecError(f"{key} must be a string {example}, got {type(text).__name__}")
    if len(text) > limit:
        raise SpecError(f"{key} is {len(text)} characters long (limit {limit})")


def parse_report_spec(text, names: Sequence[str], layers: Sequence[int],
                      default: Optional[int] = None) -> ReportSpec:
    """``"all"`` / ``"calm,desperate@18"`` / ``"fear@10-20"`` / ``"all@*"`` -> columns; an item
    without ``@`` reads :func:`default_layer` (``default``: the bank's default layer).
    :class:`SpecError` names the bad item (unknown concept, layer not monitored, too many)."""
    _check_text(EXTRA_REPORT, text, MAX_REPORT_CHARS, 'such as "all" or "calm,desperate@18"')
    if not text.strip():
        raise SpecError(f"{EXTRA_REPORT} is empty; use \"all\" or concept names")
    names, layers = list(names), [int(x) for x in layers]
    cols: "OrderedDict[Tuple[int, int], None]" = OrderedDict()
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise SpecError(f"{EXTRA_REPORT}: cannot read item {quote_input(item)}; expected "
                            "CONCEPT, CONCEPT@LAYER, CONCEPT@A-B or CONCEPT@* (or all)")
        name, at = m.group(1), m.group(2)
        if name == "all":
            cis = list(range(len(names)))
        elif name in names:
            cis = [names.index(name)]
        else:
            raise SpecError(f"{EXTRA_REPORT}: concept {quote_input(name)} is not in the bank "
                            f"(concepts: {', '.join(names)})")
        if at is None:
            lis = [layers.index(default_layer(layers, default))]
        elif at == "*":
            lis = list(range(len(layers)))
        elif "-" in at:
            a, b = (int(x) for x in at.split("-"))
            lis = [i for i, x in enumerate(layers) if a <= x <= b]
            if a > b or not lis:
                raise SpecError(f"{EXTRA_REPORT}: no monitored layer in {a}-{b} "
                                f"(monitored: {layers})")
        else:
            if int(at) not in layers:
                raise SpecError(f"{EXTRA_REPORT}: layer {int(at)} is not monitored "
                                f"(monitored: {layers})")
            lis = [layers.index(int(at))]
        for li in lis:
            for ci in cis:
                cols[(li, ci)] = None
        if len(cols) > MAX_REPORT_COLUMNS:
            raise SpecError(f"{EXTRA_REPORT} asks for more than {MAX_REPORT_COLUMNS} "
                            "(concept, layer) readings per token")
    c = list(cols)
    return ReportSpec(tuple(names[ci] for _, ci in c), tuple(layers[li] for li, _ in c),
                      tuple(c))


@dataclass(frozen=True)
class AlarmAction:
    """``kind`` "stop" or "steer"; ``program`` (steer): the program switched on;
    ``concepts``: only rules on these concepts trigger it (None: every rule)."""

    kind: str
    program: Optional[str] = None
    concepts: Optional[Tuple[str, ...]] = None

    def matches(self, concept: str) -> bool:
        return self.concepts is None or concept in self.concepts

    def __str__(self) -> str:
        at = "@" + ",".join(self.concepts) if self.concepts else ""
        return f"{self.kind}{at}" + (f" {self.program}" if self.program else "")


_ACTION = re.compile(r"^\s*(stop|steer)(?:@([^\s]+))?(?:\s+(.*\S))?\s*$", re.S)


def parse_alarm_action(text, rule_concepts: Sequence[str]) -> AlarmAction:
    """``"stop"``, ``"stop@desperate"``, ``"steer calm=+0.05"``, ``"steer@fear calm=+0.05"``.
    ``rule_concepts``: the concepts of the engine's alarm rules (an action needs one to fire
    it).  The steer program is parsed here, compiled against the bank by the caller."""
    from ...steering import Program

    _check_text(EXTRA_ON_ALARM, text, MAX_ACTION_CHARS, '("stop" or "steer PROGRAM")')
    m = _ACTION.match(text)
    if m is None:
        raise SpecError(f"{EXTRA_ON_ALARM}: cannot read {quote_input(text)}; expected "
                        "\"stop\", \"stop@CONCEPT,...\" or \"steer[@CONCEPT,...] PROGRAM\"")
    kind, at, prog = m.group(1), m.group(2), m.group(3)
    if not rule_concepts:
        raise SpecError(f"{EXTRA_ON_ALARM}: this engine has no alarm rules to fire it "
                        "(plugin config 'rules')")
    concepts = None
    if at is not None:
        concepts = tuple(dict.fromkeys(c for c in at.split(",") if c))
        bad = [c for c in concepts if c not in rule_concepts]
        if bad or not concepts:
            raise SpecError(f"{EXTRA_ON_ALARM}: no alarm rule watches {quote_input(bad or at)} "
                            f"(rules watch: {', '.join(dict.fromkeys(rule_concepts))})")
    if kind == "stop":
        if prog is not None:
            raise SpecError(f"{EXTRA_ON_ALARM}: \"stop\" takes no program")
        return AlarmAction("stop", None, concepts)
    if prog is None:
        raise SpecError(f"{EXTRA_ON_ALARM}: \"steer\" needs a program, e.g. "
                        "\"steer calm=+0.05\"")
    Program.parse(prog)
    return AlarmAction("steer", prog, concepts)


def check_stream_tag(tag) -> str:
    if not isinstance(tag, str) or not tag or len(tag) > MAX_STREAM_TAG \
            or not tag.isprintable():
        raise SpecError(f"{EXTRA_STREAM} is set by the server; got a bad value")
    return tag


def generated_rows(trace, prompt_len: int, n_generated: int):
    """Offline equivalent of the streamed rows: ``trace`` ``[positions, ...]`` (a monitor
    trace of one request) -> the rows of its ``n_generated`` generated tokens."""
    start = int(prompt_len) - 1
    return trace[start:start + int(n_generated)]


# ----------------------------------------------------------------------------- channel
def _zmq():
    import zmq  # pyzmq: a vLLM dependency

    return zmq


class Publisher:
    """Worker side (TP rank 0): push messages to the API server, never blocking."""

    def __init__(self, addr: str):
        zmq = _zmq()
        self.addr = addr
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(addr)
        self.sent = self.dropped = 0

    def send(self, msg: dict) -> bool:
        zmq = _zmq()
        try:
            self._sock.send_pyobj(msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close(0)


@dataclass
class _Choice:
    rows: List[list] = field(default_factory=list)   # generated token j -> its row
    first: int = 0                                    # row index of rows[0]
    alarms: List[dict] = field(default_factory=list)
    key: Optional[str] = None                         # monitor key (report id)
    rid: Optional[str] = None                         # vLLM's request id
    actions: List[dict] = field(default_factory=list)


@dataclass
class _Stream:
    spec: ReportSpec
    loop: Optional[asyncio.AbstractEventLoop]
    event: Optional[asyncio.Event]
    choices: Dict[str, _Choice] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)


class ReadingsBook:
    """API server side: binds a PULL socket, files the workers' messages by stream tag.

    One per API server process (:func:`server_book`).  ``open(tag, spec)`` before the request
    goes to the engine, ``close(tag)`` when its response is done; messages for unknown tags
    (a response already closed) are dropped.  ``tokens`` maps a report id to the secret
    issued with its response and the vLLM request id (for the report route)."""

    MAX_TOKENS = 8192

    def __init__(self, addr: Optional[str] = None):
        zmq = _zmq()
        if addr is None:
            d = tempfile.mkdtemp(prefix="steerkernel-")
            os.chmod(d, 0o700)
            addr = f"ipc://{d}/readings.sock"
        self.addr = addr
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(addr)
        self._lock = threading.Lock()
        self._streams: Dict[str, _Stream] = {}
        self.tokens: "OrderedDict[str, Tuple[str, Optional[str]]]" = OrderedDict()
        self.stats = {"messages": 0, "unknown_stream": 0, "streams": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="steerkernel-readings",
                                        daemon=True)
        self._thread.start()

    # -- receiving thread
    def _run(self) -> None:
        zmq = _zmq()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop:
            try:
                if not poller.poll(200):
                    continue
                msg = self._sock.recv_pyobj(flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            except Exception:  # noqa: BLE001 - a closed socket at shutdown, a bad message
                if self._stop:
                    return
                log.exception("steerkernel: readings channel: bad message dropped")
                continue
            self._file(msg)

    def _file(self, msg: dict) -> None:
        tag = msg.get("t")
        with self._lock:
            self.stats["messages"] += 1
            s = self._streams.get(tag)
            if s is None:
                self.stats["unknown_stream"] += 1
                return
            ch = s.choices.setdefault(msg.get("id"), _Choice())
            ch.key = msg.get("key", ch.key)
            ch.rid = msg.get("rid", ch.rid)
            j0, rows = msg.get("j0"), msg.get("z") or []
            if rows:
                # rows arrive in order; a gap (never expected) is filled with None
                end = ch.first + len(ch.rows)
                if j0 > end:
                    ch.rows.extend([None] * (j0 - end))
                    end = j0
                ch.rows.extend(rows[end - j0:])
            ch.alarms.extend(msg.get("alarms") or ())
            ch.actions.extend(msg.get("actions") or ())
            loop, ev = s.loop, s.event
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the loop is closed
                pass

    # -- the middleware's side (event loop)
    def open(self, tag: str, spec: ReportSpec) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._streams[tag] = _Stream(spec, loop, asyncio.Event() if loop else None)
            self.stats["streams"] += 1

    def close(self, tag: str) -> None:
        with self._lock:
            self._streams.pop(tag, None)

    def snapshot(self, tag: str, cid: Sequence[str]) -> Optional[_Choice]:
        with self._lock:
            s = self._streams.get(tag)
            if s is None:
                return None
            for c in cid:
                if c in s.choices:
                    return s.choices[c]
            if len(cid) and len(s.choices) == 1:
                return next(iter(s.choices.values()))
            return None

    async def take(self, tag: str, cid: Sequence[str], start: int, n: int,
                   timeout: float = 10.0) -> Tuple[List[list], List[dict], Optional[_Choice]]:
        """Rows ``[start, start + n)`` of a choice and the alarms at those tokens; waits (up to
        ``timeout`` s) for rows not arrived yet (missing ones come back as None)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                s = self._streams.get(tag)
            if s is None:
                return [None] * n, [], None
            ch = self.snapshot(tag, cid)
            have = ch is not None and ch.first + len(ch.rows) >= start + n
            left = deadline - time.monotonic()
            if have or left <= 0 or n == 0:
                break
            ev = s.event
            if ev is None:
                await asyncio.sleep(0.002)
                continue
            ev.clear()
            ch = self.snapshot(tag, cid)
            if ch is not None and ch.first + len(ch.rows) >= start + n:
                break
            try:
                await asyncio.wait_for(ev.wait(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        with self._lock:
            if ch is None:
                return [None] * n, [], None
            rows = [ch.rows[j - ch.first] if 0 <= j - ch.first < len(ch.rows) else None
                    for j in range(start, start + n)]
            # alarms at prompt positions (token None) go out with the first token's chunk
            alarms = [a for a in ch.alarms if (a.get("token") is None and start == 0 and n)
                      or (a.get("token") is not None and start <= a["token"] < start + n)]
        return rows, alarms, ch

    def all_alarms(self, tag: str, cid: Sequence[str]) -> List[dict]:
        ch = self.snapshot(tag, cid)
        with self._lock:
            return list(ch.alarms) if ch is not None else []

    def issue_token(self, key: str, rid: Optional[str]) -> str:
        tok = secrets.token_urlsafe(18)
        with self._lock:
            self.tokens[key] = (tok, rid)
            self.tokens.move_to_end(key)
            while len(self.tokens) > self.MAX_TOKENS:
                self.tokens.popitem(last=False)
        return tok

    def check_token(self, key: str, token: Optional[str]) -> Optional[str]:
        """The vLLM request id bound to ``key`` when ``token`` is the one issued for it."""
        with self._lock:
            got = self.tokens.get(key)
        if got is None or not token or not hmac.compare_digest(got[0], str(token)):
            return None
        return got[1] or ""

    def shutdown(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self._sock.close(0)


#: the API server process's book (None: this process serves no steerkernel engine)
_BOOK: Dict[str, object] = {}


def server_book() -> Optional[ReadingsBook]:
    return _BOOK.get("book")  # type: ignore[return-value]


def server_config():
    return _BOOK.get("config")


def start_server_book(cfg) -> ReadingsBook:
    """Create this API server process's book and export its address to the engine processes
    that start after this call (they inherit the environment)."""
    book = _BOOK.get("book")
    if book is None:
        book = ReadingsBook()
        _BOOK["book"] = book
        os.environ[ENV_ADDR] = book.addr
    _BOOK["config"] = cfg
    return book  # type: ignore[return-value]


#: vLLM request id -> rule label: alarms whose action is "stop", for the scheduler (same
#: process as the worker with one GPU / CPU rank; other executors carry them on the runner
#: output, see .patches)
PENDING_STOPS: Dict[str, str] = {}
_STOPS_LOCK = threading.Lock()


def add_stop(rid: str, label: str) -> None:
    with _STOPS_LOCK:
        PENDING_STOPS.setdefault(rid, label)


def take_stop(rid: str) -> Optional[str]:
    with _STOPS_LOCK:
        return PENDING_STOPS.pop(rid, None)


def drop_stop(rid: str) -> None:
    with _STOPS_LOCK:
        PENDING_STOPS.pop(rid, None)


__all__ = ["EXTRA_REPORT", "EXTRA_ON_ALARM", "EXTRA_STREAM", "ReportSpec", "AlarmAction",
           "parse_report_spec", "parse_alarm_action", "default_layer", "generated_rows",
           "Publisher", "ReadingsBook", "server_book", "start_server_book"]
