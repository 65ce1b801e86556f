"""Hostile inputs at every public entry of the junction op (GitHub issue #8).

* ``steerkernel.ops.junction``: wrong types, shapes, dtypes and devices for every argument,
  NaN/Inf in tables and thresholds, bad ``eps`` / ``backend``, out-of-range slots and gate
  concepts, aliasing between outputs, inputs and the residual.  Each must raise a clear
  ``ValueError`` / ``TypeError`` (or ``BackendUnavailable``) naming the argument, and a rejected
  call must leave the residual, every input and every provided output bit-identical.
* Huge shapes (K = 100,000 with tiny d, P = 100,000, T = 100,000, d = 2^20) work and match the
  reference.
* The raw C++ op ``torch.ops.steerkernel.junction`` called directly with inconsistent shapes,
  dtypes, strides and devices must raise (``TORCH_CHECK``) before writing anything, and valid
  calls with extreme values (out-of-range slots / gate concepts, d not a multiple of any vector
  width, strided outputs) must never touch memory outside their tensors: every tensor is placed
  flush against an inaccessible (PROT_NONE) page, before and after, so an out-of-bounds read or
  write faults.  All of that runs in a subprocess, so a crash is a test failure naming the
  case, not a dead pytest.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from steerkernel import backends
from steerkernel.ops import junction

HERE = os.path.dirname(os.path.abspath(__file__))
_STATUS = backends.backend_status()
HAS_CPU = _STATUS["cpu"][0]
TRITON_MODULE = importlib.util.find_spec("steerkernel.backends.triton_junction") is not None
NO_TRITON = "steerkernel/backends/triton_junction.py does not exist yet"
#: (backend, device of the tensors it takes)
PAIRS = [("reference", "cpu")] + ([("cpu", "cpu")] if HAS_CPU else []) + \
    ([("triton", "cuda" if torch.cuda.is_available() else "cpu")]
     if TRITON_MODULE and _STATUS["triton"][0] else []) + \
    ([("cuda", "cuda")] if _STATUS["cuda"][0] else [])
BACKENDS = [b for b, _ in PAIRS]
DEVICE = dict(PAIRS)
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=f"C++ CPU backend: {_STATUS['cpu'][1]}")

T, D, K, P = 5, 16, 3, 3
#: hostile inputs tried, by kind (printed by the last test)
TRIED = {"op calls rejected": 0, "raw op calls": 0, "guarded raw calls": 0,
         "spec strings": 0, "grammatical specs": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The float64 reference stalls in BLAS's thread pool on busy cores (see
    test_properties.py); the raw-op child keeps the default threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
SENTINEL = 4096.0
TENSOR_ARGS = ("residual", "V", "x", "slot", "shift", "lo", "hi", "gate_concept",
               "gate_threshold", "gate_above", "latch", "weight", "scores", "norms", "out")


def good_kwargs(dtype=torch.float32, device="cpu"):
    """A valid call with every argument given (outputs pre-filled with a sentinel)."""
    g = torch.Generator().manual_seed(0)
    V = torch.eye(D)[torch.tensor([1, 4, 9])].contiguous()
    kw = dict(
        residual=torch.randn(T, D, generator=g).to(dtype),
        V=V,
        x=torch.randn(T, D, generator=g).to(dtype),
        slot=torch.tensor([0, 1, 2, 1, 0], dtype=torch.int32),
        shift=torch.tensor([[9.0, 9.0, 9.0], [1.0, 0.0, 0.0], [0.0, -2.0, 0.0]]),
        lo=torch.tensor([[5.0] * 3, [-math.inf, 0.0, -math.inf], [-math.inf, -1.0, -math.inf]]),
        hi=torch.tensor([[6.0] * 3, [math.inf, 0.0, math.inf], [0.5, math.inf, math.inf]]),
        gate_concept=torch.tensor([-1, -1, 0], dtype=torch.int32),
        gate_threshold=torch.tensor([0.0, 0.0, -0.25]),
        gate_above=torch.tensor([True, True, False]),
        latch=torch.tensor([0, 0, 0], dtype=torch.int32),
        weight=torch.ones(D, dtype=dtype),
        eps=1e-6,
        scores=torch.full((T, K), SENTINEL),
        norms=torch.full((T,), SENTINEL),
        out=torch.full((T, D), SENTINEL, dtype=dtype),
    )
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta":
        return t
    t = t.detach()
    if t.dtype.is_floating_point:
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()
    return t.clone()


def _snapshot(kw):
    """Bit patterns of every real tensor argument, and of the storages they live in."""
    snap = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.device.type != "meta" and not v.is_sparse:
            snap[k] = (v, _bits(v))
            base = v._base if v._base is not None else None
            if base is not None:
                snap[k + "._base"] = (base, _bits(base))
    return snap


def _assert_untouched(snap):
    for k, (t, before) in snap.items():
        assert torch.equal(_bits(t), before), f"{k} was written by a rejected call"


def reject(kw, exc, pattern, backend):
    """``junction(**kw)`` must raise ``exc`` matching ``pattern`` and write nothing."""
    snap = _snapshot(kw)
    with pytest.raises(exc, match=pattern):
        junction(**kw, backend=backend)
    _assert_untouched(snap)
    TRIED["op calls rejected"] += 1


# --------------------------------------------------------------------------- every argument
WRONG_DTYPE = {
    "residual": torch.int32, "V": torch.float64, "x": torch.float16, "slot": torch.int64,
    "shift": torch.float64, "lo": torch.float16, "hi": torch.int32,
    "gate_concept": torch.int64, "gate_threshold": torch.float64, "gate_above": torch.uint8,
    "latch": torch.int64, "weight": torch.float64, "scores": torch.float64,
    "norms": torch.float16, "out": torch.float16,
}


def _mutations():
    out = []
    for name in TENSOR_ARGS:
        out.append((name, "python list", lambda t: t.tolist(), (TypeError, ValueError)))
        out.append((name, "0-d tensor", lambda t: t.reshape(-1)[0].clone(), ValueError))
        out.append((name, "extra dim", lambda t: t.unsqueeze(0).clone(), ValueError))
        out.append((name, "one too many", lambda t: torch.cat([t, t[:1]]).contiguous(),
                    ValueError))
        if name not in ("residual",):
            out.append((name, "meta device", lambda t: t.to("meta"), ValueError))
        out.append((name, "wrong dtype", lambda t, n=name: t.to(WRONG_DTYPE[n]), TypeError))
        if name in ("residual", "V", "x", "shift", "lo", "hi", "scores", "out"):
            out.append((name, "one column too many",
                        lambda t: torch.cat([t, t[:, :1]], dim=1).contiguous(), ValueError))
    return out


MUTATIONS = _mutations()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,what,mutate,exc", MUTATIONS,
                         ids=[f"{n}-{w.replace(' ', '_')}" for n, w, _, _ in MUTATIONS])
def test_bad_argument_is_rejected_before_any_write(backend, name, what, mutate, exc):
    kw = good_kwargs(device=DEVICE[backend])
    kw[name] = mutate(kw[name])
    # the message names the argument, or (for a size change) one it now disagrees with
    pattern = SIZE_RELATED.get(name, name) if what in ("one too many", "one column too many") \
        else TABLES if name in ("shift", "lo", "hi") else name
    reject(kw, exc, pattern, backend)


TABLES = r"shift|lo|hi"
SIZE_RELATED = {"residual": r"residual|x |slot|scores|norms|out|V has", "V": r"V|shift|lo|hi",
                "shift": TABLES, "lo": TABLES, "hi": TABLES}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table", ["shift", "lo", "hi", "gate_threshold"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_tables(backend, table, value):
    """NaN anywhere in a table (row 0 included) is rejected; ±inf is a valid bound or
    threshold but never a valid shift."""
    kw = good_kwargs(device=DEVICE[backend])
    kw[table] = kw[table].clone()
    kw[table].view(-1)[-1] = value
    if math.isnan(value) or table == "shift":
        reject(kw, ValueError, table if table != "lo" else "lo / hi", backend)
        kw = good_kwargs(device=DEVICE[backend])
        kw[table] = kw[table].clone()
        kw[table].view(-1)[0] = value  # row 0 is never applied, but is still checked
        reject(kw, ValueError, table if table != "lo" else "lo / hi", backend)
    else:
        s, n, o = junction(**kw, backend=backend)
        assert torch.isfinite(n).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_thresholds_have_clamp_semantics(backend):
    """A gate above -inf always fires, above +inf never does (with exact basis directions)."""
    V = torch.eye(4)[:2].contiguous()
    r = torch.tensor([[3.0, 0.0, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0]])
    shift = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    gc = torch.tensor([-1, 0, 0], dtype=torch.int32)
    thr = torch.tensor([0.0, -math.inf, math.inf])
    dev = DEVICE[backend]
    V, shift, gc, thr = V.to(dev), shift.to(dev), gc.to(dev), thr.to(dev)
    for slot, expect in (([1, 1], [1.0, 1.0]), ([2, 2], [0.0, 0.0])):
        rr = r.clone().to(dev)
        junction(rr, V, slot=torch.tensor(slot, dtype=torch.int32, device=dev), shift=shift,
                 gate_concept=gc, gate_threshold=thr, backend=backend)
        assert rr[:, 1].tolist() == expect


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what,mutate,exc,pattern", [
    ("slot = P", lambda kw: kw["slot"].__setitem__(1, P), ValueError, "slot values"),
    ("slot = -1", lambda kw: kw["slot"].__setitem__(1, -1), ValueError, "slot values"),
    ("slot = int32 max", lambda kw: kw["slot"].__setitem__(1, 2**31 - 1), ValueError,
     "slot values"),
    ("slot = int32 min", lambda kw: kw["slot"].__setitem__(1, -2**31), ValueError,
     "slot values"),
    ("gate concept = K", lambda kw: kw["gate_concept"].__setitem__(2, K), ValueError,
     "gate_concept"),
    ("gate concept = -2", lambda kw: kw["gate_concept"].__setitem__(2, -2), ValueError,
     "gate_concept"),
    ("eps NaN", lambda kw: kw.update(eps=math.nan), ValueError, "eps"),
    ("eps inf", lambda kw: kw.update(eps=math.inf), ValueError, "eps"),
    ("eps negative", lambda kw: kw.update(eps=-1e-6), ValueError, "eps"),
    ("eps string", lambda kw: kw.update(eps="1e-6"), ValueError, "eps"),
    ("eps None", lambda kw: kw.update(eps=None), ValueError, "eps"),
    ("eps tensor", lambda kw: kw.update(eps=kw["residual"].new_tensor(1e-6)), ValueError,
     "eps"),
    ("eps rounds to 0 in float32", lambda kw: kw.update(eps=1e-46), ValueError, "eps"),
    ("eps overflows float32", lambda kw: kw.update(eps=1e39), ValueError, "eps"),
    ("slot without tables", lambda kw: kw.update(shift=None, lo=None, hi=None), ValueError,
     "nothing to apply"),
    ("P = 0", lambda kw: kw.update(shift=kw["shift"][:0], lo=None, hi=None,
                                   gate_concept=None, gate_threshold=None, gate_above=None,
                                   latch=None), ValueError, "P = 0"),
    ("gate without threshold", lambda kw: kw.update(gate_threshold=None), ValueError,
     "gate_threshold"),
    ("threshold without gate", lambda kw: kw.update(gate_concept=None, latch=None), ValueError,
     "without gate_concept"),
    ("out without weight", lambda kw: kw.update(weight=None), ValueError, "weight"),
    ("empty V", lambda kw: kw.update(V=kw["V"][:0]), ValueError, "K = 0"),
    ("hidden size 0", lambda kw: kw.update(residual=kw["residual"][:, :0]), ValueError,
     "hidden size"),
    ("float64 residual on a fp32 backend", lambda kw: kw.update(
        residual=kw["residual"].double(), x=None, weight=None, out=None),
     (TypeError, ValueError), "float64|dtype"),
])
def test_bad_values_are_rejected_before_any_write(backend, what, mutate, exc, pattern):
    kw = good_kwargs(device=DEVICE[backend])
    mutate(kw)
    if what.startswith("float64") and backend == "reference":
        pytest.skip("the reference backend runs float64 residuals")
    reject(kw, exc, pattern, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 2.0 ** -149, 1e-30, 3.4e38])
def test_eps_at_the_edges_of_float32(backend, eps):
    """eps is added in float32 by the kernels: the smallest positive float32 (2^-149) must stay
    positive there, so an all-zero row normalises to 0 as in the float64 reference; eps = 0
    keeps its contract (an all-zero row is 0 * inf = NaN, as in the reference)."""
    kw = good_kwargs(device=DEVICE[backend])
    kw.update(eps=eps, slot=None, shift=None, lo=None, hi=None, gate_concept=None,
              gate_threshold=None, gate_above=None, latch=None)
    kw["residual"][1] = 0
    kw["x"][1] = 0
    ref = {k: (v.cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    junction(**kw, backend=backend)
    junction(**ref, backend="reference")
    got, want = kw["out"].cpu(), ref["out"]
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (eps, got[1], want[1])
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), rtol=1e-4, atol=1e-5), eps
    if eps > 0:
        assert (got[1] == 0).all()


@pytest.mark.skipif("cpu" not in DEVICE, reason="the native extension is not built")
@pytest.mark.parametrize("eps", [1e-46, 1e39])
def test_raw_native_op_refuses_eps_float32_cannot_hold(eps):
    """The C++ op checks eps itself (check_and_pack), not only the Python wrapper."""
    op = torch.ops.steerkernel.junction.default
    kw = good_kwargs()
    kw["eps"] = eps
    with pytest.raises(RuntimeError, match="eps must be 0 or within float32's range"):
        op(**kw)


def test_unknown_backend_is_a_clear_error():
    reject(good_kwargs(), ValueError, "unknown backend", "cuda-but-faster")


def test_unavailable_backend_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    reject(good_kwargs(), backends.BackendUnavailable, "cuda", "cuda")


@pytest.mark.parametrize("with_slot", [False, True])
@pytest.mark.parametrize("all_meta", [True, False], ids=["all-meta", "meta-residual-only"])
def test_meta_residual(with_slot, all_meta):
    """A meta residual (eager, not under torch.compile) is refused with a clear device error,
    not a misleading overlap error (meta tensors all have data_ptr 0) or a RuntimeError from
    reading slot values."""
    kw = good_kwargs()
    kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) and (all_meta or k == "residual")
              else v) for k, v in kw.items()}
    if not with_slot:
        for k in ("slot", "shift", "lo", "hi", "gate_concept", "gate_threshold", "gate_above",
                  "latch"):
            kw[k] = None
    with pytest.raises(ValueError, match="residual is on the meta device"):
        junction(**kw)
    _assert_untouched(_snapshot(kw))


@needs_cpu
def test_meta_residual_on_cpu_backend_is_unavailable():
    kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v)
          for k, v in good_kwargs().items()}
    with pytest.raises(backends.BackendUnavailable, match="meta"):
        junction(**kw, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_and_wrong_layout_tensors(backend):
    kw = good_kwargs(device=DEVICE[backend])
    kw["residual"] = kw["residual"].to_sparse()
    reject(kw, (ValueError, TypeError), "residual", backend)
    kw = good_kwargs(device=DEVICE[backend])
    kw["V"] = kw["V"].to_sparse()
    reject(kw, (ValueError, TypeError), "V", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["residual", "scores", "norms", "out"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_written_tensor_requiring_grad(backend, name, grad_mode):
    """The op is inference-only and writes the residual and outputs in place: a written
    tensor that autograd tracks is refused with one clear ValueError naming it, by every
    backend and whatever the grad mode, never silently modified."""
    kw = good_kwargs(device=DEVICE[backend])
    kw[name].requires_grad_(True)
    with torch.set_grad_enabled(grad_mode):
        reject(kw, ValueError, f"{name} requires grad", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detached_residual_is_fine(backend):
    """The documented way out: a detached view of a leaf that requires grad is written."""
    kw = good_kwargs(device=DEVICE[backend])
    leaf = kw["residual"].clone().requires_grad_(True)
    kw["residual"] = leaf.detach()
    junction(**kw, backend=backend)
    assert not torch.equal(leaf.detach(), good_kwargs(device=DEVICE[backend])["residual"])


# --------------------------------------------------------------------------- aliasing
def _alias_cases():
    """(name, build(kw), message) for calls whose tensors share memory in ill-defined ways;
    the message names both tensors (the written one first)."""
    def out_is_residual(kw):
        kw["out"] = kw["residual"]

    def out_shifted_into_residual(kw):
        buf = torch.zeros(T + 1, D, device=kw['residual'].device)
        buf[:T] = kw["residual"]
        kw["residual"], kw["out"] = buf[:T], buf[1:]

    def scores_in_residual(kw):
        buf = torch.zeros(T, D + K, device=kw['residual'].device)
        buf[:, :D] = kw["residual"]
        kw["residual"], kw["scores"] = buf[:, :D], buf[:, D - 1:D - 1 + K]

    def norms_in_residual(kw):
        kw["norms"] = kw["residual"][:, 0]

    def scores_expanded(kw):
        kw["scores"] = torch.zeros(K, device=kw['residual'].device).expand(T, K)

    def norms_expanded(kw):
        kw["norms"] = torch.zeros(1, device=kw['residual'].device).expand(T)

    def scores_overlap_norms(kw):
        buf = torch.zeros(T * K + T, device=kw['residual'].device)
        kw["scores"], kw["norms"] = buf[:T * K].view(T, K), buf[T * K - 1:T * K - 1 + T]

    def out_overlaps_scores(kw):
        buf = torch.zeros(T, D, device=kw['residual'].device)
        kw["out"], kw["scores"] = buf, buf[:, :K]

    def out_overlaps_V(kw):
        buf = torch.zeros(T, D, device=kw['residual'].device)
        buf[:K] = kw["V"]
        kw["V"], kw["out"] = buf[:K], buf

    def scores_overlap_shift(kw):
        buf = torch.zeros(T, K, device=kw['residual'].device)
        buf[:P] = kw["shift"]
        kw["shift"], kw["scores"] = buf[:P], buf

    def x_shifted_into_residual(kw):
        buf = torch.randn(T + 1, D, device=kw['residual'].device)
        kw["residual"], kw["x"] = buf[:T], buf[1:]

    def latch_is_slot_memory(kw):
        buf = torch.zeros(T, dtype=torch.int32, device=kw['residual'].device)
        buf[:] = kw["slot"]
        kw["slot"], kw["latch"] = buf, buf[:P]

    def norms_in_weight(kw):
        kw["norms"] = torch.ones(D, device=kw['residual'].device)[:T]
        kw["weight"] = kw["norms"]._base

    def out_shifted_into_x(kw):
        buf = torch.zeros(T + 1, D, device=kw['residual'].device)
        buf[:T] = kw["x"]
        kw["x"], kw["out"] = buf[:T], buf[1:]

    def out_is_x_every_other_row(kw):  # same first element as x, another row stride
        buf = torch.zeros(2 * T, D, device=kw['residual'].device)
        buf[:T] = kw["x"]
        kw["x"], kw["out"] = buf[:T], buf[::2]

    def residual_overlaps_V(kw):
        buf = torch.zeros(T + K, D, device=kw['residual'].device)
        buf[:K] = kw["V"]
        kw["V"], kw["residual"] = buf[:K], buf[K - 1:K - 1 + T]

    def latch_in_lo(kw):
        buf = kw["lo"].clone()
        kw["lo"], kw["latch"] = buf, buf.view(torch.int32)[0]

    def latch_in_gate_concept(kw):
        buf = torch.zeros(2 * P, dtype=torch.int32, device=kw['residual'].device)
        buf[:P] = kw["gate_concept"]
        kw["gate_concept"], kw["latch"] = buf[:P], buf[P - 1:2 * P - 1]

    def norms_in_gate_threshold(kw):
        buf = torch.zeros(T, device=kw['residual'].device)
        buf[:P] = kw["gate_threshold"]
        kw["gate_threshold"], kw["norms"] = buf[:P], buf

    def scores_in_x(kw):
        buf = torch.zeros(T, D + K, device=kw['residual'].device)
        buf[:, :D] = kw["x"]
        kw["x"], kw["scores"] = buf[:, :D], buf[:, 1:1 + K]

    def scores_rows_interleaved(kw):  # strides (1, 2): rows 0 and 2 share elements
        kw["scores"] = torch.zeros(T * K, device=kw['residual'].device).as_strided(
            (T, K), (1, 2))

    return [
        ("out is residual", out_is_residual,
         "out overlaps residual"),
        ("out shifted into residual", out_shifted_into_residual,
         "out overlaps residual"),
        ("scores inside residual", scores_in_residual,
         "scores overlaps residual"),
        ("norms inside residual", norms_in_residual,
         "norms overlaps residual"),
        ("scores expanded (self-overlap)", scores_expanded,
         "scores overlaps itself"),
        ("norms expanded (self-overlap)", norms_expanded,
         "norms overlaps itself"),
        ("scores rows interleaved (self-overlap)", scores_rows_interleaved,
         "scores overlaps itself"),
        ("scores overlap norms", scores_overlap_norms,
         "scores overlaps norms"),
        ("out overlaps scores", out_overlaps_scores,
         "out overlaps scores"),
        ("out overlaps V", out_overlaps_V,
         "out overlaps V"),
        ("scores overlap shift", scores_overlap_shift,
         "scores overlaps shift"),
        ("x shifted into residual", x_shifted_into_residual,
         "residual overlaps x"),
        ("latch shares slot memory", latch_is_slot_memory,
         "latch overlaps slot"),
        ("norms share weight memory", norms_in_weight,
         "norms overlaps weight"),
        ("out shifted into x", out_shifted_into_x,
         "out overlaps x"),
        ("out starts at x, other row stride", out_is_x_every_other_row,
         "out overlaps x"),
        ("residual overlaps V", residual_overlaps_V,
         "residual overlaps V"),
        ("latch inside lo", latch_in_lo,
         "latch overlaps lo"),
        ("latch overlaps gate_concept", latch_in_gate_concept,
         "latch overlaps gate_concept"),
        ("norms overlap gate_threshold", norms_in_gate_threshold,
         "norms overlaps gate_threshold"),
        ("scores inside x", scores_in_x,
         "scores overlaps x"),
    ]


ALIAS = _alias_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,build,message", ALIAS, ids=[n for n, _, _ in ALIAS])
def test_aliasing_is_rejected_before_any_write(backend, name, build, message):
    """Outputs overlapping themselves (expanded views), each other, the residual, x, V, the
    tables or the latch; x partially overlapping the residual; the latch over a table: a
    ValueError naming both tensors, raised before anything is written."""
    kw = good_kwargs(device=DEVICE[backend])
    build(kw)
    reject(kw, ValueError, f"junction: {re.escape(message)} in memory", backend)


def _benign_alias_cases():
    """(name, build(kw)) for calls whose tensors share one buffer without sharing bytes that
    are written, or share them in the two well-defined ways (x is the residual, out is x)."""
    def scores_and_norms_packed(kw):  # one [T, K + 1] monitor buffer
        buf = torch.full((T, K + 1), SENTINEL, device=kw['residual'].device)
        kw["scores"], kw["norms"] = buf[:, :K], buf[:, K]

    def residual_and_x_halves(kw):  # column halves of one [T, 2D] buffer
        buf = torch.cat([kw["residual"], kw["x"]], dim=1)
        kw["residual"], kw["x"] = buf[:, :D], buf[:, D:]

    def out_beside_residual(kw):  # interleaved rows: residual, out, residual, out, ...
        buf = torch.zeros(T, 2, D, device=kw['residual'].device)
        buf[:, 0] = kw["residual"]
        kw["residual"], kw["out"] = buf[:, 0], buf[:, 1]

    def tables_in_one_buffer(kw):  # shift / lo / hi planes of one [3, P, K] buffer
        buf = torch.stack([kw["shift"], kw["lo"], kw["hi"]])
        kw["shift"], kw["lo"], kw["hi"] = buf[0], buf[1], buf[2]

    def lo_is_hi(kw):  # inputs may share memory: both are only read
        kw["lo"] = kw["hi"] = torch.full_like(kw["lo"], 0.5)  # pin every concept

    def V_is_weight_memory(kw):
        buf = torch.ones(K * D, device=kw['residual'].device)
        buf.view(K, D).copy_(kw["V"])
        kw["V"], kw["weight"] = buf.view(K, D), buf[:D]

    def scores_in_gap_of_residual_rows(kw):  # scores: a dense block in a row's padding
        assert T * K <= D
        buf = torch.zeros(T, 2 * D, device=kw['residual'].device)
        buf[:, :D] = kw["residual"]
        kw["residual"], kw["scores"] = buf[:, :D], buf[0, D:D + T * K].view(T, K)

    return [("scores and norms packed", scores_and_norms_packed),
            ("residual and x halves of one buffer", residual_and_x_halves),
            ("out rows between residual rows", out_beside_residual),
            ("shift, lo, hi planes of one buffer", tables_in_one_buffer),
            ("lo is hi", lo_is_hi),
            ("V and weight share memory", V_is_weight_memory),
            ("scores inside the padding of a residual row", scores_in_gap_of_residual_rows)]


BENIGN = _benign_alias_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,build", BENIGN, ids=[n for n, _ in BENIGN])
def test_benign_sharing_is_accepted(backend, name, build):
    """Views of one buffer that do not share written bytes are accepted (interleaved column
    slices included) and give exactly what separate buffers give."""
    kw = good_kwargs(device=DEVICE[backend])
    build(kw)
    sep = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = junction(**kw, backend=backend)
    exp = junction(**sep, backend=backend)
    for i, what in enumerate(("scores", "norms", "out")):
        assert torch.equal(_bits(got[i]), _bits(exp[i])), what
    for k in ("residual", "latch"):
        assert torch.equal(_bits(kw[k]), _bits(sep[k])), k


def _same_or_rejected(kw, backend, alias):
    """``alias(kw)`` makes two arguments share memory exactly.  Either the call is rejected
    cleanly (ValueError, nothing written) or it gives what separate buffers give."""
    from steerkernel.testing import SCORE_TOLERANCES, TOLERANCES, assert_close

    ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_out = junction(**ref, backend=backend)
    alias(kw)
    snap = _snapshot(kw)
    try:
        got = junction(**kw, backend=backend)
    except ValueError:
        _assert_untouched(snap)
        return
    tol = TOLERANCES[kw["residual"].dtype]
    assert_close(kw["residual"], ref["residual"], tol, "residual")
    assert_close(got[0], ref_out[0], SCORE_TOLERANCES[torch.float32], "scores")
    if got[2] is not None:
        assert_close(got[2], ref_out[2], tol, "out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_is_the_residual_itself(backend):
    """``x`` *being* the residual (residual += residual) is well defined: rejected cleanly or
    computed as with a copy, never a half-write."""
    kw = good_kwargs(device=DEVICE[backend])
    kw["x"] = kw["residual"].clone()
    _same_or_rejected(kw, backend, lambda kw: kw.update(x=kw["residual"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T_", [T, 20], ids=["decode", "prefill"])
def test_out_may_overwrite_x(backend, T_):
    """``out`` *being* ``x`` (vLLM's fused_add_rms_norm writes its output over its input): each
    row of x is read before the same row of out is written, so this is rejected cleanly or
    computed as with separate buffers (20 rows: several CPU threads; every Triton kernel)."""
    kw = good_kwargs(device=DEVICE[backend])
    if T_ != T:
        g = torch.Generator().manual_seed(5)
        dev = DEVICE[backend]
        kw.update(residual=torch.randn(T_, D, generator=g).to(dev),
                  x=torch.randn(T_, D, generator=g).to(dev),
                  slot=torch.randint(0, P, (T_,), generator=g, dtype=torch.int32).to(dev),
                  scores=torch.zeros(T_, K, device=dev), norms=torch.zeros(T_, device=dev),
                  out=torch.zeros(T_, D, device=dev))
    paths = [None]
    if backend == "triton" and T_ != T:  # every Triton kernel, not only the one chosen
        import steerkernel.backends.triton_junction as tj

        paths = [None, "row", "chunked", "tile"]
    for path in paths:
        if len(paths) > 1:
            old, tj.FORCE_PATH = tj.FORCE_PATH, path
        try:
            case = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            _same_or_rejected(case, backend, lambda kw: kw.update(out=kw["x"]))
        finally:
            if len(paths) > 1:
                tj.FORCE_PATH = old


# --------------------------------------------------------------------------- huge shapes
def _compare_with_reference(make, backend):
    a = {k: (v.to(DEVICE[backend]) if isinstance(v, torch.Tensor) else v)
         for k, v in make().items()}
    b = make()
    ga = junction(**a, backend=backend)
    gb = junction(**b, backend="reference")
    from steerkernel.testing import SCORE_TOLERANCES, TOLERANCES, assert_close

    assert_close(ga[0], gb[0], SCORE_TOLERANCES[torch.float32], "scores")
    assert_close(ga[1], gb[1], SCORE_TOLERANCES[torch.float32], "norms")
    assert_close(a["residual"], b["residual"], TOLERANCES[torch.float32], "residual")
    if ga[2] is not None:
        assert_close(ga[2], gb[2], TOLERANCES[torch.float32], "out")
    if a.get("latch") is not None:
        assert torch.equal(a["latch"].cpu(), b["latch"])


def _huge(T_, d_, K_, P_, seed=0):
    def make():
        g = torch.Generator().manual_seed(seed)
        V = torch.randn(K_, d_, generator=g)
        V /= V.norm(dim=1, keepdim=True)
        kw = dict(residual=torch.randn(T_, d_, generator=g), V=V,
                  x=torch.randn(T_, d_, generator=g), weight=torch.ones(d_))
        if P_:
            kw.update(slot=torch.randint(0, P_, (T_,), generator=g, dtype=torch.int32),
                      shift=torch.randn(P_, K_, generator=g) * 0.1,
                      hi=torch.full((P_, K_), 0.5),
                      gate_concept=torch.randint(-1, K_, (P_,), generator=g, dtype=torch.int32),
                      gate_threshold=torch.zeros(P_),
                      latch=torch.zeros(P_, dtype=torch.int32))
        return kw
    return make


HUGE = [("K=100000 d=4", (3, 4, 100_000, 3)), ("K=100000 d=1", (2, 1, 100_000, 2)),
        ("P=100000", (4, 8, 2, 100_000)), ("T=100000 d=2", (100_000, 2, 1, 3)),
        ("d=2^20", (2, 2**20, 2, 2))]


#: interpreted Triton runs one Python-level program per row: T = 100,000 takes > 10 minutes
#: and d = 2^20 ~30 s there, so those two only run on native backends (and on a GPU)
TRITON_SLOW = ("T=100000 d=2", "d=2^20")
HUGE_RUNS = [(n, s, b) for n, s in HUGE for b in BACKENDS if b != "reference"
             and not (b == "triton" and not torch.cuda.is_available() and n in TRITON_SLOW)]


@pytest.mark.parametrize("name,shape,backend", HUGE_RUNS,
                         ids=[f"{n}-{b}" for n, _, b in HUGE_RUNS])
def test_huge_shapes_work(name, shape, backend):
    _compare_with_reference(_huge(*shape), backend)


# --------------------------------------------------------------------------- raw C++ op
GUARD_LIB = textwrap.dedent(r'''
    # ---- guard pages: tensors flush against PROT_NONE pages
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    PAGE = mmap.PAGESIZE
    KEEP = []

    def guarded_addr(nbytes, at_end):
        """``nbytes`` of fresh memory with an inaccessible page right before and after the
        mapping; the block ends at the upper guard (``at_end``) or starts at the lower one."""
        n = -(-nbytes // PAGE) * PAGE
        base = libc.mmap(None, n + 2 * PAGE, 3, 0x22, -1, 0)  # RW, PRIVATE|ANONYMOUS
        assert base not in (None, ctypes.c_void_p(-1).value)
        assert libc.mprotect(base, PAGE, 0) == 0
        assert libc.mprotect(base + PAGE + n, PAGE, 0) == 0
        return base + PAGE + (n - nbytes if at_end else 0)

    def guarded(shape, stride, dtype, at_end):
        esize = torch.empty((), dtype=dtype).element_size()
        span = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 1
        nbytes = span * esize
        start = guarded_addr(nbytes, at_end)
        raw = (ctypes.c_char * nbytes).from_address(start)
        KEEP.append(raw)
        flat = torch.frombuffer(raw, dtype=dtype, count=span)
        return flat.as_strided(shape, stride)

    def place(t, at_end, stride=None):
        if t is None:
            return None
        g = guarded(tuple(t.shape), stride or t.stride(), t.dtype, at_end)
        g.copy_(t)
        return g

''')

CHILD = textwrap.dedent(r'''
    import ctypes, json, math, mmap, sys, traceback
    import torch
    import steerkernel  # loads steerkernel._C: registers torch.ops.steerkernel.junction
    from steerkernel import backends
    from steerkernel.ops import junction

    OP, DEVICE = sys.argv[1], sys.argv[2]  # "junction" (C++) or "junction_triton"
    assert backends.backend_status()["triton" if OP == "junction_triton" else "cpu"][0]
    if OP == "junction_triton":
        backends.resolve(torch.device(DEVICE), "triton")
    op = getattr(torch.ops.steerkernel, OP).default

    def say(*a):
        print(*a, flush=True)

    def bits(t):
        if t.dtype.is_floating_point:
            ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
            return t.view(ints[t.element_size()]).clone()
        return t.clone()

    def call(kw):
        return op(**kw)

    GUARD_LIB
    results = {"rejected": [], "guarded": [], "errors": []}
    THREADS = max(2, torch.get_num_threads())

    # ---- 1. inconsistent calls: must raise RuntimeError, write nothing
    def good(dtype=torch.float32, T=4, d=8, K=2, P=3):
        g = torch.Generator().manual_seed(1)
        return dict(residual=torch.randn(T, d, generator=g).to(dtype),
                    V=torch.eye(d)[:K].contiguous(), x=torch.randn(T, d, generator=g).to(dtype),
                    slot=torch.tensor([0, 1, 2, 1][:T], dtype=torch.int32),
                    shift=torch.ones(P, K), lo=torch.full((P, K), -math.inf),
                    hi=torch.full((P, K), math.inf),
                    gate_concept=torch.tensor([-1, 0, -1][:P], dtype=torch.int32),
                    gate_threshold=torch.zeros(P), gate_above=torch.ones(P, dtype=torch.bool),
                    latch=torch.zeros(P, dtype=torch.int32), weight=torch.ones(d, dtype=dtype),
                    eps=1e-6, scores=torch.full((T, K), 7.0), norms=torch.full((T,), 7.0),
                    out=torch.full((T, d), 7.0, dtype=dtype))

    T, d, K, P = 4, 8, 2, 3
    BAD = {
        "V wrong d": dict(V=torch.eye(d + 1)[:K].contiguous()),
        "V K=0": dict(V=torch.zeros(0, d)),
        "V 1-D": dict(V=torch.zeros(d)),
        "V float64": dict(V=torch.eye(d)[:K].double().contiguous()),
        "V int32": dict(V=torch.eye(d)[:K].int().contiguous()),
        "V bf16 with fp32 residual": dict(V=torch.eye(d)[:K].bfloat16().contiguous()),
        "V non-contiguous": dict(V=torch.eye(d)[:, :K].contiguous().T),
        "V on meta": dict(V=torch.eye(d)[:K].contiguous().to("meta")),
        "residual float64": dict(residual=torch.zeros(T, d, dtype=torch.float64), x=None,
                                 weight=None, out=None),
        "residual int32": dict(residual=torch.zeros(T, d, dtype=torch.int32), x=None,
                               weight=None, out=None),
        "residual 1-D": dict(residual=torch.zeros(d), x=None, out=None),
        "residual 3-D": dict(residual=torch.zeros(T, d, 1), x=None, out=None),
        "residual inner stride 2": dict(residual=torch.zeros(T, 2 * d)[:, ::2]),
        "residual transposed": dict(residual=torch.zeros(d, T).T),
        "residual overlapping rows": dict(residual=torch.zeros(T * d).as_strided((T, d), (1, 1))),
        "x wrong rows": dict(x=torch.zeros(T + 1, d)),
        "x wrong d": dict(x=torch.zeros(T, d + 1)),
        "x fp16": dict(x=torch.zeros(T, d, dtype=torch.float16)),
        "x inner stride": dict(x=torch.zeros(T, 2 * d)[:, ::2]),
        "x overlapping rows": dict(x=torch.zeros(T * d).as_strided((T, d), (0, 1))),
        "x on meta": dict(x=torch.zeros(T, d, device="meta")),
        "slot int64": dict(slot=torch.zeros(T, dtype=torch.int64)),
        "slot wrong length": dict(slot=torch.zeros(T + 1, dtype=torch.int32)),
        "slot 2-D": dict(slot=torch.zeros(T, 1, dtype=torch.int32)),
        "slot non-contiguous": dict(slot=torch.zeros(2 * T, dtype=torch.int32)[::2]),
        "slot without shift": dict(shift=None),
        "slot without lo": dict(lo=None),
        "slot without hi": dict(hi=None),
        "shift wrong K": dict(shift=torch.zeros(P, K + 1)),
        "lo wrong P": dict(lo=torch.zeros(P + 1, K)),
        "hi float64": dict(hi=torch.zeros(P, K, dtype=torch.float64)),
        "shift 1-D": dict(shift=torch.zeros(P * K)),
        "shift non-contiguous": dict(shift=torch.zeros(K, P).T),
        "tables P=0": dict(shift=torch.zeros(0, K), lo=torch.zeros(0, K), hi=torch.zeros(0, K),
                           gate_concept=None, gate_threshold=None, gate_above=None,
                           latch=None),
        "gate_concept wrong length": dict(gate_concept=torch.zeros(P + 1, dtype=torch.int32)),
        "gate_concept int64": dict(gate_concept=torch.zeros(P, dtype=torch.int64)),
        "gate without threshold": dict(gate_threshold=None),
        "gate without above": dict(gate_above=None),
        "gate_threshold float64": dict(gate_threshold=torch.zeros(P, dtype=torch.float64)),
        "gate_threshold short": dict(gate_threshold=torch.zeros(P - 1)),
        "gate_above uint8": dict(gate_above=torch.ones(P, dtype=torch.uint8)),
        "latch wrong length": dict(latch=torch.zeros(P + 2, dtype=torch.int32)),
        "latch int64": dict(latch=torch.zeros(P, dtype=torch.int64)),
        "latch without gate": dict(gate_concept=None, gate_threshold=None, gate_above=None),
        "weight wrong length": dict(weight=torch.ones(d + 1)),
        "weight fp16 with fp32 residual": dict(weight=torch.ones(d, dtype=torch.float16)),
        "weight 2-D": dict(weight=torch.ones(1, d)),
        "weight non-contiguous": dict(weight=torch.ones(2 * d)[::2]),
        "scores wrong K": dict(scores=torch.zeros(T, K + 1)),
        "scores wrong T": dict(scores=torch.zeros(T - 1, K)),
        "scores float64": dict(scores=torch.zeros(T, K, dtype=torch.float64)),
        "norms missing": dict(norms=None),
        "scores 1-D": dict(scores=torch.zeros(T * K)),
        "scores on meta": dict(scores=torch.zeros(T, K, device="meta")),
        "norms wrong T": dict(norms=torch.zeros(T + 1)),
        "norms float16": dict(norms=torch.zeros(T, dtype=torch.float16)),
        "norms 2-D": dict(norms=torch.zeros(T, 1)),
        "out without weight": dict(weight=None),
        "out wrong d": dict(out=torch.zeros(T, d + 1)),
        "out fp16": dict(out=torch.zeros(T, d, dtype=torch.float16)),
        "out inner stride": dict(out=torch.zeros(T, 2 * d)[:, ::2]),
        "out overlapping rows": dict(out=torch.zeros(T * d).as_strided((T, d), (1, 1))),
    }
    def dev(v):
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            return v.to(DEVICE)
        return v

    for name, change in BAD.items():
        say("BEGIN reject", name)
        kw = {k: dev(v) for k, v in good().items()}
        kw.update({k: dev(v) for k, v in change.items()})
        snap = {k: bits(v) for k, v in kw.items()
                if isinstance(v, torch.Tensor) and v.device.type != "meta"}
        try:
            call(kw)
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            ok = all(torch.equal(bits(kw[k]), b) for k, b in snap.items())
            results["rejected"].append([name, ok, msg])
        except Exception as e:
            results["errors"].append([name, f"{type(e).__name__}: {e}"])
        else:
            results["errors"].append([name, "accepted"])

    # ---- 2. valid calls with extreme values, every tensor against a guard page
    CASES = []
    for dtype in ((torch.float32, torch.bfloat16, torch.float16)
                  if OP == "junction" and DEVICE == "cpu" else ()):
        for d_ in (1, 3, 7, 15, 17, 33, 65, 130):
            for K_ in (1, 5, 17):
                CASES.append((dtype, d_, K_, 3 + len(CASES) % 5))
        CASES.append((dtype, 37, 3, 67))  # several threads (parallel_for grain is 16 rows)
    n = 0
    for i, (dtype, d_, K_, T_) in enumerate(CASES):
        for at_end in (True, False):
            name = f"{dtype} T={T_} d={d_} K={K_} guard={'end' if at_end else 'start'}"
            say("BEGIN guarded", name)
            g = torch.Generator().manual_seed(i)
            P_ = 4
            V = torch.randn(K_, d_, generator=g)
            V = (V / V.norm(dim=1, keepdim=True)).to(dtype if i % 2 else torch.float32)
            slot = torch.tensor([0, 1, 2, 3, -1, 4, 2**31 - 1, -2**31] * 9,
                                dtype=torch.int32)[:T_].contiguous()
            kw = dict(residual=torch.randn(T_, d_, generator=g).to(dtype), V=V,
                      x=torch.randn(T_, d_, generator=g).to(dtype), slot=slot,
                      shift=torch.randn(P_, K_, generator=g),
                      lo=torch.full((P_, K_), -1.0), hi=torch.full((P_, K_), 1.0),
                      gate_concept=torch.tensor([-1, K_, -2**31, 0], dtype=torch.int32),
                      gate_threshold=torch.tensor([0.0, 0.0, 0.0, -math.inf]),
                      gate_above=torch.tensor([True, True, False, True]),
                      latch=torch.tensor([0, 0, 1, 0], dtype=torch.int32),
                      weight=torch.rand(d_, generator=g).to(dtype if i % 3 else torch.float32),
                      eps=1e-6)
            ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            torch.set_num_threads(1)  # tiny float64 matmuls stall in BLAS threads
            rs, rn, ro = junction(**ref, backend="reference", check_values=False)
            torch.set_num_threads(THREADS)
            placed = {k: (place(v, at_end) if isinstance(v, torch.Tensor) else v)
                      for k, v in kw.items()}
            # row strides > d and strided outputs, still flush against the guard page
            placed["residual"] = place(kw["residual"], at_end, (d_ + 3, 1))
            placed["scores"] = guarded((T_, K_), (1, T_), torch.float32, at_end)
            placed["norms"] = guarded((T_,), (2,), torch.float32, at_end)
            placed["out"] = guarded((T_, d_), (d_ + 1, 1), dtype, at_end)
            for t in (placed["scores"], placed["norms"], placed["out"]):
                t.fill_(math.nan)
            call(placed)
            from steerkernel.testing import SCORE_TOLERANCES, TOLERANCES, assert_close
            try:
                assert_close(placed["scores"], rs, SCORE_TOLERANCES[dtype], "scores")
                assert_close(placed["norms"], rn, SCORE_TOLERANCES[dtype], "norms")
                assert_close(placed["residual"], ref["residual"], TOLERANCES[dtype], "residual")
                assert_close(placed["out"], ro, TOLERANCES[dtype], "out")
                assert torch.equal(placed["latch"], ref["latch"]), "latch"
            except AssertionError as e:
                results["errors"].append([name, f"mismatch: {e}"])
            n += 1
    results["guarded"] = n
    say("RESULT " + json.dumps(results))
    say("DONE")
''').replace("GUARD_LIB\n", GUARD_LIB)


#: raw-op calls with one meta tensor among CPU tensors: the dispatcher picks the Meta kernel,
#: i.e. the fake impl, which must refuse the mixed devices (it once checked nothing and wrote
#: nothing, so the call silently did nothing)
MIXED_META = ("V on meta", "x on meta", "scores on meta")


def _run_child(op: str, device: str):
    """Run CHILD for ``op`` on ``device``; returns (RESULT or None, crash description)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, op, device], capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(HERE),
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    lines = proc.stdout.splitlines()
    last = next((ln for ln in reversed(lines) if ln.startswith("BEGIN")), "<none>")
    if proc.returncode != 0 or not lines or lines[-1] != "DONE":
        return None, f"child died (rc={proc.returncode}) during: {last}\n{proc.stderr[-3000:]}"
    return json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[7:]), ""


