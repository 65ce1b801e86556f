"""The GPU suite's rehearsal: `benchmarks/gpu_suite.sh --dry-run` runs every stage that can run
without a GPU (tests, the correctness matrix under the Triton interpreter, the benchmark smoke
set), so a short GPU lease cannot be lost to a silly mistake in the script."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash script")
def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_SUITE_BUDGET="240",
               GPU_CHECK_BUDGET="45")
    r = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "DRY-RUN" in summary
    for line in ("build: dry run, using the checkout's build", "tests: rc=0", "check: rc=0",
                 "sanitize: skipped (dry run)", "bench: rc=0"):
        assert line in summary, f"{line!r} not in summary:\n{summary}"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["failed"] == 0 and report["passed"] > 0, report
    stages = {c["stage"] for c in report["cases"]}
    assert {"matrix", "layouts", "graph"} <= stages, stages
    variants = {c["variant"] for c in report["cases"]}
    assert "cpu" in variants and any(v.startswith("triton:") for v in variants), variants
    assert (tmp_path / "bench-cpu-dry.json").exists()
