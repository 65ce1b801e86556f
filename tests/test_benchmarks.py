"""The benchmark suite's machinery: accounting, timers, baselines' semantics, a smoke run of every
CPU case, result-file schema and report rendering.  No speed is asserted here (docs/design.md §6: speed
targets live in the benchmarks)."""
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from steerkernel.bench import cases as C
from steerkernel.bench import report, runner, schema
from steerkernel.bench.roofline import add_rmsnorm_work, gbps, junction_work
from steerkernel.bench.timing import quantile, rotating, summarize, time_cpu
from steerkernel.testing import SCORE_TOLERANCES, TOLERANCES, assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- accounting

def test_junction_bytes_and_flops_by_hand():
    # T=2, d=4, K=3, fp32, x, RMSNorm, steering with P=5, both rows steered
    w = junction_work(2, 4, 3, 4, v_elem=4, with_x=True, norm=True, steer=True, P=5,
                      steered_rows=2)
    assert w.parts == {"read_residual": 32, "read_x": 32, "write_residual": 32,
                       "write_out": 32, "read_V": 48, "write_scores": 24, "write_norms": 8,
                       "read_weight": 16, "read_slot": 8, "read_tables": 180}
    assert w.bytes == 412
    # add 8 + projection 2*2*3*4=48 + ||h|| 16 + steer 2*(3*3 + 2*3*4)=66 + RMSNorm 4*8=32
    assert w.flops == 170


def test_monitor_only_bf16_bytes_and_flops_by_hand():
    # T=1, d=8, K=2, bf16 residual, fp32 V, no norm, no steering
    w = junction_work(1, 8, 2, 2, v_elem=4, with_x=True, norm=False)
    assert w.parts == {"read_residual": 16, "read_x": 16, "write_residual": 16, "read_V": 64,
                       "write_scores": 8, "write_norms": 4}
    assert w.bytes == 124
    assert w.flops == 8 + 32 + 16
    f = add_rmsnorm_work(2, 4, 4)
    assert (f.bytes, f.flops) == (4 * 32 + 16, 8 + 32)
    assert gbps(2e9, 2.0) == 1.0


def test_case_work_follows_mode():
    steer = C.case_work(C.JunctionCase(8, 64, 4, "steer_norm"))
    idle = C.case_work(C.JunctionCase(8, 64, 4, "idle_norm"))
    mon = C.case_work(C.JunctionCase(8, 64, 4, "monitor"))
    assert steer.bytes == idle.bytes and steer.flops - idle.flops == 8 * (3 * 4 + 2 * 4 * 64)
    assert "write_out" not in mon.parts and "read_slot" not in mon.parts
    bf = C.case_work(C.JunctionCase(8, 64, 4, "monitor", "bf16"))
    assert bf.parts["read_residual"] == 8 * 64 * 2 and bf.parts["read_V"] == 4 * 64 * 4


def test_num_sets_covers_twice_the_cache_within_caps():
    assert C.num_sets(1 << 20, 32 << 20, max_sets=2048, mem_cap=1 << 30) == 64
    assert C.num_sets(1 << 30, 32 << 20, max_sets=2048, mem_cap=1 << 30) == 1
    assert C.num_sets(100, 32 << 20, max_sets=2048, mem_cap=1 << 30) == 2048
    assert C.num_sets(1 << 20, 32 << 20, max_sets=2048, mem_cap=8 << 20) == 8


# ----------------------------------------------------------------------------- timers

def test_quantiles_and_summary():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert quantile(xs, 0.5) == 3.0 and quantile(xs, 0.1) == pytest.approx(1.4)
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0], inner=7)
    assert (t.median_s, t.p90_s, t.n, t.inner) == (3.0, pytest.approx(4.6), 5, 7)


def test_rotating_cycles_and_cpu_timer_counts():
    seen = []
    fn = rotating(seen.append, ["a", "b", "c"])
    for _ in range(5):
        fn()
    assert seen == ["a", "b", "c", "a", "b"]
    calls = [0]

    def work():
        calls[0] += 1
        time.sleep(1e-4)

    t = time_cpu(work, warmup_s=0.0, budget_s=0.0, min_samples=4, min_sample_s=0)
    assert t.n == 4 and t.inner == 1 and calls[0] == 2 + 4
    assert 1e-4 <= t.p10_s <= t.median_s <= t.p90_s < 0.05


