"""The monitor engine: buffers, aggregates, alarms with hysteresis, sinks, overload, soak."""
import gc
import json
import math
import tracemalloc

import pytest
import torch

from steerkernel.errors import SpecError, UnknownConceptError
from steerkernel.monitor import AlarmRule, JSONLSink, MonitorEngine
from steerkernel.ops import junction

NAMES = ["calm", "desperate", "afraid"]
LAYERS = [3, 5]


def _fill(engine, rows, value_fn):
    """Simulate a forward: write value_fn(request_id, token_index, layer_pos, k) into the buffer."""
    T = 0
    counters = {}
    for rid, n in rows:
        first = counters.get(rid, engine._tokens.get(rid, 0))
        for i in range(n):
            for lp in range(len(LAYERS)):
                for k in range(len(NAMES)):
                    engine.buffer[lp, T, k] = value_fn(rid, first + i, lp, k)
            T += 1
        counters[rid] = first + n
    engine.record(rows)


# ----------------------------------------------------------------------------- rules
def test_rule_parsing():
    r = AlarmRule.parse("desperate z > 2 for 8")
    assert (r.concept, r.threshold, r.above, r.zscore, r.consecutive) == ("desperate", 2.0,
                                                                         True, True, 8)
    r = AlarmRule.parse("calm@5 < -1.5 for 4 release -0.5")
    assert (r.layer, r.above, r.zscore, r.release) == (5, False, False, -0.5)
    assert r.label == "calm@5 < -1.5 for 4 release -0.5"
    # every name the steering grammar accepts: bare unicode, digits first, quoted separators
    for text, name in (("悲しい z > 1", "悲しい"), ("2nd<0", "2nd"), ("calmz>1", "calmz"),
                       ('"joy, mild"@3 > 0.5', "joy, mild"), ('"say \\"hi\\"" > 1', 'say "hi"')):
        r = AlarmRule.parse(text)
        assert r.concept == name, text
        assert AlarmRule.parse(r.label).concept == name  # the label parses back


@pytest.mark.parametrize("text", ["", "desperate", "desperate z >> 2", "desperate > nan",
                                  "desperate > 2 for 0", "desperate > 2 release 3",
                                  "desperate > 2 for -1", "> 2"])
def test_bad_rules_are_spec_errors(text):
    with pytest.raises(SpecError):
        AlarmRule.parse(text)


def test_rule_for_unknown_concept_or_layer():
    with pytest.raises(UnknownConceptError, match="known: calm"):
        MonitorEngine(NAMES, LAYERS, rules=["joy > 1"])
    with pytest.raises(SpecError, match="not monitored"):
        MonitorEngine(NAMES, LAYERS, rules=["calm@4 > 1"])


def test_rule_without_layer_watches_the_default_layer():
    """A rule without @layer watches ``default_layer`` (a bank's, as the CLI and the vLLM
    worker pass it), else the middle monitored layer (5 here); an unmonitored default layer
    is refused before anything is allocated."""
    def fired(**kw):
        eng = MonitorEngine(NAMES, LAYERS, rules=["desperate > 1"], max_tokens=4, **kw)
        events = []
        eng.on_alarm(events.append)
        _fill(eng, [("r", 1)], lambda rid, t, lp, k: 2.0 if (k, lp) == (1, 0) else 0.0)
        return len(events)

    assert fired(default_layer=3) == 1  # layer 3 holds the 2.0
    assert fired() == 0 and fired(default_layer=5) == 0  # layer 5: the middle one
    for bad in (4, "3", True):
        with pytest.raises(SpecError, match="is not a monitored layer"):
            MonitorEngine(NAMES, LAYERS, rules=["desperate > 1"], default_layer=bad)


def _stream_alarm_positions(rule, values):
    eng = MonitorEngine(NAMES, LAYERS, rules=[rule], max_tokens=4)
    events = []
    eng.on_alarm(events.append)
    for v in values:
        _fill(eng, [("r", 1)], lambda rid, t, lp, k: values[t] if k == 1 else 0.0)
    return [e.token for e in events]


def test_hysteresis_fires_exactly_when_it_should():
    # desperate raw > 1 for 3 consecutive tokens; re-arm once back to <= 0 for 2 tokens
    rule = "desperate@3 > 1 for 3 release 0"
    rule = AlarmRule(concept="desperate", threshold=1.0, zscore=False, consecutive=3,
                     release=0.0, release_after=2, layer=3)
    v = [2, 2, 0.5, 2, 2, 2,   # run broken at t=2; fires at t=5
         2, 2, 0.5, 0.5,       # still active: 0.5 is not <= release 0
         -1, 2, -1, -1,        # one quiet token (t=10) then broken; re-armed at t=13
         2, 2, 2, 2]           # fires again at t=16
    assert _stream_alarm_positions(rule, v) == [5, 16]


