"""Shape-aware automatic backend choice: the table, its lookup, and its refresh from benchmarks.

The table (:mod:`.dispatch_table`, data only; or a JSON file named by
``$STEERKERNEL_DISPATCH_TABLE``) is an ordered list of rows::

    {"device": "cuda", "T": [64, None], "K": [8, None], "dtype": ["bf16"],
     "backends": ["triton", "cuda"], "measured": False, "why": "..."}

``T``, ``K``, ``d`` are ``[lo, hi)`` ranges (None = unbounded; absent = any) and ``dtype`` the
residual dtypes a row applies to (absent = any).  :meth:`Table.choose` returns the ``backends``
of the first row that matches the call (``()`` if none does); :func:`steerkernel.backends.resolve`
takes the first of them available on this machine, then the built-in order (CUDA tensors:
cuda, triton; CPU tensors: cpu), then the reference.  A forced backend (the ``backend=``
argument, else ``$STEERKERNEL_BACKEND``) never consults the table.  A call whose shape is not
given only matches rows without conditions on the missing dimensions.

Batch invariance (docs/design.md §2) is the default: the backends round differently in the last
bits, so a choice that depends on ``T`` would give a row different scores (and a gate sitting
on its threshold a different decision) depending on how many rows share its call; in a serving
engine that is how many other requests happen to be in the step.  So by default the lookup is
given ``T = None`` and only rows without a ``T`` condition apply: one backend for every batch
size of a given ``(K, d, dtype)``.  ``STEERKERNEL_DISPATCH_BY_T=1`` (see :func:`by_batch_size`)
opts in to the ``T`` rows: the fastest backend per batch size, at the price of that invariance.

The lookup runs on every automatic junction call: one dict lookup per distinct shape (the
first call of a shape scans the few rows), no tensor data read, so it is cheap and traceable
(under ``torch.compile`` with symbolic sizes it compares sizes, which dynamo guards on).

Refresh from a GPU benchmark run (``python -m benchmarks --device cuda``)::

    python -m steerkernel.backends.dispatch_cli refresh RESULT.json [--out PATH] [--dry-run]
    python -m steerkernel.backends.dispatch_cli show [--json] [--table PATH]
    python -m steerkernel.backends.dispatch_cli check PATH

``refresh`` keeps, per (dtype, T, K, d) shape that has both ``fused_cuda`` and ``fused_triton``
results, the faster backend (sum of median times over the modes both ran), bins the measured
grid into ranges (each measured size starts its own range, the first reaches down to 0 and the
last up to unbounded), merges neighbouring ranges with the same winner, and writes these
measured rows ahead of the table's unmeasured (predicted) rows.
"""
from __future__ import annotations

import ast
import datetime as _dt
import json
import math
import os
import pprint
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
DEVICES = ("cpu", "cuda")
DTYPE_NAMES = ("fp32", "bf16", "fp16", "fp64")
_TORCH_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.float64: "fp64"}
TABLE_ENV = "STEERKERNEL_DISPATCH_TABLE"
MODULE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.py")
TABLE_VERSION = 1
#: impl names of the benchmark runner (steerkernel/bench/cases.py) -> backend
BENCH_IMPLS = {"fused_cuda": "cuda", "fused_triton": "triton"}

BY_T_ENV = "STEERKERNEL_DISPATCH_BY_T"

_ROW_KEYS = ("device", "T", "K", "d", "dtype", "backends", "measured", "why", "evidence")
_TOP_KEYS = ("version", "source", "measured", "created", "machine", "result_file", "rows")
_DIMS = ("T", "K", "d")
_UNBOUNDED = 1 << 62
_MEMO_MAX = 4096


def by_batch_size() -> bool:
    """Whether automatic choices may depend on the batch size ``T`` (``$STEERKERNEL_DISPATCH_BY_T``
    is ``1``): faster where the table's ``T`` rows say so, but no longer batch-invariant
    across the backends.  Default: no."""
    v = os.environ.get(BY_T_ENV, "0").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"${BY_T_ENV} must be 0 or 1, got {v[:20]!r}")


class TableError(ValueError):
    """A dispatch table (or a benchmark result given to refresh) is malformed; the message
    names the file and the problem."""


class Row(NamedTuple):
    device: str
    T: Optional[Tuple[int, int]]  # [lo, hi) with unbounded ends filled in; None = any
    K: Optional[Tuple[int, int]]
    d: Optional[Tuple[int, int]]
    dtypes: Optional[frozenset]
    backends: Tuple[str, ...]


