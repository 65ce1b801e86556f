"""The Triton junction backend against the float64 reference, on every path it has.

Runs on a GPU when there is one, else under Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set below before triton is imported).  The interpreter is slow, so the grid is a curated
rotation through dtype x d x K x T x path x feature rather than the full product.  Extra checks
on top of ``check_backend``:

* slot-0 / monitor-only rows bit-identical to torch's ``residual + x`` (bf16 ties included);
* NaN / Inf rows stay in their row; out-of-range slots and gate concepts via the raw op;
* rows with any row stride; the latch read as of call start; the per-device latch scratch left
  zero after every call; V changed in place between calls;
* both paths give the same bits for a row, whatever the batch size and the row's position;
* under an emulation of the GPU's bf16 tensor cores (dot operands rounded to bf16) every dot
  operand is already bf16-exact, and an unsplit fp32 V would miss the tolerance;
* every kernel variant the launcher can pick compiles for sm_90a with the launches'
  specialisation and without register spills (offline, needs only ptxas), and the tile and
  split kernels share the layouts batch invariance relies on.
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

from steerkernel.testing import host_matmul_is_shape_invariant  # noqa: E402

from steerkernel import backends  # noqa: E402
from steerkernel.ops.reference import junction_reference_  # noqa: E402
from steerkernel.testing import (SCORE_TOLERANCES, TOLERANCES, assert_close,  # noqa: E402
                                 check_backend, make_case, run_case)

_OK, _WHY = backends.backend_status()["triton"]
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_WHY}")
if _OK:
    from steerkernel.backends import triton_junction as tj
    from steerkernel.backends import triton_kernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = backends.triton_interpreted() and DEVICE == "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
PATHS = ("split", "tile")


@pytest.fixture
def knobs(monkeypatch):
    """Force a path / set module knobs for one test: ``knobs(path=..., TILE_MIN_ROWS=...)``."""
    def set_(path=None, **consts):
        monkeypatch.setattr(tj, "FORCE_PATH", path)
        for k, v in consts.items():
            assert hasattr(tj, k), k
            monkeypatch.setattr(tj, k, v)
    return set_


def test_paths_are_the_modules():
    assert tj.PATHS == PATHS
    for alias in ("row", "chunked"):
        assert tj.path_applies(alias, 1, 64, 4)


# ----------------------------------------------------------------------------- the grid
# (dtype, d, K, T, path, features); features: gate, latch, strided scores, x, norm, V dtype,
# weight dtype.  Every dtype x d x K x T value and every path occurs, each feature both ways.
GRID = [
    # dtype d    K   T    path     gate     latch  strided x      norm   V        weight
    (F32, 64, 1, 1, "split", None, False, False, True, True, F32, None),
    (F32, 577, 7, 3, "split", "above", True, True, True, True, "model", F32),
    (F32, 769, 64, 3, "row", "mixed", True, False, False, True, F32, None),
    (F32, 64, 7, 128, "tile", "below", False, True, True, False, F32, None),
    (F32, 577, 64, 128, "tile", "mixed", True, False, True, True, F32, F32),
    (F32, 769, 1, 17, "split", "above", False, False, False, False, F32, None),
    (F32, 769, 7, 1, "tile", "mixed", True, True, True, True, F32, None),
    (BF16, 64, 64, 3, "split", "mixed", True, True, True, True, F32, F32),
    (BF16, 577, 1, 3, "chunked", "above", False, False, True, True, "model", None),
    (BF16, 769, 7, 128, "tile", "above", True, True, True, True, F32, None),
    (BF16, 577, 64, 128, "tile", None, False, False, False, True, "model", F32),
    (BF16, 769, 64, 1, "split", "below", True, False, True, False, "model", None),
    (BF16, 64, 7, 17, "split", None, False, True, False, True, F32, None),
    (BF16, 577, 7, 128, "split", "mixed", True, False, True, True, F32, None),
    (BF16, 64, 1, 128, "tile", "below", True, False, True, True, "model", F32),
    (F16, 64, 7, 1, "split", "below", False, True, True, True, "model", F32),
    (F16, 577, 64, 17, "split", "mixed", False, True, True, True, F32, None),
    (F16, 769, 1, 3, "split", None, False, False, True, True, F32, F32),
    (F16, 769, 64, 128, "tile", "above", True, True, False, True, F32, None),
    (F16, 64, 7, 128, "split", "below", True, False, True, True, "model", None),
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
    knobs(path)
    case = make_case(T, d, K, dt, gate=gate, latch=latch and gate is not None,
                     strided_scores=strided, with_x=x, with_norm=norm, v_dtype=vd,
                     weight_dtype=wd, seed=hash(_id(c)) % 2**31, device=DEVICE)
    check_backend(case, "triton")


@pytest.mark.parametrize("path,dtype,T,d,K", [
    ("split", BF16, 3, 4096, 7),     # 16 segments of 4 d-chunks
    ("tile", BF16, 64, 577, 171),    # 3 K-chunks of 64 (the tile maximum is 4)
    ("tile", BF16, 65, 300, 256),    # 4 K-chunks, two row tiles
    ("split", F32, 1, 769, 171),     # decode: 3 K-chunks x 4 segments of 16 d-chunks
    ("split", F16, 2, 1024, 300),    # K beyond the tile path: 5 K-chunks
])
def test_large_d_and_K(path, dtype, T, d, K, knobs):
    knobs(path)
    case = make_case(T, d, K, dtype, gate="mixed", latch=True, v_dtype=F32, seed=d + K,
                     device=DEVICE)
    check_backend(case, "triton")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("slots", ["none", "zero", "all"])
def test_slot_modes(path, slots, knobs):
    knobs(path)
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
    assert tj.choose_path(1, 4096, 171, BF16) == "split"
    assert tj.choose_path(64, 4096, 171, BF16) == "split"
    assert tj.choose_path(8192, 4096, 171, BF16) == "tile"
    assert tj.choose_path(8192, 4096, 4) == "tile"
    assert tj.choose_path(8192, 4096, 1000) == "split"     # too many for the tile path
    assert tj.choose_path(2, 2 ** 20, 2) == "split"
    assert tj.path_applies("tile", 8192, 4096, 256) and not tj.path_applies("tile", 1, 64, 257)
    assert tj.path_applies("split", 1, 64, 100000)
    monkeypatch.setattr(tj, "FORCE_PATH", "row")
    assert tj.choose_path(8192, 4096, 171) == "split"
    r = torch.zeros(64, 32, device=DEVICE)
    V = torch.nn.functional.normalize(torch.ones(300, 32), dim=1).to(DEVICE)
    with pytest.raises(ValueError, match="K <= 256"):
        tj.junction_triton_(residual=r, V=V, scores=torch.empty(64, 300, device=DEVICE),
                            norms=torch.empty(64, device=DEVICE), path="tile")


# ----------------------------------------------------------------------------- invariance
def _pool(T, d, K, P, dtype, seed):
    """T rows, every one steered by a gated slot (thresholds set per test)."""
    g = torch.Generator().manual_seed(seed)
    t = dict(residual=torch.randn(T, d, generator=g).to(dtype),
             x=torch.randn(T, d, generator=g).to(dtype),
             V=torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=1),
             slot=torch.randint(1, P, (T,), generator=g).to(torch.int32),
             shift=torch.randn(P, K, generator=g), lo=torch.full((P, K), -math.inf),
             hi=torch.full((P, K), math.inf),
             gate_concept=torch.randint(0, K, (P,), generator=g).to(torch.int32),
             gate_above=torch.rand(P, generator=g) < 0.5,
             weight=torch.rand(d, generator=g).to(dtype) + 0.5)
    return {k: v.to(DEVICE) for k, v in t.items()}


def _run(pool, rows, thr, path):
    from steerkernel.ops import junction

    kw = dict(pool)
    for name in ("residual", "x", "slot"):
        kw[name] = pool[name][rows].clone()
    kw["gate_threshold"] = thr
    kw["latch"] = torch.zeros_like(pool["gate_concept"])
    old, tj.FORCE_PATH = tj.FORCE_PATH, path
    try:
        s, n, o = junction(**kw, backend="triton", check_values=False)
    finally:
        tj.FORCE_PATH = old
    return s, n, o, kw["residual"], kw["latch"]


@pytest.mark.parametrize("dtype,d,K", [(F32, 96, 16), (BF16, 577, 40), (F16, 200, 171),
                                       (BF16, 300, 256)],
                         ids=["fp32", "bf16", "fp16-K171", "bf16-K256"])
def test_paths_give_a_row_the_same_bits(dtype, d, K):
    """A row's scores, norm, out and residual are the same bits on both paths, alone or in a
    batch of 130 rows (three row tiles) at any position (design.md §2); so are the gate
    decisions, which compare those scores (the latch after the batch)."""
    if DEVICE == "cpu" and not host_matmul_is_shape_invariant():
        pytest.skip("Triton interpreter on a host whose numpy matmul sums a row in a "
                    "shape-dependent order (steerkernel.testing.host_matmul_is_shape_invariant)"
                    ": bit identity is the GPU kernel's property, not checkable here")
    P, T = 4, 130
    pool = _pool(T, d, K, P, dtype, seed=d + K)
    thr = torch.zeros(P, device=DEVICE)
    perm = torch.arange(T).roll(7)
    batch = {(path, k): _run(pool, rows, thr, path)
             for path in PATHS for k, rows in (("id", torch.arange(T)), ("roll", perm))}
    for path in PATHS:
        assert torch.equal(batch[(path, "id")][4], batch[("split", "id")][4]), "latch"
    for i in (0, 63, 64, 129):
        ref = _run(pool, torch.tensor([i]), thr, "split")
        for path in PATHS:
            for what, got, pos in (("alone", _run(pool, torch.tensor([i]), thr, path), 0),
                                   ("batch", batch[(path, "id")], i),
                                   ("rolled", batch[(path, "roll")], (i + 7) % T)):
                for k, name in enumerate(("scores", "norm", "out", "residual")):
                    assert torch.equal(got[k][pos], ref[k][0]), \
                        f"{name} differs: {path} {what}, row {i} at {pos}"


# ----------------------------------------------------------------------------- scratch
@pytest.mark.parametrize("path", PATHS)
def test_latch_scratch_is_left_zero(path, knobs):
    """The per-device ``fired`` flags and arrival counters are re-zeroed by each call's last
    program (no extra launch), so the next call starts clean; the latch equals the
    reference's after every call of a sequence."""
    knobs(path)
    case = make_case(70, 96, 9, BF16, gate="mixed", latch=True, P=6, seed=4, device=DEVICE)
    latch = case.kwargs["latch"].clone()
    for step in range(3):
        case.kwargs["latch"] = latch.clone()
        got = run_case(case, "triton")
        ref = run_case(case, "reference")
        assert torch.equal(got["latch"].cpu(), ref["latch"].cpu()), step
        latch = ref["latch"]
        for per_device in tj._SCRATCH.values():
            for name, t in per_device.items():
                assert int(t.abs().sum()) == 0, f"{name} left non-zero after call {step}"


