"""The junction op: every native backend against the float64 reference, exactness properties,
NaN isolation, bad input, opcheck and torch.compile.

Triton runs under the CPU interpreter in its own file (tests/test_triton_junction.py) because
the interpreter is slow; on a GPU machine it joins the grid here.
"""
import itertools
import math
import subprocess
import sys

import pytest
import torch

import steerkernel
from steerkernel import backends
from steerkernel.ops import JunctionArgs, junction
from steerkernel.testing import (KINDS, SCORE_TOLERANCES, TOLERANCES, assert_close,
                                 check_backend, make_case, run_case, to_device)

from conftest import native_backends

NATIVE = native_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DS, KS, TS = [64, 577, 769, 4096], [1, 7, 64, 171], [1, 3, 128]


def test_cpu_extension_is_built():
    ok, why = backends.backend_status()["cpu"]
    assert ok, why
    assert NATIVE, "no native backend available"


# Every (dtype, d, K, T) of the grid; the optional features rotate through the grid so
# each combination of (gate mode, latch, strided scores, x, norm, V dtype) is hit many times.
GRID = list(itertools.product(DTYPES, DS, KS, TS))
FEATURES = list(itertools.product([None, "above", "below", "mixed"], [False, True],
                                  [False, True], [True, False], [True, False]))


@pytest.mark.parametrize("backend,device", NATIVE, ids=[b for b, _ in NATIVE])
@pytest.mark.parametrize("dtype,d,K,T", GRID,
                         ids=[f"{str(dt)[6:]}-d{d}-K{K}-T{T}" for dt, d, K, T in GRID])
def test_matches_reference_grid(backend, device, dtype, d, K, T):
    i = GRID.index((dtype, d, K, T))
    gate, latch, strided, with_x, with_norm = FEATURES[i % len(FEATURES)]
    v_dtype = torch.float32 if i % 3 else "model"
    case = make_case(T, d, K, dtype, gate=gate, latch=latch and gate is not None,
                     strided_scores=strided, with_x=with_x, with_norm=with_norm,
                     v_dtype=v_dtype, weight_dtype=torch.float32 if i % 2 else None,
                     device=device)
    check_backend(case, backend)


@pytest.mark.parametrize("backend,device", NATIVE, ids=[b for b, _ in NATIVE])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_each_intervention_kind(backend, device, kind, dtype):
    case = make_case(37, 577, 9, dtype, kinds=(kind,), slots="all", device=device)
    check_backend(case, backend)


@pytest.mark.parametrize("backend,device", NATIVE, ids=[b for b, _ in NATIVE])
@pytest.mark.parametrize("gate,latch", [("above", False), ("below", False), ("mixed", True),
                                        ("above", True), ("below", True)])
def test_gates(backend, device, gate, latch):
    for seed in range(4):
        case = make_case(64, 200, 13, torch.float32, P=7, gate=gate, latch=latch, seed=seed,
                         device=device)
        check_backend(case, backend)


@pytest.mark.parametrize("backend,device", NATIVE, ids=[b for b, _ in NATIVE])
def test_monitor_only(backend, device):
    case = make_case(50, 333, 11, torch.bfloat16, slots="none", device=device)
    check_backend(case, backend)
    r, x = case.kwargs["residual"], case.kwargs["x"]
    got = run_case(case, backend)
    assert torch.equal(got["residual"], r + x)


# ----------------------------------------------------------------------------- exactness
def _orthogonal_case(dtype, device, kinds, P=3, T=16, d=256, K=8):
    return make_case(T, d, K, dtype, P=P, kinds=kinds, slots="all", orthogonal=True,
                     with_norm=False, device=device)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
