"""Hostile input sizes: the steering grammar, the alarm-rule parser and the vLLM request
validator run in linear time and memory, refuse inputs past their documented bounds before doing
the work, and quote at most a bounded prefix of the input in their errors (docs/security.md,
"Steering programs" and "Requests").

Scaling checks double an input several times and require every doubling to cost at most
``RATIO`` times the previous size, in time (best of ``REPEATS`` runs, each long enough to be
well over a millisecond) and in peak traced memory (tracemalloc).  A linear parser doubles
(ratio ~2); the quadratic-or-worse parsers these tests replace gave ratios of 4 to 16.
"""
from __future__ import annotations

import asyncio
import gc
import importlib.util
import socket
import time
import tracemalloc
from types import SimpleNamespace

import pytest

from steerkernel.errors import SpecError, UnknownConceptError
from steerkernel.monitor.alarms import MAX_RULE_CHARS, AlarmRule
from steerkernel.steering import (MAX_ENTRIES, MAX_PROGRAM_CHARS, MAX_PROGRAM_LAYERS,
                                  MAX_STEER_LAYERS, QUOTE_CHARS, compile_program,
                                  parse_program, parse_steer, quote_input)
from steerkernel.integrations.vllm.config import RequestOptions, program_text, request_args

from test_steering import make_bank

RATIO = 3.0      # allowed cost ratio per doubling (linear: ~2)
#: allowed time ratio over the whole size range, per unit of size growth (linear: ~1; n log n
#: over 32 -> 256: ~1.6; quadratic: 8).  Timing is checked over the whole range, not per
#: doubling: at millisecond scale one doubling can cost 3.1-3.3x on an idle 2-core machine (a
#: cache step), which a per-doubling bound of 3 flagged as superlinear.
TIME_RATIO_SPAN = 2.5
REPEATS = 7      # best-of runs (a loaded 2-core machine)
ERROR_CHARS = 400  # an error message's length, whatever the input's


