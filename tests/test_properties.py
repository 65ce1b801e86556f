"""Property-based tests (hypothesis) of the junction op: every backend against the float64
reference over random shapes, dtypes, memory layouts and intervention tables, plus the
algebraic laws of docs/design.md §2 (GitHub issue #8).

Two families of generated cases:

* **random**: Gaussian hidden states, random unit (non-orthogonal) directions; gate thresholds
  sit in gaps between the projections (or at ±inf) so fp32 and float64 agree on every gate
  decision; every other output is compared with the per-dtype tolerances of
  ``steerkernel.testing``.
* **exact**: directions are signed basis vectors and every value is a small multiple of 1/2, so
  projections, clamps and updates are exact in every dtype.  Gate thresholds are drawn *from the
  projections themselves* (equality must never fire) and from ±inf; ``scores``, ``residual`` and
  ``latch`` must then be bit-identical to the reference.

Every generated call uses its own memory layout: rows padded to a larger row stride at an
offset inside a bigger buffer, ``scores`` as a transposed / stepped / layer-major view,
``norms`` stepped.  Each call also checks that nothing outside the output views changed (the
padding of every buffer), that no input was written, and that every output element was written
(outputs are poisoned with NaN first).  Invalid layouts (non-unit inner stride, overlapping rows,
non-contiguous V / tables / slot / weight) must be rejected with a ``ValueError`` before
anything is written.

The number of cases run is counted per backend and a final test asserts the total reaches
``MIN_CASES`` (the issue asks for >= 1,000 per CI run).
"""
from __future__ import annotations

import collections
import importlib.util
import math
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from steerkernel import backends
from steerkernel.ops import junction
from steerkernel.testing import SCORE_TOLERANCES, TOLERANCES, Tol, assert_close

MIN_CASES = 1000
THREADS_AT_IMPORT = torch.get_num_threads()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXACT = Tol(rtol=0.0, atol=0.0)

# Backends compared with the reference.  The C++ CPU backend takes most cases; Triton runs
# under the CPU interpreter (slow) when there is no GPU, so it gets a small share.
_STATUS = backends.backend_status()
HAS_CPU = _STATUS["cpu"][0]
HAS_CUDA = torch.cuda.is_available() and _STATUS["cuda"][0]
TRITON_MODULE = importlib.util.find_spec("steerkernel.backends.triton_junction") is not None
HAS_TRITON = TRITON_MODULE and _STATUS["triton"][0]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_FAST = torch.cuda.is_available()  # interpreted Triton is slow: few, small cases
NO_TRITON = ("steerkernel/backends/triton_junction.py does not exist yet" if not TRITON_MODULE
             else f"triton backend unavailable: {_STATUS['triton'][1]}")

#: cases checked, per backend ("reference" counts the algebraic laws checked on the oracle)
CASES: Dict[str, int] = collections.Counter()
#: counted tests that started in this session (the final count is only asserted when every
#: counted test that this machine can run did start, i.e. the whole file was selected)
FINISHED: set = set()
COUNTED_TESTS: List[str] = []


def counted(fn):
    COUNTED_TESTS.append(fn.__name__)
    return fn


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=False, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny float64 matmuls in the reference stall for ~10 ms each in BLAS's thread pool when
    the cores are busy (measured: 82 ms vs 1.3 ms per reference call on 2 shared cores);
    hundreds of small cases run far faster single-threaded.  The determinism test below turns
    threads back on for the CPU kernel."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Rows:
    """A ``[T, d]`` view at ``offset`` in a buffer with row stride ``d + pad``."""

    pad: int = 0
    offset: int = 0


ROW_LAYOUTS = st.builds(Rows, pad=st.sampled_from([0, 0, 1, 3, 8, 17]),
                        offset=st.sampled_from([0, 0, 1, 5]))
SCORE_LAYOUTS = st.sampled_from(["contiguous", "transposed", "stepped", "layer_major",
                                 "token_major", "padded"])
