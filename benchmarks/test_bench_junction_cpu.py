"""pytest-benchmark over the CPU junction cases of the registry (steerkernel/bench/cases.py).

Per case (one pytest-benchmark group), side by side: the fused C++ op, the unfused torch eager
chain, the same chain under torch.compile, and a plain add+RMSNorm (eager and compiled)::

    pytest benchmarks/test_bench_junction_cpu.py --benchmark-json=bench-cpu-pytest.json

Environment: STEERKERNEL_BENCH_SIZE=smoke|quick|full (default quick);
STEERKERNEL_BENCH_COMPILE=0 leaves out the torch.compile impls (their compile happens before
timing starts and is cached per shape).  Each result's ``extra_info`` carries the case
parameters, bytes and FLOPs per call, and achieved GB/s.  The suite's own runner
(``python -m benchmarks``) times the same cases and adds copy bandwidth and the reports.
"""
import os

import pytest
import torch

from steerkernel.bench import cases as C
from steerkernel.bench.runner import llc_bytes
from steerkernel.bench.timing import rotating

SIZE = os.environ.get("STEERKERNEL_BENCH_SIZE", "quick")
COMPILE = os.environ.get("STEERKERNEL_BENCH_COMPILE", "1") != "0"
CASES = C.junction_cases("cpu", SIZE)
IMPLS = ("fused_cpu", "chain_eager", "chain_compiled", "addnorm_eager", "addnorm_compiled")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_junction_cpu(benchmark, case, impl):
    impls = {i.name: i for i in C.junction_impls(case, "cpu", compile=COMPILE)}
    if impl not in impls:
        pytest.skip(f"{impl} does not apply here (no fused CPU backend, no norm, or no compile)")
    im = impls[impl]
    nsets = C.num_sets(im.work.bytes, llc_bytes(), max_sets=2 if SIZE == "smoke" else 2048,
                       mem_cap=1 << 30)
    fn = rotating(im.call, [im.prepare(s) for s in C.input_sets(case, "cpu", nsets)])
    fn()  # compiles (cached per shape) outside the timed region
    benchmark.group = case.name
    benchmark.extra_info.update(case.params(), case=case.name, impl=impl, role=im.role,
                                bytes=im.work.bytes, flops=im.work.flops, sets=nsets,
                                torch_threads=torch.get_num_threads())
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["gbps"] = im.work.bytes / stats.stats.median / 1e9