def _best_time(fn, min_seconds: float = 0.002) -> float:
    """Best per-call CPU time of ``fn`` over REPEATS runs, each repeating ``fn`` until it has
    run at least ``min_seconds`` (so a run is never below the timer's noise).  CPU time of
    this thread, not wall time: on a shared core, a run longer than the scheduler's time slice
    would otherwise pay for the other processes' slices.  The cyclic garbage
    collector is off meanwhile, as in ``timeit``: its passes cost in proportion to every
    object of the test process, not to the input."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _best_time_no_gc(fn, min_seconds)
    finally:
        if was_enabled:
            gc.enable()


def _best_time_no_gc(fn, min_seconds: float) -> float:
    reps = 1
    while True:
        t = time.thread_time()
        for _ in range(reps):
            fn()
        if time.thread_time() - t >= min_seconds:
            break
        reps *= 2
    best = float("inf")
    for _ in range(REPEATS):
        t = time.thread_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.thread_time() - t) / reps)
    return best


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _quiet(fn, *args):
    def run():
        try:
            fn(*args)
        except SpecError:
            pass
    return run


def _assert_linear(make, sizes, what):
    """``make(n)`` -> a zero-argument call on an input of size ``n``.  Peak memory: every
    doubling of ``n`` costs at most RATIO x.  Time: from the smallest to the largest size it
    grows at most TIME_RATIO_SPAN x the size ratio (measured again, twice at most, when over:
    a loaded machine can slow one measurement down)."""
    peaks = [_peak_bytes(make(n)) for n in sizes]
    for i in range(1, len(sizes)):
        growth = sizes[i] / sizes[i - 1]
        assert peaks[i] <= RATIO * max(peaks[i - 1], 4096) * growth / 2, \
            (what, "memory", sizes, peaks)
    span = sizes[-1] / sizes[0]
    small, large = _best_time(make(sizes[0])), _best_time(make(sizes[-1]))
    for _ in range(2):
        if large <= TIME_RATIO_SPAN * span * small:
            break
        small, large = _best_time(make(sizes[0])), _best_time(make(sizes[-1]))
    assert large <= TIME_RATIO_SPAN * span * small, (what, "time", sizes, small, large)


# ------------------------------------------------------------------------------ grammar
def _program(n_entries: int) -> str:
    return "; ".join(f"c{i} <= 1.5z @ {i}-{i + 2} :generated ? g>2! " for i in range(n_entries))


@pytest.mark.parametrize("what,make,sizes", [
    ("valid program, entries", lambda n: _quiet(parse_program, _program(n)),
     [32, 64, 128, 256]),
    ("spaces then garbage (was O(n^4))",
     lambda n: _quiet(parse_program, "calm=1" + " " * n + "x"), [2000, 4000, 8000, 16000]),
    ("spaces in every part",
     lambda n: _quiet(parse_program, "calm" + " " * n + "=" + " " * n + "1" + " " * n + "@1"
                      + " " * n + ":all" + " " * n + "?" + " " * n + "g>1" + " " * n),
     [256, 512, 1024, 2048]),
    ("layer list", lambda n: _quiet(parse_steer, "calm=+1@" + "+".join(map(str, range(n)))),
     [128, 256, 512, 1024]),
    ("quoted name", lambda n: _quiet(parse_steer, '"' + "\\\"" * n + '"=+1'),
     [1000, 2000, 4000, 8000]),
    ("unterminated quote", lambda n: _quiet(parse_program, '"' + "\\\"" * n + "; calm=+1"),
     [1000, 2000, 4000, 8000]),
])
def test_grammar_is_linear(what, make, sizes):
    _assert_linear(make, sizes, what)


def test_the_reported_backtracking_input_is_fast():
    t = time.perf_counter()
    with pytest.raises(SpecError, match="at character"):
        parse_program("calm=1" + " " * 500 + "x")
    assert time.perf_counter() - t < 0.05


@pytest.mark.parametrize("text,pattern", [
    ("calm=+0.01@" + "+".join(["0-99999"] * 400), f"at most {MAX_STEER_LAYERS} layers"),
    ("calm=+1@" + "+".join(map(str, range(MAX_STEER_LAYERS + 1))),
     f"at most {MAX_STEER_LAYERS} layers"),
    ("; ".join(["calm=+1"] * (MAX_ENTRIES + 1)), f"limit {MAX_ENTRIES}"),
    ("calm=+1; " * 2000, f"limit {MAX_PROGRAM_CHARS}"),
    ("calm=+1 " + " " * MAX_PROGRAM_CHARS, f"limit {MAX_PROGRAM_CHARS}"),
    ("; ".join(f"c{i}=+1@0-{MAX_STEER_LAYERS - 1}" for i in range(17)),
     f"limit {MAX_PROGRAM_LAYERS}"),
])
def test_bounds_are_refused_before_the_work(text, pattern):
    t = time.perf_counter()
    peak = 0
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match=pattern) as e:
            parse_program(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 0.5
    assert peak < 4 * len(text) + 2**20  # nothing expanded beyond the input itself
    assert len(str(e.value)) < ERROR_CHARS


def test_program_bounds_hold_at_compile_too():
    """Entries without layers apply to every bank layer: the (entry, layer) pairs are counted
    against the bank before any table is written."""
    bank = SimpleNamespace(layers=list(range(80)), names=["calm"])  # checked before any use
    steers = parse_program("; ".join(["calm=+1"] * 210)).steers  # 210 × 80 bank layers
    with pytest.raises(SpecError, match=f"limit {MAX_PROGRAM_LAYERS}"):
        compile_program(list(steers), bank)


def test_a_layer_named_twice_in_one_entry_is_refused():
    for text in ("calm=+1abs@10+10", "calm=+1@5-9+7", "calm=+1@3-4+2-3"):
        with pytest.raises(SpecError, match="named twice"):
            parse_steer(text)
    from steerkernel.steering import Steer

    with pytest.raises(SpecError, match="layer 5 is named twice"):
        Steer("calm", "add", 1.0, layers=(5, 6, 5))


def test_separate_entries_on_one_layer_add_up():
    """The documented rule: two entries on the same (concept, layer) combine (shifts add)."""
    bank = make_bank()
    c = compile_program("calm=+1abs@5; calm=+1abs@5", bank)
    assert float(c.tables["prompt"].shift[1, 0]) == 2.0
    c = compile_program("calm=+1abs@5", bank)
    assert float(c.tables["prompt"].shift[1, 0]) == 1.0


def test_errors_quote_a_bounded_escaped_prefix():
    entry = "calm\x00\x1b[2J\n=" + "x" * 16000
    with pytest.raises(SpecError) as e:
        parse_program(entry)
    msg = str(e.value)
    assert len(msg) < ERROR_CHARS and f"({len(entry)} chars)" in msg
    assert "\x00" not in msg and "\x1b" not in msg and "\n" not in msg and "\\x1b" in msg
    assert quote_input("a" * 500) == repr("a" * QUOTE_CHARS) + "…(500 chars)"
    assert quote_input("ok") == "'ok'"
    with pytest.raises(UnknownConceptError) as e:
        compile_program(f"{'n' * 5000}=+1", make_bank())
    assert len(str(e.value)) < ERROR_CHARS


# ------------------------------------------------------------------------------ alarm rules
@pytest.mark.parametrize("text,expect", [
    ("calm>1", ("calm", None, False, True, 1.0, 1)),
    ("sad>2", ("sad", None, False, True, 2.0, 1)),
    ("calm@20<-0.5", ("calm", 20, False, False, -0.5, 1)),
    ("calm z>1 for 3", ("calm", None, True, True, 1.0, 3)),
    ("desperate z > 2 for 8", ("desperate", None, True, True, 2.0, 8)),
    ("  calm  <  .5  ", ("calm", None, False, False, 0.5, 1)),
])
def test_alarm_rules_accept_the_compact_form_of_gates(text, expect):
    r = AlarmRule.parse(text)
    assert (r.concept, r.layer, r.zscore, r.above, r.threshold, r.consecutive) == expect


@pytest.mark.parametrize("what,make,sizes", [
    ("spaces then garbage",
     lambda n: _quiet(AlarmRule.parse, "calm > 1" + " " * n + "x"), [64, 128, 256, 512]),
    ("spaces everywhere",
     lambda n: _quiet(AlarmRule.parse, f"calm{' ' * n}z{' ' * n}>{' ' * n}1{' ' * n}for"
                                       f"{' ' * n}2{' ' * n}release{' ' * n}0.5"),
     [16, 32, 64, 128]),
    ("long threshold", lambda n: _quiet(AlarmRule.parse, "calm>" + "1" * n + " for"),
     [128, 256, 512, 1000]),
])
def test_alarm_rule_parser_is_linear(what, make, sizes):
    _assert_linear(make, sizes, what)


@pytest.mark.parametrize("text,pattern", [
    ("calm>1" + " " * MAX_RULE_CHARS, f"limit {MAX_RULE_CHARS}"),
    ("calm@" + "9" * 900 + ">1", "out of bounds"),
    ("calm>1 for " + "9" * 900, r"\[1, 1e6\]"),
    ("calm\x1b>1", "at character 5"),
])
def test_alarm_rule_bounds(text, pattern):
    with pytest.raises(SpecError, match=pattern) as e:
        AlarmRule.parse(text)
    assert len(str(e.value)) < ERROR_CHARS and "\x1b" not in str(e.value)


# ------------------------------------------------------------------------------ requests
def _dict_entries(n):
    return [{"concept": f"c{i}", "op": "add", "value": 0.1, "layers": [i, i + 1, i + 2]}
            for i in range(n)]


@pytest.mark.parametrize("what,make,sizes", [
    ("list of dicts", lambda n: _quiet(request_args, {"steerkernel": _dict_entries(n)}),
     [32, 64, 128, 256]),
    ("list of strings", lambda n: _quiet(request_args, {"steerkernel": [
        f"c{i}=+0.1@{i}-{i + 2}" for i in range(n)]}), [32, 64, 128, 256]),
    ("string", lambda n: _quiet(request_args, {"steerkernel": _program(n)}),
     [32, 64, 128, 256]),
])
def test_request_validator_is_linear(what, make, sizes):
    """``request_args`` is what the vLLM front end runs on a request's ``extra_args``."""
    _assert_linear(make, sizes, what)


