"""The CUDA extension compiles the way the real build compiles it, so it cannot rot on CPU-only CI.

* Every ``csrc/*.cu`` is compiled by nvcc with the flags torch's ``BuildExtension`` passes
  (``COMMON_NVCC_FLAGS``, ``-fPIC``, C++20, the extension defines) plus
  :func:`steerkernel.backends.native_spec.nvcc_flags`, for sm_90 (H100/H200, what
  ``pip install`` builds on such a machine) and sm_80 (CMakeLists.txt builds 80;90).
  ``ptxas -v`` reports every kernel instantiation: the table (registers, stack, spills) is
  printed, every kernel family the launcher can pick must be there for every dtype pairing,
  and no kernel may spill or use a stack frame.
* ``csrc/cuda_ops.cpp`` (the torch side of the CUDA op) is syntax-checked by the host compiler
  against the torch and CUDA headers, C++20.

The CPU torch wheel ships the ATen/c10 CUDA headers except the CMake-generated
``c10/cuda/impl/cuda_cmake_macros.h``; the tests supply that one-line header.  What this cannot
check: that the kernels run correctly — ``benchmarks/gpu_suite.sh`` / ``gpu_check.py`` do that
on a GPU machine.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
ARCHS = ("90", "80")

#: Kernel families and the (residual, V) dtype pairings the launcher instantiates
#: (junction_cuda.cu: launch() -> launch_typed<T, VT>), and how many (NV, R) instantiations of
#: each family it can pick for a 16-bit / an fp32 residual (rows_fn / project_fn;
#: rows_smem_kernel has one).
TYPE_PAIRS = {("float", "float"), ("__nv_bfloat16", "float"), ("__nv_bfloat16", "__nv_bfloat16"),
              ("__half", "float"), ("__half", "__half")}
FAMILIES = {"rows_kernel": (7, 9), "project_kernel": (6, 8), "rows_smem_kernel": (1, 1)}


def _native_spec():
    path = os.path.join(ROOT, "steerkernel", "backends", "native_spec.py")
    spec = importlib.util.spec_from_file_location("steerkernel_native_spec_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stub_dir(tmp_path):
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return str(tmp_path / "stub")


def _torch_includes():
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    return [f"-I{inc}", f"-I{inc}/torch/csrc/api/include",
            f"-I{sysconfig.get_paths()['include']}"]


def _defines():
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C_cuda",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _nvcc_build_flags():
    """What torch.utils.cpp_extension.BuildExtension passes to nvcc for a .cu source."""
    from torch.utils import cpp_extension

    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    return common + ["--compiler-options", "-fPIC"] + _native_spec().nvcc_flags() + \
        ["-std=c++20"]


def _demangle(names):
    filt = shutil.which("c++filt")
    if not filt or not names:
        return dict(zip(names, names))
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def parse_ptxas(text):
    """``[(arch, mangled name, registers, stack bytes, spill stores, spill loads)]`` from the
    ``-Xptxas -v`` log of one nvcc run."""
    rows, cur, frame = [], None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur, frame = (m.group(1), m.group(2)), None
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m and cur:
            frame = tuple(int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            st, ss, sl = frame or (0, 0, 0)
            rows.append((cur[1], cur[0], int(m.group(1)), st, ss, sl))
            cur = None
    return rows


def _short(name):
    name = re.sub(r"steerkernel::cuda::\(anonymous namespace\)::", "", name)
    return name.replace("steerkernel::JunctionParams", "Params")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("cu", sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))),
                         ids=os.path.basename)
def test_cu_compiles_without_spills(cu, tmp_path, capsys):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, *_nvcc_build_flags(), *gencode, "-c", cu, "-o", str(tmp_path / "k.o"),
           *_torch_includes(), f"-I{_stub_dir(tmp_path)}", *_defines(), "-Xptxas", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, " ".join(cmd) + "\n" + r.stderr[-4000:]
    rows = parse_ptxas(r.stderr)
    assert rows, "no ptxas -v report: " + r.stderr[-2000:]
    names = _demangle(sorted({row[1] for row in rows}))
    with capsys.disabled():
        print(f"\n{os.path.basename(cu)}: {len(rows)} kernels "
              f"(arch, registers, stack, spill stores / loads, kernel)")
        for arch, mangled, regs, st, ss, sl in sorted(rows, key=lambda x: (x[0], names[x[1]])):
            print(f"  {arch} {regs:4d} regs  stack {st:3d}  spill {ss}/{sl}  "
                  f"{_short(names[mangled])}")
    bad = [(arch, names[m], st, ss, sl) for arch, m, _, st, ss, sl in rows if st or ss or sl]
    assert not bad, f"kernels with a stack frame or register spills: {bad}"

    if os.path.basename(cu) == "junction_cuda.cu":
        for arch in ARCHS:
            found = {}
            for a, mangled, *_ in rows:
                m = re.search(r"(\w+)<([\w:]+), ([\w:]+)(?:, (\d+), (\d+))?>",
                              names[mangled])
                if a == f"sm_{arch}" and m:
                    key = (m.group(1), m.group(2), m.group(3))
                    found[key] = found.get(key, 0) + 1
            for family, counts in FAMILIES.items():
                for t, vt in TYPE_PAIRS:
                    count = counts[t == "float"]
                    assert found.get((family, t, vt), 0) == count, \
                        (f"sm_{arch}: expected {count} instantiation(s) of {family}<{t}, {vt}>, "
                         f"found {found.get((family, t, vt), 0)}")


def _cuda_include():
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    cands += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime_api.h")):
            return os.path.join(c, "include")
    return None


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_cuda_ops_cpp_compiles(tmp_path):
    """The torch side of the CUDA op (guard, stream, scratch, registration) against the torch
    and CUDA headers, C++20, as BuildExtension compiles it (syntax and semantics, no codegen)."""
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found")
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-fPIC", "-Wall", "-Werror=return-type",
           *_torch_includes(), f"-I{_stub_dir(tmp_path)}", f"-I{inc}", *_defines(),
           os.path.join(ROOT, "csrc", "cuda_ops.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, " ".join(cmd) + "\n" + r.stderr[-4000:]


# ----------------------------------------------------------------------------- on a GPU only
def _bits(t):
    """A tensor's bits (so -0 / +0 and NaN payloads count)."""
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _run_cuda(kw, misaligned=False):
    """One CUDA junction call on clones of ``kw``; ``misaligned``: the residual, x and out are
    views with row stride d + 1 (the shared-memory fallback kernel).  Returns the outputs."""
    from steerkernel.ops import junction

    args = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}
    T, d = args["residual"].shape

    def view_of(t):
        if not misaligned:
            return t
        buf = torch.zeros(T, d + 1, dtype=t.dtype, device=t.device)
        buf[:, 1:].copy_(t)
        return buf[:, 1:]

    args["residual"] = view_of(args["residual"])
    if args.get("x") is not None:
        args["x"] = view_of(args["x"])
    if args.get("weight") is not None:
        args["out"] = view_of(torch.zeros_like(kw["residual"]))
    scores, norms, out = junction(**args, backend="cuda", check_values=False)
    return dict(residual=args["residual"], scores=scores, norms=norms, out=out,
                latch=args.get("latch"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d,K", [(96, 40), (4096, 16), (4096, 171), (4104, 40)])
def test_cuda_paths_give_the_same_bits(dtype, d, K):
    """docs/design.md §2 batch invariance across every CUDA kernel choice: the fused kernel at
    each rows-per-block, the split path, the shared-memory fallback (misaligned views), forced
    paths, and a row alone vs in a batch all give the same bits (the kernels share one
    reduction formulation; junction_cuda.cu, "numerics").  T = 1100 crosses every threshold of
    make_plan on an H100/H200 (132 SMs)."""
    from steerkernel import backends
    from steerkernel.backends import native
    from steerkernel.testing import make_case

    ok, why = backends.backend_status()["cuda"]
    if not ok:
        pytest.skip(why)
    ext = native.load("_C_cuda")
    T = 1100
    kw = make_case(T, d, K, dtype, gate="mixed", latch=True, seed=7 * d + K,
                   device="cuda").kwargs
    old = ext.get_path()
    try:
        ext.set_path("auto")
        ref = _run_cuda(kw)
        runs = {"misaligned": _run_cuda(kw, misaligned=True)}
        for path in ("row", "split"):
            ext.set_path(path)
            runs[path] = _run_cuda(kw)
        ext.set_path("auto")
        for n in (1, 7, 600):  # the first n rows alone: split / fused R = 4 ...
            sub = {k: (v[:n] if k in ("residual", "x", "slot") else v) for k, v in kw.items()}
            got = _run_cuda(sub)
            for name in ("residual", "scores", "norms", "out"):
                assert torch.equal(_bits(got[name]), _bits(ref[name][:n])), f"{name}, T = {n}"
    finally:
        ext.set_path(old)
    for label, got in runs.items():
        for name in ("residual", "scores", "norms", "out", "latch"):
            assert torch.equal(_bits(got[name]), _bits(ref[name])), f"{name}, {label}"