@pytest.fixture(scope="module")
def raw_child():
    """The C++ op's CHILD run (asserting it did not crash)."""
    if not HAS_CPU:
        pytest.skip(f"C++ CPU backend: {_STATUS['cpu'][1]}")
    res, crash = _run_child("junction", "cpu")
    assert res is not None, crash
    TRIED["raw op calls"] += len(res["rejected"]) + len(res["errors"])
    TRIED["guarded raw calls"] += res["guarded"]
    return res


def test_raw_native_op_rejects_inconsistent_calls(raw_child):
    """Direct calls of torch.ops.steerkernel.junction with inconsistent shapes / dtypes /
    strides / devices raise a RuntimeError naming steerkernel.junction and write nothing."""
    errors = raw_child["errors"]
    assert not errors, "\n".join(f"{n}: {m}" for n, m in errors)
    not_clean = [n for n, ok, _ in raw_child["rejected"] if not ok]
    assert not not_clean, f"rejected calls that still wrote: {not_clean}"
    assert len(raw_child["rejected"]) >= 60
    for name, _, msg in raw_child["rejected"]:
        assert "steerkernel.junction" in msg, f"{name}: unclear error {msg!r}"


def test_raw_native_op_stays_in_bounds(raw_child):
    """Every tensor flush against a PROT_NONE page (before and after): no fault, and the
    results of out-of-range slots / gate concepts match the reference semantics."""
    assert raw_child["guarded"] >= 150


