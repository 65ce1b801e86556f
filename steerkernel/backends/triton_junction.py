"""Triton junction backend (GPU; on CPU under ``TRITON_INTERPRET=1`` for tests).

Importing this module implements ``steerkernel::junction_triton`` (defined, with the shared
argument list, in :mod:`steerkernel.ops.library`) and registers it as backend ``triton``.  The
math is docs/design.md §2, with the semantics of the reference
(:func:`steerkernel.ops.reference.junction_reference_`).  The kernels are in
:mod:`.triton_kernels`; this module chooses, plans and launches them, and lists the variants
for the ahead-of-time compile checks.  Numbers below: d = 4096, K = 171, bf16 residual with x
and an RMSNorm weight, fp32 V, H100 / H200 SXM (132 SMs; ~3.0 / ~4.3 TB/s copy bandwidth,
the floor's denominator; 989 TFLOP/s dense bf16; 50 MB L2).  No GPU has run these kernels:
the arithmetic is a prediction; the compile facts (registers, layouts) are checked offline.

Numerics
--------
Every product runs on bf16 tensor cores with fp32 accumulation, fed only bf16-exact values, so
each product is exact and only the fp32 sums round.  An fp32 (or fp16) value ``a`` is split
into ``hi + lo``, both bf16 (``|a - hi - lo| <= 2^-16 |a|``); a bf16 residual's ``h`` is exact
as it is.  Projection ``h·v``: ``h·v`` (bf16 V), ``fin(h)·v_lo + h·v_hi`` (fp32 V), four terms
``h_lo·fin(v_hi) + fin(h_hi)·v_lo + h_hi·v_hi + h_lo·v_lo`` (fp16 / fp32 residual).  Update
``dq·V`` (dq fp32, always split): ``dq_lo·fin(v) + dq_hi·v`` (bf16 V), else the four terms.
``fin`` (±inf -> 0) keeps a zero lo piece from making inf·0 = NaN in a cross term, so ±inf and
NaN reach a result only as in an unsplit product.  Score error: <= 0.35 of SCORE_TOLERANCES
at d = 64 .. 4096 (measured in fp64 emulation); the update's 4 terms keep the stored residual
within ~0.4 of TOLERANCES (2 terms would leave bf16 at ~0.7, and > 1 where h and the update
cancel).  Roundings to the residual dtype are RNE (the hardware conversion on the GPU; integer
ops under the interpreter, whose bf16 conversion truncates), so slot-0 rows are bit-identical
to torch's ``residual + x``.

The terms of one product are interleaved along its reduction dimension so that each product is
ONE ``tl.dot`` (bf16 residual, fp32 V: ``[64, 2·64] x [2·64, 64]`` per d-chunk and K-chunk for
the projection, ``[64, 4·64] x [4·64, 64]`` for the update): a dot whose result feeds another
dot makes Triton give both a replicated warp layout and convert the accumulator between them,
and ``acc + dot(a, b)`` is fused into a chain unless the dot's accumulator is not a provable
zero (``_opaque_zero``).

Batch invariance (design.md §2: same row -> same bits at any batch size and position)
------------------------------------------------------------------------------------------
A row's projection is the same sequence of operations on every path: d is cut in chunks of
``BD`` (64 for a bf16 residual, 16 for fp16 / fp32) and segments of ``SEG_D = 256`` (the last
one up to the row's last chunk); per
K-chunk of ``KC`` (<= 64) concepts a chain of MMAs runs over one segment from 0 (``pt``), the
segments' partials are summed in order (``acc``).  The tile kernel does this in registers, the
split path with one program per ``(K-chunk, segment)`` and an in-order sum of the partials; the
MMAs have the same shapes and warp layout on both paths (8 warps, ``[4, 2]`` wgmma layout,
m64n32k16), so each output element sees the same k16 MMAs in the same order, and an MMA's
row ``t`` depends on row ``t`` of its operands only.  ``Σ h²`` is a per-chunk ``tl.sum`` (same
``[64, BD]`` blocked layout on both paths, ``mul.rn`` squares so ptxas cannot contract them)
added in chunk order; the update is one MMA per K-chunk (again the same shapes) summed in
K-chunk order; everything else is elementwise.  The compile check asserts the identical
layouts.  Under the interpreter every dot is an fp32 numpy matmul of the same shape on every
path (numpy's result for a row depends on the shape, never on the other rows, for M > 1).

Paths
-----
``tile`` (prefill; ``T >= TILE_MIN_ROWS``, ``K <= TILE_MAX_K = 256``).  ``_vcat_kernel``
splits V into its bf16 pieces once per call, transposed (``[2·d, 192]`` bf16 = 2.8 MB read,
2.8 MB written), so the tile kernel's MMAs take V straight from the async-copy buffers.  Then
one program per 64 rows (128 programs at T = 8192: one wave):
  pass 1 over d: load r, x (cp.async, pipelined), store h, ``Σ h²``, projection (3 K-chunks x
         2 terms, accumulators ``pt`` + ``acc`` = 96 fp32 registers per thread);
  then   scores, norms, gate decisions (latch as of call start), the latch merge by the last
         program, dQ's pieces (the update's loop-invariant right operand, in shared memory);
  pass 2 over d: re-read h; ``out`` of the unsteered rows; the steered rows' update (tiles with
         one only; computed transposed, ``updᵀ = V_pieces · dQᵀ``, so dQ sits in shared memory
         instead of 192 registers);
  pass 3 (steered rows, with a weight): ``out`` from the stored rows.
  Registers up to 255 per thread (bf16 V at K >= 171), no spills in any of the variants the
  compile check builds; 1 CTA of 256 threads per SM.  (fp16 / fp32 residuals: 16-column
  d-chunks, and the update MMA has M = 16, so it is an mma.sync there.)
  Bytes at T = 8192: the floor's 277 MB (r, x, residual, out, scores, V) + 5.6 MB V pieces +
  the re-read of pass 2 (67 MB) and, steered, of pass 3 (67 MB), each hitting L2 only in part
  (the 128 tiles in flight hold 64 MB of h against a 50 MB L2): at ~50 % hits, +34 MB per
  re-read.  MMA: projection 25.8 GFLOP, update 51.5 GFLOP (4 terms x 2·T·192·d).
  L2 -> SM: V pieces 2.8 MB per 64 rows (358 MB; twice with steering) + the streams.
  Prediction (fraction of the floor): monitor + norm ~85 % (H100) / ~80 % (H200; L2- and
  re-read-bound); steering every row ~75 % / ~55 %: the 77 GFLOP of MMAs (~120 µs at a
  realistic ~650 TFLOP/s) exceed the H200 floor (64 µs).  With V in bf16 (one projection term,
  two update terms, 1.4 MB of pieces): ~38.7 GFLOP, steer ~80 % / ~70 %.  The old kernel
  (TF32 MMAs, K padded to 256, 32-row tiles, pass 3 over every row) was predicted 30 - 45 %.
  Levers left: an fp16 single-term update with per-row scaling (1 MMA instead of 4, bf16
  outputs only) and keeping a tile on chip across passes (thread-block clusters splitting d:
  not expressible in plain Triton).

``split`` (decode and mid sizes; any K).  Three launches; one program per ``(row tile,
K-chunk, d-segment)`` and then per ``(row tile, d-chunk)``, so V is read by many SMs at once:
  1 ``split.proj`` (grid 1 x 3 x 16 at T <= 64): projection partials -> scratch; the last
    program of each (row tile, K-chunk) sums them in order -> scores; the last of a row tile
    reduces ``Σ h²``, decides, writes dQ; the last of all merges the latch;
  2 ``split.update`` (grid 1 x 64): h = r + x, the steered rows' update (V again, from L2),
    residual, ``out`` of the unsteered rows;
  3 ``split.norm`` (norm with steering only): ``out`` of the steered rows.
  Bytes at T = 64: V 2.8 MB (twice when a row is steered; the second from L2) + the rows'
  2 MB + partials (16 x 64 x 192 x 4 B = 0.8 MB, written and read back through L2).  Per SM
  <= 64 KB of V per launch.  Prediction: ~3 µs + ~2 µs + ~2 µs with CUDA graphs, i.e. about
  2x a plain fused add + RMSNorm (~3.5 µs) when steering, ~1.4x when monitoring (launch 3
  skipped).  The old row kernel (one concept per iteration at d >= 4096) was predicted 100+ µs.
  Why three launches: the gate needs a row's whole projection before any update, and the
  RMSNorm needs the whole updated row; one launch would need a grid-wide barrier, which
  Triton cannot express safely (no co-residency guarantee; the interpreter runs programs one
  by one).  The ``<= 1.5x`` decode target therefore needs a cooperative launch (the CUDA
  backend); see :func:`choose_path` for what the dispatcher should use.

Latch
-----
Decisions read ``latch`` as of call start; each program that decides writes ``fired[s] = 1``
for its firing slots, counts itself in (``atomic_add``, acq_rel, after a CTA barrier) and the
last one sets ``latch[s] = 1`` where ``fired`` is set and re-zeroes ``fired`` and its counter.
``fired`` and the counters are per-device int32 buffers (:func:`_persistent`), zero between
calls, allocated on first use (before graph capture: a capture that needs them larger raises).
So a call launches only its kernels, stays CUDA-graph capturable, and the latch it leaves
does not depend on program order.  Calls on two streams of one device must not overlap (they
would share the counters).

Launches run under ``torch.cuda.device(residual.device)`` (the current device may differ).
``FORCE_PATH`` / the ``path=`` keyword force a path (``PATHS``; "row" and "chunked", earlier
kernels' names, mean "split"); :func:`path_applies` says where one applies.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

import triton
from triton.runtime.interpreter import InterpretedFunction

from ..ops import library
from ..ops.args import JunctionArgs
from ..ops.checks import MODEL_DTYPES, Dims, check_structure
from . import triton_kernels as K_

# ----------------------------------------------------------------------------- knobs
#: Force a path for every call: None (automatic), "split" or "tile" ("row" and "chunked",
#: the names of earlier kernels, mean "split").
FORCE_PATH: Optional[str] = None
#: The paths, in the order benchmarks and tests force them.
PATHS = ("split", "tile")
_ALIASES = {"row": "split", "chunked": "split", "split": "split", "tile": "tile"}

# Shapes that fix a row's reduction structure.  Every path uses the same values (they are
# not per-path knobs: changing one changes results bitwise, on all paths alike).
#: rows per program (the M of every projection MMA, the N of every update MMA)
TILE_ROWS = 64
#: d-chunk for a bf16 residual (projection operand [64, 2 x 64] with fp32 V), and for fp16 /
#: fp32 (whose h takes two bf16 pieces: 4 terms, operand [64, 4 x 16]; wider spills)
CHUNK_D = 64
CHUNK_D_SPLIT_H = 16
#: d-segment: the projection is a chain of MMAs over one segment, summed over segments in
#: order; the split path parallelises over segments
SEG_D = 256
#: widest K-chunk (the N of one projection MMA)
MAX_KC = 64
#: warps of every kernel that runs an MMA or a row reduction (fixes their layouts)
NUM_WARPS = 8

#: The tile path holds the projection in registers: at most this many concepts.
TILE_MAX_K = 4 * MAX_KC
#: ... and is chosen from this many rows on (fewer: too few programs to fill the GPU while
#: each reads all of V; see the design notes).
TILE_MIN_ROWS = 4096
#: Software-pipelining depth of the tile kernel's pass-1 loop, of its update loop (whose
#: loop-invariant dQ pieces take shared memory), and of the split kernels.
TILE_STAGES = 2
TILE_UPDATE_STAGES = 2
SPLIT_STAGES = 2
#: Slots merged per step into the latch by the last program.
P_BLOCK = 256

INTERPRETED = isinstance(K_._tile_kernel, InterpretedFunction)


# ----------------------------------------------------------------------------- shapes
def k_chunk(K: int) -> Tuple[int, int]:
    """``(KC, NKC)``: the K-chunk width of every MMA for ``K`` concepts and how many chunks."""
    if K <= 0:
        return 16, 0
    kc = min(MAX_KC, max(16, triton.next_power_of_2(K)))
    return kc, triton.cdiv(K, kc)


def chunk_d(dtype: torch.dtype) -> int:
    """The d-chunk of a residual of ``dtype``."""
    return CHUNK_D if dtype == torch.bfloat16 else CHUNK_D_SPLIT_H


def _segments(d: int, bd: int) -> Tuple[int, int, int]:
    """``(SEG_CHUNKS, n_seg, n_chunks)`` of a row of ``d`` in chunks of ``bd`` (the last
    segment may hold fewer chunks)."""
    seg_chunks = max(1, SEG_D // bd)
    return seg_chunks, triton.cdiv(d, bd * seg_chunks), triton.cdiv(d, bd)


def path_applies(path: str, T: int, d: int, K: int) -> bool:
    """Whether ``path`` can run a ``[T, d]`` x ``K`` call (the split path runs any)."""
    path = _ALIASES.get(path, path)
    if path == "split":
        return True
    if path == "tile":
        return K <= TILE_MAX_K
    raise ValueError(f"triton junction: unknown path {path!r} ({', '.join(PATHS)})")


def choose_path(T: int, d: int, K: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The path a ``[T, d]`` x ``K`` call of residual ``dtype`` takes (``FORCE_PATH`` wins).

    Cheap (integer compares; no tensors), for the shape-aware dispatcher too: ``tile`` from
    ``TILE_MIN_ROWS`` rows when ``K <= TILE_MAX_K`` and rows are whole 16-byte vectors
    (``d % 8 == 0``), else ``split``.  (:func:`launch` also sends calls whose row strides or
    pointers are not 16-byte aligned to ``split``: the tile kernel's loads would not be
    vectorised, and the paths give the same bits.)  ``dtype`` does not change the choice
    today.  For the dispatcher: the tile path is the Triton backend's prefill path and should
    beat a per-row CUDA kernel from T ~ 4096 (64-row programs reading V's pieces once per
    tile; it fills the GPU from T ~ 64·SMs ~ 8K); the split path is three dependent launches,
    so for decode (T <= 64) a single-launch kernel should be preferred when there is one.
    Calibrate both thresholds with the GPU benchmark.
    """
    if FORCE_PATH is not None:
        return _ALIASES.get(FORCE_PATH, FORCE_PATH)
    if T >= TILE_MIN_ROWS and K <= TILE_MAX_K and d % 8 == 0:
        return "tile"
    return "split"


