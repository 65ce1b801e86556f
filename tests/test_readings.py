"""Unit tests of the serving readings (no server): request options, the worker -> API server
channel, the response middleware (JSON and SSE) and the scheduler's stop-on-alarm wrapper.
The real server is tested in tests/test_vllm_server_readings.py."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import time

import pytest

from steerkernel.errors import SpecError
from steerkernel.integrations.vllm import readings as rd
from steerkernel.integrations.vllm.config import (PluginConfig, action_slots, request_args,
                                                  request_options)

NAMES = ["calm", "joy", "fear"]
LAYERS = [2, 4, 6, 8, 10]

needs_zmq = pytest.mark.skipif(importlib.util.find_spec("zmq") is None,
                               reason="pyzmq (a vLLM dependency) is not installed")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed")


# ------------------------------------------------------------------------------ options
def test_report_spec_items_layers_and_defaults():
    s = rd.parse_report_spec("calm, fear@8,joy@3-7,calm", NAMES, LAYERS)
    assert list(zip(s.concepts, s.layers)) == [("calm", 6), ("fear", 8), ("joy", 4), ("joy", 6)]
    assert s.cols == ((2, 0), (3, 2), (1, 1), (2, 1))
    a = rd.parse_report_spec("all", NAMES, LAYERS)
    assert a.concepts == tuple(NAMES) and set(a.layers) == {6}
    star = rd.parse_report_spec("fear@*", NAMES, LAYERS)
    assert star.layers == tuple(LAYERS) and set(star.concepts) == {"fear"}
    assert len(rd.parse_report_spec("all@*", NAMES, LAYERS).cols) == 15
    assert rd.default_layer(LAYERS) == 6
    # an item without @ reads the bank's default layer where it is monitored
    assert rd.default_layer(LAYERS, 10) == 10
    with pytest.raises(SpecError, match="default_layer 5 is not a monitored layer"):
        rd.default_layer(LAYERS, 5)
    assert rd.parse_report_spec("calm,joy@2", NAMES, LAYERS, 8).layers == (8, 2)
    assert rd.parse_report_spec("all", NAMES, LAYERS, 4).layers == (4, 4, 4)


@pytest.mark.parametrize("text,why", [
    ("clam", "concept 'clam' is not in the bank"),
    ("calm@5", "layer 5 is not monitored"),
    ("calm@11-20", "no monitored layer in 11-20"),
    ("calm@9-3", "no monitored layer in 9-3"),
    ("calm@", "cannot read item"),
    ("calm fear", "cannot read item"),
    ("", "is empty"),
    (",", "cannot read item"),
    ("calm," * 2000, "characters long"),
])
def test_report_spec_errors_name_the_problem(text, why):
    with pytest.raises(SpecError, match=why):
        rd.parse_report_spec(text, NAMES, LAYERS)


def test_report_spec_bounds_columns_and_types():
    names = [f"c{i}" for i in range(60)]
    with pytest.raises(SpecError, match="more than 1024"):
        rd.parse_report_spec("all@*", names, list(range(30)))
    for bad in (3, True, None, ["calm"]):
        with pytest.raises(SpecError, match="must be a string"):
            rd.parse_report_spec(bad, NAMES, LAYERS)


def test_alarm_action_forms():
    assert rd.parse_alarm_action("stop", ["fear"]) == rd.AlarmAction("stop")
    a = rd.parse_alarm_action("stop@fear,joy", ["fear", "joy"])
    assert a.concepts == ("fear", "joy") and a.matches("joy") and not a.matches("calm")
    s = rd.parse_alarm_action("steer@fear calm=+0.05@2-6; joy=ablate", ["fear"])
    assert s.kind == "steer" and s.program == "calm=+0.05@2-6; joy=ablate"
    assert str(s) == "steer@fear calm=+0.05@2-6; joy=ablate"


@pytest.mark.parametrize("text,rules,why", [
    ("stop", [], "no alarm rules"),
    ("stop@calm", ["fear"], "no alarm rule watches"),
    ("halt", ["fear"], "cannot read"),
    ("steer", ["fear"], "needs a program"),
    ("stop calm=+1", ["fear"], "takes no program"),
    ("steer calm=", ["fear"], "calm"),
    (1, ["fear"], "must be a string"),
])
def test_alarm_action_errors(text, rules, why):
    with pytest.raises(SpecError, match=why):
        rd.parse_alarm_action(text, rules)


class _Bank:
    names = NAMES
    layers = LAYERS
    default_layer = 8


def test_request_args_and_options():
    a = request_args({"steerkernel_report": "calm", "steerkernel_on_alarm": "stop",
                      "steerkernel_stream": "abc"})
    assert (a.report, a.on_alarm, a.stream) == ("calm", "stop", "abc")
    with pytest.raises(SpecError, match="must be a string"):
        request_args({"steerkernel_report": 5})
    with pytest.raises(SpecError, match="set by the server"):
        request_args({"steerkernel_stream": "x" * 65})
    with pytest.raises(SpecError, match="need the monitor"):
        request_args({"steerkernel_report": "calm", "steerkernel_monitor": False})
    cfg = PluginConfig(bank="b", rules=("fear z > 2",))
    opts = request_options(request_args({"steerkernel_report": "fear@4"}), _Bank, cfg)
    assert opts.report.cols == ((1, 2),) and opts.action is None and action_slots(opts) == 0
    opts = request_options(request_args({"steerkernel_report": "fear"}), _Bank, cfg)
    assert opts.report.layers == (8,)  # the bank's default layer
    with pytest.raises(SpecError, match="monitor"):
        request_options(request_args({"steerkernel_report": "fear"}), _Bank,
                        PluginConfig(bank="b", monitor=False))


# ------------------------------------------------------------------------------ the channel
def _wait(cond, timeout=5.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


@needs_zmq
def test_publisher_to_book_rows_alarms_and_tokens():
    book = rd.ReadingsBook()
    pub = rd.Publisher(book.addr)
    spec = rd.parse_report_spec("calm", NAMES, LAYERS)

    async def go():
        book.open("t1", spec)
        pub.send({"t": "t1", "id": "cmpl-1-0", "rid": "cmpl-1-0-abcd1234", "key": "k1",
                  "j0": 0, "z": [[0.5]], "alarms": [{"rule": "r", "token": None}]})
        pub.send({"t": "t1", "id": "cmpl-1-0", "j0": 1, "z": [[1.5], [2.5]],
                  "alarms": [{"rule": "r", "token": 2}]})
        pub.send({"t": "gone", "id": "x", "j0": 0, "z": [[9.0]]})  # closed: dropped
        rows, alarms, ch = await book.take("t1", ["cmpl-1-0", "cmpl-1"], 0, 1)
        assert rows == [[0.5]] and alarms == [{"rule": "r", "token": None}]
        rows, alarms, ch = await book.take("t1", ["cmpl-1-0"], 1, 2)
        assert rows == [[1.5], [2.5]] and alarms == [{"rule": "r", "token": 2}]
        assert ch.key == "k1" and ch.rid == "cmpl-1-0-abcd1234"
        t0 = time.monotonic()
        rows, _, _ = await book.take("t1", ["cmpl-1-0"], 3, 1, timeout=0.2)
        assert rows == [None] and time.monotonic() - t0 < 2
        book.close("t1")
        rows, _, _ = await book.take("t1", ["cmpl-1-0"], 0, 1)
        assert rows == [None]

    try:
        asyncio.run(go())
        _wait(lambda: book.stats["unknown_stream"] >= 1)
        tok = book.issue_token("k1", "rid-1")
        assert book.check_token("k1", tok) == "rid-1"
        assert book.check_token("k1", "wrong") is None and book.check_token("k1", None) is None
        assert book.check_token("k2", tok) is None
    finally:
        pub.close()
        book.shutdown()


# ------------------------------------------------------------------------------ middleware
@pytest.fixture
def served_book(monkeypatch, tmp_path):
    pytest.importorskip("zmq")
    import torch

    import steerkernel

    bank = tmp_path / "bank.safetensors"
    steerkernel.ConceptBank(
        names=NAMES, layers=LAYERS, directions=torch.nn.functional.normalize(
            torch.randn(5, 3, 16), dim=-1), baseline_mean=torch.zeros(5, 3),
        baseline_std=torch.ones(5, 3), vector_norms=torch.ones(5, 3),
        resid_norm=torch.ones(5), default_layer=6).save(bank)
    book = rd.ReadingsBook()
    monkeypatch.setitem(rd._BOOK, "book", book)
    monkeypatch.setitem(rd._BOOK, "config", PluginConfig(bank=str(bank)))
    yield book
    book.shutdown()


def _app(events, ctype=b"text/event-stream", seen=None):
    async def app(scope, receive, send):
        msg = await receive()
        if seen is not None:
            seen.append(json.loads(msg["body"]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype), (b"content-length", b"999")]})
        for i, e in enumerate(events):
            await send({"type": "http.response.body", "body": e,
                        "more_body": i < len(events) - 1})
    return app


async def _call(mw, body: bytes):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append(msg)

    await mw({"type": "http", "method": "POST", "path": "/v1/completions"}, receive, send)
    return sent


def _feed(book, seen, rows):
    tag = seen[0]["vllm_xargs"]["steerkernel_stream"]
    book._file({"t": tag, "id": "cmpl-9-0", "rid": "cmpl-9-0-0000abcd", "key": "cmpl-9-0",
                "j0": 0, "z": rows, "alarms": [{"rule": "r", "token": 1, "action": None}]})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_middleware_rewrites_sse_events_split_anywhere(served_book):
    from steerkernel.integrations.vllm.server import ReadingsMiddleware

    def ev(tokens, finish=None):
        return b"data: " + json.dumps({"id": "cmpl-9", "choices": [
            {"index": 0, "text": "x", "token_ids": tokens, "finish_reason": finish}]}).encode() \
            + b"\n\n"

    stream = ev([11]) + ev([12, 13]) + ev([14], "length") + b"data: [DONE]\n\n"
    parts = [stream[:7], stream[7:100], stream[100:101], stream[101:]]  # split mid-event
    seen = []
    mw = ReadingsMiddleware(_app(parts, seen=seen))
    body = json.dumps({"prompt": "p", "stream": True,
                       "vllm_xargs": {"steerkernel_report": "calm,fear@2"}}).encode()

    async def go():
        task = asyncio.ensure_future(_call(mw, body))
        while not seen:
            await asyncio.sleep(0.001)
        _feed(served_book, seen, [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])
        return await task

    sent = asyncio.run(go())
    assert seen[0]["return_token_ids"] is True
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    docs = [json.loads(e[6:]) for e in events[:-1]]
    sks = [d["choices"][0]["steerkernel"] for d in docs]
    assert sks[0]["concepts"] == ["calm", "fear"] and sks[0]["layers"] == [6, 2]
    assert [s["z"] for s in sks] == [[[0.0, 1.0]], [[2.0, 3.0], [4.0, 5.0]], [[6.0, 7.0]]]
    assert sks[1]["alarms"] == [{"rule": "r", "token": 1, "action": None}]
    assert sks[2]["tokens"] == 4 and sks[2]["aggregates"] == {"mean": [3.0, 4.0],
                                                              "max": [6.0, 7.0]}
    assert sks[2]["report_id"] == "cmpl-9-0" and sks[2]["report_token"]
    assert all("token_ids" not in d["choices"][0] for d in docs)  # not asked for: removed
    assert served_book.check_token("cmpl-9-0", sks[2]["report_token"]) == "cmpl-9-0-0000abcd"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_middleware_rewrites_json_and_fixes_length(served_book):
    from steerkernel.integrations.vllm.server import ReadingsMiddleware

    answer = json.dumps({"id": "cmpl-9", "choices": [
        {"index": 0, "text": "ab", "token_ids": [5, 6], "finish_reason": "length"}]}).encode()
    seen = []
    mw = ReadingsMiddleware(_app([answer], b"application/json", seen))
    body = json.dumps({"prompt": "p", "return_token_ids": True,
                       "vllm_xargs": {"steerkernel_report": "joy"}}).encode()

    async def go():
        task = asyncio.ensure_future(_call(mw, body))
        while not seen:
            await asyncio.sleep(0.001)
        _feed(served_book, seen, [[1.0], [3.0]])
        return await task

    sent = asyncio.run(go())
    start = sent[0]
    body_out = sent[1]["body"]
    assert dict(start["headers"])[b"content-length"] == str(len(body_out)).encode()
    ch = json.loads(body_out)["choices"][0]
    assert ch["token_ids"] == [5, 6]  # the client asked for them: kept
    assert ch["steerkernel"]["z"] == [[1.0], [3.0]]
    assert ch["steerkernel"]["aggregates"]["mean"] == [2.0]


def test_plan_request_pass_through_and_errors(served_book):
    from steerkernel.integrations.vllm.server import plan_request

    assert plan_request(b'{"prompt": "hi"}') == (None, None)
    assert plan_request(b"not json steerkernel") == (None, None)
    assert plan_request(b'{"vllm_xargs": {"steerkernel": "calm=+1"}}') == (None, None)
    plan, body = plan_request(b'{"vllm_xargs": {"steerkernel_stream": "forged"}}')
    assert plan is None and json.loads(body) == {"vllm_xargs": {}}
    status, err = plan_request(json.dumps({"n": 2, "vllm_xargs": {
        "steerkernel_report": "calm"}}).encode())
    assert status == 400 and b"n=1" in err
    status, err = plan_request(json.dumps({"echo": True, "vllm_xargs": {
        "steerkernel_report": "calm"}}).encode())
    assert status == 400 and b"echo needs return_token_ids" in err
    plan, body = plan_request(json.dumps({"echo": True, "return_token_ids": True, "vllm_xargs": {
        "steerkernel_report": "calm"}}).encode())
    assert plan is not None and plan.strip_ids is False
    status, err = plan_request(json.dumps({"vllm_xargs": {
        "steerkernel_report": "nope"}}).encode())
    assert status == 400 and b"'nope' is not in the bank" in err


def test_plan_request_without_a_steerkernel_engine(monkeypatch):
    from steerkernel.integrations.vllm.server import plan_request

    monkeypatch.setattr(rd, "_BOOK", {})
    status, err = plan_request(json.dumps({"vllm_xargs": {
        "steerkernel_report": "calm"}}).encode())
    assert status == 400 and b"no readings channel" in err


# ------------------------------------------------------------------------------ the scheduler
@needs_vllm
def test_scheduler_stop_wrapper_ends_the_request_with_the_rule():
    from types import SimpleNamespace

    from vllm.v1.request import RequestStatus

    from steerkernel.integrations.vllm.patches import _wrap_update_request_with_output

    def orig(self, request, new_token_ids, *a, **k):
        request.out += list(new_token_ids)
        return new_token_ids, False

    wrapped = _wrap_update_request_with_output(orig)
    req = SimpleNamespace(request_id="r1", out=[], status=RequestStatus.RUNNING,
                          stop_reason=None)
    assert wrapped(None, req, [7]) == ([7], False)  # no decision: unchanged
    rd.add_stop("r1", "steerkernel: fear z > 2")
    rd.add_stop("r1", "steerkernel: later")  # the first decision wins
    assert wrapped(None, req, []) == ([], False)  # no new token (prefill chunk): waits
    assert wrapped(None, req, [8]) == ([8], True)
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.stop_reason == "steerkernel: fear z > 2"
    assert "r1" not in rd.PENDING_STOPS