@pytest.mark.parametrize("program,pattern", [
    (["calm=+1"] * 20_000, f"limit {MAX_ENTRIES}"),
    (_dict_entries(MAX_ENTRIES + 1), f"limit {MAX_ENTRIES}"),
    ([{"concept": "calm", "layers": list(range(20_000))}], f"limit {MAX_STEER_LAYERS}"),
    ([{"concept": "calm", "layers": [3, 3]}], "named twice"),
    (["calm=+1@0-99999"], f"at most {MAX_STEER_LAYERS} layers"),
    (['"' + "x" * 10_000 + '"=+1', '"' + "y" * 10_000 + '"=+1'],
     f"more than {MAX_PROGRAM_CHARS} characters"),
    ([{"concept": "n" * 9000, "layers": [1, 2]}, {"concept": "m" * 9000}],
     f"limit {MAX_PROGRAM_CHARS}"),
    ([{"concept": "calm", "bogus" * 5000: 1}], "bad steering entry"),
])
def test_request_bounds_whatever_the_form(program, pattern):
    t = time.perf_counter()
    with pytest.raises(SpecError, match=pattern) as e:
        program_text(program)
    assert time.perf_counter() - t < 0.5
    assert len(str(e.value)) < ERROR_CHARS


def test_unknown_request_keys_are_quoted_bounded():
    with pytest.raises(SpecError) as e:
        request_args({f"steerkernel_{'k' * 5000}{i}": 1 for i in range(50)})
    assert len(str(e.value)) < ERROR_CHARS