@pytest.mark.parametrize("path", PATHS)
def test_V_changed_in_place_between_calls(path, knobs):
    """Nothing is cached from V across calls (the tile path splits it per call)."""
    knobs(path)
    case = make_case(9, 64, 5, BF16, gate="above", seed=8, device=DEVICE)
    check_backend(case, "triton")
    V = case.kwargs["V"]
    V.copy_(torch.nn.functional.normalize(torch.randn(V.shape), dim=1).to(DEVICE))
    check_backend(case, "triton")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_residuals_device_not_the_current_one():
    case = make_case(65, 96, 9, BF16, gate="mixed", latch=True, seed=3, device="cuda:1")
    with torch.cuda.device(0):
        for path in PATHS:
            tj.FORCE_PATH = path
            try:
                check_backend(case, "triton")
            finally:
                tj.FORCE_PATH = None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_plain_add_rmsnorm_without_V(path, dtype, knobs):
    """V None (K = 0): every kernel is the fused add + RMSNorm alone, as the reference."""
    knobs(path)
    for T, d, with_x in ((3, 96, True), (70, 200, True), (5, 96, False)):
        case = make_case(T, d, 0, dtype, slots="none", with_x=with_x, seed=T, device=DEVICE)
        check_backend(case, "triton")
        got = run_case(case, "triton")
        assert got["scores"] is None
        expect = case.kwargs["residual"] + case.kwargs["x"] if with_x else case.kwargs["residual"]
        assert torch.equal(got["residual"], expect)


