"""The OpenAI-compatible server side of the plugin (docs/vllm.md, "Readings in the response").

* :class:`ReadingsMiddleware`: an ASGI middleware on ``/v1/completions`` and
  ``/v1/chat/completions``.  A request whose ``vllm_xargs`` has ``steerkernel_report`` gets a
  stream tag (``steerkernel_stream``) and ``return_token_ids`` (to count each chunk's tokens;
  removed again from the answer unless the client asked for it); every choice of the answer
  then carries a ``steerkernel`` object with the z rows of its tokens, the alarms that fired at
  them, and, with the choice's last chunk, aggregates and the id + token of its full report.
  Requests without ``steerkernel_report`` pass through untouched (two substring tests).
  Installed by the ``response_middleware`` touch point (:mod:`.touchpoints`), inside vLLM's own
  middleware (CORS, API key).
* :class:`SteerkernelEndpoints`: a ``vllm.endpoint_plugins`` entry point (vLLM's documented
  way to add routes; it loads only when ``VLLM_PLUGINS`` names ``steerkernel``):
  ``GET /v1/steerkernel/concepts`` (the served bank) and ``GET /v1/steerkernel/reports/{id}``
  (a finished request's full report; the ``X-Steerkernel-Report-Token`` header must carry the
  token its response gave, unless the plugin config sets ``reports_open``).
"""
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ...errors import SpecError
from .config import EXTRA_REPORT, EXTRA_STREAM, load_bank
from .readings import ReportSpec, default_layer, parse_report_spec, server_book, server_config

PATHS = ("/v1/completions", "/v1/chat/completions")
#: how long a chunk waits for its tokens' rows (they normally arrive before the token)
ROW_TIMEOUT_S = 10.0
#: the most values (tokens x layers x concepts) a report route answer carries in its trace
MAX_TRACE_VALUES = 2_000_000
TOKEN_HEADER = "x-steerkernel-report-token"


def _error(status: int, message: str, param: Optional[str] = "vllm_xargs") -> tuple:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError"
                                 if status == 400 else "NotFoundError", "param": param,
                                 "code": status}}).encode()
    return status, body


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass
class _ChoiceState:
    offset: int = 0
    sent_header: bool = False
    n: int = 0
    sums: List[float] = field(default_factory=list)
    maxs: List[float] = field(default_factory=list)
    missing: int = 0
    alarms: List[dict] = field(default_factory=list)


@dataclass
class _Plan:
    tag: str
    spec: ReportSpec
    strip_ids: bool
    choices: Dict[int, _ChoiceState] = field(default_factory=dict)


def plan_request(body: bytes):
    """``(plan, new_body)`` for a request asking for readings, ``(None, new_body)`` for one
    that only needs cleaning (a client-set stream tag), ``(None, None)`` to pass it through;
    a ``(status, body)`` error tuple for a bad one."""
    if b"steerkernel_report" not in body and b"steerkernel_stream" not in body:
        return None, None  # the common case: no JSON parse here (vLLM parses it anyway)
    try:
        doc = json.loads(body)
    except ValueError:
        return None, None  # vLLM answers malformed JSON itself
    if not isinstance(doc, dict) or not isinstance(doc.get("vllm_xargs"), dict):
        return None, None
    xargs = doc["vllm_xargs"]
    if EXTRA_REPORT not in xargs:
        if EXTRA_STREAM in xargs:  # set by this middleware only
            del xargs[EXTRA_STREAM]
            return None, json.dumps(doc).encode()
        return None, None
    book, cfg = server_book(), server_config()
    if book is None or cfg is None:
        return _error(400, f"steerkernel: {EXTRA_REPORT}: this server has no readings "
                           "channel (it serves no steerkernel engine, runs more than one "
                           "API server process, or uses pipeline parallelism)")
    n = doc.get("n", 1)
    if n not in (None, 1):
        return _error(400, f"steerkernel: {EXTRA_REPORT} needs n=1 (got n={n!r})", "n")
    if doc.get("echo") and not doc.get("return_token_ids"):
        # vLLM drops the echoed prompt text when return_token_ids is on, which this middleware
        # would have to turn on to count each chunk's tokens: the client must choose
        return _error(400, f"steerkernel: {EXTRA_REPORT} with echo needs return_token_ids "
                           "true (vLLM then returns the prompt as prompt_token_ids, not text)",
                      "echo")
    try:
        bank = load_bank(cfg.bank)
        spec = parse_report_spec(xargs[EXTRA_REPORT], bank.names, [int(x) for x in bank.layers],
                                 bank.default_layer)
    except SpecError as e:
        return _error(400, f"steerkernel: {e}")
    tag = secrets.token_hex(12)
    xargs[EXTRA_STREAM] = tag
    strip = not doc.get("return_token_ids")
    doc["return_token_ids"] = True
    return _Plan(tag, spec, strip), json.dumps(doc).encode()