def dtype_name(dtype) -> Optional[str]:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` / ``"fp64"`` for a torch dtype or one of those names."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return dtype
    return _TORCH_DTYPES.get(dtype, str(dtype))


# ----------------------------------------------------------------------------- validation

def _fail(where: str, msg: str):
    raise TableError(f"steerkernel dispatch table {where}: {msg}")


def _range(where: str, name: str, v) -> Tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        _fail(where, f"{name} must be [lo, hi] (hi exclusive, null = unbounded), got {v!r}")
    lo, hi = v
    for end, x in (("lo", lo), ("hi", hi)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
            _fail(where, f"{name} {end} must be a non-negative integer or null, got {x!r}")
    lo = 0 if lo is None else lo
    hi = _UNBOUNDED if hi is None else hi
    if lo >= hi:
        _fail(where, f"{name} range {list(v)!r} is empty (lo must be < hi)")
    return lo, hi


def _compile_row(where: str, row) -> Row:
    if not isinstance(row, dict):
        _fail(where, f"a row must be an object, got {type(row).__name__}")
    extra = sorted(set(row) - set(_ROW_KEYS))
    if extra:
        _fail(where, f"unknown key(s) {extra} (a row has {list(_ROW_KEYS)})")
    dev = row.get("device")
    if dev not in DEVICES:
        _fail(where, f"device must be one of {list(DEVICES)}, got {dev!r}")
    bk = row.get("backends")
    if not isinstance(bk, (list, tuple)) or not bk:
        _fail(where, f"backends must be a non-empty list of backend names, got {bk!r}")
    for b in bk:
        if b not in BACKEND_NAMES:
            _fail(where, f"backends: unknown backend {b!r} (choose from {list(BACKEND_NAMES)})")
    if len(set(bk)) != len(bk):
        _fail(where, f"backends lists a backend twice: {list(bk)!r}")
    dims = {k: (_range(where, k, row[k]) if k in row else None) for k in _DIMS}
    dts = row.get("dtype")
    if dts is not None:
        if not isinstance(dts, (list, tuple)) or not dts:
            _fail(where, f"dtype must be a non-empty list of {list(DTYPE_NAMES)}, got {dts!r}")
        for x in dts:
            if x not in DTYPE_NAMES:
                _fail(where, f"dtype: unknown dtype {x!r} (choose from {list(DTYPE_NAMES)})")
        dts = frozenset(dts)
    if "measured" in row and not isinstance(row["measured"], bool):
        _fail(where, f"measured must be true or false, got {row['measured']!r}")
    if "why" in row and not isinstance(row["why"], str):
        _fail(where, f"why must be a string, got {type(row['why']).__name__}")
    if "evidence" in row and not isinstance(row["evidence"], dict):
        _fail(where, f"evidence must be an object, got {type(row['evidence']).__name__}")
    return Row(dev, dims["T"], dims["K"], dims["d"], dts, tuple(bk))


def compile_table(raw, source: str = "<table>") -> Tuple[Row, ...]:
    """Validate a table (the dict form) and return its rows ready for lookup.

    Raises :class:`TableError` naming ``source`` and the first problem found."""
    if not isinstance(raw, dict):
        _fail(source, f"the table must be an object with 'version' and 'rows', got "
                      f"{type(raw).__name__}")
    extra = sorted(set(raw) - set(_TOP_KEYS))
    if extra:
        _fail(source, f"unknown top-level key(s) {extra} (a table has {list(_TOP_KEYS)})")
    if raw.get("version") != TABLE_VERSION:
        _fail(source, f"version must be {TABLE_VERSION}, got {raw.get('version')!r}")
    rows = raw.get("rows")
    if not isinstance(rows, list) or not rows:
        _fail(source, f"rows must be a non-empty list, got {rows!r}")
    return tuple(_compile_row(f"{source} rows[{i}]", r) for i, r in enumerate(rows))


# ----------------------------------------------------------------------------- the table

class Table:
    """A validated dispatch table: :meth:`choose` per call, :meth:`describe` for reports."""

    def __init__(self, raw: dict, source: str):
        self.rows = compile_table(raw, source)
        self.raw = raw
        self.source = source
        self._memo: Dict[tuple, Tuple[str, ...]] = {}

    def choose(self, device_type: str, T=None, d=None, K=None, dtype=None) -> Tuple[str, ...]:
        """The ``backends`` of the first row matching the call, ``()`` if none matches.

        ``T``, ``d``, ``K`` may be None (unknown) or, while torch.compile traces with dynamic
        shapes, symbolic sizes (compared, never memoised)."""
        dt = dtype_name(dtype)
        plain = ((T is None or type(T) is int) and (d is None or type(d) is int)
                 and (K is None or type(K) is int))
        if plain:
            key = (device_type, T, d, K, dt)
            hit = self._memo.get(key)
            if hit is not None:
                return hit
        found: Tuple[str, ...] = ()
        for row in self.rows:
            if row.device != device_type:
                continue
            if row.T is not None and (T is None or not (row.T[0] <= T < row.T[1])):
                continue
            if row.K is not None and (K is None or not (row.K[0] <= K < row.K[1])):
                continue
            if row.d is not None and (d is None or not (row.d[0] <= d < row.d[1])):
                continue
            if row.dtypes is not None and dt not in row.dtypes:
                continue
            found = row.backends
            break
        if plain:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[key] = found
        return found

    def describe(self) -> dict:
        """JSON-able summary: where the table came from and its rows (as written)."""
        return {"source": self.source, "measured": bool(self.raw.get("measured")),
                "table_source": self.raw.get("source"), "created": self.raw.get("created"),
                "machine": self.raw.get("machine"), "rows": self.raw["rows"]}


def read_table_file(path: str) -> dict:
    """The dict form of a table file: JSON (``.json``) or a Python module assigning a literal
    ``TABLE = {...}`` (parsed, never executed).  Raises :class:`TableError` naming the file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        _fail(path, f"cannot be read ({e.strerror or e})")
    if not path.endswith(".py"):
        try:
            return json.loads(text)
        except ValueError as e:
            _fail(path, f"is not valid JSON ({e})")
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        _fail(path, f"is not valid Python (line {e.lineno}: {e.msg})")
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "TABLE"):
            try:
                return ast.literal_eval(node.value)
            except ValueError as e:
                _fail(path, f"TABLE (line {node.lineno}) is not a plain literal ({e})")
    _fail(path, "has no assignment 'TABLE = {...}'")


def load(path: Optional[str] = None) -> Table:
    """The table at ``path``, else at ``$STEERKERNEL_DISPATCH_TABLE``, else the shipped
    :mod:`.dispatch_table`."""
    path = path or os.environ.get(TABLE_ENV) or MODULE_PATH
    return Table(read_table_file(path), path)


_ACTIVE: Optional[Table] = None


def active() -> Table:
    """The table automatic choices use (loaded once per process; :func:`reload` re-reads)."""
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = load()
    return _ACTIVE


def reload() -> Table:
    """Re-read the table (after ``$STEERKERNEL_DISPATCH_TABLE`` or the file changed)."""
    global _ACTIVE
    _ACTIVE = None
    return active()


# ----------------------------------------------------------------------------- refresh

def _load_result(result) -> Tuple[dict, str]:
    if isinstance(result, dict):
        return result, "<result>"
    try:
        with open(result) as f:
            return json.load(f), result
    except OSError as e:
        raise TableError(f"benchmark result {result}: cannot be read ({e.strerror or e})")
    except ValueError as e:
        raise TableError(f"benchmark result {result}: is not valid JSON ({e})")


def measured_winners(doc: dict, name: str = "<result>") -> Dict[tuple, dict]:
    """``{(dtype, T, K, d): {"backend", "times": {backend: seconds}, "modes": n}}`` for every
    junction shape of a CUDA benchmark result measured with both fused_cuda and fused_triton
    (times: sum over the modes both ran of the median seconds per call)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise TableError(f"benchmark result {name}: not a `python -m benchmarks` result "
                         "(no 'results' list)")
    if doc.get("device") != "cuda":
        raise TableError(f"benchmark result {name}: is a {doc.get('device')!r} run; the "
                         "dispatch table is refreshed from a CUDA run (python -m benchmarks "
                         "--device cuda)")
    per: Dict[tuple, Dict[str, Dict[str, float]]] = {}
    for i, r in enumerate(doc["results"]):
        if not isinstance(r, dict) or r.get("impl") not in BENCH_IMPLS:
            continue
        if r.get("status") != "ok" or r.get("family", "junction") != "junction":
            continue
        p = r.get("params") or {}
        try:
            key = (str(p["dtype"]), int(p["T"]), int(p["K"]), int(p["d"]))
            mode = str(p["mode"])
            t = float(r["median_s"])
        except (KeyError, TypeError, ValueError):
            raise TableError(f"benchmark result {name}: results[{i}] lacks params T/K/d/dtype/"
                             "mode or median_s")
        if not (t > 0 and math.isfinite(t)):
            continue
        per.setdefault(key, {}).setdefault(mode, {})[BENCH_IMPLS[r["impl"]]] = t
    out = {}
    for key, modes in per.items():
        both = [m for m, by in modes.items() if len(by) == len(BENCH_IMPLS)]
        if not both:
            continue
        times = {b: sum(modes[m][b] for m in both) for b in BENCH_IMPLS.values()}
        out[key] = {"backend": min(times, key=times.get), "times": times, "modes": len(both)}
    if not out:
        raise TableError(f"benchmark result {name}: no junction shape has ok results for both "
                         f"{' and '.join(BENCH_IMPLS)}; nothing to refresh from")
    return out


def _bins(values: Sequence[int]) -> Dict[int, Tuple[Optional[int], Optional[int]]]:
    """Each measured value starts its range, which ends where the next one starts; the first
    reaches down to 0, the last up to unbounded (None)."""
    vs = sorted(set(values))
    return {v: (None if i == 0 else v, vs[i + 1] if i + 1 < len(vs) else None)
            for i, v in enumerate(vs)}


def _merge(cells: List[dict]) -> List[dict]:
    """Merge rows with the same winner that differ in one dimension's range, where the ranges
    touch; repeat until nothing merges."""
    cells = [dict(c) for c in cells]
    changed = True
    while changed:
        changed = False
        for dim in _DIMS:
            others = [x for x in _DIMS if x != dim]
            for i, a in enumerate(cells):
                for j in range(len(cells)):
                    b = cells[j]
                    if (j == i or a["win"] != b["win"] or a[dim][1] is None
                            or a[dim][1] != b[dim][0]
                            or any(a[o] != b[o] for o in others)):
                        continue
                    a[dim] = (a[dim][0], b[dim][1])
                    a["n"] += b["n"]
                    a["logs"] += b["logs"]
                    del cells[j]
                    changed = True
                    break
                if changed:
                    break
            if changed:
                break
    return cells


def _over_all_T(pts: Dict[tuple, dict]) -> Dict[tuple, dict]:
    """``pts`` ({(T, K, d): winner entry}) folded over T into {(None, K, d): entry}: the
    backend with the smaller geometric-mean time over the measured batch sizes (the
    batch-invariant rows: one backend whatever T)."""
    logs: Dict[tuple, Dict[str, List[float]]] = {}
    for (T, K, d), v in pts.items():
        for b, t in v["times"].items():
            logs.setdefault((None, K, d), {}).setdefault(b, []).append(math.log(t))
    out = {}
    for key, by in logs.items():
        if len({len(x) for x in by.values()}) != 1:
            continue
        times = {b: math.exp(sum(x) / len(x)) for b, x in by.items()}
        out[key] = {"backend": min(times, key=times.get), "times": times}
    return out


def _measured_rows(pts: Dict[tuple, dict], dt: str, gpu: str, over: str) -> List[dict]:
    """Table rows for one dtype from ``{(T, K, d): winner entry}`` (T None: rows without a T
    condition): each measured value starts its range, neighbours with one winner merge."""
    dims = [i for i in range(3) if any(p[i] is not None for p in pts)]
    bins = {i: _bins([p[i] for p in pts]) for i in dims}  # per dim: value -> range
    cells = []
    for key, v in pts.items():
        other = [b for b in v["times"] if b != v["backend"]][0]
        ratio = v["times"][other] / v["times"][v["backend"]]
        cell = {dim: (bins[i][key[i]] if i in dims else (None, None))
                for i, dim in enumerate(_DIMS)}
        cell.update(win=v["backend"], n=1, logs=math.log(ratio))
        cells.append(cell)
    rows = []
    for c in sorted(_merge(cells), key=lambda c: tuple((c[x][0] or 0) for x in _DIMS)):
        other = [b for b in BENCH_IMPLS.values() if b != c["win"]]
        geo = math.exp(c["logs"] / c["n"])
        row = {"device": "cuda", "dtype": [dt]}
        for dim in _DIMS:
            if c[dim] != (None, None):
                row[dim] = list(c[dim])
        row.update(backends=[c["win"]] + other, measured=True,
                   why=f"measured on {gpu} ({over}): {c['win']} faster by {geo:.2f}x "
                       f"(geometric mean over {c['n']} shape(s))",
                   evidence={"shapes": c["n"], "speedup_geomean": round(geo, 4)})
        rows.append(row)
    return rows


def refresh_table(result, base: Optional[dict] = None, *, now: Optional[str] = None) -> dict:
    """A new table: measured rows from a CUDA benchmark ``result`` (path or parsed dict) ahead
    of ``base``'s unmeasured rows (default: the shipped table's)."""
    doc, name = _load_result(result)
    wins = measured_winners(doc, name)
    if base is None:
        base = read_table_file(MODULE_PATH)
    compile_table(base, "base table")
    gpu = (doc.get("machine") or {}).get("gpu") or "an unnamed GPU"
    rows = []
    for dt in sorted({k[0] for k in wins}, key=lambda x: DTYPE_NAMES.index(x)
                     if x in DTYPE_NAMES else 99):
        pts = {k[1:]: v for k, v in wins.items() if k[0] == dt}
        rows += _measured_rows(pts, dt, gpu, "batch size (opt-in, not batch-invariant)")
        rows += _measured_rows(_over_all_T(pts), dt, gpu, "every batch size measured")
    rows += [r for r in base["rows"] if not r.get("measured")]
    return {"version": TABLE_VERSION,
            "source": f"measured: {os.path.basename(name)} on {gpu}, then predictions",
            "measured": True,
            "created": now or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": gpu, "result_file": os.path.basename(name), "rows": rows}


_HEADER = '''"""Shape-aware automatic backend choice: the table (data only; read by :mod:`.dispatch`).

Rows are tried in order; the first row whose ``device`` matches and whose conditions hold
(``T``, ``K``, ``d``: ``[lo, hi)`` with None = unbounded; ``dtype``: the residual dtypes it
applies to) names the backends to try, best first; the first one available on this machine is
used.  A call whose shape is not known only matches rows without conditions on the missing
dimensions.  Written by ``python -m steerkernel.backends.dispatch_cli refresh`` from a result
of ``python -m benchmarks --device cuda``; check a hand edit with ``... dispatch_cli check``.

{status}

Rows with a ``T`` condition apply only with ``STEERKERNEL_DISPATCH_BY_T=1``: by default the
choice ignores the batch size, so a row's bits do not depend on the rows sharing its call
(batch invariance, docs/design.md §2).  The predicted CUDA rows: by default the CUDA extension
when built, else Triton (the CUDA kernel's decode path finishes a call in one launch); opted
in, the Triton tile path (64-row tiles, the projection on bf16 tensor cores) from T >= 4096
with K >= 8, where it is predicted 3-5x faster than the CUDA kernel's CUDA-core FMAs.
"""

'''
_STATUS_PREDICTED = ('THE ROWS BELOW ARE PREDICTIONS, NOT MEASUREMENTS ("measured": False): '
                     'no GPU had been\nlent when they were written.')
_STATUS_MEASURED = ('Rows with "measured": True come from the benchmark result named in '
                    '"source"; rows with\n"measured": False are predictions, not '
                    'measurements.')


def render_module(table: dict) -> str:
    """The Python module text of ``table`` (``TABLE = {...}``, a plain literal)."""
    status = _STATUS_MEASURED if table.get("measured") else _STATUS_PREDICTED
    return (_HEADER.format(status=status) + "TABLE = "
            + pprint.pformat(table, indent=1, width=100, sort_dicts=False) + "\n")


def write_table(table: dict, path: str) -> None:
    """Validate ``table`` and write it to ``path`` (JSON for ``.json``, else a Python module)."""
    compile_table(table, path)
    text = (json.dumps(table, indent=1) + "\n") if path.endswith(".json") else render_module(table)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reports

def _fmt_range(name: str, r) -> str:
    lo, hi = r
    if lo is None:
        return f"{name}<{hi}"
    if hi is None:
        return f"{name}>={lo}"
    return f"{lo}<={name}<{hi}"


def format_rows(rows: Sequence[dict]) -> List[str]:
    """One line per row: conditions -> backends  (measured/predicted: why)."""
    out = []
    for r in rows:
        cond = [_fmt_range(k, r[k]) for k in _DIMS if k in r and list(r[k]) != [None, None]]
        if r.get("dtype"):
            cond.append("dtype in " + "/".join(r["dtype"]))
        kind = "measured" if r.get("measured") else "predicted"
        out.append(f"{r['device']:<5} {' '.join(cond) or 'any shape':<32} -> "
                   f"{' > '.join(r['backends']):<16} [{kind}] {r.get('why', '')}")
    return out