NORM_LAYOUTS = st.sampled_from(["contiguous", "stepped", "token_major"])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bit pattern of ``t`` (so NaN == NaN) for exact before/after comparisons."""
    if t.dtype.is_floating_point:
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()
    return t.clone()


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical except that any NaN equals any NaN (NaN sign / payload depend on the
    operand order of the arithmetic that produced them, which is no contract)."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(_bits(a)[~na], _bits(b)[~nb])


@dataclass
class Placed:
    """A view inside a buffer; ``outside`` marks the buffer elements the view does not cover."""

    view: torch.Tensor
    buf: torch.Tensor
    outside: torch.Tensor
    before: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.before = _bits(self.buf)

    def outside_untouched(self) -> bool:
        return torch.equal(_bits(self.buf).cpu()[self.outside], self.before.cpu()[self.outside])


def _place(shape, stride, offset, size, dtype, device="cpu", fill=4096.0) -> Placed:
    buf = torch.full((size,), fill, dtype=dtype, device=device)
    view = buf.as_strided(shape, stride, offset)
    idx = torch.arange(size).as_strided(shape, stride, offset)
    outside = torch.ones(size, dtype=torch.bool)
    outside[idx.reshape(-1)] = False
    return Placed(view, buf, outside)


def _place_rows(values: torch.Tensor, lay: Rows, device="cpu") -> Placed:
    T, d = values.shape
    rs = d + lay.pad
    pl = _place((T, d), (rs, 1), lay.offset, lay.offset + T * rs + 2, values.dtype, device)
    pl.view.copy_(values)
    pl.before = _bits(pl.buf)
    return pl


def _place_scores(T: int, K: int, dtype, layout: str, device="cpu") -> Placed:
    L, l = 3, 1
    return _place(*_score_geometry(T, K, layout, L, l), dtype, device)


def _score_geometry(T, K, layout, L, l):
    """(shape, stride, offset, buffer size) of a scores view."""
    if layout == "contiguous":
        return (T, K), (K, 1), 0, T * K
    if layout == "transposed":  # [K, T] buffer viewed as [T, K]
        return (T, K), (1, T), 0, T * K
    if layout == "stepped":  # every other column of a [T, 2K] buffer
        return (T, K), (2 * K, 2), 1, 2 * T * K + 1
    if layout == "layer_major":  # slice l of an [L, T, K] monitor buffer
        return (T, K), (K, 1), l * T * K, L * T * K
    if layout == "token_major":  # slice l of a [T, L, K] monitor buffer
        return (T, K), (L * K, 1), l * K, L * T * K
    if layout == "padded":
        return (T, K), (K + 5, 1), 2, T * (K + 5) + 3
    raise AssertionError(layout)


def _place_norms(T: int, dtype, layout: str, device="cpu") -> Placed:
    if layout == "contiguous":
        return _place((T,), (1,), 0, T, dtype, device)
    if layout == "stepped":
        return _place((T,), (3,), 2, 3 * T + 2, dtype, device)
    if layout == "token_major":
        return _place((T,), (4,), 1, 4 * T, dtype, device)
    raise AssertionError(layout)


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """Values of one junction call (contiguous tensors) and the layout each call uses."""

    residual: torch.Tensor
    V: torch.Tensor
    x: Optional[torch.Tensor] = None
    tables: Dict[str, torch.Tensor] = field(default_factory=dict)  # slot, shift, lo, hi, gates
    latch: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    eps: float = 1e-6
    check_values: bool = True
    res_layout: Rows = Rows()
    x_layout: Rows = Rows()
    out_layout: Rows = Rows()
    scores_layout: str = "contiguous"
    norms_layout: str = "contiguous"
    exact: bool = False

    @property
    def dtype(self):
        return self.residual.dtype


def _run(case: Case, backend: str, device="cpu", *, layouts: bool = True):
    """Run ``backend`` on freshly placed copies of the case; check confinement of writes.

    Outputs are poisoned with NaN, padding is filled with a sentinel; afterwards every buffer's
    padding and every input must be bit-identical to before.  Returns contiguous CPU results.
    """
    T, d = case.residual.shape
    K = case.V.shape[0]
    lay = case if layouts else Case(case.residual, case.V)  # default layouts
    res = _place_rows(case.residual, lay.res_layout, device)
    x = _place_rows(case.x, lay.x_layout, device) if case.x is not None else None
    sc = _place_scores(T, K, torch.float32, lay.scores_layout, device)
    nm = _place_norms(T, torch.float32, lay.norms_layout, device)
    sc.view.fill_(math.nan)
    nm.view.fill_(math.nan)
    sc.before, nm.before = _bits(sc.buf), _bits(nm.buf)
    out = None
    if case.weight is not None:
        out = _place_rows(torch.full((T, d), math.nan, dtype=case.dtype), lay.out_layout, device)
    inputs = {"V": case.V.to(device, copy=True),
              **{k: v.to(device, copy=True) for k, v in case.tables.items()}}
    if case.weight is not None:
        inputs["weight"] = case.weight.to(device, copy=True)
    snap = {k: _bits(v) for k, v in inputs.items()}
    latch = case.latch.to(device, copy=True) if case.latch is not None else None
    s, n, o = junction(res.view, inputs["V"], x=x.view if x is not None else None,
                       weight=inputs.get("weight"), eps=case.eps, latch=latch,
                       scores=sc.view, norms=nm.view, out=out.view if out is not None else None,
                       check_values=case.check_values, backend=backend,
                       **{k: v for k, v in inputs.items() if k not in ("V", "weight")})
    assert s is sc.view and n is nm.view and (o is None) == (out is None)
    for name, pl in (("residual", res), ("x", x), ("scores", sc), ("norms", nm), ("out", out)):
        if pl is not None:
            assert pl.outside_untouched(), f"[{backend}] wrote outside the {name} view"
    if x is not None:
        assert torch.equal(_bits(x.buf), x.before), f"[{backend}] modified x"
    for k, v in inputs.items():
        assert torch.equal(_bits(v), snap[k]), f"[{backend}] modified input {k}"
    return dict(residual=res.view.cpu(), scores=sc.view.cpu(), norms=nm.view.cpu(),
                out=out.view.cpu() if out is not None else None,
                latch=latch.cpu() if latch is not None else None)


def _compare(case: Case, backend: str, device="cpu") -> None:
    got = _run(case, backend, device)
    ref = _run(case, "reference", layouts=False)
    tol, stol = TOLERANCES[case.dtype], SCORE_TOLERANCES[case.dtype]
    assert_close(got["scores"], ref["scores"], EXACT if case.exact else stol,
                 f"[{backend}] scores")
    assert_close(got["norms"], ref["norms"], stol, f"[{backend}] norms")
    assert_close(got["residual"], ref["residual"], EXACT if case.exact else tol,
                 f"[{backend}] residual")
    if ref["out"] is not None:
        assert_close(got["out"], ref["out"], tol, f"[{backend}] out")
    if ref["latch"] is not None:
        assert torch.equal(got["latch"], ref["latch"]), \
            f"[{backend}] latch {got['latch'].tolist()} != {ref['latch'].tolist()}"
    CASES[backend] += 1


def _gap_threshold(col: torch.Tensor, scale: float, pick: float) -> float:
    """A threshold at least 1e-3·scale away from every projection in ``col`` (float64)."""
    vals = torch.unique(col)
    cands = [float(vals[0]) - 1.0, float(vals[-1]) + 1.0]
    if vals.numel() > 1:
        mids = (vals[1:] + vals[:-1]) / 2
        gaps = vals[1:] - vals[:-1]
        cands += [float(m) for m, g in zip(mids, gaps) if float(g) > 2e-3 * scale]
    return cands[min(int(pick * len(cands)), len(cands) - 1)]


KINDS = ("add", "ablate", "cap_above", "cap_below", "pin", "noop", "band", "inverted",
         "pin_inf", "bounded_add")


@st.composite
def cases(draw, exact: bool = False, max_T: int = 24, max_d: int = 300, max_K: int = 12,
          raw: bool = True):
    """A junction call.  ``raw`` allows out-of-range slot / gate values with check_values=False."""
    dtype = draw(st.sampled_from(DTYPES))
    K = draw(st.integers(1, max_K))
    d_small = st.integers(K if exact else 1, max(K, 20) if exact else 20)
    d_tail = st.sampled_from([15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 255, 257])
    d = draw(st.one_of(d_small, d_tail.filter(lambda v: v <= max_d and v >= (K if exact else 1)),
                       st.integers(K if exact else 1, max(max_d, K))))
    T = draw(st.one_of(st.integers(1, 6), st.integers(1, max_T)))
    P = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    v_model = draw(st.booleans())
    v_dtype = dtype if v_model else torch.float32

    if exact:
        perm = torch.randperm(d, generator=gen)[:K]
        sign = torch.where(torch.rand(K, generator=gen) < 0.5, -1.0, 1.0).double()
        V64 = torch.zeros(K, d, dtype=f64)
        V64[torch.arange(K), perm] = sign

        def vals(*shape, lim=8):
            return torch.randint(-2 * lim, 2 * lim + 1, shape, generator=gen).double() / 2
        residual = vals(T, d)
        x = vals(T, d) if draw(st.booleans()) else None
    else:
        V64 = torch.randn(K, d, generator=gen, dtype=f64)
        V64 /= V64.norm(dim=1, keepdim=True)
        residual = torch.randn(T, d, generator=gen, dtype=f64) * draw(st.sampled_from([1.0, 30.0]))
        x = torch.randn(T, d, generator=gen, dtype=f64) if draw(st.booleans()) else None
        if draw(st.integers(0, 19)) == 0:  # a non-finite entry must stay in its own row
            bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            tgt = residual if x is None or draw(st.booleans()) else x
            tgt[draw(st.integers(0, T - 1)), draw(st.integers(0, d - 1))] = bad
    V = V64.to(v_dtype).contiguous()
    residual = residual.to(dtype)
    x = x.to(dtype) if x is not None else None
    h = residual + x if x is not None else residual.clone()  # what every backend projects
    p = h.double() @ V.double().T  # [T, K], exact for the exact family
    finite = p[torch.isfinite(p)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0

    case = Case(residual, V, x, exact=exact)
    case.res_layout = draw(ROW_LAYOUTS)
    case.x_layout = draw(ROW_LAYOUTS)
    case.out_layout = draw(ROW_LAYOUTS)
    case.scores_layout = draw(SCORE_LAYOUTS)
    case.norms_layout = draw(NORM_LAYOUTS)
    if draw(st.booleans()):
        case.weight = (torch.rand(d, generator=gen, dtype=f64) + 0.5).to(
            draw(st.sampled_from([torch.float32, dtype])))
        case.eps = draw(st.sampled_from([1e-6, 1e-5, 1.0] + ([0.0] if exact else [])))

    slots = draw(st.sampled_from(["none", "zero", "random", "random", "all"]))
    if slots == "none":
        return case
    if slots == "zero" or P == 1:
        slot = torch.zeros(T, dtype=torch.int32)
    elif slots == "all":
        slot = torch.randint(1, P, (T,), generator=gen, dtype=torch.int32)
    else:
        slot = torch.randint(0, P, (T,), generator=gen, dtype=torch.int32)
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=P * K, max_size=P * K))

    def tau():
        if exact:
            return float(torch.randint(-16, 17, (), generator=gen)) / 2
        return float(torch.randn((), generator=gen, dtype=f64)) * scale / 2

    shift = torch.zeros(P, K, dtype=f64)
    lo = torch.full((P, K), -math.inf, dtype=f64)
    hi = torch.full((P, K), math.inf, dtype=f64)
    for s in range(P):
        for k in range(K):
            kind = kinds[s * K + k]
            a = (float(torch.randint(-8, 9, (), generator=gen)) / 2 if exact
                 else float(torch.empty((), dtype=f64).uniform_(-3, 3, generator=gen)) * scale)
            if kind in ("add", "bounded_add"):
                shift[s, k] = a
                if kind == "bounded_add":
                    lo[s, k], hi[s, k] = sorted([tau(), tau()])
            elif kind == "ablate":
                lo[s, k] = hi[s, k] = 0.0
            elif kind == "cap_above":
                hi[s, k] = tau()
            elif kind == "cap_below":
                lo[s, k] = tau()
            elif kind == "pin":
                lo[s, k] = hi[s, k] = tau()
            elif kind == "band":
                lo[s, k], hi[s, k] = sorted([tau(), tau()])
            elif kind == "inverted":  # lo > hi: clamp semantics (torch.clamp gives hi)
                a, b = sorted([tau(), tau()])
                lo[s, k], hi[s, k] = b + 1.0, a
            elif kind == "pin_inf":
                lo[s, k] = hi[s, k] = draw(st.sampled_from([math.inf, -math.inf]))
    # row 0 is never applied: values that would show if it were
    shift[0] = 3.0
    lo[0] = 50.0
    hi[0] = 60.0
    case.tables = dict(slot=slot, shift=shift.float(), lo=lo.float(), hi=hi.float())
    if draw(st.booleans()):  # tables given partially: the wrapper fills the defaults
        for name in draw(st.lists(st.sampled_from(["shift", "lo", "hi"]), max_size=2,
                                  unique=True)):
            default = {"shift": 0.0, "lo": -math.inf, "hi": math.inf}[name]
            if bool((case.tables[name] == default).all()):
                del case.tables[name]

    if draw(st.booleans()):
        gc = torch.randint(-1, K, (P,), generator=gen, dtype=torch.int32)
        above = torch.rand(P, generator=gen) < 0.5
        thr = torch.zeros(P, dtype=torch.float32)
        for s in range(P):
            c = max(int(gc[s]), 0)
            col = p[:, c]
            col = col[torch.isfinite(col)]
            mode = draw(st.sampled_from(["data", "data", "data", "inf", "-inf"]))
            if mode != "data" or col.numel() == 0:
                thr[s] = math.inf if mode == "inf" else -math.inf
            elif exact:  # exactly at a projection (must not fire) or half-way off one
                thr[s] = float(col[int(torch.randint(0, col.numel(), (), generator=gen))]) + \
                    draw(st.sampled_from([0.0, 0.0, 0.5, -0.5]))
            else:
                thr[s] = _gap_threshold(col, scale, float(torch.rand((), generator=gen)))
        case.tables.update(gate_concept=gc, gate_threshold=thr)
        if draw(st.booleans()):
            case.tables["gate_above"] = above
        if draw(st.booleans()):
            case.latch = (torch.rand(P, generator=gen) < 0.3).to(torch.int32)
    if raw and draw(st.integers(0, 4)) == 0:
        # Out-of-range values with check_values=False: slots act as 0, gate concepts never fire.
        case.check_values = False
        if T and draw(st.booleans()):
            i = draw(st.integers(0, T - 1))
            slot[i] = draw(st.sampled_from([-1, P, P + 7, -2**31, 2**31 - 1]))
        if "gate_concept" in case.tables and draw(st.booleans()):
            case.tables["gate_concept"][draw(st.integers(0, P - 1))] = draw(
                st.sampled_from([-2, K, K + 3, -2**31, 2**31 - 1]))
    return case


def _describe(case: Case) -> str:
    T, d = case.residual.shape
    return (f"T={T} d={d} K={case.V.shape[0]} dtype={case.dtype} V={case.V.dtype} "
            f"x={case.x is not None} weight={None if case.weight is None else case.weight.dtype} "
            f"eps={case.eps} tables={sorted(case.tables)} latch={case.latch is not None} "
            f"check_values={case.check_values} layouts=({case.res_layout}, {case.x_layout}, "
            f"{case.out_layout}, {case.scores_layout}, {case.norms_layout})")


# --------------------------------------------------------------------------- backend vs oracle
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=f"C++ CPU backend: {_STATUS['cpu'][1]}")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)


@counted
@needs_cpu
@_settings(450)
@given(case=cases())
def test_cpu_matches_reference_random(case):
    note(_describe(case))
    _compare(case, "cpu")


@counted
@needs_cpu
@_settings(300)
@given(case=cases(exact=True))
def test_cpu_matches_reference_exact(case):
    """Basis directions and half-integer values: bit-identical scores, residual and latch."""
    note(_describe(case))
    _compare(case, "cpu")


@counted
@needs_cpu
@_settings(20)
@given(case=cases(max_T=80, max_d=64))
def test_cpu_is_deterministic(case):
    """Two runs of the same call (several threads when T is large) give identical bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(2, THREADS_AT_IMPORT))
    try:
        a, b = _run(case, "cpu"), _run(case, "cpu")
    finally:
        torch.set_num_threads(n)
    for k in a:
        if a[k] is not None:
            assert _identical(a[k], b[k]), k
    CASES["cpu"] += 1