def test_ablation_leaves_zero_projection(backend, device):
    case = _orthogonal_case(torch.float32, device, ("ablate",))
    got = run_case(case, backend)
    V = case.kwargs["V"].double()
    p_after = got["residual"].double() @ V.T
    scale = float(got["scores"].abs().max())
    assert float(p_after.abs().max()) < 1e-5 * scale


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
def test_add_moves_orthogonal_projection_by_alpha(backend, device):
    case = _orthogonal_case(torch.float32, device, ("add", "noop"))
    got = run_case(case, backend)
    kw = case.kwargs
    V = kw["V"].double()
    slot = kw["slot"].long()
    alpha = kw["shift"].double()[slot]  # [T, K]; noop concepts have shift 0
    moved = got["residual"].double() @ V.T - got["scores"].double()
    scale = float(got["scores"].abs().max()) + 3
    assert torch.allclose(moved, alpha, atol=2e-6 * scale, rtol=0)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_slot_zero_is_bit_identical_to_residual_plus_x(backend, device, dtype):
    case = make_case(40, 769, 7, dtype, slots="zero", device=device)
    kw = case.kwargs
    expected = kw["residual"] + kw["x"]
    got = run_case(case, backend)
    assert torch.equal(got["residual"], expected)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
def test_noop_rows_are_bit_identical(backend, device):
    """An active slot whose every concept is a no-op changes nothing (q - p == 0 exactly)."""
    case = make_case(24, 300, 5, torch.bfloat16, kinds=("noop",), slots="all", device=device)
    kw = case.kwargs
    expected = kw["residual"] + kw["x"]
    got = run_case(case, backend)
    assert torch.equal(got["residual"], expected)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
def test_gate_at_exact_threshold_does_not_fire(backend, device):
    """With basis directions the projection is exact, so p == threshold can be tested."""
    d, K, T = 16, 4, 6
    V = torch.eye(d)[:K].contiguous().to(device)
    residual = torch.zeros(T, d, device=device)
    residual[:, 0] = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, 2.0])
    slot = torch.tensor([1, 1, 1, 2, 2, 2], dtype=torch.int32, device=device)
    shift = torch.zeros(3, K, device=device)
    shift[1:, 1] = 5.0
    gc = torch.tensor([-1, 0, 0], dtype=torch.int32, device=device)
    thr = torch.tensor([0.0, 2.0, 2.0], device=device)
    above = torch.tensor([True, True, False], device=device)
    junction(residual, V, slot=slot, shift=shift, gate_concept=gc, gate_threshold=thr,
             gate_above=above, backend=backend)
    # slot 1 (above 2): only p=3 fires; slot 2 (below 2): only p=1 fires
    assert residual[:, 1].tolist() == [0.0, 0.0, 5.0, 0.0, 5.0, 0.0]


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
def test_latch_keeps_firing_across_calls(backend, device):
    d, K = 8, 2
    V = torch.eye(d)[:K].contiguous().to(device)
    shift = torch.tensor([[0.0, 0.0], [0.0, 1.0]], device=device)
    gc = torch.tensor([-1, 0], dtype=torch.int32, device=device)
    thr = torch.tensor([0.0, 0.5], device=device)
    latch = torch.zeros(2, dtype=torch.int32, device=device)
    slot = torch.ones(1, dtype=torch.int32, device=device)
    steered = []
    for p0 in [0.0, 1.0, 0.0, 0.0]:  # gate fires only on the second step
        r = torch.zeros(1, d, device=device)
        r[0, 0] = p0
        junction(r, V, slot=slot, shift=shift, gate_concept=gc, gate_threshold=thr,
                 latch=latch, backend=backend)
        steered.append(float(r[0, 1]))
    assert steered == [0.0, 1.0, 1.0, 1.0]
    assert latch.tolist() == [0, 1]


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_row_stays_in_its_row(backend, device, bad):
    case = make_case(9, 577, 7, torch.float32, gate="mixed", latch=False, device=device)
    case.kwargs["residual"][4, 10] = bad
    got = run_case(case, backend)
    ref_case = make_case(9, 577, 7, torch.float32)  # shape donor only
    del ref_case
    s = got["scores"]
    assert not torch.isfinite(s[4]).all()
    others = torch.ones(9, dtype=torch.bool)
    others[4] = False
    assert torch.isfinite(s[others]).all()
    assert torch.isfinite(got["residual"][others]).all()
    assert torch.isfinite(got["out"][others]).all()
    if backend != "reference":
        check_backend(case, backend)  # the other rows equal the reference exactly as usual


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
def test_empty_batch(backend, device):
    r = torch.zeros(0, 64, device=device)
    V = torch.nn.functional.normalize(torch.randn(3, 64), dim=1).to(device)
    s, n, o = junction(r, V, weight=torch.ones(64, device=device), backend=backend)
    assert s.shape == (0, 3) and n.shape == (0,) and o.shape == (0, 64)