def _rows_aligned(call: JunctionArgs) -> bool:
    """Whether every ``[T, d]`` tensor of ``call`` has 16-byte-aligned rows."""
    for t in (call.residual, call.x, call.out):
        if t is not None and (t.data_ptr() % 16 or (t.shape[0] > 1 and t.stride(0) % 8)):
            return False
    return True


# ----------------------------------------------------------------------------- scratch
#: Per device: ``fired`` (int32 per slot) and ``count`` (int32 arrival counters), zero
#: between calls (each call's last program re-zeroes what it used), so a call launches only
#: its kernels.  Replaced buffers are kept alive (a captured graph may still use them).
_SCRATCH: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}
_RETIRED: List[torch.Tensor] = []
_MIN_CAPACITY = {"fired": 4096, "count": 4096}


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _persistent(dev: torch.device, name: str, n: int) -> torch.Tensor:
    key = (dev.type, dev.index if dev.index is not None else -1)
    cache = _SCRATCH.setdefault(key, {})
    t = cache.get(name)
    if t is None or t.numel() < n:
        if _capturing(dev):
            raise RuntimeError(
                f"steerkernel triton junction: its per-device scratch '{name}' needs {n} "
                "entries but was sized by earlier calls for fewer; run the call once outside "
                "CUDA-graph capture (a warm-up at the largest shape) before capturing it")
        if t is not None:
            _RETIRED.append(t)
        cap = max(_MIN_CAPACITY[name], triton.next_power_of_2(n))
        t = cache[name] = torch.zeros(cap, dtype=torch.int32, device=dev)
    return t