@counted
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA backend (no GPU or extension not built)")
@_settings(200)
@given(case=cases())
def test_cuda_matches_reference(case):
    note(_describe(case))
    _compare(case, "cuda", "cuda")


#: the Triton launcher picks one of three kernels by shape; small generated shapes would only
#: ever reach "row", so each case also forces a kernel (None = the launcher's own choice)
TRITON_PATHS = st.sampled_from([None, "row", "chunked", "tile"])


class _triton_path:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        import steerkernel.backends.triton_junction as tj

        self.tj, self.old = tj, tj.FORCE_PATH
        tj.FORCE_PATH = self.path
        note(f"triton path: {self.path or 'auto'}")

    def __exit__(self, *exc):
        self.tj.FORCE_PATH = self.old


@counted
@needs_triton
@_settings(200 if TRITON_FAST else 80)
@given(case=cases(max_T=6 if not TRITON_FAST else 24, max_d=64 if not TRITON_FAST else 300,
                  max_K=5 if not TRITON_FAST else 12), path=TRITON_PATHS)
def test_triton_matches_reference_random(case, path):
    note(_describe(case))
    with _triton_path(path):
        _compare(case, "triton", TRITON_DEVICE)


@counted
@needs_triton
@_settings(200 if TRITON_FAST else 60)
@given(case=cases(exact=True, max_T=6 if not TRITON_FAST else 24,
                  max_d=32 if not TRITON_FAST else 300, max_K=5 if not TRITON_FAST else 12),
       path=TRITON_PATHS)
