"""Every .cu file compiles with nvcc for sm_90, so the CUDA kernel cannot rot on CPU-only CI.

The CPU torch wheel ships the ATen/c10 CUDA headers except the CMake-generated
``c10/cuda/impl/cuda_cmake_macros.h``; the test supplies that one-line header.  What this
checks: the kernel, its launcher and its TORCH_LIBRARY registration compile (all dtype
instantiations), with no register spills.  What it cannot check here: that it runs correctly
— `benchmarks/gpu_suite.sh` does that on a GPU machine.
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("cu", sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))),
                         ids=os.path.basename)
def test_cu_compiles_for_sm90(cu, tmp_path):
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "-c", cu, "-o", str(tmp_path / "k.o"),
           f"-I{inc}", f"-I{inc}/torch/csrc/api/include",
           f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path / 'stub'}",
           "-DTORCH_EXTENSION_NAME=_C_cuda", "-Xptxas", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", r.stderr)]
    assert spills and max(spills) == 0, "register spills: " + r.stderr[-2000:]
