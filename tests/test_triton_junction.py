"""The Triton junction backend against the float64 reference, on every kernel it has.

Runs on a GPU when there is one, else under Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set below before triton is imported).  The interpreter is slow, so the grid is a curated
rotation through dtype x d x K x T x kernel x feature rather than the full product; block-size
knobs are raised for the big-T cases (semantics do not depend on them) and lowered where a test
needs several K- or d-chunks.  Extra checks on top of ``check_backend``:

* slot-0 / monitor-only rows bit-identical to torch's ``residual + x`` (bf16 ties included);
* NaN / Inf rows stay in their row; out-of-range slots and gate concepts via the raw op;
* rows with any row stride; the latch read as of call start;
* the tile kernel under an emulation of the GPU's TF32 tensor cores (operands truncated to
  10 mantissa bits), which is what the hi/lo operand split is for;
* the kernels compile for sm_90 (H100) without register spills (offline, needs only ptxas).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402

from steerkernel import backends  # noqa: E402
from steerkernel.ops.reference import junction_reference_  # noqa: E402
from steerkernel.testing import (SCORE_TOLERANCES, TOLERANCES, assert_close,  # noqa: E402
                                 check_backend, make_case, run_case)

_OK, _WHY = backends.backend_status()["triton"]
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_WHY}")
if _OK:
    from steerkernel.backends import triton_junction as tj

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = backends.triton_interpreted() and DEVICE == "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
PATHS = ("row", "chunked", "tile")


@pytest.fixture
def knobs(monkeypatch):
    """Force a kernel / block sizes for one test: ``knobs(path=..., ROW_CHUNK_D=...)``."""
    def set_(path=None, **consts):
        monkeypatch.setattr(tj, "FORCE_PATH", path)
        for k, v in consts.items():
            assert hasattr(tj, k), k
            monkeypatch.setattr(tj, k, v)
    return set_


def _fast(T):
    """Under the interpreter, big-T row-kernel cases take the whole row of V at once."""
    return dict(ROW_TILE_PER_THREAD=4096) if INTERPRETED and T > 8 else {}


# ----------------------------------------------------------------------------- the grid
# (dtype, d, K, T, path, features); features: gate, latch, strided scores, x, norm, V dtype,
# weight dtype.  Every dtype x d x K x T value and every path occurs, each feature both ways.
G = [None, "above", "below", "mixed"]
GRID = [
    # dtype d    K   T    path       gate     latch  strided x      norm   V        weight
    (F32, 64, 1, 1, "row", None, False, False, True, True, F32, None),
    (F32, 577, 7, 3, "row", "above", True, True, True, True, "model", F32),
    (F32, 769, 64, 3, "chunked", "mixed", True, False, False, True, F32, None),
    (F32, 64, 7, 128, "tile", "below", False, True, True, False, F32, None),
    (F32, 577, 64, 128, "tile", "mixed", True, False, True, True, F32, F32),
    (F32, 769, 1, 17, "row", "above", False, False, False, False, F32, None),
    (F32, 769, 7, 1, "tile", "mixed", True, True, True, True, F32, None),
    (BF16, 64, 64, 3, "row", "mixed", True, True, True, True, F32, F32),
    (BF16, 577, 1, 3, "chunked", "above", False, False, True, True, "model", None),
    (BF16, 769, 7, 128, "tile", "above", True, True, True, True, F32, None),
    (BF16, 577, 64, 128, "tile", None, False, False, False, True, "model", F32),
    (BF16, 769, 64, 1, "row", "below", True, False, True, False, "model", None),
    (BF16, 64, 7, 17, "chunked", None, False, True, False, True, F32, None),
    (BF16, 577, 7, 128, "row", "mixed", True, False, True, True, F32, None),
    (BF16, 64, 1, 128, "tile", "below", True, False, True, True, "model", F32),
    (F16, 64, 7, 1, "chunked", "below", False, True, True, True, "model", F32),
    (F16, 577, 64, 17, "row", "mixed", False, True, True, True, F32, None),
    (F16, 769, 1, 3, "row", None, False, False, True, True, F32, F32),
    (F16, 769, 64, 128, "tile", "above", True, True, False, True, F32, None),
    (F16, 64, 7, 128, "chunked", "below", True, False, True, True, "model", None),
    (F16, 64, 64, 3, "tile", "mixed", True, False, True, False, F32, F32),
]


def _id(c):
    dt, d, K, T, path, gate, latch, strided, x, norm, vd, wd = c
    feats = [gate or "ungated"] + [n for n, on in (("latch", latch), ("strided", strided),
                                                   ("nox", not x), ("nonorm", not norm),
                                                   ("Vmodel", vd == "model"),
                                                   ("w32", wd is F32)) if on]
    return f"{str(dt)[6:]}-d{d}-K{K}-T{T}-{path}-" + "-".join(feats)


@pytest.mark.parametrize("c", GRID, ids=[_id(c) for c in GRID])
def test_matches_reference_grid(c, knobs):
    dt, d, K, T, path, gate, latch, strided, x, norm, vd, wd = c
    knobs(path, **_fast(T))
    case = make_case(T, d, K, dt, gate=gate, latch=latch and gate is not None,
                     strided_scores=strided, with_x=x, with_norm=norm, v_dtype=vd,
                     weight_dtype=wd, seed=hash(_id(c)) % 2**31, device=DEVICE)
    check_backend(case, "triton")


@pytest.mark.parametrize("path,dtype,T,d,K", [
    ("row", BF16, 3, 4096, 7),      # BLOCK_D 4096 (8 warps), BLOCK_K 1 with the real knobs
    ("tile", BF16, 64, 577, 171),   # BLOCK_K 256: the K-chunked update, 6 chunks
    ("row", F32, 1, 769, 171),      # decode: 86 K-chunks of 2 concepts
    ("chunked", F16, 2, 4096, 40),  # 4 d-chunks of 1024 x 20 K-chunks
])
def test_large_d_and_K(path, dtype, T, d, K, knobs):
    knobs(path)
    case = make_case(T, d, K, dtype, gate="mixed", latch=True, v_dtype=F32, seed=d + K,
                     device=DEVICE)
    check_backend(case, "triton")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("slots", ["none", "zero", "all"])
def test_slot_modes(path, slots, knobs):
    knobs(path, ROW_CHUNK_D=256, ROW_TILE_PER_THREAD=32)  # several d- and K-chunks
    case = make_case(20, 577, 20, BF16, slots=slots, gate="above" if slots == "all" else None,
                     seed=7, device=DEVICE)
    check_backend(case, "triton")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("orthogonal", [True, False])
def test_every_intervention_kind(path, orthogonal, knobs):
    knobs(path)
    case = make_case(64, 64, 12, F32, slots="all", orthogonal=orthogonal, P=7, seed=11,
                     device=DEVICE)
    check_backend(case, "triton")


# ----------------------------------------------------------------------------- exactness
def _r_plus_x(r, x):
    return (r + x) if x is not None else r.clone()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda t: str(t)[6:])
def test_unsteered_rows_are_bit_identical_to_torch_add(path, dtype, knobs):
    """Slot-0 rows (and every row of a monitor-only call) equal ``residual + x`` bit for bit;
    without x they are not written at all."""
    knobs(path)
    T, d = (64 if path == "tile" else 21), 100
    g = torch.Generator().manual_seed(1)
    # magnitudes spread over 2^-20 .. 2^20 so the fp32 sum lands on many bf16/fp16 ties
    r = (torch.randn(T, d, generator=g) * 2.0 ** torch.randint(-20, 20, (T, d), generator=g))
    x = (torch.randn(T, d, generator=g) * 2.0 ** torch.randint(-20, 20, (T, d), generator=g))
    if dtype is F16:
        r, x = r.clamp(-6e4, 6e4), x.clamp(-6e4, 6e4)
    r[0, :4] = torch.tensor([1.0, 1.0, -1.0, 3.0])
    x[0, :4] = torch.tensor([2.0 ** -8, 3 * 2.0 ** -8, -(2.0 ** -8), 2.0 ** -7])  # bf16 ties
    r, x = r.to(dtype).to(DEVICE), x.to(dtype).to(DEVICE)
    V = torch.nn.functional.normalize(torch.randn(16, d, generator=g), dim=1).to(DEVICE)
    slot = (torch.arange(T) % 3 == 0).to(torch.int32).to(DEVICE)  # every third row steered
    shift = torch.full((2, 16), 0.5, device=DEVICE)
    for xx in (x, None):
        for sl in (slot, None):
            res = r.clone()
            steerkernel_junction(res, V, x=xx, slot=sl, shift=shift if sl is not None else None)
            expect = _r_plus_x(r, xx)
            keep = torch.ones(T, dtype=torch.bool) if sl is None else (slot.cpu() == 0)
            got, exp = res.cpu()[keep], expect.cpu()[keep]
            assert torch.equal(got.view(torch.int8), exp.view(torch.int8)), (xx is None, sl)


def steerkernel_junction(residual, V, **kw):
    from steerkernel.ops import junction

    return junction(residual, V, backend="triton", **kw)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_overflow_and_nan_round_like_torch(path, knobs):
    knobs(path)
    big = torch.finfo(BF16).max
    r = torch.tensor([[big, -big, 1.0, math.nan, math.inf, 0.0, -0.0, 1e-40]] * 2, dtype=BF16)
    x = torch.tensor([[big, -big, math.nan, 1.0, -1.0, -0.0, -0.0, 1e-40]] * 2, dtype=BF16)
    V = torch.eye(8)[:2].contiguous()
    res = r.clone().to(DEVICE)
    steerkernel_junction(res, V.to(DEVICE), x=x.to(DEVICE))
    expect = r + x
    nan = torch.isnan(expect)
    assert torch.equal(torch.isnan(res.cpu()), nan)
    assert torch.equal(res.cpu()[~nan].view(torch.int16), expect[~nan].view(torch.int16))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("steered", [True, False])
def test_nonfinite_row_stays_in_its_row(path, bad, steered, knobs):
    knobs(path)
    T = 40 if path == "tile" else 9
    case = make_case(T, 577, 7, F32, slots="all" if steered else "zero", seed=5,
                     device=DEVICE)
    case.kwargs["residual"][4, 10] = bad
    got = run_case(case, "triton")
    others = torch.ones(T, dtype=torch.bool)
    others[4] = False
    assert not torch.isfinite(got["scores"][4].cpu()).all()
    for k in ("scores", "residual", "out"):
        assert torch.isfinite(got[k].cpu()[others]).all(), k
    check_backend(case, "triton")  # the NaN/Inf pattern and every other value as the oracle


def _strided(t, pad, fill):
    """``t`` copied into the first columns of a wider buffer (row stride ``d + pad``)."""
    buf = torch.full((t.shape[0], t.shape[1] + pad), fill, dtype=t.dtype, device=t.device)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


@pytest.mark.parametrize("path", PATHS)
def test_rows_with_any_row_stride(path, knobs):
    """residual, x and out as row-strided views of wider buffers; scores column-major."""
    from steerkernel.ops import junction

    knobs(path)
    T, d, K = 65, 96, 9
    case = make_case(T, d, K, F16, gate="mixed", latch=True, seed=3)
    outs = {}
    for backend, dev in (("reference", "cpu"), ("triton", DEVICE)):
        kw = {k: (v.clone().to(dev) if isinstance(v, torch.Tensor) else v)
              for k, v in case.kwargs.items()}
        kw["residual"] = _strided(kw["residual"], 13, 7.0)
        kw["x"] = _strided(kw["x"], 7, 7.0)
        out = _strided(torch.zeros(T, d, dtype=F16, device=dev), 5, 9.0)
        scores = torch.full((K, T), math.nan, device=dev).T
        s, n, o = junction(**kw, backend=backend, out=out, scores=scores)
        assert o.data_ptr() == out.data_ptr() and s.stride() == (1, T)
        assert kw["residual"].stride(0) == d + 13
        outs[backend] = (kw["residual"].cpu(), s.cpu(), n.cpu(), o.cpu(), kw["latch"].cpu())
        pads = torch.as_strided(o, (T, 5), (d + 5, 1), o.storage_offset() + d)
        assert (pads == 9.0).all(), "out written outside its view"
    ref, got = outs["reference"], outs["triton"]
    assert_close(got[1], ref[1], SCORE_TOLERANCES[F16], "scores")
    assert_close(got[2], ref[2], SCORE_TOLERANCES[F16], "norms")
    assert_close(got[0], ref[0], TOLERANCES[F16], "residual")
    assert_close(got[3], ref[3], TOLERANCES[F16], "out")
    assert torch.equal(got[4], ref[4])


# ----------------------------------------------------------------------------- gates and latch
@pytest.mark.parametrize("path", PATHS)
def test_latch_is_read_as_of_call_start(path, knobs):
    """Two tokens of one slot in one call: only the one above threshold is steered, although
    the other comes later; the latch is set for the next call, which steers both."""
    knobs(path)
    d = 16
    V = torch.eye(d)[:2].contiguous().to(DEVICE)
    shift = torch.tensor([[0.0, 0.0], [0.0, 1.0]], device=DEVICE)
    gc = torch.tensor([-1, 0], dtype=torch.int32, device=DEVICE)
    thr = torch.tensor([0.0, 0.5], device=DEVICE)
    latch = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    slot = torch.ones(2, dtype=torch.int32, device=DEVICE)
    r = torch.zeros(2, d, device=DEVICE)
    r[0, 0] = 1.0  # fires
    for expect in ([1.0, 0.0], [2.0, 1.0]):
        steerkernel_junction(r, V, slot=slot, shift=shift, gate_concept=gc,
                             gate_threshold=thr, latch=latch)
        assert r[:, 1].cpu().tolist() == expect
        assert latch.cpu().tolist() == [0, 1]


def _raw_args(case):
    from steerkernel.ops.junction import prepare_junction

    return prepare_junction(**case.kwargs, backend="reference").args


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_slots_and_gate_concepts_via_raw_op(path, knobs):
    """The raw op (no validation): slots outside [0, P) act as slot 0, gate concepts outside
    [-1, K) never fire (but a latched slot is still steered); latch values other than 0/1."""
    knobs(path)
    case = make_case(33, 64, 5, F32, P=6, gate="mixed", latch=True, slots="all", seed=9)
    args = _raw_args(case)
    slot = args.slot
    slot[::4] = torch.tensor([-1, 6, 2**31 - 1, -(2**31), 7, -5, 100, 6, 1])[: slot[::4].numel()]
    args.gate_concept[:] = torch.tensor([-1, 5, -2, 1, 99, 0], dtype=torch.int32)
    args.latch[:] = torch.tensor([0, 0, 3, 0, 1, 0], dtype=torch.int32)
    ref = {k: a.clone() if isinstance(a, torch.Tensor) else a for k, a in args._asdict().items()}
    junction_reference_(**ref)
    got = {k: a.to(DEVICE).clone() if isinstance(a, torch.Tensor) else a
           for k, a in args._asdict().items()}
    tj.junction_triton_(**got)
    for name, tol in (("residual", TOLERANCES[F32]), ("scores", SCORE_TOLERANCES[F32]),
                      ("norms", SCORE_TOLERANCES[F32]), ("out", TOLERANCES[F32])):
        assert_close(got[name], ref[name], tol, name)
    assert torch.equal(got["latch"].cpu(), ref["latch"])


def test_path_choice(monkeypatch):
    monkeypatch.setattr(tj, "FORCE_PATH", None)
    assert tj.choose_path(1, 4096, 171) == "row"
    assert tj.choose_path(8192, 4096, 171) == "tile"
    assert tj.choose_path(8192, 4096, 4) == "row"       # few concepts: stream V per row
    assert tj.choose_path(8192, 4096, 1000) == "row"    # too many for the tile kernel
    assert tj.choose_path(2, 2 ** 20, 2) == "chunked"
    r = torch.zeros(64, 32, device=DEVICE)
    V = torch.nn.functional.normalize(torch.ones(300, 32), dim=1).to(DEVICE)
    with pytest.raises(ValueError, match="K <= 256"):
        tj.junction_triton_(residual=r, V=V, scores=torch.empty(64, 300, device=DEVICE),
                            norms=torch.empty(64, device=DEVICE), path="tile")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_plain_add_rmsnorm_without_V(path, dtype, knobs):
    """V None (K = 0): every kernel is the fused add + RMSNorm alone, as the reference."""
    knobs(path, **_fast(70))
    for T, d, with_x in ((3, 96, True), (70, 200, True), (5, 96, False)):
        case = make_case(T, d, 0, dtype, slots="none", with_x=with_x, seed=T, device=DEVICE)
        check_backend(case, "triton")
        got = run_case(case, "triton")
        assert got["scores"] is None
        expect = case.kwargs["residual"] + case.kwargs["x"] if with_x else case.kwargs["residual"]
        assert torch.equal(got["residual"], expect)


# ----------------------------------------------------------------------------- GPU arithmetic
@pytest.fixture
def tf32_tensor_cores(monkeypatch):
    """Make the interpreter's ``tl.dot(..., input_precision="tf32")`` truncate fp32 operands
    to TF32 (10 explicit mantissa bits) like the GPU's tensor cores."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter as interp

    orig = interp.InterpreterBuilder.create_dot

    def tf32(h):
        if h.data.dtype != np.float32:
            return h
        return interp.TensorHandle((h.data.view(np.int32) & np.int32(-8192)).view(np.float32),
                                   h.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = tf32(a), tf32(b)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


@pytest.mark.skipif(not INTERPRETED, reason="emulates the GPU under the interpreter")
@pytest.mark.parametrize("dtype,v_dtype", [(F32, F32), (BF16, F32), (F16, "model")],
                         ids=["fp32-V32", "bf16-V32", "fp16-Vmodel"])
def test_tile_kernel_is_exact_enough_on_tf32_tensor_cores(dtype, v_dtype, knobs,
                                                          tf32_tensor_cores):
    knobs("tile")
    case = make_case(64, 1024, 171, dtype, gate="mixed", latch=True, slots="all",
                     v_dtype=v_dtype, seed=2)
    check_backend(case, "triton")


@pytest.mark.skipif(not INTERPRETED, reason="emulates the GPU under the interpreter")
def test_tf32_emulation_would_catch_a_plain_tf32_dot(knobs, tf32_tensor_cores, monkeypatch):
    """The emulation is not vacuous: without the hi/lo split the scores miss the tolerance."""
    knobs("tile")
    monkeypatch.setattr(tj, "_tf32_split", _no_split)
    case = make_case(32, 512, 16, BF16, slots="none", v_dtype=F32, seed=2)
    with pytest.raises(AssertionError, match="scores"):
        check_backend(case, "triton")


if _OK:
    import triton
    import triton.language as tl

    @triton.jit
    def _no_split(a):
        return a, a * 0.0
else:  # pragma: no cover
    _no_split = None


_SM90_SCRIPT = textwrap.dedent(r"""
    import os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from steerkernel.backends import triton_junction as tj
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptr = dict(res_ptr="D", x_ptr="D", V_ptr="V", slot_ptr="i32", shift_ptr="fp32",
               lo_ptr="fp32", hi_ptr="fp32", gc_ptr="i32", thr_ptr="fp32", above_ptr="u8",
               latch_ptr="i32", fired_ptr="i32", w_ptr="D", out_ptr="D", scores_ptr="fp32",
               norms_ptr="fp32", dq_ptr="fp32")
    flags = dict(HAS_X=True, HAS_SLOT=True, HAS_GATE=True, HAS_LATCH=True, HAS_W=True)
    def compile_(kernel, consts, D, V, num_warps):
        sig = {}
        for i, n in enumerate(kernel.arg_names):
            if n in ptr:
                sig[n] = "*" + ptr[n].replace("D", D).replace("V", V)
            elif i in kernel.constexprs:
                sig[n] = "constexpr"
            else:
                sig[n] = "fp32" if n == "eps" else "i32"
        k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=tj.TILE_NUM_STAGES))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([ptxas, "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        m = re.search(r"(\d+) bytes spill stores", log)
        return int(m.group(1)) if m else -1
    bad = []
    jobs = []
    for kp in sys.argv[1].split(","):
        kp = int(kp)
        for D, V in (("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")):
            cfg = tj.tile_config(kp, V == "fp32")
            w = cfg.pop("num_warps")
            jobs.append((f"tile kp={kp} {D}/{V}", tj._junction_tile_kernel,
                         dict(flags, H_SPLIT=D == "fp32", V_SPLIT=V == "fp32", **cfg), D, V, w))
    jobs.append(("row d=4096 bf16/fp32", tj._junction_row_kernel,
                 dict(flags, BLOCK_D=4096, BLOCK_K=1), "bf16", "fp32", 8))
    jobs.append(("chunked fp16/fp16", tj._junction_chunked_kernel,
                 dict(flags, BLOCK_D=1024, BLOCK_K=2), "fp16", "fp16", 4))
    for name, kernel, consts, D, V, w in jobs:
        spills = compile_(kernel, consts, D, V, w)
        print(name, "spill bytes:", spills)
        if spills != 0:
            bad.append(name)
    sys.exit(1 if bad else 0)
""")


def test_kernels_compile_for_h100_without_spills():
    """Compile for sm_90a offline (no GPU needed) and read ptxas' spill count: catches code
    the interpreter accepts but the compiler does not, and block sizes that spill."""
    try:
        import triton as _triton
    except ImportError:  # pragma: no cover
        pytest.skip("triton not installed")
    ptxas = os.path.join(os.path.dirname(_triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT, "16,256"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