# ----------------------------------------------------------------------------- launches
class Launch(NamedTuple):
    """One kernel launch of a call: ``kernel[grid](**args, **consts, num_warps=,
    num_stages=)``."""

    name: str
    kernel: object
    grid: Tuple[int, ...]
    args: Dict[str, object]
    consts: Dict[str, object]
    num_warps: int
    num_stages: int

    def run(self) -> None:
        self.kernel[self.grid](**self.args, **self.consts, num_warps=self.num_warps,
                               num_stages=self.num_stages)


def plan(call: JunctionArgs, dims: Dims, path: str, *, interp: bool = INTERPRETED
         ) -> List[Launch]:
    """The launches that compute ``call`` (validated; ``dims`` its sizes) on ``path``.

    Allocates the call's scratch (the split path's per-call buffers and the tile path's V
    pieces with ``torch.empty``; the per-device ``fired`` / ``count``).  ``interp=False``
    plans the GPU kernels whatever the tensors' device (the compile checks plan on CPU
    tensors).
    """
    T, d, K, P = dims
    (residual, V, x, slot, shift, lo, hi, gate_concept, gate_threshold, gate_above, latch,
     weight, eps, scores, norms, out) = call
    dev = residual.device
    has_x = x is not None
    has_slot = slot is not None
    has_gate = has_slot and gate_concept is not None
    has_latch = has_gate and latch is not None
    has_w = weight is not None and out is not None
    dummy = norms  # any tensor: the pointer of an argument a kernel never dereferences
    P = P if has_slot else 1
    kc, nkc = k_chunk(K)
    flags = dict(HAS_X=has_x, HAS_SLOT=has_slot, HAS_GATE=has_gate, HAS_LATCH=has_latch,
                 HAS_W=has_w)
    splits = dict(H_SPLIT=residual.dtype != torch.bfloat16,
                  V_SPLIT=V is not None and V.dtype != torch.bfloat16, INTERP=interp)
    common = dict(
        res_ptr=residual, res_stride=residual.stride(0), x_ptr=x if has_x else dummy,
        x_stride=x.stride(0) if has_x else 0, V_ptr=V if V is not None else dummy)
    tables = dict(
        slot_ptr=slot if has_slot else dummy, shift_ptr=shift if has_slot else dummy,
        lo_ptr=lo if has_slot else dummy, hi_ptr=hi if has_slot else dummy,
        gc_ptr=gate_concept if has_gate else dummy,
        thr_ptr=gate_threshold if has_gate else dummy,
        above_ptr=gate_above.view(torch.uint8) if has_gate else dummy,
        latch_ptr=latch if has_latch else dummy)
    fired = _persistent(dev, "fired", P) if has_latch else dummy
    outs = dict(
        scores_ptr=scores if K else dummy, sc_stride0=scores.stride(0) if K else 0,
        sc_stride1=scores.stride(1) if K else 0, norms_ptr=norms,
        norms_stride=norms.stride(0))
    w_ = dict(w_ptr=weight if has_w else dummy, out_ptr=out if has_w else dummy,
              out_stride=out.stride(0) if has_w else 0)
    n_rt = triton.cdiv(T, TILE_ROWS)
    bd = chunk_d(residual.dtype)
    seg_chunks, n_seg, n_chunks = _segments(d, bd)
    blocks = dict(BT=TILE_ROWS, BD=bd, KC=kc)
    np_ = 4 if splits["H_SPLIT"] else (2 if splits["V_SPLIT"] else 1)

    if path == "tile":
        if K > TILE_MAX_K:
            raise ValueError(f"triton junction: the tile path takes K <= {TILE_MAX_K} "
                             f"(got K={K}, d={d})")
        launches = []
        if K:
            # V's bf16 pieces, transposed, once per call: the MMAs read them from memory
            vt = torch.empty((np_ * d, nkc * kc), dtype=torch.bfloat16, device=dev)
            launches.append(Launch(
                "tile.vcat", K_._vcat_kernel, (nkc, triton.cdiv(d, bd)),
                dict(V_ptr=V, Vt_ptr=vt, d=d, K=K, KP=nkc * kc),
                dict(H_SPLIT=splits["H_SPLIT"], V_SPLIT=splits["V_SPLIT"], INTERP=interp,
                     KC=kc, BD=bd, NP=np_),
                NUM_WARPS, 1))
        else:
            vt = dummy
        count = _persistent(dev, "count", 1) if has_latch else dummy
        args = dict(common, **tables, fired_ptr=fired, count_ptr=count, **w_, **outs,
                    T=T, d=d, K=K, P=P, eps=float(eps))
        del args["V_ptr"]
        args.update(Vt_ptr=vt, KP=max(nkc * kc, 1))
        consts = dict(flags, **splits, **blocks, NKC=nkc, SEG_CHUNKS=seg_chunks,
                      P_BLOCK=P_BLOCK, STAGES=TILE_STAGES, STAGES2=TILE_UPDATE_STAGES)
        launches.append(Launch("tile", K_._tile_kernel, (n_rt,), args, consts, NUM_WARPS,
                               TILE_STAGES))
        return launches
    if path != "split":
        raise ValueError(f"triton junction: unknown path {path!r} ({', '.join(PATHS)})")

    # split path: per-call scratch in one fp32 buffer
    nkcp = max(nkc, 1)
    Tpad = n_rt * TILE_ROWS
    KP = nkc * kc
    sizes = dict(part=n_seg * Tpad * KP, sqp=n_chunks * Tpad, pscr=Tpad * KP,
                 dq=Tpad * KP if has_slot else 0, inv=Tpad if has_w else 0,
                 apply=Tpad if has_slot else 0,
                 sq2=n_chunks * Tpad if has_slot and has_w else 0)
    if sizes["part"] >= 2**31:
        raise ValueError(f"triton junction: T={T}, d={d}, K={K} is too large for the split "
                         "path's scratch")
    buf = torch.empty(sum(sizes.values()), dtype=torch.float32, device=dev)
    views, at = {}, 0
    for name, n in sizes.items():
        views[name] = buf[at:at + n] if n else dummy
        at += n
    if has_slot:
        views["apply"] = views["apply"].view(torch.int32)
    count = _persistent(dev, "count", n_rt * nkcp + n_rt + 1)
    scratch = dict(part_ptr=views["part"], sqp_ptr=views["sqp"], pscr_ptr=views["pscr"],
                   dq_ptr=views["dq"], inv_ptr=views["inv"], apply_ptr=views["apply"])
    launches = [Launch(
        "split.proj", K_._split_proj_kernel, (n_rt, nkcp, n_seg),
        dict(common, **tables, fired_ptr=fired, count_ptr=count, **outs, **scratch, T=T, d=d,
             K=K, P=P, eps=float(eps), Tpad=Tpad, part_stride=Tpad * KP),
        dict(flags, HAS_V=K > 0, **splits, **blocks, SEG_CHUNKS=seg_chunks,
             P_BLOCK=P_BLOCK),
        NUM_WARPS, SPLIT_STAGES)]
    if has_x or has_slot or has_w:
        launches.append(Launch(
            "split.update", K_._split_update_kernel, (n_rt, triton.cdiv(d, bd)),
            dict(common, **w_, dq_ptr=views["dq"], inv_ptr=views["inv"],
                 apply_ptr=views["apply"], sq2_ptr=views["sq2"], T=T, d=d, K=K,
                 eps=float(eps), Tpad=Tpad, n_kc=nkc),
            dict(HAS_X=has_x, HAS_SLOT=has_slot, HAS_W=has_w, H_SPLIT=splits["H_SPLIT"],
                 V_SPLIT=splits["V_SPLIT"], INTERP=interp, **blocks),
            NUM_WARPS, SPLIT_STAGES))
    if has_slot and has_w:
        launches.append(Launch(
            "split.norm", K_._split_norm_kernel, (n_rt, triton.cdiv(d, bd)),
            dict(res_ptr=residual, res_stride=residual.stride(0), **w_,
                 apply_ptr=views["apply"], sq2_ptr=views["sq2"], T=T, d=d, eps=float(eps),
                 Tpad=Tpad, n_chunks=triton.cdiv(d, bd)),
            dict(INTERP=interp, BT=TILE_ROWS, BD=bd), 4, 1))
    return launches