def test_below_rule_and_nan_never_fire():
    rule = AlarmRule(concept="desperate", threshold=-1.0, above=False, zscore=False,
                     consecutive=2, layer=3)
    assert _stream_alarm_positions(rule, [-2, math.nan, -2, -2, -2]) == [3]


def test_multi_token_forward_equals_token_by_token():
    """Alarms and aggregates do not depend on how tokens are split across forwards."""
    torch.manual_seed(0)
    vals = torch.randn(40, len(LAYERS), len(NAMES)) * 2
    rules = ["desperate z > 1 for 2", "calm z < -1 for 3 release 0"]

    def run(chunks):
        eng = MonitorEngine(NAMES, LAYERS, rules=rules, max_tokens=64)
        t = 0
        for c in chunks:
            _fill(eng, [("a", c), ("b", c)], lambda rid, i, lp, k: float(vals[i, lp, k]) *
                  (1 if rid == "a" else -1))
            t += c
        return eng.close("a"), eng.close("b")

    one = run([1] * 40)
    many = run([7, 13, 1, 19])
    for x, y in zip(one, many):
        assert [(a.rule, a.token) for a in x.alarms] == [(a.rule, a.token) for a in y.alarms]
        assert torch.allclose(x.mean, y.mean, atol=1e-6) and torch.equal(x.max, y.max)
        assert torch.allclose(x.ema, y.ema, atol=1e-5) and torch.equal(x.above, y.above)
        assert torch.equal(x.trace, y.trace)
    assert len(one[0].alarms) > 0 and len(one[1].alarms) > 0


# ----------------------------------------------------------------------------- buffers
def test_mixed_batch_traces_and_aggregates():
    eng = MonitorEngine(NAMES, LAYERS, max_tokens=16, ema_alpha=0.5)
    f = lambda rid, t, lp, k: {"a": 1.0, "b": 10.0, "c": 100.0, None: -7.0}[rid] * (t + 1) + lp + 0.1 * k
    _fill(eng, [("a", 3), ("b", 1), ("c", 2)], f)   # prefill-ish mixed forward
    _fill(eng, [("a", 1), ("b", 1)], f)             # c is not scheduled this step
    _fill(eng, [("a", 1), (None, 2), ("c", 1)], f)  # padding rows are ignored
    ra = eng.close("a")
    assert ra.tokens == 5 and ra.trace.shape == (5, 2, 3)
    exp = torch.tensor([[[f("a", t, lp, k) for k in range(3)] for lp in range(2)]
                        for t in range(5)])
    assert torch.allclose(ra.trace, exp)
    assert torch.allclose(ra.mean, exp.mean(0)) and torch.equal(ra.max, exp.amax(0))
    ema = torch.zeros(2, 3)
    for t in range(5):
        ema = 0.5 * exp[t] + 0.5 * ema
    assert torch.allclose(ra.ema, ema, atol=1e-5)
    rb = eng.report("b")
    assert rb.tokens == 2 and torch.allclose(rb.trace[:, 0, 0], torch.tensor([10.0, 20.0]))
    rc = eng.close("c")
    assert rc.tokens == 3 and torch.allclose(rc.trace[:, 1, 2], torch.tensor([101.2, 201.2,
                                                                                301.2]))
    assert eng.open_requests() == ["b"]


def test_finished_request_slot_is_reused_without_residue():
    eng = MonitorEngine(NAMES, LAYERS, max_requests=1, rules=["calm z > 0 for 1"])
    _fill(eng, [("a", 4)], lambda *a: 5.0)
    assert len(eng.close("a").alarms) == 1
    _fill(eng, [("b", 2)], lambda *a: -5.0)
    rb = eng.close("b")
    assert rb.alarms == [] and float(rb.max.max()) == -5.0 and rb.tokens == 2
    with pytest.raises(SpecError, match="monitor is full"):
        eng.open("x"), eng.open("y")


def test_junction_writes_straight_into_the_monitor_buffer():
    eng = MonitorEngine(NAMES, LAYERS, max_tokens=8)
    torch.manual_seed(1)
    V = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    r = torch.randn(5, 32)
    for lp in range(2):
        view = eng.scores_view(lp, 5)
        assert view.untyped_storage().data_ptr() == eng.buffer.untyped_storage().data_ptr()
        junction(r, V, scores=view)
    eng.record([("q", 5)])
    rep = eng.close("q")
    assert torch.allclose(rep.trace[:, 0], r @ V.T, atol=1e-5)


