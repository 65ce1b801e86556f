"""Build steerkernel.  Metadata lives in pyproject.toml; this file only adds the native code.

* torch importable at build time (``pip install --no-build-isolation .``, scripts/bootstrap.sh):
  the C++ CPU extension is compiled now, and the CUDA one too where torch has CUDA and nvcc
  is found.  A ``_native_build.json`` beside them records the sources' hash and the torch they
  were built against.
* no torch at build time (``pip install .`` with pip's default build isolation, ``python -m
  build``): a pure-Python wheel that carries ``csrc/`` as ``steerkernel/_csrc``; the extension is
  compiled once on first use into a cache (steerkernel/backends/native.py).

Environment:
  STEERKERNEL_BUILD_NATIVE=0   never compile at build time (as if torch were absent).
  STEERKERNEL_BUILD_CUDA=0|1   skip / force the CUDA extension (default: built when torch was
                               built with CUDA and nvcc is found).
  STEERKERNEL_CPU_NATIVE=1     compile the CPU kernel with -march=native (off by default: the
                               kernel already dispatches between AVX-512, AVX2 and baseline).
"""
import importlib.util
import json
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _native_spec():
    path = os.path.join(HERE, "steerkernel", "backends", "native_spec.py")
    mod_spec = importlib.util.spec_from_file_location("steerkernel_native_spec", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


spec = _native_spec()


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package (steerkernel/_csrc) for first-use builds."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's csrc/ directly
        dst = os.path.join(self.build_lib, "steerkernel", spec.PACKAGED_CSRC)
        os.makedirs(dst, exist_ok=True)
        for name in spec.source_files(os.path.join(HERE, CSRC)):
            shutil.copy2(os.path.join(HERE, CSRC, name), os.path.join(dst, name))


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []

try:
    import torch
except ImportError:
    torch = None

if torch is not None and os.environ.get("STEERKERNEL_BUILD_NATIVE", "1") != "0":
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

    def want_cuda() -> bool:
        flag = os.environ.get("STEERKERNEL_BUILD_CUDA", "auto")
        has = torch.version.cuda is not None and CUDA_HOME is not None
        if flag == "1" and not has:
            raise RuntimeError("STEERKERNEL_BUILD_CUDA=1 but torch has no CUDA "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return has and flag != "0"

    def sources(name):
        return [f"{CSRC}/{s}" for s in spec.EXTENSIONS[name]]

    ext_modules.append(CppExtension(
        "steerkernel._C", sources("_C"),
        extra_compile_args={"cxx": spec.cxx_flags()}, extra_link_args=spec.openmp_flags()))
    if want_cuda():
        from torch.utils.cpp_extension import CUDAExtension

        ext_modules.append(CUDAExtension(
            "steerkernel._C_cuda", sources("_C_cuda"),
            extra_compile_args={"cxx": ["-O3"], "nvcc": spec.nvcc_flags()}))

    class BuildExtWithInfo(BuildExtension.with_options(use_ninja=True)):
        """Record the sources' hash and torch version beside the built extensions."""

        def run(self):
            super().run()
            built = {ext.name.split(".")[-1]: {"source_hash": spec.source_hash(
                os.path.join(HERE, CSRC)), "torch": torch.__version__}
                for ext in self.extensions}
            out_dir = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, spec.BUILD_INFO), "w") as f:
                json.dump(built, f, indent=1)

    cmdclass["build_ext"] = BuildExtWithInfo

setup(ext_modules=ext_modules, cmdclass=cmdclass)