# ------------------------------------------------------------------------------ vLLM front end
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed")


def _compiled(slots):
    """A stand-in compiled program needing ``slots`` slots (0, 1 or 2)."""
    return SimpleNamespace(identity={"prompt": slots == 0, "generated": slots == 0},
                           phase_dependent=slots == 2, program="calm=+1.0rel")


class _FakeEngine:
    """What the admission wrapper reads of an ``AsyncLLM``."""

    def __init__(self, max_slots=None, max_num_seqs=2):
        self.vllm_config = SimpleNamespace(
            additional_config={"steerkernel": {"bank": "/b.safetensors",
                                               "max_slots": max_slots}},
            scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))
        self.output_processor = SimpleNamespace(request_states={}, parent_requests={})
        self.added = []

    async def add_request(self, request_id, prompt, params, *args, **kwargs):
        self.added.append(request_id)
        self.output_processor.request_states[request_id] = True
        return SimpleNamespace(request_id=request_id)


@needs_vllm
def test_slots_are_reserved_at_admission_and_refused_with_429(monkeypatch):
    """No silent unsteered requests: a steered request the slots cannot hold is refused at the
    front end (429 now, 400 never), and slots come back when the request leaves."""
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError, VLLMValidationError

    from steerkernel.integrations.vllm import patches

    need = {"one": 1, "two": 2, "none": 0}
    monkeypatch.setattr(patches, "_frontend_check",
                        lambda vc, params: (_compiled(need[params.extra_args["steerkernel"]]),
                                            RequestOptions()))
    add = patches._wrap_async_add_request(_FakeEngine.add_request)
    eng = _FakeEngine(max_slots=4)  # 3 usable slots

    def params(kind, n=1):
        return SimpleNamespace(extra_args={"steerkernel": kind}, n=n)

    async def scenario():
        await add(eng, "a", "p", params("two"))
        await add(eng, "b", "p", params("one"))
        await add(eng, "c", "p", params("none"))        # steers nothing: holds nothing
        await add(eng, "d", "p", SimpleNamespace(extra_args=None, n=1))  # unsteered
        with pytest.raises(GracefulHTTPError, match="no free steering slot") as e:
            await add(eng, "e", "p", params("one"))
        assert e.value.http_status == HTTPStatus.TOO_MANY_REQUESTS
        with pytest.raises(VLLMValidationError, match="needs 4 steering slots"):
            await add(eng, "f", "p", params("two", n=2))
        del eng.output_processor.request_states["a"]  # "a" finished: its 2 slots are free
        await add(eng, "g", "p", params("two"))
    asyncio.run(scenario())
    assert eng.added == ["a", "b", "c", "d", "g"]
    assert eng._steerkernel_ledger.held == {"b": 1, "g": 2}