def test_z_scores_use_the_baseline():
    mu, sd = torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)
    eng = MonitorEngine(NAMES, LAYERS, baseline_mean=mu, baseline_std=sd, above_z=1.0)
    _fill(eng, [("a", 2)], lambda rid, t, lp, k: 5.0 if t == 0 else 0.0)
    rep = eng.close("a")
    assert torch.allclose(rep.z[0], torch.full((2, 3), 2.0))
    assert torch.equal(rep.above, torch.ones(2, 3, dtype=torch.int32))


# ----------------------------------------------------------------------------- overload
def test_drop_policy_counts_every_dropped_sample():
    eng = MonitorEngine(NAMES, LAYERS, ring_size=1, on_full="drop")
    eng._ring[0].busy = True  # the consumer is stuck: the only host slot stays in use
    _fill(eng, [("a", 3), ("b", 2)], lambda *a: 1.0)
    assert eng.stats()["dropped_tokens"] == 5
    eng._ring[0].busy = False
    _fill(eng, [("a", 1)], lambda *a: 2.0)
    ra = eng.close("a")
    assert ra.dropped == 3 and ra.tokens == 4
    assert torch.isnan(ra.trace[:3]).all() and (ra.trace[3] == 2.0).all()


# ----------------------------------------------------------------------------- sinks
def test_jsonl_sink(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JSONLSink(str(path), layer=5)
    eng = MonitorEngine(NAMES, LAYERS, rules=["afraid z > 1 for 2"], sinks=[sink])
    _fill(eng, [("a", 3)], lambda rid, t, lp, k: 3.0 if k == 2 else 0.0)
    eng.close("a")
    sink.close()
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert [l["event"] for l in lines] == ["alarm", "request"]
    assert lines[0]["token"] == 1 and lines[0]["concept"] == "afraid"
    assert lines[1]["layers"] == [5] and lines[1]["tokens"] == 3
    with pytest.raises(IsADirectoryError):
        JSONLSink(str(tmp_path))


def test_prometheus_sink():
    pc = pytest.importorskip("prometheus_client")
    from steerkernel.monitor import PrometheusSink

    reg = pc.CollectorRegistry()
    eng = MonitorEngine(NAMES, LAYERS, rules=["calm > 0.5"], sinks=[PrometheusSink(reg)])
    _fill(eng, [("a", 2)], lambda *a: 1.0)
    eng.close("a")
    assert reg.get_sample_value("steerkernel_alarms_total",
                                {"rule": "calm > 0.5", "concept": "calm"}) == 1.0
    assert reg.get_sample_value("steerkernel_concept_mean", {"concept": "calm"}) == 1.0
    assert reg.get_sample_value("steerkernel_request_tokens_total") == 2.0


# ----------------------------------------------------------------------------- soak
def test_soak_10k_steps_16_requests_no_loss_flat_memory():
    """10,000 decode steps, 16 concurrent requests joining and leaving: every sample arrives
    in order, and memory does not grow once traces are consumed."""
    K = len(NAMES)
    eng = MonitorEngine(NAMES, LAYERS, max_tokens=16, max_requests=16, keep_traces=True,
                        rules=["desperate > 0.5 for 3"])
    live = {i: 0 for i in range(16)}  # request -> tokens so far
    next_id, total, checked = 16, 0, 0
    lengths = {i: 50 + (i * 37) % 400 for i in range(16)}
    tracemalloc.start()
    base = None
    for step in range(10_000):
        rows = [(rid, 1) for rid in live]
        for t, (rid, _) in enumerate(rows):
            eng.buffer[:, t, :] = float(rid % 1000) + live[rid] * 1e-3  # encodes (rid, token)
        eng.record(rows)
        total += len(rows)
        for rid in list(live):
            live[rid] += 1
            if live[rid] == lengths[rid]:
                rep = eng.close(rid)
                n = live.pop(rid)
                assert rep.tokens == n and rep.trace.shape == (n, len(LAYERS), K)
                exp = float(rid % 1000) + torch.arange(n, dtype=torch.float32) * 1e-3
                assert torch.allclose(rep.trace[:, 0, 0], exp), rid
                checked += n
                live[next_id] = 0
                lengths[next_id] = 50 + (next_id * 37) % 400
                next_id += 1
        if step == 2000:
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
    gc.collect()
    end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    st = eng.stats()
    assert st["tokens"] == total and st["dropped_tokens"] == 0 and checked > 0.8 * total
    # open requests hold at most 16 x 450 tokens of traces: bound growth well below that
    assert end - base < 2_000_000, f"memory grew by {end - base} bytes"