def test_triton_matches_reference_exact(case, path):
    note(_describe(case))
    with _triton_path(path):
        _compare(case, "triton", TRITON_DEVICE)


# --------------------------------------------------------------------------- invalid layouts
ROW_ARGS = ("residual", "x", "out")
CONTIGUOUS_ARGS = ("V", "weight", "slot", "shift", "lo", "hi", "gate_concept",
                   "gate_threshold", "gate_above", "latch")


def _relayout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t``'s values (except for "overlap") in another memory layout."""
    if how == "inner_stride":  # every other element of a twice-as-wide buffer
        buf = torch.zeros(*t.shape, 2, dtype=t.dtype)
        buf[..., 0] = t
        return buf[..., 0]
    if how == "transposed":
        return t.T.contiguous().T if t.dim() == 2 else t.clone()
    if how == "overlap":  # row stride d - 1: rows share memory
        T, d = t.shape
        buf = t.reshape(-1)[: max(T * (d - 1) + 1, 1)].clone()
        return buf.as_strided((T, d), (d - 1, 1))
    raise AssertionError(how)


def _layout_ok(name: str, t: torch.Tensor) -> bool:
    """The documented layout rules (junction docstring / docs/design.md §5), stated independently."""
    if name in ROW_ARGS:
        T, d = t.shape
        return (d <= 1 or t.stride(1) == 1) and (T <= 1 or t.stride(0) >= d)
    # contiguous: strides are those of a C-ordered tensor, ignoring size-1 dims
    expect = 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


