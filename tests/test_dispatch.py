"""Shape-aware automatic backend choice (steerkernel/backends/dispatch.py and its table).

Availability is monkeypatched (the probe cache of steerkernel.backends), so the CUDA rows are
exercised on a machine without a GPU; nothing here launches a kernel.
"""
import json
import math
import os

import pytest
import torch

from steerkernel import backends
from steerkernel.backends import dispatch, dispatch_cli

CUDA = torch.device("cuda")  # constructing a device needs no GPU
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_table(monkeypatch):
    """Every test starts from the shipped table and leaves it active again."""
    monkeypatch.delenv(dispatch.TABLE_ENV, raising=False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    dispatch.reload()
    yield
    monkeypatch.delenv(dispatch.TABLE_ENV, raising=False)
    dispatch.reload()


def _available(monkeypatch, cuda: bool, triton: bool):
    """Pretend the CUDA extension / Triton are (or are not) usable on CUDA tensors."""
    probed = dict(backends._PROBED)
    probed["_cuda_ext"] = (cuda, "pretend cuda" if cuda else "pretend: no cuda")
    probed["_triton"] = (triton, "pretend triton" if triton else "pretend: no triton")
    monkeypatch.setattr(backends, "_PROBED", probed)


def _pick(T=None, K=None, d=2048, dtype=torch.bfloat16, device=CUDA, requested=None):
    return backends.resolve(device, requested, T=T, d=d, K=K, dtype=dtype)


# ----------------------------------------------------------------------------- the table

def test_shipped_table_is_valid_and_says_it_is_a_prediction():
    t = dispatch.load(dispatch.MODULE_PATH)
    assert t.raw["measured"] is False
    assert all(r.get("measured") is False for r in t.raw["rows"])
    with open(dispatch.MODULE_PATH) as f:
        assert "PREDICTIONS, NOT MEASUREMENTS" in f.read()
    # the shipped file is exactly what the refresh tool would write for it
    with open(dispatch.MODULE_PATH) as f:
        assert f.read() == dispatch.render_module(t.raw)


@pytest.mark.parametrize("T,K,want", [
    (1, 16, "cuda"), (63, 171, "cuda"),          # decode
    (64, 16, "cuda"), (8192, 171, "cuda"),       # prefill: the same backend (batch-invariant)
    (4096, 0, "cuda"), (None, None, "cuda"),     # no V / shape not given
])
def test_default_choice_does_not_depend_on_T(monkeypatch, T, K, want):
    _available(monkeypatch, cuda=True, triton=True)
    monkeypatch.delenv(dispatch.BY_T_ENV, raising=False)
    assert _pick(T, K) == want


@pytest.mark.parametrize("T,K,want", [
    (1, 16, "cuda"), (4095, 171, "cuda"),        # below the tile path's rows: CUDA
    (4096, 16, "triton"), (8192, 171, "triton"), # prefill with K >= 8: the Triton tile path
    (8192, 4, "cuda"), (4096, 0, "cuda"),        # few concepts / no V
    (None, None, "cuda"),                        # shape not given
])
def test_T_rows_apply_when_opted_in(monkeypatch, T, K, want):
    _available(monkeypatch, cuda=True, triton=True)
    monkeypatch.setenv(dispatch.BY_T_ENV, "1")
    assert _pick(T, K) == want


def test_by_T_switch_refuses_junk(monkeypatch):
    monkeypatch.setenv(dispatch.BY_T_ENV, "maybe")
    with pytest.raises(ValueError, match="STEERKERNEL_DISPATCH_BY_T must be 0 or 1"):
        dispatch.by_batch_size()
    monkeypatch.setenv(dispatch.BY_T_ENV, "off")
    assert dispatch.by_batch_size() is False


def test_first_available_backend_of_the_row_wins(monkeypatch):
    monkeypatch.setenv(dispatch.BY_T_ENV, "1")
    _available(monkeypatch, cuda=False, triton=True)
    assert _pick(1, 16) == "triton" and _pick(8192, 16) == "triton"
    _available(monkeypatch, cuda=True, triton=False)
    assert _pick(1, 16) == "cuda" and _pick(8192, 16) == "cuda"
    _available(monkeypatch, cuda=False, triton=False)
    assert _pick(256, 16) == "reference"


def test_cpu_tensors_use_the_cpu_row():
    ok = backends.backend_status()["cpu"][0]
    want = "cpu" if ok else "reference"
    assert _pick(256, 16, dtype=torch.float32, device=CPU) == want
    assert backends.resolve(CPU) == want


def test_custom_table_from_env(monkeypatch, tmp_path):
    _available(monkeypatch, cuda=True, triton=True)
    table = {"version": 1, "rows": [
        {"device": "cuda", "T": [None, 8], "dtype": ["fp16"], "backends": ["triton"]},
        {"device": "cuda", "d": [4096, None], "backends": ["reference"]},
        {"device": "cuda", "backends": ["cuda"]},
        {"device": "cpu", "backends": ["reference"]}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    monkeypatch.setenv(dispatch.BY_T_ENV, "1")
    dispatch.reload()
    assert _pick(4, 16, dtype=torch.float16) == "triton"
    assert _pick(4, 16, dtype=torch.bfloat16) == "cuda"      # dtype condition fails
    assert _pick(8, 16, dtype=torch.float16) == "cuda"       # hi is exclusive
    assert _pick(512, 16, d=4096) == "reference"
    assert _pick(512, 16, d=None) == "cuda"                  # unknown d skips the d row
    assert _pick(4, 16, dtype=torch.float32, device=CPU) == "reference"
    assert dispatch.active().source == str(path)


def test_forced_backends_win_over_the_table(monkeypatch):
    _available(monkeypatch, cuda=True, triton=True)
    monkeypatch.setenv(dispatch.BY_T_ENV, "1")
    assert _pick(8192, 16, requested="cuda") == "cuda"       # table says triton
    assert _pick(1, 16, requested="triton") == "triton"      # table says cuda
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert _pick(1, 16) == "triton"
    assert _pick(1, 16, requested="cuda") == "cuda"          # the argument beats the env var
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert _pick(256, 16, dtype=torch.float32, device=CPU) == "reference"


def test_forced_backend_ignores_a_broken_table(monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    monkeypatch.setenv(dispatch.TABLE_ENV, str(bad))
    dispatch._ACTIVE = None
    assert backends.resolve(CPU, "reference") == "reference"
    with pytest.raises(dispatch.TableError, match="bad.json"):
        backends.resolve(CPU)


def test_choice_is_memoised_and_stable(monkeypatch):
    _available(monkeypatch, cuda=True, triton=True)
    t = dispatch.active()
    first = [t.choose("cuda", T, 2048, 16, torch.bfloat16) for T in (1, 4096, 1, 4096)]
    assert first == [("cuda", "triton"), ("triton", "cuda")] * 2
    assert ("cuda", 4096, 2048, 16, "bf16") in t._memo


def test_choice_traces_with_symbolic_sizes():
    """Under torch.compile(dynamic=True) the sizes are SymInts: compared, never hashed."""
    t = dispatch.active()
    seen = []

    def f(x):
        seen.append(t.choose("cuda", x.shape[0], x.shape[1], 16, x.dtype))
        return x + 1

    g = torch.compile(f, dynamic=True, backend="eager", fullgraph=True)
    for T in (4100, 4200):
        g(torch.zeros(T, 32))
    assert seen and all(s == ("triton", "cuda") for s in seen)


# ----------------------------------------------------------------------------- malformed

BAD_TABLES = [
    ("{", "not valid JSON"),
    ("[]", "must be an object"),
    ('{"version": 2, "rows": []}', "version must be 1"),
    ('{"version": 1, "rows": []}', "rows must be a non-empty list"),
    ('{"version": 1, "rows": [{"device": "tpu", "backends": ["cpu"]}]}',
     r"rows\[0\]: device must be one of"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": ["cdua"]}]}',
     r"rows\[0\]: backends: unknown backend 'cdua'"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": []}]}', "non-empty list"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": ["cuda"], "T": [64]}]}',
     r"T must be \[lo, hi\]"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": ["cuda"], "K": [8, 8]}]}',
     "is empty"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": ["cuda"], "d": [-1, null]}]}',
     "non-negative integer"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": ["cuda"], "dtype": ["f32"]}]}',
     "unknown dtype 'f32'"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": ["cuda"], "Tmin": 4}]}',
     r"unknown key\(s\) \['Tmin'\]"),
    ('{"version": 1, "rows": [{"device": "cuda", "backends": ["cuda"]}], "rowz": []}',
     "unknown top-level key"),
]


@pytest.mark.parametrize("text,problem", BAD_TABLES, ids=[p for _, p in BAD_TABLES])
def test_malformed_table_file_names_file_and_problem(monkeypatch, tmp_path, text, problem):
    path = tmp_path / "mine.json"
    path.write_text(text)
    with pytest.raises(dispatch.TableError, match=problem) as e:
        dispatch.load(str(path))
    assert str(path) in str(e.value)
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    with pytest.raises(dispatch.TableError, match=problem):
        dispatch.reload()


@pytest.mark.parametrize("text,problem", [
    ("TABLE = {\n", "not valid Python"),
    ("rows = []\n", "no assignment 'TABLE"),
    ("TABLE = make_table()\n", "not a plain literal"),
    ("TABLE = {'version': 1, 'rows': [{'device': 'cuda', 'backends': 'cuda'}]}\n",
     "backends must be a non-empty list"),
])
def test_malformed_table_module(tmp_path, text, problem):
    path = tmp_path / "dispatch_table.py"
    path.write_text(text)
    with pytest.raises(dispatch.TableError, match=problem):
        dispatch.load(str(path))


def test_missing_table_file(tmp_path):
    with pytest.raises(dispatch.TableError, match="cannot be read"):
        dispatch.load(str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------- refresh

def _record(T, d, K, mode, dtype, impl, seconds, status="ok"):
    return {"case": f"junction_T{T}_d{d}_K{K}_{mode}_{dtype}", "family": "junction",
            "params": {"T": T, "d": d, "K": K, "mode": mode, "dtype": dtype},
            "impl": impl, "role": "kernel", "status": status, "median_s": seconds}


def synthetic_result(winner, gpu="Fake GPU 80GB"):
    """A `python -m benchmarks --device cuda` result where ``winner(T, K, d)`` is faster by 2x."""
    res = []
    for T in (1, 16, 64, 256, 2048):
        for K in (16, 171):
            for d in (576, 4096):
                w = winner(T, K, d)
                for mode in ("steer_norm", "monitor_norm"):
                    base = 1e-6 * T * K * d / 1e3 + 5e-6
                    for impl, b in (("fused_cuda", "cuda"), ("fused_triton", "triton")):
                        res.append(_record(T, d, K, mode, "bf16", impl,
                                           base if b == w else 2 * base))
                    res.append(_record(T, d, K, mode, "bf16", "chain_eager", 10 * base))
    res.append(_record(8, 576, 16, "steer_norm", "bf16", "fused_cuda", 1e-6, status="error"))
    return {"schema_version": 1, "device": "cuda", "machine": {"gpu": gpu}, "results": res}


def test_refresh_from_synthetic_result(tmp_path, monkeypatch):
    doc = synthetic_result(lambda T, K, d: "cuda" if T < 64 else "triton")
    src = tmp_path / "cuda-full-Fake-GPU.json"
    src.write_text(json.dumps(doc))
    new = dispatch.refresh_table(str(src), now="2026-12-02T00:00:00+00:00")
    measured = [r for r in new["rows"] if r["measured"]]
    # the winner only changes with T: one row per side, K and d merged away; then the
    # batch-invariant row (no T condition): triton wins 3 of the 5 batch sizes by 2x
    assert [(r.get("T"), r["backends"], r["dtype"]) for r in measured] == [
        ([None, 64], ["cuda", "triton"], ["bf16"]), ([64, None], ["triton", "cuda"], ["bf16"]),
        (None, ["triton", "cuda"], ["bf16"])]
    assert all("K" not in r and "d" not in r for r in measured)
    assert all(math.isclose(r["evidence"]["speedup_geomean"], 2.0) for r in measured[:2])
    assert "every batch size" in measured[2]["why"]
    assert "Fake GPU 80GB" in measured[0]["why"] and new["machine"] == "Fake GPU 80GB"
    # the predicted rows stay behind the measured ones
    shipped = dispatch.read_table_file(dispatch.MODULE_PATH)["rows"]
    assert new["rows"][len(measured):] == shipped
    for out in (tmp_path / "t.py", tmp_path / "t.json"):
        dispatch.write_table(new, str(out))
        t = dispatch.load(str(out))
        assert t.choose("cuda", 32, 2048, 171, torch.bfloat16) == ("cuda", "triton")
        assert t.choose("cuda", 512, 2048, 4, torch.bfloat16) == ("triton", "cuda")
        # fp16 was not measured: the predictions answer
        assert t.choose("cuda", 512, 2048, 4, torch.float16) == ("cuda", "triton")
    assert "Rows with \"measured\": True" in (tmp_path / "t.py").read_text()
    # a second refresh replaces the measured rows instead of stacking them
    again = dispatch.refresh_table(str(src), base=new)
    assert again["rows"] == new["rows"]
    # the active table follows the refreshed file through the env var
    _available(monkeypatch, cuda=True, triton=True)
    monkeypatch.setenv(dispatch.TABLE_ENV, str(tmp_path / "t.json"))
    dispatch.reload()
    assert _pick(32, 171) == "triton" and _pick(4096, 4) == "triton"  # invariant rows
    monkeypatch.setenv(dispatch.BY_T_ENV, "1")
    assert _pick(32, 171) == "cuda" and _pick(4096, 4) == "triton"


def test_refresh_keeps_a_checkerboard_apart(tmp_path):
    doc = synthetic_result(lambda T, K, d: "triton" if (T >= 256 and K >= 171) else "cuda")
    new = dispatch.refresh_table(doc)
    t = dispatch.Table(new, "refreshed")
    for T in (1, 16, 64, 256, 2048, 10 ** 6):
        for K in (16, 100, 171, 500):
            want = "triton" if (T >= 256 and K >= 171) else "cuda"
            assert t.choose("cuda", T, 576, K, "bf16")[0] == want, (T, K)
    # the batch-invariant rows: triton wins only 2 of the 5 batch sizes at K = 171
    assert t.choose("cuda", None, 576, 171, "bf16")[0] == "cuda"


@pytest.mark.parametrize("doc,problem", [
    ({"device": "cpu", "results": []}, "is a 'cpu' run"),
    ({"device": "cuda"}, "no 'results' list"),
    ({"device": "cuda", "results": [_record(1, 64, 4, "steer", "bf16", "fused_cuda", 1e-6)]},
     "no junction shape has ok results for both"),
    ({"device": "cuda", "results": [{"impl": "fused_cuda", "status": "ok", "params": {}}]},
     r"results\[0\] lacks params"),
])
def test_refresh_refuses_unusable_results(doc, problem):
    with pytest.raises(dispatch.TableError, match=problem):
        dispatch.refresh_table(doc)


def test_cli_refresh_show_check(tmp_path, capsys):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(synthetic_result(lambda T, K, d: "triton")))
    out = tmp_path / "table.py"
    assert dispatch_cli.main(["refresh", str(src), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert dispatch_cli.main(["check", str(out)]) == 0
    assert dispatch_cli.main(["show", "--table", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["measured"] is True
    assert dispatch_cli.main(["refresh", str(src), "--dry-run"]) == 0
    assert "TABLE = " in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "rows": [{"device": "gpu", "backends": ["cuda"]}]}')
    assert dispatch_cli.main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "device must be one of" in err
    with open(dispatch.MODULE_PATH) as f:  # --dry-run and --out left the shipped table alone
        assert "PREDICTIONS, NOT MEASUREMENTS" in f.read()


def test_doctor_prints_the_table(capsys, monkeypatch):
    from steerkernel.cli import doctor

    class A:
        json = False
    assert doctor.run(A()) == 0
    text = capsys.readouterr().out
    assert "dispatch table" in text and "triton > cuda" in text and "[predicted]" in text
    A.json = True
    assert doctor.run(A()) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dispatch"]["rows"] == dispatch.read_table_file(dispatch.MODULE_PATH)["rows"]
    bad = os.path.join(os.path.dirname(__file__), "no-such-table.json")
    monkeypatch.setenv(dispatch.TABLE_ENV, bad)
    dispatch._ACTIVE = None
    A.json = False
    assert doctor.run(A()) == 0
    assert "dispatch table: ERROR" in capsys.readouterr().out