# ----------------------------------------------------------------------------- GPU arithmetic
def _bf16_round(a):
    """fp32 numpy array rounded to nearest-even bf16 (kept as fp32), NaN kept."""
    import numpy as np

    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a), a, r)


@pytest.fixture
def bf16_tensor_cores(monkeypatch):
    """Make the interpreter's ``tl.dot`` round its fp32 operands to bf16, as the GPU path's
    ``.to(bf16)`` before its MMA would; records whether any operand was not bf16-exact."""
    import numpy as np
    from triton.runtime import interpreter as interp

    orig = interp.InterpreterBuilder.create_dot
    inexact = []

    def rnd(h):
        if h.data.dtype != np.float32:
            return h
        r = _bf16_round(h.data)
        fin = np.isfinite(h.data)
        if not np.array_equal(r[fin], h.data[fin]):
            inexact.append(h.data.shape)
        return interp.TensorHandle(r, h.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, rnd(a), rnd(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)
    return inexact


@pytest.mark.skipif(not INTERPRETED, reason="emulates the GPU under the interpreter")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,v_dtype", [(F32, F32), (BF16, F32), (F16, "model"),
                                           (BF16, "model")],
                         ids=["fp32-V32", "bf16-V32", "fp16-Vmodel", "bf16-Vmodel"])
