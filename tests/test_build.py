"""The CMake build compiles the same native sources, and its library works when loaded."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_load(tmp_path):
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path), *gen,
                    f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, text=True)
    r = subprocess.run(["cmake", "--build", str(tmp_path), "-j", "2"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lib = next(p for p in os.listdir(tmp_path) if p.startswith("_C") and p.endswith(".so"))
    # Fresh process: load the CMake-built op (not steerkernel._C) and compare to the oracle.
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(tmp_path / lib)!r})
        from steerkernel.ops.reference import junction_reference_
        torch.manual_seed(0)
        T, d, K = 7, 96, 5
        r = torch.randn(T, d); x = torch.randn(T, d)
        V = torch.nn.functional.normalize(torch.randn(K, d), dim=1)
        slot = torch.tensor([0, 1, 2, 1, 0, 2, 1], dtype=torch.int32)
        shift = torch.randn(3, K); lo = torch.full((3, K), -1.0); hi = torch.full((3, K), 1.0)
        w = torch.rand(d)
        outs = []
        for fn in (torch.ops.steerkernel.junction, junction_reference_):
            rr = r.clone(); s = torch.empty(T, K); n = torch.empty(T); o = torch.empty(T, d)
            fn(residual=rr, V=V, x=x, slot=slot, shift=shift, lo=lo, hi=hi, gate_concept=None,
               gate_threshold=None, gate_above=None, latch=None, weight=w, eps=1e-6, scores=s,
               norms=n, out=o)
            outs.append((rr, s, n, o))
        for a, b in zip(*outs):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_setup_declares_required_layout():
    for path in ("csrc", "steerkernel", "benchmarks", "tests", "setup.py", "CMakeLists.txt"):
        assert os.path.exists(os.path.join(ROOT, path)), path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP flags are set on Linux")
def test_cpu_op_is_built_with_openmp():
    """at::parallel_for only spreads rows over threads in a file compiled with OpenMP: without
    -fopenmp the CPU op silently runs on one thread whatever torch.set_num_threads says."""
    from steerkernel.backends import native

    ext = native.load("_C")
    with open(ext.__file__, "rb") as f:
        data = f.read()
    assert b"GOMP_parallel" in data, f"{ext.__file__} was built without OpenMP"