class _FakeServing:
    """What the HTTP admission wrapper reads of vLLM's OpenAI serving class: like vLLM, a
    streamed response adds its engine requests (one per prompt) only when it is iterated."""

    def __init__(self, engine, add):
        self.engine_client, self._add = engine, add

    async def create_completion(self, request, raw_request=None):
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]

        async def add_all():
            for i, _ in enumerate(prompts):
                params = SimpleNamespace(extra_args=request.vllm_xargs, n=request.n)
                await self._add(self.engine_client, f"{request.id}-{i}", "p", params)

        if not request.stream:
            await add_all()
            return {"ok": request.id}

        async def stream():
            await add_all()
            for chunk in ("a", "b"):
                yield chunk
        return stream()


def _served(monkeypatch, max_slots, need):
    from steerkernel.integrations.vllm import patches

    monkeypatch.setattr(patches, "_frontend_check", lambda vc, params: (
        _compiled(need(params.extra_args["steerkernel"])), RequestOptions()))
    eng = _FakeEngine(max_slots=max_slots)
    serving = _FakeServing(eng, patches._wrap_async_add_request(_FakeEngine.add_request))
    create = patches._wrap_openai_create(_FakeServing.create_completion)

    def request(rid, program, prompts=1, n=1, stream=True):
        return SimpleNamespace(id=rid, prompt=["p"] * prompts if prompts > 1 else "p", n=n,
                               stream=stream, vllm_xargs={"steerkernel": program})
    return patches, eng, serving, create, request


@needs_vllm
def test_streamed_requests_are_refused_before_the_stream_starts(monkeypatch):
    """A streamed request gets its 429 / 400 from the HTTP layer, before a 200 response could
    start (not as an error event inside the stream); its prompts share one reservation, which
    its engine requests take over; nothing is left held when the responses end."""
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError, VLLMValidationError

    patches, eng, serving, create, request = _served(
        monkeypatch, max_slots=5, need=lambda prog: {"one": 1, "two": 2, "bad": 1}[prog])

    async def scenario():
        s1 = await create(serving, request("a", "two", prompts=2, stream=True))  # 4 of 4
        assert not eng.added  # the stream has not started: nothing reached the engine yet
        with pytest.raises(GracefulHTTPError) as e:
            await create(serving, request("b", "one", stream=True))
        assert e.value.http_status == HTTPStatus.TOO_MANY_REQUESTS
        with pytest.raises(VLLMValidationError, match="needs 6 steering slots"):
            await create(serving, request("c", "two", prompts=3))
        assert [c async for c in s1] == ["a", "b"]
        assert eng.added == ["a-0", "a-1"]
        assert eng._steerkernel_ledger.held == {"a-0": 2, "a-1": 2}
        del eng.output_processor.request_states["a-0"]
        del eng.output_processor.request_states["a-1"]
        assert await create(serving, request("d", "one", n=2, stream=False)) == {"ok": "d"}
        assert eng._steerkernel_ledger.held == {"d-0": 2}
        assert not patches._PREADMITTED
    asyncio.run(scenario())


@needs_vllm
def test_preadmitted_slots_come_back_when_the_stream_is_dropped(monkeypatch):
    """Slots a response reserved but never handed to the engine come back: when its stream
    ends or is dropped unstarted (client gone before the first byte), at the latest after
    PREADMISSION_TTL_S."""
    patches, eng, serving, create, request = _served(monkeypatch, max_slots=3,
                                                     need=lambda prog: 1)
    ledger = patches._ledger(eng)

    async def scenario():
        s = await create(serving, request("a", "one", prompts=2))
        assert sum(ledger.held.values()) == 2
        await s.aclose()  # closed before its first chunk: its engine requests never came
        del s
        assert ledger.held == {} and not patches._PREADMITTED
        s = await create(serving, request("b", "one", prompts=2))
        assert await s.__anext__() == "a"
        await s.aclose()  # client gone mid-stream
        assert ledger.held == {"b-0": 1, "b-1": 1} and not patches._PREADMITTED
        eng.output_processor.request_states.clear()  # b's requests finished
        monkeypatch.setattr(patches, "PREADMISSION_TTL_S", 0.0)
        kept = await create(serving, request("c", "one", prompts=2))  # held, never iterated
        assert list(ledger.held.values()) == [2]
        time.sleep(0.01)
        s = await create(serving, request("d", "one", prompts=2))  # c's expired slots freed
        assert [c async for c in s] == ["a", "b"]
        assert ledger.held == {"d-0": 1, "d-1": 1}
        del kept
    asyncio.run(scenario())
    patches._PREADMITTED.clear()