# ----------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(C.MODES))
def test_unfused_chain_computes_the_junction(mode, dtype):
    """The baseline must compute what the kernel computes, or its ratio means nothing."""
    case = C.JunctionCase(6, 64, 5, mode, dtype)
    s = C.input_sets(case, "cpu", 1)[0]
    h, p, n, out = C.make_chain(case.steer, case.norm)(*C._chain_args(s))
    ref = runner.Runner("cpu", "smoke").reference(s)
    tol, stol = TOLERANCES[C.DTYPES[dtype]], SCORE_TOLERANCES[C.DTYPES[dtype]]
    assert_close(p, ref["scores"], stol, "scores")
    assert_close(n, ref["norms"], stol, "norms")
    assert_close(h, ref["residual"], tol, "residual")
    if case.norm:
        assert_close(out, ref["out"], tol, "out")
        if not case.steer:
            h2, out2 = C.add_rmsnorm(s["residual"], s["x"], s["weight"])
            assert_close(out2, ref["out"], tol, "add+rmsnorm out")
    else:
        assert out is None


@pytest.mark.skipif(os.environ.get("STEERKERNEL_BENCH_TEST_COMPILE") != "1",
                    reason="first torch.compile in a process takes 10-20 s on a 2-core CPU; "
                           "set STEERKERNEL_BENCH_TEST_COMPILE=1 (the runner checks every "
                           "compiled baseline against the reference on every real run)")
def test_compiled_chain_matches_eager():
    case = C.JunctionCase(4, 32, 3, "steer_norm")
    s = C.input_sets(case, "cpu", 1)[0]
    eager = C.make_chain(True, True)(*C._chain_args(s))
    got = C.compiled(("test", "chain"), C.make_chain(True, True))(*C._chain_args(s))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- runs, files

def _args(out, **kw):
    base = dict(device="cpu", size="smoke", out=str(out), name="smoke.json", filter=[],
                impls=None, no_compile=True, compile_budget=None, time_budget=None,
                threads=None, system_allocator=False, label=None, note=["test"], no_report=True)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = runner.run(_args(out))
    return rc, os.path.join(out, "smoke.json")


def test_smoke_run_measures_every_cpu_case(smoke_result):
    rc, path = smoke_result
    assert rc == 0
    doc = _load(path)
    assert doc["complete"] and doc["device"] == "cpu" and doc["notes"] == ["test"]
    assert doc["copy_bandwidth"]["gbps"] > 0
    seen = {(r["case"], r["impl"]) for r in doc["results"]}
    for case in C.junction_cases("cpu", "smoke"):
        for impl in C.junction_impls(case, "cpu", compile=False):
            assert (case.name, impl.name) in seen
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["p10_s"] <= r["median_s"] <= r["p90_s"]
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        if r["role"] != "floor":
            assert r["checked"]


def test_result_files_validate_against_schema(smoke_result):
    sch = schema.load_schema()
    assert sch is not None, "benchmarks/results/schema.json is missing"
    # runner result files (other scripts, e.g. bench_hf_decode.py, keep their own formats there)
    committed = [p for p in glob.glob(os.path.join(REPO, "benchmarks", "results", "*.json"))
                 if "schema_version" in _load(p) and not p.endswith("schema.json")]
    paths = [smoke_result[1]] + committed
    for p in paths:
        assert schema.validate(_load(p), sch) == [], p
    bad = _load(smoke_result[1])
    bad["device"] = "tpu"
    del bad["results"][0]["status"]
    bad["results"][1]["median_s"] = -1.0
    errs = schema.validate(bad, sch)
    assert len(errs) == 3, errs
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft7Validator.check_schema(sch)
    assert not list(jsonschema.Draft7Validator(sch).iter_errors(_load(paths[0])))
    assert len(list(jsonschema.Draft7Validator(sch).iter_errors(bad))) == 3