def test_every_mma_operand_is_bf16_exact(path, dtype, v_dtype, knobs, bf16_tensor_cores):
    knobs(path)
    case = make_case(64, 320, 171, dtype, gate="mixed", latch=True, slots="all",
                     v_dtype=v_dtype, seed=2)
    check_backend(case, "triton")
    assert not bf16_tensor_cores, f"operands not bf16-exact: {bf16_tensor_cores[:3]}"


@pytest.mark.skipif(not INTERPRETED, reason="emulates the GPU under the interpreter")
def test_bf16_emulation_would_catch_an_unsplit_fp32_V(knobs, bf16_tensor_cores, monkeypatch):
    """The emulation is not vacuous: without the hi/lo split the scores miss the tolerance."""
    knobs("tile")
    monkeypatch.setattr(tk, "_pieces", _no_split)
    case = make_case(32, 512, 16, BF16, slots="none", v_dtype=F32, seed=2)
    with pytest.raises(AssertionError, match="scores"):
        check_backend(case, "triton")


if _OK:
    import triton
    import triton.language as tl

    @triton.jit
    def _no_split(a, INTERP: tl.constexpr):
        return a, a * 0.0
else:  # pragma: no cover
    _no_split = None


# ----------------------------------------------------------------------------- compile checks
_SM90_SCRIPT = textwrap.dedent(r"""
    import os, re, subprocess, sys, tempfile
    from concurrent.futures import ProcessPoolExecutor
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from steerkernel.backends import triton_junction as tj

    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    FULL = os.environ.get("STEERKERNEL_COMPILE_ALL") == "1"
    _VARIANTS = None

    def _variants():
        global _VARIANTS
        if _VARIANTS is None:
            _VARIANTS = tj.compile_variants(full=FULL)
        return _VARIANTS

    def compile_one(i):
        v = _variants()[i]
        k = triton.compile(ASTSource(fn=v.kernel, signature=v.signature,
                                     constexprs=v.constexprs, attrs=v.attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([PTXAS, "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        return (v.name, int(regs.group(1)) if regs else -1,
                int(spill.group(1)) if spill else -1, k.asm["ttgir"])

    def layouts(ttgir):
        # the Σh² reductions' layouts, and each MMA's result shape and layout, resolved to
        # their definitions
        d = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, re.M))
        sq = {d.get(m, m) for m in re.findall(
            r'"__nv_fmul_rn"\}[^\n]*-> tensor<\d+x\d+xf32, (#\w+)>', ttgir)}
        mma = {(shape, d[m]) for shape, m in re.findall(
            r"dot [^\n]*-> tensor<(\d+x\d+)xf32, (#mma\d*)>", ttgir)}
        return sq, mma

    if __name__ == "__main__":
        n = len(_variants())
        with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
            results = list(ex.map(compile_one, range(n)))
        bad = []
        print(f"{'variant':<78} regs spill")
        for name, regs, spill, _ in results:
            print(f"{name:<78} {regs:>4} {spill:>5}")
            if spill != 0 or regs < 0:
                bad.append(name)
        # batch invariance on the GPU: the tile and split kernels of one call share layouts
        by = {r[0]: r[3] for r in results}
        for combo in ("bfloat16/float32", "bfloat16/bfloat16", "float32/float32"):
            sel = {k.split()[0]: t for k, t in by.items()
                   if k.endswith(f" K=171 {combo} steer") and " d=4096 " in k and " T=64 " in k
                   and k.split()[0] in ("tile", "split.proj", "split.update")}
            tile, proj, upd = (layouts(sel[k]) for k in ("tile", "split.proj", "split.update"))
            if tile[0] != proj[0] | upd[0] or tile[1] != proj[1] | upd[1]:
                bad.append(f"layouts differ between paths ({combo}): {tile} {proj} {upd}")
        print(f"{n} variants; {len(bad)} failed")
        for b in bad:
            print("FAILED:", b)
        sys.exit(1 if bad else 0)
""")


def test_every_kernel_variant_compiles_for_h100_without_spills():
    """Compile every variant the launcher can pick (:func:`tj.compile_variants`: the set
    dispatch chooses from, with the real launches' specialisation) for sm_90a offline and
    read ptxas' register and spill counts (printed; ``pytest -s`` shows them); also that the
    tile and split kernels give the Σh² reductions and the MMAs the same layouts (batch
    invariance on the GPU).  ``STEERKERNEL_COMPILE_ALL=1``: every feature x alignment x T
    form too (~2000 variants)."""
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
    script = os.path.join(root, ".pytest_cache", "sm90_compile_check.py")
    os.makedirs(os.path.dirname(script), exist_ok=True)
    with open(script, "w") as f:
        f.write(_SM90_SCRIPT)
    proc = subprocess.run([sys.executable, script], env=env, cwd=root, capture_output=True,
                          text=True, timeout=3000)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