@counted
@needs_cpu
@_settings(150)
@given(case=cases(exact=True, max_T=6, max_d=40, max_K=5, raw=False), data=st.data())
def test_layouts_are_validated(case, data):
    """A non-conforming layout raises ValueError before any write; a conforming one (e.g. a
    transposed [1, d] tensor) gives the reference result."""
    T, d = case.residual.shape
    present = ["residual", "V"] + (["x"] if case.x is not None else []) + \
        (["weight", "out"] if case.weight is not None else []) + list(case.tables) + \
        (["latch"] if case.latch is not None else [])
    name = data.draw(st.sampled_from(present), label="argument")
    how = data.draw(st.sampled_from(["inner_stride", "transposed"] +
                                    (["overlap"] if name in ROW_ARGS else [])), label="layout")
    kw = dict(residual=case.residual.clone(), V=case.V.clone(), x=case.x,
              weight=case.weight, eps=case.eps, latch=case.latch,
              **{k: v.clone() for k, v in case.tables.items()})
    if kw["x"] is not None:
        kw["x"] = kw["x"].clone()
    if kw["latch"] is not None:
        kw["latch"] = kw["latch"].clone()
    if case.weight is not None:
        kw["out"] = torch.full((T, d), 4096.0, dtype=case.dtype)
    kw[name] = _relayout(kw[name], how)
    ok = _layout_ok(name, kw[name])
    note(f"{name} {how}: shape {tuple(kw[name].shape)} strides {kw[name].stride()} ok={ok}")
    if not ok:
        K = case.V.shape[0]
        scores = torch.full((T, K), 4096.0)
        norms = torch.full((T,), 4096.0)
        snap = {k: _bits(v) for k, v in kw.items() if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match="stride|overlapping|contiguous"):
            junction(**kw, scores=scores, norms=norms, backend="cpu")
        for k, v in snap.items():
            assert torch.equal(_bits(kw[k]), v), f"{k} was written by a rejected call"
        assert (scores == 4096.0).all() and (norms == 4096.0).all(), "outputs were written"
    elif how != "overlap":
        exp = dict(kw)
        exp = {k: (v.contiguous().clone() if isinstance(v, torch.Tensor) else v)
               for k, v in kw.items()}
        got = junction(**kw, backend="cpu")
        ref = junction(**exp, backend="reference")
        tol, stol = TOLERANCES[case.dtype], SCORE_TOLERANCES[case.dtype]
        assert_close(got[0], ref[0], EXACT, "scores")
        assert_close(got[1], ref[1], stol, "norms")
        assert_close(kw["residual"], exp["residual"], EXACT, "residual")
        if got[2] is not None:
            assert_close(got[2], ref[2], tol, "out")
    CASES["cpu"] += 1


# --------------------------------------------------------------------------- algebraic laws
LAW_BACKENDS = [("reference", "cpu")] + ([("cpu", "cpu")] if HAS_CPU else []) + \
    ([("cuda", "cuda")] if HAS_CUDA else []) + \
    ([("triton", TRITON_DEVICE)] if HAS_TRITON and TRITON_FAST else [])
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: the Triton backend's per-product error beyond fp32 (bf16-piece tensor-core products)
TRITON_SPLIT_REL = 2.0**-16


@dataclass
class Orth:
    """Orthonormal directions (signed basis vectors when ``exact``) and a hidden state."""

    residual: torch.Tensor
    x: Optional[torch.Tensor]
    V: torch.Tensor
    exact: bool
    #: relative error of each product on top of fp32 rounding: the Triton backend multiplies
    #: bf16 pieces of fp32 values (|a - hi - lo| <= 2^-16 |a|, triton_junction's "Numerics")
    split_rel: float = 0.0

    @property
    def h(self) -> torch.Tensor:
        return self.residual + self.x if self.x is not None else self.residual.clone()

    def bound(self, *states: torch.Tensor) -> torch.Tensor:
        """Per-row bound on a projection error: one store in the model dtype plus fp32
        arithmetic (and fp32-rounded directions) on hidden states as large as ``states``."""
        h = states[0]
        if self.exact:
            return torch.zeros(h.shape[0], 1, dtype=torch.float64)
        d = h.shape[1]
        u = UNIT_ROUNDOFF[h.dtype] + 4 * d * 2.0**-24 + 2 * self.split_rel
        norm = torch.stack([s.double().norm(dim=1, keepdim=True) for s in states]).amax(0)
        return 4 * u * norm

    def score_tol(self, *states: torch.Tensor) -> Tol:
        """SCORE_TOLERANCES of the dtype, widened by the backend's product error on states
        this large (a near-zero score of a large state is exact only up to that)."""
        tol = SCORE_TOLERANCES[self.residual.dtype]
        if not self.split_rel:
            return tol
        norm = max(float(s.double().norm(dim=1).max()) for s in states)
        return Tol(rtol=tol.rtol, atol=tol.atol + 4 * self.split_rel * norm)


@st.composite
def orthonormal(draw, max_T=12, max_d=96):
    dtype = draw(st.sampled_from(DTYPES))
    exact = draw(st.booleans())
    d = draw(st.integers(1, max_d))
    K = draw(st.integers(1, min(d, 10)))
    T = draw(st.integers(1, max_T))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if exact:
        V = torch.zeros(K, d)
        V[torch.arange(K), torch.randperm(d, generator=gen)[:K]] = torch.where(
            torch.rand(K, generator=gen) < 0.5, -1.0, 1.0)
        r = torch.randint(-16, 17, (T, d), generator=gen).double() / 2
        x = torch.randint(-16, 17, (T, d), generator=gen).double() / 2
    else:
        q, _ = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))
        V = q.T.contiguous().float()
        r = torch.randn(T, d, generator=gen, dtype=torch.float64) * 4
        x = torch.randn(T, d, generator=gen, dtype=torch.float64)
    with_x = draw(st.booleans())
    return Orth(r.to(dtype), x.to(dtype) if with_x else None, V, exact)