def test_report_renders_table_and_plot(smoke_result, tmp_path):
    _, path = smoke_result
    readme = tmp_path / "README_table.md"
    text = report.render_files([path], out_dir=str(tmp_path), readme=str(readme))
    full = (tmp_path / "smoke.md").read_text()
    assert "| T | d | K |" in full and "junction" not in full.split("\n")[0]
    n_rows = sum(1 for line in full.splitlines() if line.startswith("| ") and "| cpu |" in line)
    assert n_rows == len(C.junction_cases("cpu", "smoke"))
    assert readme.read_text().endswith(text)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_readme_table_is_spliced_between_markers(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\nrest\n")
    assert report.splice_readme("| new | table |\n", str(doc))
    assert doc.read_text() == (f"intro\n{report.README_START}\n| new | table |\n"
                               f"{report.README_END}\nrest\n")
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not report.splice_readme("x", str(plain)) and plain.read_text() == "no markers\n"
    assert not report.splice_readme("x", str(tmp_path / "missing.md"))


def test_latest_results_prefers_full_then_newest(tmp_path):
    def doc(size, created, device="cpu", complete=True):
        return {"size": size, "created": created, "device": device, "complete": complete}

    docs = {"a": doc("quick", "2025-01-02"), "b": doc("quick", "2025-01-03"),
            "c": doc("full", "2025-01-01"), "d": doc("full", "2025-01-05", complete=False),
            "e": doc("smoke", "2025-01-09"), "f": doc("quick", "2025-01-01", "cuda")}
    for name, d in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    assert [os.path.basename(p) for p in report.latest_results(str(tmp_path))] == ["c.json",
                                                                                  "f.json"]


def test_entry_points_and_pytest_benchmark_file(tmp_path, capsys):
    """`python -m benchmarks`, `steerkernel bench` and the pytest-benchmark file all run."""
    spec = importlib.util.spec_from_file_location(
        "benchmarks_main", os.path.join(REPO, "benchmarks", "__main__.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--size", "smoke", "--no-compile", "--filter", "T1_d64_K4_steer_norm_fp32",
                   "--out", str(tmp_path), "--name", "one.json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| 1 | 64 | 4 | steer_norm | fp32 | cpu |" in out
    assert (tmp_path / "one.md").exists()
    assert mod.main(["report", str(tmp_path / "one.json"), "--readme", "none"]) == 0
    from steerkernel.cli.main import build_parser

    args = build_parser(["bench", "--quick", "--device", "cpu"]).parse_args(
        ["bench", "--quick", "--device", "cpu", "--filter", "x"])
    assert (args.size, args.device, args.filter) == ("quick", "cpu", ["x"])
    env = dict(os.environ, STEERKERNEL_BENCH_SIZE="smoke", STEERKERNEL_BENCH_COMPILE="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "benchmarks/test_bench_junction_cpu.py", "--benchmark-disable",
                        "-k", "T8 and steer_norm_fp32"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 passed" in r.stdout


def test_decode_hook_and_unavailable_families_become_records(monkeypatch):
    doc = {"model": "m", "steer": "c=+0.05", "settings": {"monitored": "30 layers x 171"},
           "results": {"stock": {"median_ms": 10.0, "p10_ms": 9.0, "p90_ms": 12.0, "samples": 8},
                       "attached": {"median_ms": 10.5, "p10_ms": 9.5, "p90_ms": 12.5,
                                    "samples": 8, "paired_ratio_to_stock_median": 1.04}}}
    calls = []
    fake = SimpleNamespace(run=lambda **kw: calls.append(kw) or doc)
    monkeypatch.setattr(C, "load_benchmarks_module", lambda name: fake)
    (case,) = C.hf_decode_cases("cpu", "quick")
    r = runner.Runner("cpu", "smoke")
    recs = r.run_case(case)
    assert calls == [dict(steps=16, rounds=2, threads=torch.get_num_threads())]
    assert [(x["impl"], x["role"]) for x in recs] == [("stock", "stock"), ("attached", "kernel")]
    assert recs[1]["median_s"] == pytest.approx(0.0105) and recs[1]["ratio_to_stock"] == 1.04
    assert recs[0]["tokens_per_s"] == pytest.approx(100.0)
    (skip,) = r.run_case(C.Unavailable("vllm_decode", "vllm is not importable here"))
    assert skip["status"] == "skipped" and "vllm" in skip["reason"]
    sch = schema.load_schema()
    item = sch["properties"]["results"]["items"]
    for rec in recs + [skip]:
        assert schema.validate(rec, item) == []
    assert "attached" in report.other_table({"results": recs + [skip]})