@needs_vllm
def test_admission_validates_off_the_event_loop(monkeypatch):
    """The front-end check runs in a thread: a slow validation does not stall the loop."""
    import threading

    from steerkernel.integrations.vllm import patches

    loop_thread = []

    def slow_check(vc, params):
        loop_thread.append(threading.get_ident())
        time.sleep(0.3)
        return _compiled(1), RequestOptions()

    monkeypatch.setattr(patches, "_frontend_check", slow_check)
    add = patches._wrap_async_add_request(_FakeEngine.add_request)
    eng = _FakeEngine()

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        task = asyncio.create_task(ticker())
        await add(eng, "a", "p", SimpleNamespace(extra_args={"steerkernel": "x"}, n=1))
        task.cancel()
        return ticks, threading.get_ident()
    ticks, main = asyncio.run(scenario())
    assert loop_thread and loop_thread[0] != main
    assert ticks >= 5  # the loop kept running while the check slept


@needs_vllm
def test_process_inputs_reuses_the_async_check(monkeypatch):
    from steerkernel.integrations.vllm import patches

    calls = []
    monkeypatch.setattr(patches, "_frontend_check",
                        lambda vc, params: calls.append(1) or (_compiled(1), RequestOptions()))
    p = SimpleNamespace(extra_args={"steerkernel": "x"}, n=1)
    patches._PRECHECKED[id(p)] = (p, (_compiled(1), RequestOptions()))
    try:
        wrapped = patches._wrap_process_inputs(lambda self, rid, prompt, params: "request")
        self = SimpleNamespace(vllm_config=None, cache_config=None)
        assert wrapped(self, "r", "p", p) == "request" and not calls
        q = SimpleNamespace(extra_args={"steerkernel": "x"}, n=1)
        assert wrapped(self, "r", "p", q) == "request" and calls == [1]
    finally:
        patches._PRECHECKED.pop(id(p), None)


# ------------------------------------------------------------------------------ Prometheus
needs_prometheus = pytest.mark.skipif(importlib.util.find_spec("prometheus_client") is None,
                                      reason="prometheus_client is not installed")


@needs_prometheus
def test_prometheus_port_in_use_warns_once_and_carries_on(caplog):
    from steerkernel.monitor.sinks import PrometheusSink

    import prometheus_client as pc

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        reg = pc.CollectorRegistry()
        with caplog.at_level("WARNING", logger="steerkernel.monitor"):
            a = PrometheusSink(registry=reg, port=port)
            b = PrometheusSink(registry=reg, port=port)
        assert a.port is None and b.port is None
        assert sum("cannot serve Prometheus" in r.getMessage() for r in caplog.records) == 1
        a.requests.inc()
        assert reg.get_sample_value("steerkernel_requests_total") == 1.0
    finally:
        taken.close()


@needs_prometheus
def test_two_prometheus_sinks_share_the_registered_metrics():
    from steerkernel.monitor.sinks import PrometheusSink

    import prometheus_client as pc

    a = PrometheusSink()  # the process-wide registry, twice: no DuplicateTimeseries
    b = PrometheusSink()
    assert a.requests is b.requests
    reg = pc.CollectorRegistry()
    c, d = PrometheusSink(registry=reg), PrometheusSink(registry=reg)
    c.tokens.inc(3)
    d.tokens.inc(4)
    assert reg.get_sample_value("steerkernel_request_tokens_total") == 7.0
    assert c.tokens is not a.tokens