def _call(o: Orth, backend, device, residual=None, with_x=True, **kw):
    r = (o.residual if residual is None else residual).to(device, copy=True)
    x = o.x.to(device) if (with_x and o.x is not None) else None
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    s, n, out = junction(r, o.V.to(device), x=x, backend=backend, **kw)
    return r.cpu(), s.cpu(), n.cpu(), (out.cpu() if out is not None else None)


def _tables(K, P=2):
    return (torch.zeros(P, K), torch.full((P, K), -math.inf), torch.full((P, K), math.inf))


@counted
@pytest.mark.parametrize("backend,device", LAW_BACKENDS, ids=[b for b, _ in LAW_BACKENDS])
@_settings(60)
@given(o=orthonormal(), data=st.data())
def test_law_ablation_is_idempotent(backend, device, o, data):
    """Ablating leaves a zero projection, and ablating again changes (almost) nothing."""
    T, d = o.residual.shape
    K = o.V.shape[0]
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=K, max_size=K)))
    assume(bool(mask.any()))
    shift, lo, hi = _tables(K)
    lo[1, mask] = 0.0
    hi[1, mask] = 0.0
    slot = torch.ones(T, dtype=torch.int32)
    r1, s1, _, _ = _call(o, backend, device, slot=slot, shift=shift, lo=lo, hi=hi)
    p1 = r1.double() @ o.V.double().T
    assert (p1[:, mask].abs() <= o.bound(r1, o.h)).all(), f"projection left after ablation: {p1}"
    r2, s2, _, _ = _call(o, backend, device, residual=r1, with_x=False, slot=slot, shift=shift,
                         lo=lo, hi=hi)
    assert_close(s2, p1.float(), o.score_tol(r1, o.h), "scores of 2nd call")
    if o.exact:
        assert torch.equal(r2, r1), "ablation is not idempotent"
    else:
        u = UNIT_ROUNDOFF[o.residual.dtype]
        bound = K * o.bound(r1, o.h) + 2 * u * r1.double().abs()
        assert ((r2.double() - r1.double()).abs() <= bound).all(), "ablation not idempotent"
    CASES[backend] += 1


@counted
@pytest.mark.parametrize("backend,device", LAW_BACKENDS, ids=[b for b, _ in LAW_BACKENDS])
@_settings(60)
@given(o=orthonormal(), data=st.data())
def test_law_caps_hold(backend, device, o, data):
    """A ceiling (floor) cap leaves no projection above (below) it; other concepts keep theirs."""
    T, d = o.residual.shape
    K = o.V.shape[0]
    kinds = data.draw(st.lists(st.sampled_from(["ceil", "floor", "free"]), min_size=K,
                               max_size=K))
    p0 = o.h.double() @ o.V.double().T
    shift, lo, hi = _tables(K)
    for k, kind in enumerate(kinds):
        # a cap inside the data's range (so it binds for some rows), or at a data value
        col = p0[:, k]
        tau = float(col[data.draw(st.integers(0, T - 1))]) + data.draw(
            st.sampled_from([0.0, 0.5, -0.5, -1.0]))
        if kind == "ceil":
            hi[1, k] = tau
        elif kind == "floor":
            lo[1, k] = tau
    slot = torch.ones(T, dtype=torch.int32)
    r, s, _, _ = _call(o, backend, device, slot=slot, shift=shift, lo=lo, hi=hi)
    p = r.double() @ o.V.double().T
    b = o.bound(r, o.h)
    for k, kind in enumerate(kinds):
        if kind == "ceil":
            assert (p[:, k:k + 1] <= hi[1, k].double() + b).all(), f"above ceiling, concept {k}"
        elif kind == "floor":
            assert (p[:, k:k + 1] >= lo[1, k].double() - b).all(), f"below floor, concept {k}"
        else:
            assert ((p[:, k:k + 1] - p0[:, k:k + 1]).abs() <= b).all(), \
                f"free concept {k} moved"
    CASES[backend] += 1


@counted
@pytest.mark.parametrize("backend,device", LAW_BACKENDS, ids=[b for b, _ in LAW_BACKENDS])
@_settings(60)
@given(o=orthonormal(), data=st.data())
def test_law_add_then_subtract_is_identity(backend, device, o, data):
    """add α then add −α returns the input within one rounding per store (exactly for basis
    directions and half-integer values)."""
    T, d = o.residual.shape
    K = o.V.shape[0]
    halves = st.integers(-8, 8).map(lambda v: v / 2)
    alpha = torch.tensor(data.draw(st.lists(halves if o.exact else
                                            st.floats(-6, 6, allow_nan=False, width=32),
                                            min_size=K, max_size=K)), dtype=torch.float32)
    shift, lo, hi = _tables(K)
    slot = torch.ones(T, dtype=torch.int32)
    h = o.h
    shift[1] = alpha
    r1, s1, _, _ = _call(o, backend, device, slot=slot, shift=shift, lo=lo, hi=hi)
    moved = r1.double() @ o.V.double().T - s1.double()
    assert ((moved - alpha.double()).abs() <= o.bound(r1, h)).all(), \
        "add did not move the projections by alpha"
    shift[1] = -alpha
    r2, _, _, _ = _call(o, backend, device, residual=r1, with_x=False, slot=slot, shift=shift,
                        lo=lo, hi=hi)
    if o.exact:
        assert torch.equal(r2, h), "add α then −α is not the identity"
    else:
        u = UNIT_ROUNDOFF[h.dtype] + 4 * d * 2.0**-24
        step = alpha.double().abs() @ o.V.double().abs()  # [d]
        bound = 4 * u * (h.double().abs() + r1.double().abs() + step)
        err = (r2.double() - h.double()).abs()
        assert (err <= bound).all(), f"max error {float(err.max())}"
    CASES[backend] += 1