def _aggregates(st: _ChoiceState) -> dict:
    if not st.n:
        return {"mean": None, "max": None}
    return {"mean": [round(s / st.n, 6) for s in st.sums], "max": list(st.maxs)}


async def annotate_choice(plan: _Plan, resp_id: str, choice: dict, whole: bool) -> None:
    """Add the ``steerkernel`` object to one choice (of a chunk, or of a whole answer)."""
    book = server_book()
    idx = int(choice.get("index", 0) or 0)
    st = plan.choices.setdefault(idx, _ChoiceState())
    ids = choice.get("token_ids") or []
    n = len(ids)
    cids = [f"{resp_id}-{idx}", resp_id]
    # rows normally arrive before their token; once one failed to, do not stall each chunk
    wait = ROW_TIMEOUT_S if not st.missing else 0.2
    rows, alarms, ch = await book.take(plan.tag, cids, st.offset, n, timeout=wait)
    st.offset += n
    for row in rows:
        if row is None:
            st.missing += 1
            continue
        if not st.sums:
            st.sums, st.maxs = [0.0] * len(row), [-math.inf] * len(row)
        st.n += 1
        for c, v in enumerate(row):
            st.sums[c] += v
            if v > st.maxs[c]:
                st.maxs[c] = v
    st.alarms.extend(alarms)
    sk: Dict[str, Any] = {}
    if not st.sent_header:
        sk.update(concepts=list(plan.spec.concepts), layers=list(plan.spec.layers))
        st.sent_header = True
    sk["z"] = rows
    sk["alarms"] = alarms
    if whole or choice.get("finish_reason") is not None:
        key = ch.key if ch is not None else None
        sk.update(tokens=st.offset, aggregates=_aggregates(st), missing=st.missing,
                  alarms_total=len(st.alarms))
        stop = choice.get("stop_reason")
        if isinstance(stop, str) and stop.startswith("steerkernel: "):
            sk["stopped_by"] = stop[len("steerkernel: "):]
        if key is not None:
            sk["report_id"] = key
            sk["report_token"] = book.issue_token(key, ch.rid)
    choice["steerkernel"] = sk
    if plan.strip_ids:
        choice.pop("token_ids", None)
        choice.pop("prompt_token_ids", None)


async def annotate(plan: _Plan, doc: dict, whole: bool) -> dict:
    choices = doc.get("choices")
    if isinstance(choices, list):
        for ch in choices:
            if isinstance(ch, dict):
                await annotate_choice(plan, str(doc.get("id", "")), ch, whole)
    if plan.strip_ids:
        doc.pop("prompt_token_ids", None)
    return doc