@pytest.mark.parametrize("where", ["after", "before"])
def test_guard_pages_fault_on_out_of_bounds_access(where):
    """The detector itself: touching one byte past (before) a guarded tensor kills the child."""
    code = GUARD_LIB + textwrap.dedent(f"""
        start = guarded_addr(60, at_end={where == 'after'})
        ctypes.memset(start, 1, 60)  # in bounds: fine
        assert ctypes.string_at(start, 60) == bytes([1]) * 60
        print("armed", flush=True)
        ctypes.string_at(start + 60 if {where == 'after'} else start - 1, 1)
        print("NOT CAUGHT", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", "import ctypes, mmap\n" + code],
                          capture_output=True, text=True, timeout=120)
    assert "armed" in proc.stdout and "NOT CAUGHT" not in proc.stdout
    assert proc.returncode == -11, (proc.returncode, proc.stderr[-2000:])


@pytest.mark.skipif("triton" not in DEVICE, reason=NO_TRITON if not TRITON_MODULE
                    else f"triton unavailable: {_STATUS['triton'][1]}")
def test_raw_triton_op_rejects_inconsistent_calls():
    """The same 61 inconsistent direct calls against torch.ops.steerkernel.junction_triton
    (it once checked nothing and corrupted the heap under the interpreter)."""
    res, crash = _run_child("junction_triton", DEVICE["triton"])
    assert res is not None, crash
    TRIED["raw op calls"] += len(res["rejected"]) + len(res["errors"])
    assert not res["errors"], "\n".join(f"{n}: {m}" for n, m in res["errors"])
    assert all(ok for _, ok, _ in res["rejected"]), "a rejected call still wrote"
    assert len(res["rejected"]) >= 60
    rejected = {n: m for n, _, m in res["rejected"]}
    for name in MIXED_META:
        assert "meta" in rejected[name], f"{name}: unclear error {rejected[name]!r}"
    for name, _, msg in res["rejected"]:
        assert "steerkernel.junction" in msg, f"{name}: unclear error {msg!r}"


def test_raw_native_op_rejects_mixed_meta_devices(raw_child):
    """One meta tensor among CPU tensors reaches the fake impl (the Meta kernel), which refuses
    the mixed devices with a RuntimeError naming the tensor, and nothing is written."""
    rejected = {n: (ok, m) for n, ok, m in raw_child["rejected"]}
    for name in MIXED_META:
        assert name in rejected, f"{name} was not rejected"
        ok, msg = rejected[name]
        assert ok and "meta" in msg and name.split()[0] in msg, (name, msg)


def test_raw_ops_still_run_on_all_meta_tensors():
    """All-meta raw calls (shape propagation) keep working through the fake impl."""
    kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v)
          for k, v in good_kwargs().items()}
    ops = [torch.ops.steerkernel.junction_reference.default]
    if HAS_CPU:
        ops.append(torch.ops.steerkernel.junction.default)
    for op in ops:
        assert op(**kw) is None


# --------------------------------------------------------------------------- steering specs
HAS_STEERING = importlib.util.find_spec("steerkernel.steering") is not None
needs_steering = pytest.mark.skipif(not HAS_STEERING,
                                    reason="steerkernel/steering.py does not exist yet")
if HAS_STEERING:
    from types import SimpleNamespace

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from steerkernel.errors import SpecError, UnknownConceptError
    from steerkernel.steering import (Gate, Program, SlotTables, Steer, compile_program,
                                      format_steer, parse_program, parse_steer)

    SPEC_ERRORS = (SpecError, UnknownConceptError)
    NAMES = ["calm", "fear", "joy", "z", "flat"]
    LAYERS = [0, 1, 2, 5]

    def spec_bank():
        """A bank over LAYERS (the real ConceptBank once it exists, else the attributes
        compile_program reads); concept 'flat' has a zero baseline std."""
        L, K = len(LAYERS), len(NAMES)
        std = torch.full((L, K), 2.0)
        std[:, NAMES.index("flat")] = 0.0
        fields = dict(names=list(NAMES), layers=list(LAYERS),
                      resid_norm=torch.tensor([10.0, 20.0, 40.0, 80.0]),
                      baseline_mean=torch.arange(L * K, dtype=torch.float32).view(L, K),
                      baseline_std=std)
        if importlib.util.find_spec("steerkernel.concepts.bank") is None:
            return SimpleNamespace(**fields)
        from steerkernel.concepts.bank import ConceptBank

        return ConceptBank(**fields, directions=torch.eye(8)[:K].expand(L, K, 8).contiguous(),
                           vector_norms=torch.ones(L, K), default_layer=LAYERS[0])

    # Spec-string material: grammar tokens, numbers (incl. hostile ones), names, junk.
    SPEC_TOKENS = st.sampled_from(
        NAMES + ["unknown", "=", "==", "<=", ">=", "<", ">", "=ablate", "=mean", "ablate",
                 "mean", "@", "-", "+", ":", "?", "!", ";", ",", " ", "abs", "rel", "z",
                 "all", "prompt", "generated", "sometimes", "0", "1", "2", "5", "7", "-1",
                 "+0.05", "1e308", "1e309", "-1e309", "nan", "inf", "1e-320", ".5", "5.",
                 "3-1", "0-5", "2+5", "\t", "\n", "é", "\x00", "'", '"', "(", ")", "[", "]"])
    SPEC_STRINGS = st.one_of(st.lists(SPEC_TOKENS | st.sampled_from(
                                 ["0-99999", "@0-1000000000000", "7" * 5000, '"', '\\"',
                                  '"calm"', '"a;b"']), max_size=24).map("".join),
                             st.text(max_size=60))


@needs_steering
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=SPEC_STRINGS)
def test_spec_strings_raise_only_spec_errors(text):
    """Any string: parse + compile either succeed or raise SpecError / UnknownConceptError;
    whatever compiles is accepted by the op with check_values=True."""
    TRIED["spec strings"] += 1
    try:
        program = parse_program(text)
        compiled = compile_program(program, spec_bank())
    except SPEC_ERRORS:
        return
    _check_compiled_tables(compiled)


def _check_compiled_tables(compiled):
    K = len(NAMES)
    for phase, t in compiled.tables.items():
        assert torch.isfinite(t.shift).all(), phase
        assert not torch.isnan(t.lo).any() and not torch.isnan(t.hi).any(), phase
        assert (t.lo <= t.hi).all(), phase
        assert ((t.gate_concept >= -1) & (t.gate_concept < K)).all(), phase
        assert torch.isfinite(t.gate_threshold).all(), phase
        # every layer's row drives the op (slot 1; row 0 identity) without a rejection
        for i in range(len(LAYERS)):
            d = 8
            V = torch.eye(d)[:K].contiguous()
            ident = lambda v, fill: torch.cat([torch.full_like(v[i:i + 1], fill), v[i:i + 1]])
            junction(torch.randn(3, d), V, slot=torch.tensor([0, 1, 1], dtype=torch.int32),
                     shift=ident(t.shift, 0.0), lo=ident(t.lo, -math.inf),
                     hi=ident(t.hi, math.inf),
                     gate_concept=torch.cat([torch.tensor([-1], dtype=torch.int32),
                                             t.gate_concept[i:i + 1]]),
                     gate_threshold=torch.cat([torch.zeros(1), t.gate_threshold[i:i + 1]]),
                     gate_above=torch.cat([torch.ones(1, dtype=torch.bool),
                                           t.gate_above[i:i + 1]]),
                     check_values=True)


if HAS_STEERING:
    #: every float, NaN and ±inf included: finite values beyond float32 (after unit resolution)
    #: are a SpecError, never torch's RuntimeError
    NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0.0, 1.0, -1.0, 1e308, -1e308, 3.5e38, -3.5e38, 1e37,
                                         3.4028234663852886e38, 5e-324]))

    @st.composite
    def spec_entries(draw):
        """Grammatical entries with hostile values, names, layers and gates."""
        name = draw(st.sampled_from(NAMES + ["unknown"]))
        op = draw(st.sampled_from(["=", "<=", ">=", "==", "=ablate", "=mean"]))
        num = draw(NUMBERS)
        unit = draw(st.sampled_from(["", "abs", "rel", "z"]))
        body = op if op in ("=ablate", "=mean") else f"{op}{num!r}{unit}"
        if draw(st.booleans()):
            a = draw(st.integers(0, 12))
            b = draw(st.integers(0, 12))
            body += f"@{a}" + (f"-{b}" if draw(st.booleans()) else "")
        if draw(st.booleans()):
            body += ":" + draw(st.sampled_from(["all", "prompt", "generated", "never"]))
        if draw(st.booleans()):
            body += f"?{draw(st.sampled_from(NAMES + ['nope']))}" \
                    f"{draw(st.sampled_from(['>', '<']))}{draw(NUMBERS)!r}" \
                    f"{draw(st.sampled_from(['', 'abs', 'rel', 'z']))}" \
                    f"{draw(st.sampled_from(['', '!']))}"
        return name + body


@needs_steering
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(spec_entries() if HAS_STEERING else st.none(), min_size=1,
                        max_size=4))
def test_grammatical_specs_with_hostile_values(entries):
    """NaN / inf / huge values, unknown concepts, layers out of range, conflicting gates and
    zero-std z units give SpecError / UnknownConceptError; what compiles is a valid table."""
    text = "; ".join(entries)
    TRIED["grammatical specs"] += 1
    try:
        compiled = compile_program(parse_program(text), spec_bank())
    except SPEC_ERRORS as e:
        assert str(e), "an error without a message"
        return
    _check_compiled_tables(compiled)


@needs_steering
@pytest.mark.parametrize("make", [
    lambda: Steer("calm", "add", math.nan),
    lambda: Steer("calm", "add", math.inf),
    lambda: Steer("calm", "cap_above", -math.inf),
    lambda: Steer("calm", "add", "1.0"),
    lambda: Steer("calm", "add", None),
    lambda: Steer("calm", "add", True),
    lambda: Steer("calm", "multiply", 1.0),
    lambda: Steer("calm", "add", 1.0, unit="percent"),
    lambda: Steer("calm", "add", 1.0, layers=(1.5,)),
    lambda: Steer("calm", "add", 1.0, layers=(True,)),
    lambda: Steer("calm", "add", 1.0, layers=()),
    lambda: Steer("calm", "add", 1.0, tokens="sometimes"),
    lambda: Steer("calm", "add", 1.0, gate={"concept": "fear"}),
    lambda: Steer("", "add", 1.0),
    lambda: Steer(None, "add", 1.0),
    lambda: Gate("fear", math.nan),
    lambda: Gate("fear", -math.inf),
    lambda: Gate("", 1.0),
    lambda: Gate("fear", 1.0, unit="kg"),
    lambda: Gate("fear", 1.0, above="yes"),
    lambda: Program((1, 2)),
    lambda: Program.coerce(42),
    lambda: parse_program(None),
    lambda: parse_program(b"calm=+1"),
    lambda: SlotTables(4, 1, 3),
], ids=lambda f: "")
def test_spec_objects_reject_bad_values(make):
    with pytest.raises(SpecError):
        make()


@needs_steering
@pytest.mark.parametrize("text,exc,pattern", [
    ("unknown=+1", "unknown", "unknown"),
    ("calm=+1?unknown>0", "unknown", "unknown"),
    ("calm=+1@3", "spec", "layer 3"),
    ("calm=+1@99", "spec", "layer 99"),
    ("flat<=1z", "spec", "std"),
    ("calm=1e308abs; calm=1e308abs", "spec", "non-finite"),
    ("calm<=0abs; calm>=1abs", "spec", "empty interval"),
    ("calm=+1?fear>0; joy=+1?fear<0", "spec", "gate"),
])
def test_compile_errors_are_spec_errors(text, exc, pattern):
    with pytest.raises(UnknownConceptError if exc == "unknown" else SpecError, match=pattern):
        compile_program(parse_program(text), spec_bank())


@needs_steering
def test_slot_tables_reject_bad_slots_and_phases():
    bank = spec_bank()
    tables = SlotTables(len(LAYERS), 3, len(NAMES))
    compiled = compile_program("calm=+1", bank)
    for slot in (0, 3, -1, True, 1.0, "1"):
        with pytest.raises(SpecError):
            tables.assign(slot, compiled, "prompt")
    with pytest.raises(SpecError):
        tables.assign(1, compiled, "decode")
    with pytest.raises(SpecError):
        SlotTables(len(LAYERS) + 1, 3, len(NAMES)).assign(1, compiled, "prompt")


@needs_steering
@pytest.mark.parametrize("layers", ["7" * 5000, "0-" + "7" * 5000, "0" * 5000 + "1-2"])
def test_layer_number_with_thousands_of_digits(layers):
    """int() refuses more than 4300 digits with a plain ValueError: the digit strings are
    bounded first (leading zeros are fine), and the SpecError names the range, shortened."""
    if layers.startswith("0" * 100):
        assert parse_program("calm=+1@" + layers).steers[0].layers == (1, 2)
        return
    with pytest.raises(SpecError, match=r"out of bounds.*\[0, 100000\)") as e:
        parse_program("calm=+1@" + layers)
    assert len(str(e.value)) < 400


LAYER_RANGE_CHILD = textwrap.dedent(r'''
    import resource, sys, time
    from steerkernel.errors import SpecError
    from steerkernel.steering import parse_program
    pages = int(open("/proc/self/statm").read().split()[0])
    vsz = pages * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vsz + 256 * 2**20, resource.RLIM_INFINITY))
    t = time.time()
    try:
        parse_program(sys.argv[1])
    except SpecError as e:
        print("SpecError", round(time.time() - t, 3), flush=True)
    except BaseException as e:
        print(type(e).__name__, round(time.time() - t, 3), flush=True)
    else:
        print("accepted", round(time.time() - t, 3), flush=True)
''')


@needs_steering
def test_huge_layer_range_fails_fast_without_allocating():
    """Parsed in a child whose address space may grow by 256 MiB at most: ranges beyond
    MAX_LAYER are refused before anything is expanded."""
    for spec in ("calm=+1@0-1000000000000", "calm=+1@0-50000000", "calm=+1@3+0-100000"):
        proc = subprocess.run([sys.executable, "-c", LAYER_RANGE_CHILD, spec],
                              capture_output=True, text=True, timeout=120,
                              cwd=os.path.dirname(HERE))
        assert proc.returncode == 0, proc.stderr[-2000:]
        kind, seconds = proc.stdout.split()
        assert kind == "SpecError" and float(seconds) < 1.0, (spec, proc.stdout)


@needs_steering
def test_largest_layer_range_is_bounded():
    """The widest range the grammar accepts (MAX_STEER_LAYERS layers, indices below
    MAX_LAYER) stays cheap; one layer more, or an index past MAX_LAYER, is a SpecError."""
    from steerkernel.steering import MAX_LAYER, MAX_STEER_LAYERS

    top = MAX_LAYER - 1
    assert len(parse_steer(f"calm=+1@{top - MAX_STEER_LAYERS + 1}-{top}").layers) \
        == MAX_STEER_LAYERS
    with pytest.raises(SpecError, match=f"at most {MAX_STEER_LAYERS} layers"):
        parse_steer(f"calm=+1@0-{MAX_STEER_LAYERS}")
    with pytest.raises(SpecError, match=f"'0-{MAX_LAYER}'"):
        parse_steer(f"calm=+1@0-{MAX_LAYER}")


@needs_steering
@pytest.mark.parametrize("text,value", [
    ("calm<=1e39", "1e+39"), ("calm>=-1e308", "-1e+308"), ("calm==1e39abs", "1e+39"),
    ("calm<=1e37rel", "1e+37"), ("calm=+1?fear>3.5e38", "3.5e+38"), ("calm=4e38abs", "4e+38"),
    ("calm=+1e37", "1e+37"), ("calm==2e38z", "2e+38")])
def test_values_beyond_float32_are_spec_errors(text, value):
    """A finite value that does not fit the float32 tables after unit resolution (rel: × the
    layer's residual norm; z: × std) is a SpecError naming the value, not torch's
    RuntimeError; the largest float32 itself still compiles."""
    with pytest.raises(SpecError, match=re.escape(f"value {value} ") + ".*overflows float32"):
        compile_program(parse_program(text), spec_bank())


@needs_steering
def test_float32_max_still_compiles():
    c = compile_program(parse_program("calm<=3.4028234663852886e38; joy=-3.4e38abs"),
                        spec_bank())
    assert float(c.tables["prompt"].hi[0, NAMES.index("calm")]) == 3.4028234663852886e38
    _check_compiled_tables(c)


@needs_steering
@pytest.mark.parametrize("value,thr", [(0.123456789, 2.0), (1 / 3, -0.1234567),
                                       (1e-7 + 1e-13, 0.5), (5e-324, -1.7976931348623157e308),
                                       (-0.0, 1e16)])
def test_format_steer_round_trips(value, thr):
    s = Steer("calm", "add", value, "abs", (1, 2), "generated", Gate("fear", thr, False))
    assert parse_steer(format_steer(s)) == s


def test_zz_hostile_counts(capsys):
    """Record how many hostile inputs were tried (printed to the terminal)."""
    with capsys.disabled():
        print(f"\n[test_hostile_inputs] inputs tried: {sum(TRIED.values())} "
              f"({', '.join(f'{k}={v}' for k, v in TRIED.items())})")
    # when the generating tests ran, they really generated
    if TRIED["spec strings"]:
        assert TRIED["spec strings"] >= 250 and TRIED["grammatical specs"] >= 250
    if TRIED["guarded raw calls"]:
        assert TRIED["raw op calls"] >= 60 and TRIED["guarded raw calls"] >= 150
