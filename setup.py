"""Build steerkernel: the CPU extension always, the CUDA extension where torch has CUDA.

Environment:
  STEERKERNEL_BUILD_CUDA=0|1   skip / force the CUDA extension (default: build it when torch
                               was built with CUDA and nvcc is found).
  STEERKERNEL_CPU_NATIVE=1     compile the CPU kernel with -march=native (off by default: the
                               kernel already dispatches between AVX-512, AVX2 and baseline).
"""
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def want_cuda() -> bool:
    flag = os.environ.get("STEERKERNEL_BUILD_CUDA", "auto")
    has = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not has:
            raise RuntimeError("STEERKERNEL_BUILD_CUDA=1 but torch has no CUDA "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return True
    return has


cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno"]
if os.environ.get("STEERKERNEL_CPU_NATIVE") == "1":
    cxx_flags.append("-march=native")
# at::parallel_for is a header template: it only runs threads when the including file is
# compiled with OpenMP (torch's own build uses it; the process keeps torch's one libgomp).
omp_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []

ext_modules = [
    CppExtension(
        "steerkernel._C",
        [f"{CSRC}/ops.cpp", f"{CSRC}/checks.cpp", f"{CSRC}/junction_cpu.cpp"],
        extra_compile_args={"cxx": cxx_flags + omp_flags},
        extra_link_args=omp_flags,
    )
]
if want_cuda():
    from torch.utils.cpp_extension import CUDAExtension

    ext_modules.append(
        CUDAExtension(
            "steerkernel._C_cuda",
            [f"{CSRC}/cuda_ops.cpp", f"{CSRC}/checks.cpp", f"{CSRC}/junction_cuda.cu"],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17",
                                         "-lineinfo"]},
        )
    )

setup(
    name="steerkernel",
    version="0.1.0",
    description="Fused residual-stream monitoring and steering kernels for LLM serving",
    long_description=open(os.path.join(HERE, "README.md")).read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["steerkernel", "steerkernel.*"]),
    package_data={"steerkernel": ["data/*.json", "data/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "hf": ["transformers>=4.45", "accelerate", "gguf"],
        "plots": ["matplotlib"],
        "monitor": ["prometheus_client"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
    },
    entry_points={
        "console_scripts": ["steerkernel=steerkernel.cli.main:main"],
        # vLLM loads this in each of its processes; it stays dormant unless an engine is
        # started with additional_config={"steerkernel": {...}} (docs/vllm.md)
        "vllm.general_plugins": ["steerkernel = steerkernel.integrations.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