@counted
@pytest.mark.parametrize("backend,device", LAW_BACKENDS, ids=[b for b, _ in LAW_BACKENDS])
@_settings(60)
@given(case=cases(max_T=16, max_d=96, max_K=6, raw=False))
def test_law_slot_zero_and_readout(backend, device, case):
    """Rows on slot 0 are bit-identical to residual + x whatever the tables (row 0 of the
    tables holds garbage), and the readout (scores, norms) is pre-intervention: bit-identical to
    a monitoring-only call on the same backend.  Slot 0 never sets a latch."""
    if "slot" not in case.tables:
        case.tables = dict(slot=torch.zeros(case.residual.shape[0], dtype=torch.int32),
                           shift=torch.full((1, case.V.shape[0]), 7.0))
    steer = _run(case, backend, device)
    mon = Case(case.residual, case.V, case.x, weight=case.weight, eps=case.eps)
    plain = _run(mon, backend, device, layouts=False)
    assert _identical(steer["scores"], plain["scores"]), "scores not pre-steer"
    assert _identical(steer["norms"], plain["norms"]), "norms not pre-steer"
    zero = case.tables["slot"] == 0
    assert _identical(steer["residual"][zero], plain["residual"][zero]), "a slot-0 row changed"
    h = case.residual + case.x if case.x is not None else case.residual
    assert _identical(plain["residual"], h), "monitoring changed residual + x"
    if plain["out"] is not None:
        assert _identical(steer["out"][zero], plain["out"][zero]), "slot-0 out differs"
    if case.latch is not None:
        used = torch.zeros_like(case.latch, dtype=torch.bool)
        used[case.tables["slot"][~zero].long()] = True
        assert torch.equal(steer["latch"][~used], case.latch[~used]), "unused slot latched"
    CASES[backend] += 1


@counted
@needs_triton
@pytest.mark.skipif(TRITON_FAST, reason="on a GPU triton joins the law tests above")
@_settings(15)
@given(o=orthonormal(max_T=4, max_d=32), data=st.data())
def test_laws_triton_interpreted(o, data):
    """A few law checks for interpreted Triton (each call is slow under the interpreter)."""
    law = data.draw(st.sampled_from([test_law_ablation_is_idempotent, test_law_caps_hold,
                                     test_law_add_then_subtract_is_identity]))
    o = dataclasses.replace(o, split_rel=TRITON_SPLIT_REL)
    law.hypothesis.inner_test("triton", "cpu", o, data)


def test_scores_agree_across_backends():
    """One fixed case through every backend: the readout is backend-invariant within the fp32
    tolerance (the random tests above check each backend against the reference)."""
    from steerkernel.testing import make_case, run_case

    names = [b for b, _ in LAW_BACKENDS] + (["triton"] if HAS_TRITON and not TRITON_FAST else [])
    case = make_case(5, 48, 4, torch.float32, P=3, gate="mixed", seed=11)
    got = {}
    for b in names:
        dev = dict(LAW_BACKENDS).get(b, TRITON_DEVICE)
        from steerkernel.testing import to_device
        got[b] = run_case(to_device(case, dev), b)["scores"].cpu()
    for b in names[1:]:
        assert_close(got[b], got[names[0]], SCORE_TOLERANCES[torch.float32], f"{b} vs reference")


# --------------------------------------------------------------------------- shared memory
#: arguments that may be placed in one shared buffer, and those the op writes
SHARE_ARGS = ("residual", "x", "out", "scores", "norms", "V", "weight", "slot", "shift", "lo",
              "hi", "gate_concept", "gate_threshold", "latch")
WRITTEN_ARGS = frozenset({"residual", "out", "scores", "norms", "latch"})
#: pairs that may be the very same view (x is the residual; out is x)
SAME_VIEW_OK = (frozenset({"x", "residual"}), frozenset({"out", "x"}))


def _byte_set(t: torch.Tensor) -> set:
    """Every byte address ``t`` reads or writes (small tensors only)."""
    offs = [0]
    for n, st_ in zip(t.shape, t.stride()):
        offs = [o + i * st_ for o in offs for i in range(n)]
    esz, base = t.element_size(), t.data_ptr()
    return {base + o * esz + b for o in offs for b in range(esz)}


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