# ----------------------------------------------------------------------------- variants
#: Residual dtype x V dtype combinations the op takes (V is fp32 or the residual's dtype).
DTYPE_COMBOS = ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                (torch.float16, torch.float32), (torch.float16, torch.float16),
                (torch.float32, torch.float32))
#: Feature sets: which optional arguments a call passes.
FEATURES = {
    "steer": dict(x=True, slot=True, gate=True, latch=True, weight=True),
    "steer_nolatch": dict(x=True, slot=True, gate=True, latch=False, weight=True),
    "steer_ungated": dict(x=True, slot=True, gate=False, latch=False, weight=True),
    "steer_nonorm": dict(x=True, slot=True, gate=True, latch=True, weight=False),
    "hook": dict(x=False, slot=True, gate=True, latch=True, weight=False),
    "monitor_norm": dict(x=True, slot=False, gate=False, latch=False, weight=True),
    "monitor": dict(x=True, slot=False, gate=False, latch=False, weight=False),
    "monitor_hook": dict(x=False, slot=False, gate=False, latch=False, weight=False),
}
#: K values that reach every ``(KC, NKC)`` the launcher uses (0: no V).
K_CLASSES = (0, 1, 16, 32, 64, 128, 171, 256, 512)


def example_call(T: int, d: int, K: int, dtype: torch.dtype, v_dtype: torch.dtype,
                 features: dict, *, P: int = 5, device="cpu") -> Tuple[JunctionArgs, Dims]:
    """A complete call of the given shape (uninitialised data) and its dims: what the compile
    checks plan launches for (the launches specialise on these tensors' alignment)."""
    e = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device=device)  # noqa
    f = features
    slot = f["slot"] and K > 0
    gate = slot and f["gate"]
    call = JunctionArgs(
        residual=e(T, d, dt=dtype), V=e(K, d, dt=v_dtype) if K else None,
        x=e(T, d, dt=dtype) if f["x"] else None,
        slot=torch.zeros(T, dtype=torch.int32, device=device) if slot else None,
        shift=e(P, K) if slot else None, lo=e(P, K) if slot else None,
        hi=e(P, K) if slot else None,
        gate_concept=torch.zeros(P, dtype=torch.int32, device=device) if gate else None,
        gate_threshold=e(P) if gate else None,
        gate_above=torch.zeros(P, dtype=torch.bool, device=device) if gate else None,
        latch=torch.zeros(P, dtype=torch.int32, device=device) if gate and f["latch"] else None,
        weight=e(d, dt=dtype) if f["weight"] else None, eps=1e-6,
        scores=e(T, K) if K else None, norms=e(T), out=e(T, d, dt=dtype) if f["weight"] else None)
    return call, Dims(T, d, K, P if slot else 0)