class ReadingsMiddleware:
    """See the module docstring.  Pure ASGI (no response buffering for streams)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" \
                or not str(scope.get("path", "")).endswith(PATHS):
            return await self.app(scope, receive, send)
        chunks: List[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        got = plan_request(body)
        if isinstance(got[0], int):
            return await _send_json(send, got[0], got[1])
        plan, new_body = got
        if new_body is not None:
            body = new_body
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # disconnects reach the app as before

        if plan is None:
            return await self.app(scope, replay, send)
        book = server_book()
        book.open(plan.tag, plan.spec)
        try:
            await self.app(scope, replay, _ResponseRewriter(plan, send))
        finally:
            book.close(plan.tag)


class _ResponseRewriter:
    """The ``send`` the app gets: rewrites JSON answers whole and SSE streams event by
    event; errors (non-200) and anything else pass through."""

    def __init__(self, plan: _Plan, send):
        self.plan, self.send = plan, send
        self.mode = None
        self.start: Optional[dict] = None
        self.buf = b""

    async def __call__(self, msg):
        if msg["type"] == "http.response.start":
            headers = {k.lower(): v for k, v in msg.get("headers", [])}
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            if msg.get("status") != 200:
                self.mode = "pass"
            elif "text/event-stream" in ctype:
                self.mode = "sse"
            elif "application/json" in ctype:
                self.mode = "json"
                self.start = msg
                return
            else:
                self.mode = "pass"
            return await self.send(msg)
        if msg["type"] != "http.response.body" or self.mode == "pass":
            return await self.send(msg)
        more = msg.get("more_body", False)
        self.buf += msg.get("body", b"")
        if self.mode == "json":
            if more:
                return
            out = self.buf
            try:
                doc = json.loads(self.buf)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                out = json.dumps(await annotate(self.plan, doc, whole=True),
                                 separators=(",", ":")).encode()
            headers = [(k, v) for k, v in self.start.get("headers", [])
                       if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(out)).encode()))
            await self.send(dict(self.start, headers=headers))
            return await self.send({"type": "http.response.body", "body": out,
                                    "more_body": False})
        # SSE: complete events only ("...\n\n"); a partial one waits for the next body
        events, sep, rest = self.buf.rpartition(b"\n\n")
        if not sep and more:
            return
        if not sep:
            events, rest = self.buf, b""
        self.buf = rest
        out = []
        for ev in events.split(b"\n\n"):
            if ev:
                out.append(await self._event(ev))
        data = b"\n\n".join(out) + (b"\n\n" if out and sep else b"")
        if not more and self.buf:
            data += self.buf
            self.buf = b""
        return await self.send({"type": "http.response.body", "body": data,
                                "more_body": more})

    async def _event(self, ev: bytes) -> bytes:
        if not ev.startswith(b"data: "):
            return ev
        payload = ev[6:]
        if payload.strip() == b"[DONE]":
            return ev
        try:
            doc = json.loads(payload)
        except ValueError:
            return ev
        if not isinstance(doc, dict) or "choices" not in doc:
            return ev
        doc = await annotate(self.plan, doc, whole=False)
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------ routes
def _report_json(d: dict, trace: bool) -> dict:
    from .worker import unpack_tensor

    names, layers = list(d["names"]), list(d["layers"])
    mu, sd = unpack_tensor(d.get("baseline_mean")), unpack_tensor(d.get("baseline_std"))
    out: Dict[str, Any] = {"object": "steerkernel.report", "report_id": str(d["request_id"]),
                           "program": d.get("program"), "error": d.get("error"),
                           "final": bool(d.get("final")), "concepts": names, "layers": layers,
                           "tokens": int(d.get("tokens", 0)), "skipped": int(d.get("skipped", 0)),
                           "dropped": int(d.get("dropped", 0)),
                           "alarms": [{k: a[k] for k in ("rule", "concept", "layer", "token",
                                                         "value")}
                                      for a in d.get("alarms", [])]}
    if mu is None or sd is None:
        return out
    sd = sd.clamp_min(1e-6)

    def z(t):
        return ((unpack_tensor(t) - mu) / sd).round(decimals=6).tolist()

    out["z_mean"], out["z_max"], out["z_ema"] = z(d["mean"]), z(d["max"]), z(d["ema"])
    out["above"] = unpack_tensor(d["above"]).tolist()
    tr = unpack_tensor(d.get("trace"))
    if trace and tr is not None:
        if tr.numel() > MAX_TRACE_VALUES:
            out["trace_omitted"] = (f"{tr.numel()} values (limit {MAX_TRACE_VALUES}); the "
                                    "aggregates are complete")
        else:
            out["z"] = ((tr - mu) / sd).round(decimals=6).tolist()
    return out


def make_router():
    from fastapi import APIRouter, Header, Query, Request
    from fastapi.responses import JSONResponse

    router = APIRouter(prefix="/v1/steerkernel", tags=["steerkernel"])

    def err(status: int, message: str):
        return JSONResponse(status_code=status, content={"error": {
            "message": message, "type": "NotFoundError" if status == 404 else "BadRequestError",
            "param": None, "code": status}})

    @router.get("/concepts", summary="The served concept bank: concepts, layers, rules",
                description="The bank's concept names and monitored layers (what "
                "`steerkernel_report` and steering programs may name), the default layer an "
                "item without `@LAYER` reads, and the engine's alarm rules (what "
                "`steerkernel_on_alarm` acts on).")
    async def concepts():
        from ...monitor.alarms import parse_rules

        cfg = server_config()
        if cfg is None:
            return err(404, "steerkernel: this server serves no steerkernel engine")
        bank = load_bank(cfg.bank)
        layers = [int(x) for x in bank.layers]
        rules = parse_rules(cfg.rules)
        default = default_layer(layers, bank.default_layer)
        return {"object": "steerkernel.bank", "concepts": list(bank.names), "layers": layers,
                "default_layer": default, "hidden_size": int(bank.d),
                "rules": [{"rule": r.label, "concept": r.concept,
                           "layer": r.layer if r.layer is not None else default}
                          for r in rules],
                "reports_open": bool(cfg.reports_open)}

    @router.get("/reports/{report_id:path}", summary="A request's full monitor report",
                description="The report of a request that asked for readings: z-scored "
                "aggregates `[L, K]`, alarms and (with `trace=true`) the per-position z trace "
                "`[positions, L, K]`. Send the `report_token` its response gave in the "
                "`X-Steerkernel-Report-Token` header (not needed when the operator set "
                "`reports_open`). Unknown ids and wrong tokens both answer 404.")
    async def report(request: Request, report_id: str,
                     trace: bool = Query(True, description="include the per-position trace"),
                     x_steerkernel_report_token: Optional[str] = Header(None)):
        from .frontend import _merge

        cfg, book = server_config(), server_book()
        if cfg is None or book is None:
            return err(404, "steerkernel: this server serves no steerkernel engine")
        if len(report_id) > 512:
            return err(400, "steerkernel: report id too long")
        rid = None
        if not cfg.reports_open:
            rid = book.check_token(report_id, x_steerkernel_report_token)
            if rid is None:
                return err(404, f"steerkernel: no report {report_id!r} for this token")
        engine = getattr(request.app.state, "steerkernel_engine", None) or getattr(
            request.app.state, "engine_client", None)
        got = await engine.collective_rpc("steerkernel_rpc", args=("reports", [report_id],
                                                                   False))
        d = _merge(got).get(report_id)
        if d is None or (rid and d.get("vllm_request_id") != rid) or "tokens" not in d:
            return err(404, f"steerkernel: no report {report_id!r} is kept (finished reports "
                            "are kept up to the plugin's max_finished)")
        return _report_json(d, trace)

    return router


class SteerkernelEndpoints:
    """``vllm.endpoint_plugins`` entry point: the routes above."""

    name = "steerkernel"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        app.include_router(make_router())

    async def init_state(self, engine_client, state, args) -> None:
        state.steerkernel_engine = engine_client


__all__ = ["ReadingsMiddleware", "SteerkernelEndpoints", "plan_request", "annotate",
           "make_router", "PATHS"]