@needs_cpu
@_settings(250)
@given(data=st.data())
def test_shared_buffer_aliasing_is_exact(data):
    """Arguments placed at random offsets in one buffer, every strided one with the same row
    stride (column slices of one row-major buffer, the layout of real packed buffers), the
    others dense anywhere.  An independent byte-level oracle decides: if a written tensor
    shares a byte with any other argument (except x *being* the residual and out *being* x)
    the call must raise ValueError and write nothing; otherwise it must be accepted and give
    bit for bit what separate buffers give, touching no byte outside the written views."""
    draw = data.draw
    T, d, K, P = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 3)), 3
    packed = draw(st.booleans(), label="packed")
    width = {"residual": d, "x": d, "out": d, "scores": K, "norms": 1}
    if packed:  # disjoint column slices of one [T, S] buffer, in a random order
        shared = draw(st.sets(st.sampled_from(sorted(width)), min_size=2), label="shared")
        order = draw(st.permutations(sorted(shared)), label="column order")
        S = sum(width[n] for n in order) + draw(st.integers(0, 3), label="row padding")
        columns, c = {}, 0
        for n in order:
            columns[n], c = c, c + width[n]
    else:
        S = draw(st.integers(max(d, K), 2 * max(d, K) + 4), label="row stride")
        shared = draw(st.sets(st.sampled_from(SHARE_ARGS), min_size=2, max_size=7),
                      label="shared")
    words = T * S + 48
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    raw = torch.randn(words, generator=gen) * 0.5
    same = draw(st.sampled_from([None, "x=residual", "out=x"]), label="same view")
    backend = draw(st.sampled_from(["cpu", "cpu", "reference"]), label="backend")
    geometry = {"residual": ((T, d), (S, 1)), "x": ((T, d), (S, 1)), "out": ((T, d), (S, 1)),
                "scores": ((T, K), (S, 1)), "norms": ((T,), (S,)), "V": ((K, d), (d, 1)),
                "weight": ((d,), (1,)), "slot": ((T,), (1,)), "shift": ((P, K), (K, 1)),
                "lo": ((P, K), (K, 1)), "hi": ((P, K), (K, 1)), "gate_concept": ((P,), (1,)),
                "gate_threshold": ((P,), (1,)), "latch": ((P,), (1,))}
    ints = {"slot", "gate_concept", "latch"}
    kw, offsets = {}, {}
    for name in SHARE_ARGS:
        shape, stride = geometry[name]
        span = 1 + sum((n - 1) * s_ for n, s_ in zip(shape, stride))
        dtype = torch.int32 if name in ints else torch.float32
        if name in shared:
            if packed:
                offsets[name] = columns[name]
            else:
                column = st.integers(0, S - 1) if stride[0] == S else st.nothing()
                offsets[name] = draw(column | st.integers(0, words - span),
                                     label=f"{name} offset")
            base = raw.view(torch.int32) if name in ints else raw
            kw[name] = base.as_strided(shape, stride, offsets[name])
        else:
            kw[name] = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    # valid-ish integer contents (later writes win where they share memory; the op runs with
    # check_values=False, and out-of-range slots / gate concepts are defined to be inert)
    kw["slot"].copy_(torch.randint(0, P, (T,), generator=gen, dtype=torch.int32))
    kw["gate_concept"].copy_(torch.tensor([-1, 0, K - 1], dtype=torch.int32))
    kw["latch"].copy_(torch.tensor([0, 1, 0], dtype=torch.int32))
    kw["lo"].copy_(torch.minimum(kw["lo"], kw["hi"]))
    in_raw = dict(offsets)  # where each argument living in the shared buffer starts
    if same == "x=residual":
        kw["x"] = kw["residual"]
        in_raw.pop("x", None)
        if "residual" in offsets:
            in_raw["x"] = offsets["residual"]
    elif same == "out=x":
        kw["out"] = kw["x"]
        in_raw.pop("out", None)
        if "x" in offsets:
            in_raw["out"] = offsets["x"]
    kw.update(gate_above=torch.tensor([True, False, True]), eps=1e-6, check_values=False)
    note(f"T={T} d={d} K={K} S={S} packed={packed} shared={sorted(shared)} offsets={in_raw} "
         f"same={same} "
         f"backend={backend}")

    must_reject, interleaved = None, False
    for i, a in enumerate(SHARE_ARGS):
        for b in SHARE_ARGS[i + 1:]:
            if a not in WRITTEN_ARGS and b not in WRITTEN_ARGS:
                continue
            ta, tb = kw[a], kw[b]
            if frozenset({a, b}) in SAME_VIEW_OK and _same_view(ta, tb):
                continue
            sa, sb = _byte_set(ta), _byte_set(tb)
            if sa & sb:
                must_reject = must_reject or (a, b)
            elif min(sa) < max(sb) and min(sb) < max(sa):
                interleaved = True  # byte ranges intersect, bytes do not
    event("rejected" if must_reject else
          "accepted, interleaved views" if interleaved else "accepted")
    sep = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    before_raw = _bits(raw)
    before = {k: _bits(v) for k, v in kw.items()
              if isinstance(v, torch.Tensor) and k not in in_raw}
    if must_reject:
        note(f"oracle: {must_reject[0]} shares bytes with {must_reject[1]}")
        with pytest.raises(ValueError, match="overlaps"):
            junction(**kw, backend=backend)
        assert torch.equal(_bits(raw), before_raw), "a rejected call wrote the shared buffer"
        for k, v in before.items():
            assert torch.equal(_bits(kw[k]), v), f"a rejected call wrote {k}"
        return
    got = junction(**kw, backend=backend)
    exp = junction(**sep, backend=backend)
    results = {"scores": (got[0], exp[0]), "norms": (got[1], exp[1]), "out": (got[2], exp[2]),
               "residual": (kw["residual"], sep["residual"]), "latch": (kw["latch"], sep["latch"])}
    for k, (g_, e_) in results.items():
        assert _identical(g_, e_), k
    # the shared buffer: exactly the separate results in the written views, nothing else
    expect = before_raw.view(torch.float32).clone()
    for k in WRITTEN_ARGS & set(in_raw):
        shape, stride = geometry[k]
        base = expect.view(torch.int32) if k in ints else expect
        base.as_strided(shape, stride, in_raw[k]).copy_(results[k][1])
    assert _identical(raw, expect), "bytes outside the written views changed"
    CASES[backend] += 1


# --------------------------------------------------------------------------- the count
@pytest.fixture(autouse=True)
def _record_started(request):
    FINISHED.add(request.function.__name__)
    yield


def test_zz_generated_case_count(capsys):
    """At least MIN_CASES generated cases ran in this session, across backends."""
    total = sum(CASES.values())
    with capsys.disabled():
        print(f"\n[test_properties] generated cases checked: {total} "
              f"({', '.join(f'{k}={v}' for k, v in sorted(CASES.items()))})")
    required = [n for n in COUNTED_TESTS if not _env_skipped(n)]
    missing = [n for n in required if n not in FINISHED]
    if missing:
        pytest.skip(f"only part of the file ran (not run: {', '.join(missing)}); "
                    f"{total} cases counted")
    assert total >= MIN_CASES, f"only {total} generated cases ran: {dict(CASES)}"


def _env_skipped(name: str) -> bool:
    fn = globals()[name]
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return True
    return False