def test_reference_runs_in_float64():
    case = make_case(17, 129, 5, torch.float64, gate="mixed", latch=True, v_dtype=torch.float64)
    got = run_case(case, "reference")
    assert got["scores"].dtype == torch.float64 and got["out"].dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        run_case(case, "cpu")


# ----------------------------------------------------------------------------- bad input
def _good(device="cpu"):
    case = make_case(6, 64, 4, torch.float32, P=3, gate="above", latch=True, device=device)
    return dict(case.kwargs)


BAD = {
    "wrong d in V": (lambda kw: kw.update(V=torch.randn(4, 65)), ValueError, "hidden size"),
    "wrong K in tables": (lambda kw: kw.update(shift=torch.zeros(3, 5)), ValueError, "shape"),
    "x dtype": (lambda kw: kw.update(x=kw["x"].double()), TypeError, "x is torch.float64"),
    "V dtype": (lambda kw: kw.update(V=kw["V"].half()), TypeError, "V must be float32"),
    "residual int": (lambda kw: kw.update(residual=torch.zeros(6, 64, dtype=torch.int32)),
                     TypeError, "dtype"),
    "non-unit stride": (lambda kw: kw.update(residual=torch.zeros(64, 6).T), ValueError,
                        "unit stride"),
    "3-D residual": (lambda kw: kw.update(residual=torch.zeros(2, 3, 64)), ValueError, "2-D"),
    "slot int64": (lambda kw: kw.update(slot=kw["slot"].long()), TypeError, "int32"),
    "slot out of range": (lambda kw: kw["slot"].__setitem__(0, 3), ValueError, r"\[0, 3\)"),
    "negative slot": (lambda kw: kw["slot"].__setitem__(0, -1), ValueError, "slot values"),
    "gate concept out of range": (lambda kw: kw["gate_concept"].__setitem__(1, 4), ValueError,
                                  "gate_concept values"),
    "NaN shift": (lambda kw: kw["shift"].__setitem__((1, 1), math.nan), ValueError, "finite"),
    "NaN lo": (lambda kw: kw["lo"].__setitem__((1, 1), math.nan), ValueError, "NaN"),
    "slot length": (lambda kw: kw.update(slot=torch.zeros(5, dtype=torch.int32)), ValueError,
                    "entries"),
    "weight length": (lambda kw: kw.update(weight=torch.ones(63)), ValueError, "weight"),
    "negative eps": (lambda kw: kw.update(eps=-1.0), ValueError, "eps"),
    "latch without gate": (lambda kw: kw.update(gate_concept=None, gate_threshold=None,
                                                gate_above=None), ValueError, "latch"),
    "empty V": (lambda kw: kw.update(V=torch.zeros(0, 64)), ValueError, "K = 0"),
    "not a tensor": (lambda kw: kw.update(V=[[1.0] * 64]), TypeError, "torch.Tensor"),
    "meta device": (lambda kw: kw.update(x=kw["x"].to("meta")), ValueError, "is on meta"),
}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_writing(backend, name):
    mutate, exc, pattern = BAD[name]
    kw = _good()
    mutate(kw)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)
              and v.device.type != "meta"}
    scores = torch.full((kw["residual"].shape[0], 4), 7.0) if kw["residual"].dim() == 2 else None
    with pytest.raises(exc, match=pattern):
        junction(**kw, backend=backend, scores=scores)
    for k, v in before.items():
        torch.testing.assert_close(kw[k], v, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{k} was modified")
    if scores is not None:
        assert (scores == 7.0).all(), "scores were written"


def test_output_overlapping_residual_is_rejected():
    r = torch.zeros(4, 8)
    V = torch.eye(8)[:2].contiguous()
    with pytest.raises(ValueError, match="overlaps residual"):
        junction(r, V, weight=torch.ones(8), out=r)


def test_native_op_checks_direct_calls():
    """Calling the raw C++ op with inconsistent shapes raises, never reads out of bounds."""
    r = torch.zeros(4, 8)
    V = torch.zeros(2, 9)
    with pytest.raises(RuntimeError, match="V must be"):
        torch.ops.steerkernel.junction(*JunctionArgs(residual=r, V=V, scores=torch.zeros(4, 2),
                                                     norms=torch.zeros(4)))


# ----------------------------------------------------------------------------- no V: add + norm
NO_V = [("reference", "cpu")] + NATIVE


@pytest.mark.parametrize("backend,device", NO_V, ids=[b for b, _ in NO_V])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("with_x,with_norm", [(True, True), (True, False), (False, True)])
def test_plain_add_rmsnorm_without_V(backend, device, dtype, with_x, with_norm):
    """V None (K = 0): the fused add + RMSNorm alone, no scores, against the reference (and,
    for the residual, bit-identical to torch's ``residual + x``)."""
    for T, d in ((1, 64), (37, 577), (130, 4096)):
        case = make_case(T, d, 0, dtype, slots="none", with_x=with_x, with_norm=with_norm,
                         weight_dtype=torch.float32 if d == 577 else None, seed=T,
                         device=device)
        check_backend(case, backend)
        got = run_case(case, backend)
        kw = case.kwargs
        assert got["scores"] is None
        expected = kw["residual"] + kw["x"] if with_x else kw["residual"]
        assert torch.equal(got["residual"], expected)


@pytest.mark.parametrize("backend,device", NO_V, ids=[b for b, _ in NO_V])
def test_without_V_steering_and_scores_are_refused(backend, device):
    r = torch.zeros(3, 8, device=device)
    slot = torch.ones(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="slot given without V"):
        junction(r, None, slot=slot, shift=torch.zeros(2, 1, device=device), backend=backend)
    with pytest.raises(ValueError, match="scores given without V"):
        junction(r, None, scores=torch.zeros(3, 0, device=device), backend=backend)


@pytest.mark.skipif(not backends.backend_status()["cpu"][0], reason="no C++ CPU backend")
def test_native_op_pairs_V_with_scores():
    r, n = torch.zeros(4, 8), torch.zeros(4)
    V = torch.eye(8)[:2].contiguous()
    op = torch.ops.steerkernel.junction.default
    with pytest.raises(RuntimeError, match="V given without scores"):
        op(*JunctionArgs(residual=r, V=V, norms=n))
    with pytest.raises(RuntimeError, match="scores given without V"):
        op(*JunctionArgs(residual=r, scores=torch.zeros(4, 2), norms=n))
    op(*JunctionArgs(residual=r, norms=n))  # a plain add (nothing to add): norms only
    assert torch.equal(n, torch.zeros(4))


# ----------------------------------------------------------------------------- selection
def test_backend_selection_and_env(monkeypatch):
    assert backends.resolve(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("STEERKERNEL_BACKEND", "reference")
    assert backends.resolve(torch.device("cpu")) == "reference"
    assert backends.resolve(torch.device("cpu"), "cpu") == "cpu"  # argument wins
    monkeypatch.setenv("STEERKERNEL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve(torch.device("cpu"))
    monkeypatch.delenv("STEERKERNEL_BACKEND")
    with pytest.raises(backends.BackendUnavailable, match="CUDA"):
        backends.resolve(torch.device("cpu"), "cuda")


# ----------------------------------------------------------------------------- torch.library
def _op_args(case):
    from steerkernel.ops.junction import prepare_junction

    return tuple(prepare_junction(**case.kwargs).args)


OPS = [("junction_reference", "cpu")] + [("junction", d) for b, d in NATIVE if b != "triton"]
if backends.backend_status()["triton"][0]:
    OPS.append(("junction_triton", "cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("op_name,device", OPS, ids=[f"{o}-{d}" for o, d in OPS])
@pytest.mark.parametrize("variant", ["steer", "monitor"])
def test_opcheck(op_name, device, variant):
    op = getattr(torch.ops.steerkernel, op_name).default
    case = make_case(5, 64, 3, torch.float32, P=3, gate="mixed", latch=True,
                     slots="random" if variant == "steer" else "none", device=device, seed=3)
    torch.library.opcheck(op, _op_args(case))


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + NATIVE,
                         ids=["reference"] + [b for b, _ in NATIVE])
def test_torch_compile_sees_the_op(backend, device):
    case = make_case(8, 64, 5, torch.float32, P=3, gate="above", device=device, seed=1)

    def step(kw):
        s, n, o = junction(**kw, backend=backend, check_values=False)
        return s * 2, n, o

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    kw1 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.kwargs.items()}
    kw2 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.kwargs.items()}
    a = step(kw1)
    b = compiled(kw2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(kw1["residual"], kw2["residual"])


FIRST_CALL_COMPILED = r"""
import sys, torch
from steerkernel.ops import junction
backend = None if sys.argv[1] == "auto" else sys.argv[1]
f = lambda r, x, w: junction(r, None, x=x, weight=w, backend=backend)[2]
r, x, w = torch.randn(4, 8), torch.randn(4, 8), torch.rand(8) + 0.5
r2 = r.clone()
got = torch.compile(f, backend="eager", fullgraph=True)(r, x, w)  # the process's first call
want = junction(r2, None, x=x, weight=w, backend="reference")[2]
torch.testing.assert_close(got, want)
print("ok")
"""


@pytest.mark.parametrize("backend", ["auto", "reference"] + [b for b, _ in NATIVE])
def test_torch_compile_fullgraph_as_the_first_call(backend):
    """The backend is probed (extension loaded, dispatch table read) on first use; when that
    first use is inside torch.compile(fullgraph=True) the choice is made at trace time instead
    of being traced (it once failed: 'Failed to trace builtin operator')."""
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL_COMPILED, backend],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_reference_backend_records_no_autograd_history():
    """Like the kernels, the oracle leaves no grad_fn on the buffers it writes when an input
    requires grad, and may write buffers made under inference mode."""
    residual, w = torch.randn(3, 8), torch.ones(8)
    x = torch.randn(3, 8, requires_grad=True)
    junction(residual, None, x=x, weight=w, backend="reference")
    assert residual.grad_fn is None and not residual.requires_grad
    junction(residual, None, x=torch.randn(3, 8), weight=w, backend="reference")  # accepted
    with torch.inference_mode():
        scores, norms = torch.zeros(3, 2), torch.zeros(3)
    r = torch.randn(3, 8)
    want = junction(r.clone(), torch.eye(2, 8), x=torch.ones(3, 8), backend="reference")
    junction(r, torch.eye(2, 8), x=torch.ones(3, 8), scores=scores, norms=norms,
             backend="reference")
    assert torch.equal(scores, want[0]) and torch.equal(norms, want[1])


def test_public_api_names():
    import inspect

    params = list(inspect.signature(steerkernel.ops.junction).parameters)
    assert params[:13] == ["residual", "V", "x", "slot", "shift", "lo", "hi", "gate_concept",
                           "gate_threshold", "gate_above", "weight", "eps", "backend"]


# ----------------------------------------------------------------------------- one contract
SCHEMA_OPS = ["junction_reference"] + (["junction"] if NATIVE else []) + \
    (["junction_triton"] if backends.backend_status()["triton"][0] else [])


@pytest.mark.parametrize("name", SCHEMA_OPS)
def test_every_op_has_the_generated_schema(name):
    """The schema of every registered junction op (the C++ one is spelled in csrc/ops.cpp) is
    the one generated from steerkernel/ops/args.py."""
    from steerkernel.ops.args import SCHEMA

    got = getattr(torch.ops.steerkernel, name).default._schema
    want = torch._C.parse_schema(f"steerkernel::{name}{SCHEMA}")
    assert str(got) == str(want)
    assert got == want


def test_argument_table_drives_the_python_signatures():
    import inspect

    from steerkernel.ops import ARGS, JunctionArgs, junction_reference_

    names = [a.name for a in ARGS]
    assert list(JunctionArgs._fields) == names
    assert list(inspect.signature(junction_reference_).parameters) == names
    assert set(inspect.signature(steerkernel.ops.junction).parameters) >= set(names)
    assert JunctionArgs(residual=None).eps == 1e-6