class Variant(NamedTuple):
    """One compiled form of a kernel: what ``triton.compile`` needs to build it ahead of time
    as a real launch would (``signature`` / ``constexprs`` / ``attrs`` from the launch's
    argument specialisation: 16-byte-aligned pointers and ints divisible by 16 get
    ``tt.divisibility = 16``, ints equal to 1 become constants)."""

    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[Tuple[int, ...], list]
    num_warps: int
    num_stages: int


def specialise(ln: Launch) -> Variant:
    """The :class:`Variant` the JIT compiles for launch ``ln``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = ln.kernel
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ln.consts:
            sig[name] = "constexpr"
            consts[name] = ln.consts[name]
            continue
        ty, key = native_specialize_impl(BaseBackend, ln.args[name], False, True, True)
        if ty == "constexpr":
            sig[name], consts[name] = "constexpr", key
        else:
            sig[name] = ty
            if key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return Variant(ln.name, fn, sig, consts, attrs, ln.num_warps, ln.num_stages)


def compile_variants(full: bool = False) -> List[Variant]:
    """The kernel variants a GPU launch can compile, for the ahead-of-time compile checks.

    ``full``: every path x dtype combination x K class x feature set, at d = 4096 and, for
    the split path, also d = 577 (rows not 16-byte aligned: the tile path is not chosen for
    those) and T = 1 (a specialised constant).  Default: the register-heaviest set: every
    path x dtype combination x K class with all features, every feature set for a bf16
    residual with fp32 V at K = 171, and the unaligned and T = 1 split forms of those.
    Duplicates (same kernel, signature, constants, hints) are dropped.
    """
    out, seen = [], set()

    def add(path, T, d, K, dt, vdt, feat):
        if not path_applies(path, T, d, K):
            return
        call, dims = example_call(T, d, K, dt, vdt, FEATURES[feat])
        for ln in plan(call, dims, path, interp=False):
            v = specialise(ln)
            key = (v.name, tuple(sorted(v.signature.items())), repr(sorted(v.constexprs.items())),
                   repr(sorted(v.attrs.items())), v.num_warps, v.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(v._replace(name=f"{v.name} {path} T={T} d={d} K={K} "
                                             f"{str(dt)[6:]}/{str(vdt)[6:]} {feat}"))

    rows = {"tile": 64, "split": 64}
    for path in PATHS:
        for dt, vdt in DTYPE_COMBOS:
            for K in K_CLASSES:
                feats = FEATURES if full else (["steer"] if K else ["monitor_norm"])
                for feat in feats:
                    if K == 0 and FEATURES[feat]["slot"]:
                        continue
                    if K == 0 and vdt != DTYPE_COMBOS[0][1] and dt == torch.bfloat16:
                        continue  # no V: the V dtype does not matter
                    ds = (4096, 577) if full and path == "split" else (4096,)
                    Ts = (rows[path], 1) if (full and path == "split") else (rows[path],)
                    for d in ds:
                        for T in Ts:
                            add(path, T, d, K, dt, vdt, feat)
    if not full:
        for path in PATHS:
            for feat in FEATURES:
                add(path, rows[path], 4096, 171, torch.bfloat16, torch.float32, feat)
        add("split", 64, 577, 171, torch.bfloat16, torch.float32, "steer")
        add("split", 1, 4096, 171, torch.bfloat16, torch.float32, "steer")
        add("split", 1, 4096, 171, torch.bfloat16, torch.float32, "monitor_norm")
    return out


def junction_triton_(*args, path: Optional[str] = None, **kwargs) -> None:
    """A raw ``steerkernel::junction_triton`` call: the op's arguments
    (:class:`~steerkernel.ops.args.JunctionArgs`, positional or by keyword).

    Checks the metadata with the shared :func:`~steerkernel.ops.checks.check_structure`
    (``RuntimeError`` before any write; values are the public wrapper's) and runs
    :func:`launch`.  ``path`` (one of :data:`PATHS`) forces a path.
    """
    call = JunctionArgs(*args, **kwargs)
    launch(call, check_structure(call, MODEL_DTYPES, complete=True), path=path)


def launch(call: JunctionArgs, dims: Dims, *, path: Optional[str] = None) -> None:
    """Run a call that :func:`check_structure` accepted (``dims``: its sizes) on the
    residual's device.  Writes ``residual`` (in place), ``scores``, ``norms``, ``out`` and
    ``latch``; slots outside ``[0, P)`` act as slot 0 and gate concepts outside ``[-1, K)``
    never fire.  By default :func:`choose_path` picks the path.
    """
    T, d, K, _ = dims
    if T == 0:
        return
    residual = call.residual
    which = path or choose_path(T, d, K, residual.dtype)
    which = _ALIASES.get(which, which)
    if which == "tile" and path is None and FORCE_PATH is None and not _rows_aligned(call):
        which = "split"
    if residual.device.type == "cuda":
        with torch.cuda.device(residual.device):
            for ln in plan(call, dims, which):
                ln.run()
    else:
        for ln in plan(call, dims, which):
            ln.run()


# Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
_lib = torch.library.Library("steerkernel", "IMPL")
_lib.impl("junction_triton", junction_triton_, "CUDA")
_lib.impl("junction_triton", junction_triton_, "CPU")
library.register_backend("triton", torch.ops.steerkernel.junction_triton.default)
