"""Triton junction kernels (GPU; on CPU under ``TRITON_INTERPRET=1`` for tests).

Importing this module implements ``steerkernel::junction_triton`` (defined, with the shared
argument list, in :mod:`steerkernel.ops.library`) and registers it as backend ``triton``.  The
math is docs/design.md §2, with exactly the semantics of the reference
(:func:`steerkernel.ops.reference.junction_reference_`); all arithmetic fp32.

Rounding: every store of ``h`` is one round-to-nearest-even of an fp32 value into the residual
dtype (``rne``), so slot-0 rows are bit-identical to torch's ``residual + x``, and every later
read of ``h`` (projection, norm, update) sees the stored value.  The clamp is ``where(q < lo,
lo, q)`` then ``where(q > hi, hi, q)`` (NaN propagates, like ``torch.clamp``).  Slots outside
``[0, P)`` act as slot 0 and gate concepts outside ``[-1, K)`` never fire.  Without V
(``K = 0``) the projection loops are empty: a plain add + RMSNorm.
Decisions read the latch as of call start; each kernel writes the slots whose gate fired into
a zeroed scratch ``fired [P]`` and the launcher then sets ``latch[fired != 0] = 1`` (one torch op
on the same stream, so the call stays CUDA-graph capturable and deterministic).

Three kernels, chosen by :func:`junction_triton_` from the shape (see :func:`choose_path`):

* ``row``      one program per row, the whole row in registers (``d <= ROW_MAX_BLOCK_D``).
               One pass over memory: residual and x read once, residual written once
               (only when something changed), out written once.  V is streamed once per
               row in ``[BLOCK_K, BLOCK_D]`` tiles; the update is accumulated alongside the
               projection (``delta += dqᵀ V``) and applied after the gate decision, so V is
               read once even for steered rows.  Decode sizes, and any T when K is small.
* ``chunked``  one program per row for rows too long for registers (d > ROW_MAX_BLOCK_D):
               passes over d-chunks (add + store + ||h||²; projection per K-chunk, the row
               re-read per K-chunk; update re-reading the stored ``scores``; norm).
* ``tile``     one program per ``BLOCK_T`` rows (prefill, K <= TILE_MAX_K): projection and
               update with ``tl.dot`` over d-chunks.  Passes over the row tile:
               (1) read residual (+x), write the added residual (when x is given), project
               ``P += H·Vᵀ`` and accumulate ``||h||²``; (2) only when some row of the tile is
               steered: re-read those rows, ``H += dQ·V``, write them, accumulate ``||h||²``;
               (3) only with a weight: re-read the tile (stored values), write ``out``.
               So HBM traffic is residual/x read once and residual/out written once (plus
               the steered rows' second write); the re-reads of passes 2 and 3 should hit L2
               (a tile is ``BLOCK_T·d`` elements).  V is read once per program from L2 (twice
               when the tile holds a steered row), i.e. ``T / BLOCK_T`` times per call.

tl.dot precision.  fp32 ``tl.dot`` on NVIDIA defaults to TF32 (10 mantissa bits), far too
coarse for the fp32 score tolerance, and ``input_precision="ieee"`` runs on CUDA cores
(FMA-bound at K in the hundreds).  The tile kernel therefore feeds tensor cores only values
that TF32 represents (almost) exactly: every fp32 operand is split as ``a = a_hi + a_lo`` where
``a_hi`` keeps the top 11 significant bits (exact in TF32) and ``a_lo = a - a_hi`` is exact in
fp32 with ``|a_lo| < 2^-10 |a|``; ``a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi`` (the dropped
``a_lo·b_lo`` and TF32's truncation of the lo pieces are each below ``2^-20 |a b|``).
bf16/fp16 operands are exact in TF32 and are not split, so a bf16 residual against an fp32 V
costs two TF32 MMAs per projection, a model-dtype V one.  Non-finite values stay in the hi
pieces and the lo products see them as 0, so ±inf/NaN propagate exactly as in an unsplit
product.  The row kernels reduce with fp32 FMAs (no tensor cores).

Rounding and widening are done with integer ops (``_rne``, ``_f32``) for bf16: the same bits
as the hardware conversions and torch, also under the interpreter, whose own bf16 conversions
truncate and flush subnormals.

Block sizes (H100; the interpreter ignores them) are module constants so a benchmark session
can tune them; ``FORCE_PATH`` / the ``path=`` keyword force a kernel (tests).
"""
from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl

from ..ops import library
from ..ops.args import JunctionArgs
from ..ops.checks import MODEL_DTYPES, Dims, check_structure

# ----------------------------------------------------------------------------- tuning knobs
#: Force a kernel for every call: None (automatic), "row", "chunked" or "tile" (tests).
FORCE_PATH: Optional[str] = None
#: The row kernel holds a whole row in registers up to this many elements (power of 2).
#: 8192 fp32 values of h plus the update accumulator are 64 registers per thread at 8 warps.
ROW_MAX_BLOCK_D = 8192
#: Elements per thread of one ``[BLOCK_K, BLOCK_D]`` V tile in the row kernels
#: (``BLOCK_K = this * 32 * num_warps / BLOCK_D``); 16 keeps every variant spill-free.
ROW_TILE_PER_THREAD = 16
#: d-chunk of the chunked row kernel.
ROW_CHUNK_D = 1024
#: The tile kernel is used from this many rows on ...
TILE_MIN_ROWS = 64
#: ... when there are at least this many concepts (fewer: the row kernel streams V cheaply) ...
TILE_MIN_K = 8
#: ... and at most this many (the ``[BLOCK_T, next_pow2(K)]`` projection lives in registers).
TILE_MAX_K = 256
#: Software-pipelining depth of the tile kernel's loops.
TILE_NUM_STAGES = 2

# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _rne(h, DST: tl.constexpr):
    """fp32 tensor ``h`` (any shape) rounded to nearest-even in ``DST`` (fp32/bf16/fp16).

    bf16 is rounded with integer ops (``(u + 0x7FFF + lsb) >> 16``, NaN kept quiet): the same
    bits as torch's ``c10::BFloat16`` conversion, on GPU and in the interpreter alike.
    """
    if DST == tl.bfloat16:
        u = h.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(h != h, (u >> 16) | 0x40, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = h.to(DST)
    return out


@triton.jit
def _f32(x):
    """Tensor of fp32/bf16/fp16 values widened to fp32 exactly.

    bf16 is widened by a 16-bit shift (what the hardware conversion does; the interpreter's
    own conversion gets bf16 subnormals wrong).
    """
    if x.dtype == tl.bfloat16:
        out = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def _tf32_split(a):
    """``a = hi + lo`` for an fp32 tensor: ``hi`` keeps the top 11 significant bits (exact in
    TF32), ``lo = a - hi`` (exact, same sign as ``a``, ``|lo| < 2^-10 |a|``).  NaN and ±inf
    stay whole in ``hi`` (``lo = 0``)."""
    hi = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    hi = tl.where(a != a, a, hi)
    lo = tl.where(hi == a, 0.0, a - hi)
    lo = tl.where(a != a, 0.0, lo)
    return hi, lo


@triton.jit
def _finite(a):
    """``a`` with ±inf replaced by 0 (NaN kept): the hi piece as seen by the lo products."""
    return tl.where((a == float("inf")) | (a == float("-inf")), 0.0, a)


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr):
    """``acc + a @ b`` with fp32-grade accuracy from TF32 MMAs.

    a ``[M, Kd]`` = a_hi + a_lo, b ``[Kd, N]`` = b_hi + b_lo (fp32 tensors; the lo pieces are
    only used when ``A_SPLIT`` / ``B_SPLIT``):
    ``acc + a_lo @ fin(b_hi) + fin(a_hi) @ b_lo + a_hi @ b_hi`` where ``fin`` zeroes ±inf, so
    an infinite element contributes (±inf, or NaN against an exact 0) only through
    ``a_hi @ b_hi``, as in an unsplit product, and never ``inf * 0`` against a zero lo piece.
    ``a_lo @ b_lo`` is dropped (< 2^-20 relative).
    """
    if A_SPLIT:
        acc = tl.dot(a_lo, _finite(b_hi), acc, input_precision="tf32")
    if B_SPLIT:
        acc = tl.dot(_finite(a_hi), b_lo, acc, input_precision="tf32")
    acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    return acc


@triton.jit
def _clamp(q, lo, hi):
    """``where(q < lo, lo, q)`` then ``where(q > hi, hi, q)``: torch.clamp incl. NaN q -> NaN."""
    q = tl.where(q < lo, lo, q)
    return tl.where(q > hi, hi, q)


@triton.jit
def _valid_slot(s, P):
    """Slots (int32 scalar or ``[BT]``) outside ``[0, P)`` behave as the identity slot 0."""
    return tl.where((s >= 0) & (s < P), s, 0)


@triton.jit
def _decide(s, gc, pg, thr_ptr, above_ptr, latch_ptr, fired_ptr, K,
            HAS_GATE: tl.constexpr, HAS_LATCH: tl.constexpr):
    """Whether each row is steered (``s``, ``gc``, ``pg``: scalars or ``[BT]``): slot
    ``s != 0`` and its gate open (docs/design.md §2; ``pg`` is the gate concept's projection).
    Writes ``fired[s] = 1`` for firing rows; the latch itself is only read.
    """
    steer = s != 0
    if HAS_GATE:
        thr = tl.load(thr_ptr + s)
        above = tl.load(above_ptr + s) != 0
        cmp = tl.where(above, pg > thr, pg < thr)
        fires = steer & (gc >= 0) & (gc < K) & cmp
        open_ = (gc == -1) | fires
        if HAS_LATCH:
            open_ = open_ | (tl.load(latch_ptr + s) != 0)
            tl.store(fired_ptr + s, 1, mask=fires)
        steer = steer & open_
    return steer


# ----------------------------------------------------------------------------- row kernel
@triton.jit
def _junction_row_kernel(
    res_ptr, res_stride, x_ptr, x_stride, V_ptr,
    slot_ptr, shift_ptr, lo_ptr, hi_ptr, gc_ptr, thr_ptr, above_ptr, latch_ptr, fired_ptr,
    w_ptr, out_ptr, out_stride, scores_ptr, sc_stride0, sc_stride1, norms_ptr, norms_stride,
    d, K, P, eps,
    HAS_X: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_LATCH: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row ``t``, the whole row in registers (``BLOCK_D >= d``).

    Shapes: residual/x/out ``[T, d]`` (row strides given, unit column stride); V ``[K, d]``
    contiguous (fp32 or residual dtype); slot int32 ``[T]``; shift/lo/hi fp32 ``[P, K]``;
    gate concept int32 / threshold fp32 / above uint8 / latch int32 / fired int32 ``[P]``;
    weight ``[d]``; scores fp32 ``[T, K]`` (strides ``sc_stride0, sc_stride1``); norms fp32
    ``[T]`` (stride ``norms_stride``).

    Math: ``h = rne(r + x)``; for each K-chunk ``k``: ``p_k = V_k · h`` (``[BLOCK_K,
    BLOCK_D]`` tile, reduction along d), ``scores[t, k] = p_k`` and, for a row with slot != 0,
    ``delta += Σ_k (clamp(p_k + shift[s,k], lo[s,k], hi[s,k]) - p_k) V_k``; then, if the gate
    is open, ``h = rne(h + delta)``; store h; ``out = rne(h rsqrt(mean h² + eps) w)``.
    V is read once per row; residual/x read once; residual/out written once.
    """
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    DT = res_ptr.dtype.element_ty
    r = tl.load(res_ptr + row * res_stride + offs_d, mask=dmask, other=0.0)
    if HAS_X:
        xv = tl.load(x_ptr + row * x_stride + offs_d, mask=dmask, other=0.0)
        hs = _rne(_f32(r) + _f32(xv), DT)
    else:
        hs = r
    h = _f32(hs)
    sumsq = tl.sum(h * h, axis=0)
    tl.store(norms_ptr + row * norms_stride, tl.sqrt_rn(sumsq))

    if HAS_SLOT:
        s = _valid_slot(tl.load(slot_ptr + row), P)
        steer = s != 0
        s64 = s.to(tl.int64)
    else:
        s = 0
        steer = False
        s64 = 0
    if HAS_GATE:
        gc = tl.load(gc_ptr + s)
    else:
        gc = -1
    pg_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    delta = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        v = _f32(tl.load(V_ptr + offs_k[:, None].to(tl.int64) * d + offs_d[None, :],
                         mask=kmask[:, None] & dmask[None, :], other=0.0))
        p = tl.sum(v * h[None, :], axis=1)                                   # [BLOCK_K]
        tl.store(scores_ptr + row * sc_stride0 + offs_k.to(tl.int64) * sc_stride1, p,
                 mask=kmask)
        if HAS_GATE:
            pg_acc += tl.where(offs_k == gc, p, 0.0)
        if HAS_SLOT:
            if steer:
                tab = s64 * K + offs_k
                q = p + tl.load(shift_ptr + tab, mask=kmask, other=0.0)
                q = _clamp(q, tl.load(lo_ptr + tab, mask=kmask, other=0.0),
                           tl.load(hi_ptr + tab, mask=kmask, other=0.0))
                dq = tl.where(kmask, q - p, 0.0)
                delta += tl.sum(dq[:, None] * v, axis=0)

    if HAS_SLOT:
        pg = tl.sum(pg_acc, axis=0)
        apply = _decide(s, gc, pg, thr_ptr, above_ptr, latch_ptr, fired_ptr, K,
                        HAS_GATE, HAS_LATCH)
        hn = _rne(h + delta, DT)
        hs = tl.where(apply, hn, hs)
        h = tl.where(apply, _f32(hn), h)
        if HAS_X:
            tl.store(res_ptr + row * res_stride + offs_d, hs, mask=dmask)
        else:
            tl.store(res_ptr + row * res_stride + offs_d, hs, mask=dmask & apply)
        sumsq = tl.sum(tl.where(dmask, h * h, 0.0), axis=0)
    elif HAS_X:
        tl.store(res_ptr + row * res_stride + offs_d, hs, mask=dmask)

    if HAS_W:
        inv = 1.0 / tl.sqrt_rn(sumsq / d + eps)
        w = _f32(tl.load(w_ptr + offs_d, mask=dmask, other=0.0))
        tl.store(out_ptr + row * out_stride + offs_d, _rne(h * inv * w, DT), mask=dmask)


# ----------------------------------------------------------------------------- chunked row kernel
@triton.jit
def _junction_chunked_kernel(
    res_ptr, res_stride, x_ptr, x_stride, V_ptr,
    slot_ptr, shift_ptr, lo_ptr, hi_ptr, gc_ptr, thr_ptr, above_ptr, latch_ptr, fired_ptr,
    w_ptr, out_ptr, out_stride, scores_ptr, sc_stride0, sc_stride1, norms_ptr, norms_stride,
    d, K, P, eps,
    HAS_X: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_LATCH: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row ``t`` for rows longer than the registers hold (d-chunks).

    Shapes as in :func:`_junction_row_kernel`; ``BLOCK_D`` is the d-chunk.

    Passes (a barrier between each, since later passes read what earlier ones stored):
    1. per d-chunk: ``h = rne(r + x)``, stored when x is given; ``||h||²``.
    2. per K-chunk, per d-chunk: ``p_k += V_k · h`` (h re-read from the residual);
       ``scores[t, k] = p_k``; the gate concept's projection is picked up on the way.
    3. only for a steered row: per d-chunk, ``h += Σ_k dq_k V_k`` with ``dq`` recomputed from
       the stored scores (exact fp32 p), ``h = rne(h)`` stored, ``||h||²`` re-accumulated.
    4. with a weight: per d-chunk, ``out = rne(h rsqrt(mean h² + eps) w)``.
    """
    row = tl.program_id(0).to(tl.int64)
    DT = res_ptr.dtype.element_ty
    res_row = res_ptr + row * res_stride
    sc_row = scores_ptr + row * sc_stride0
    offs = tl.arange(0, BLOCK_D)

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + offs
        dmask = offs_d < d
        r = tl.load(res_row + offs_d, mask=dmask, other=0.0)
        if HAS_X:
            xv = tl.load(x_ptr + row * x_stride + offs_d, mask=dmask, other=0.0)
            hs = _rne(_f32(r) + _f32(xv), DT)
            tl.store(res_row + offs_d, hs, mask=dmask)
        else:
            hs = r
        hf = _f32(hs)
        acc += hf * hf
    sumsq = tl.sum(acc, axis=0)
    tl.store(norms_ptr + row * norms_stride, tl.sqrt_rn(sumsq))
    tl.debug_barrier()

    if HAS_SLOT:
        s = _valid_slot(tl.load(slot_ptr + row), P)
        s64 = s.to(tl.int64)
    else:
        s = 0
        s64 = 0
    if HAS_GATE:
        gc = tl.load(gc_ptr + s)
    else:
        gc = -1
    pg_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        pacc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + offs
            dmask = offs_d < d
            hf = _f32(tl.load(res_row + offs_d, mask=dmask, other=0.0))
            v = _f32(tl.load(V_ptr + offs_k[:, None].to(tl.int64) * d + offs_d[None, :],
                             mask=kmask[:, None] & dmask[None, :], other=0.0))
            pacc += v * hf[None, :]
        p = tl.sum(pacc, axis=1)
        tl.store(sc_row + offs_k.to(tl.int64) * sc_stride1, p, mask=kmask)
        if HAS_GATE:
            pg_acc += tl.where(offs_k == gc, p, 0.0)

    if HAS_SLOT:
        pg = tl.sum(pg_acc, axis=0)
        apply = _decide(s, gc, pg, thr_ptr, above_ptr, latch_ptr, fired_ptr, K,
                        HAS_GATE, HAS_LATCH)
        if apply:
            tl.debug_barrier()
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + offs
                dmask = offs_d < d
                hf = _f32(tl.load(res_row + offs_d, mask=dmask, other=0.0))
                delta = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    kmask = offs_k < K
                    p = tl.load(sc_row + offs_k.to(tl.int64) * sc_stride1, mask=kmask, other=0.0)
                    tab = s64 * K + offs_k
                    q = p + tl.load(shift_ptr + tab, mask=kmask, other=0.0)
                    q = _clamp(q, tl.load(lo_ptr + tab, mask=kmask, other=0.0),
                               tl.load(hi_ptr + tab, mask=kmask, other=0.0))
                    dq = tl.where(kmask, q - p, 0.0)
                    v = tl.load(V_ptr + offs_k[:, None].to(tl.int64) * d + offs_d[None, :],
                                mask=kmask[:, None] & dmask[None, :], other=0.0)
                    delta += dq[:, None] * _f32(v)
                hn = _rne(hf + tl.sum(delta, axis=0), DT)
                tl.store(res_row + offs_d, hn, mask=dmask)
                hf = _f32(hn)
                acc += tl.where(dmask, hf * hf, 0.0)
            sumsq = tl.sum(acc, axis=0)

    if HAS_W:
        tl.debug_barrier()
        inv = 1.0 / tl.sqrt_rn(sumsq / d + eps)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + offs
            dmask = offs_d < d
            hf = _f32(tl.load(res_row + offs_d, mask=dmask, other=0.0))
            w = _f32(tl.load(w_ptr + offs_d, mask=dmask, other=0.0))
            tl.store(out_ptr + row * out_stride + offs_d, _rne(hf * inv * w, DT), mask=dmask)


# ----------------------------------------------------------------------------- tile kernel
@triton.jit
def _junction_tile_kernel(
    res_ptr, res_stride, x_ptr, x_stride, V_ptr,
    slot_ptr, shift_ptr, lo_ptr, hi_ptr, gc_ptr, thr_ptr, above_ptr, latch_ptr, fired_ptr,
    w_ptr, out_ptr, out_stride, scores_ptr, sc_stride0, sc_stride1, norms_ptr, norms_stride,
    dq_ptr, T, d, K, P, eps,
    HAS_X: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_LATCH: tl.constexpr, HAS_W: tl.constexpr,
    H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_KU: tl.constexpr, BLOCK_DU: tl.constexpr,
):
    """One program per ``BLOCK_T`` rows; all K concepts of the projection at once.

    Shapes as in :func:`_junction_row_kernel`, plus the scratch ``dq`` fp32
    ``[n_programs * BLOCK_T, BLOCK_K]`` (contiguous; only touched when a row of the tile is
    steered).  ``BLOCK_K`` is K rounded up to a power of 2 (16 ..= 256).  Tiles: H
    ``[BLOCK_T, BLOCK_D]`` and V ``[BLOCK_K, BLOCK_D]`` in pass 1, P ``[BLOCK_T, BLOCK_K]``
    (the fp32 accumulator), dQ ``[BLOCK_T, BLOCK_KU]`` and V ``[BLOCK_KU, BLOCK_DU]`` in
    pass 2, H ``[BLOCK_T, BLOCK_DU]`` in passes 2 and 3.

    Math.  Pass 1 over d-chunks: ``H = rne(R + X)`` (stored when x is given),
    ``P += H @ Vᵀ`` (:func:`_dot3`; H split when the residual is fp32 (``H_SPLIT``), V when it
    is fp32 (``V_SPLIT``)), ``||h||²`` per row.  Then ``scores = P``, ``norms = sqrt(||h||²)``
    and the per-row decisions.  If a row of the tile is steered: ``P`` goes to the scratch and
    is turned into ``dQ = where(apply, clamp(P + shift[s], lo[s], hi[s]) - P, 0)`` there,
    ``BLOCK_KU`` columns at a time (so the table gathers never share registers with P); then
    pass 2 over d-chunks: ``H = rne(H + Σ_kchunks dQ_k @ V_k)`` (dQ split in two) stored for
    the steered rows, whose ``||h||²`` is recomputed.  Pass 3, with a weight, over d-chunks:
    ``out = rne(H rsqrt(mean h² + eps) w)`` from the stored H.  A barrier precedes every
    re-read of what another thread of the program stored.
    """
    pid = tl.program_id(0)
    DT = res_ptr.dtype.element_ty
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rows < T
    rows64 = rows.to(tl.int64)
    res_rows = res_ptr + rows64 * res_stride                                # [BLOCK_T]
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K

    # pass 1: add, store, project, sum of squares
    offs = tl.arange(0, BLOCK_D)
    pacc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + offs
        dmask = offs_d < d
        m2 = tmask[:, None] & dmask[None, :]
        rp = res_rows[:, None] + offs_d[None, :]
        r = tl.load(rp, mask=m2, other=0.0)
        if HAS_X:
            xv = tl.load(x_ptr + rows64[:, None] * x_stride + offs_d[None, :], mask=m2,
                         other=0.0)
            hs = _rne(_f32(r) + _f32(xv), DT)
            tl.store(rp, hs, mask=m2)
        else:
            hs = r
        hf = _f32(hs)
        sumsq += tl.sum(hf * hf, axis=1)
        v = _f32(tl.load(V_ptr + offs_k[:, None] * d + offs_d[None, :],
                         mask=kmask[:, None] & dmask[None, :], other=0.0))
        if H_SPLIT:
            h_hi, h_lo = _tf32_split(hf)
        else:
            h_hi = hf
            h_lo = hf
        if V_SPLIT:
            v_hi, v_lo = _tf32_split(v)
        else:
            v_hi = v
            v_lo = v
        pacc = _dot3(h_hi, h_lo, tl.trans(v_hi), tl.trans(v_lo), pacc, H_SPLIT, V_SPLIT)

    p = pacc
    tl.store(scores_ptr + rows64[:, None] * sc_stride0 + offs_k[None, :] * sc_stride1, p,
             mask=tmask[:, None] & kmask[None, :])
    tl.store(norms_ptr + rows64 * norms_stride, tl.sqrt_rn(sumsq), mask=tmask)

    offs_u = tl.arange(0, BLOCK_DU)
    if HAS_SLOT:
        s = _valid_slot(tl.load(slot_ptr + rows, mask=tmask, other=0), P)
        if HAS_GATE:
            gc = tl.load(gc_ptr + s)
            pg = tl.sum(tl.where(offs_k[None, :] == gc[:, None], p, 0.0), axis=1)
        else:
            gc = tl.full([BLOCK_T], -1, dtype=tl.int32)
            pg = tl.zeros([BLOCK_T], dtype=tl.float32)
        apply = _decide(s, gc, pg, thr_ptr, above_ptr, latch_ptr, fired_ptr, K,
                        HAS_GATE, HAS_LATCH)
        n_apply = tl.sum(apply.to(tl.int32), axis=0)
        if n_apply > 0:
            # dQ into the scratch, one [BLOCK_T, BLOCK_KU] chunk at a time (keeps the
            # table gathers out of the registers that hold P)
            dq_tile = dq_ptr + pid.to(tl.int64) * BLOCK_T * BLOCK_K             # scalar
            offs_ku = tl.arange(0, BLOCK_KU)
            loc_t = tl.arange(0, BLOCK_T)[:, None] * BLOCK_K
            tl.store(dq_tile + loc_t + offs_k[None, :], p)
            tl.debug_barrier()
            s_tab = s[:, None] * K
            for k0 in range(0, K, BLOCK_KU):
                kk = k0 + offs_ku
                am = apply[:, None] & (kk < K)[None, :]
                pc = tl.load(dq_tile + loc_t + kk[None, :])
                tab = s_tab + kk[None, :]
                q = pc + tl.load(shift_ptr + tab, mask=am, other=0.0)
                q = _clamp(q, tl.load(lo_ptr + tab, mask=am, other=0.0),
                           tl.load(hi_ptr + tab, mask=am, other=0.0))
                tl.store(dq_tile + loc_t + kk[None, :], tl.where(am, q - pc, 0.0))
            # pass 2: the update, steered rows only
            tl.debug_barrier()
            acc2 = tl.zeros([BLOCK_T], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_DU):
                offs_d = d0 + offs_u
                dmask = offs_d < d
                m2 = apply[:, None] & dmask[None, :]
                rp = res_rows[:, None] + offs_d[None, :]
                hf = _f32(tl.load(rp, mask=m2, other=0.0))
                upd = tl.zeros([BLOCK_T, BLOCK_DU], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_KU):
                    kk = k0 + offs_ku
                    dq = tl.load(dq_tile + loc_t + kk[None, :])
                    dq_hi, dq_lo = _tf32_split(dq)
                    v = tl.load(V_ptr + kk[:, None] * d + offs_d[None, :],
                                mask=(kk < K)[:, None] & dmask[None, :], other=0.0)
                    v = _f32(v)
                    if V_SPLIT:
                        v_hi, v_lo = _tf32_split(v)
                    else:
                        v_hi = v
                        v_lo = v
                    upd = _dot3(dq_hi, dq_lo, v_hi, v_lo, upd, True, V_SPLIT)
                hn = _rne(hf + upd, DT)
                tl.store(rp, hn, mask=m2)
                hnf = _f32(hn)
                acc2 += tl.sum(tl.where(m2, hnf * hnf, 0.0), axis=1)
            sumsq = tl.where(apply, acc2, sumsq)

    if HAS_W:
        # pass 3: RMSNorm of the stored rows
        tl.debug_barrier()
        inv = 1.0 / tl.sqrt_rn(sumsq / d + eps)
        for d0 in range(0, d, BLOCK_DU):
            offs_d = d0 + offs_u
            dmask = offs_d < d
            m2 = tmask[:, None] & dmask[None, :]
            hf = tl.load(res_rows[:, None] + offs_d[None, :], mask=m2, other=0.0)
            w = _f32(tl.load(w_ptr + offs_d, mask=dmask, other=0.0))
            o = _rne(_f32(hf) * inv[:, None] * w[None, :], DT)
            tl.store(out_ptr + rows64[:, None] * out_stride + offs_d[None, :], o, mask=m2)


# ----------------------------------------------------------------------------- launcher
def _tile_fits(d: int, K: int, P: int) -> bool:
    """The tile kernel holds all K in registers and indexes V and the tables with int32."""
    return triton.next_power_of_2(K) <= TILE_MAX_K and K * d < 2**31 and P * K < 2**31


def choose_path(T: int, d: int, K: int, P: int = 1) -> str:
    """Which kernel a ``[T, d]`` x ``K`` call (``P`` slots) uses (``FORCE_PATH`` wins)."""
    if FORCE_PATH is not None:
        return FORCE_PATH
    if T >= TILE_MIN_ROWS and K >= TILE_MIN_K and _tile_fits(d, K, P):
        return "tile"
    if triton.next_power_of_2(d) <= ROW_MAX_BLOCK_D:
        return "row"
    return "chunked"


def _row_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)


#: Tile-kernel blocks per ``BLOCK_K`` (K rounded up to a power of 2, >= 16):
#: ``(BLOCK_T, BLOCK_D, BLOCK_KU, BLOCK_DU, num_warps)``.  Chosen for an H100 so that no
#: variant spills (ptxas -v for sm_90a, every dtype / V dtype / flag combination): the fp32
#: accumulator ``[BLOCK_T, BLOCK_K]`` and the V tile ``[BLOCK_K, BLOCK_D]`` with its TF32
#: split are what bounds them.  ``TILE_CONFIGS_NO_V_SPLIT`` applies when V is in the model's
#: 16-bit dtype (no split, so twice the rows per program fit).
TILE_CONFIGS = {16: (64, 32, 16, 32, 8), 32: (64, 32, 32, 32, 8), 64: (64, 32, 32, 32, 8),
                128: (32, 32, 32, 64, 8), 256: (32, 16, 32, 64, 8)}
TILE_CONFIGS_NO_V_SPLIT = {**TILE_CONFIGS, 128: (64, 32, 32, 32, 16),
                           256: (32, 16, 32, 64, 8)}


def tile_config(kp: int, v_split: bool = True) -> dict:
    """Launch parameters of the tile kernel for ``BLOCK_K = kp`` (a power of 2 in [16, 256]).

    Pass 1 holds ``[BLOCK_T, kp]`` fp32 accumulators and a ``[kp, BLOCK_D]`` V tile; pass 2
    streams ``[BLOCK_T, BLOCK_KU] @ [BLOCK_KU, BLOCK_DU]`` MMAs, independent of K.
    """
    table = TILE_CONFIGS if v_split else TILE_CONFIGS_NO_V_SPLIT
    bt, bd, bku, bdu, warps = table[kp]
    return dict(BLOCK_T=bt, BLOCK_K=kp, BLOCK_D=bd, BLOCK_KU=bku, BLOCK_DU=bdu,
                num_warps=warps)


def junction_triton_(*args, path: Optional[str] = None, **kwargs) -> None:
    """A raw ``steerkernel::junction_triton`` call: the op's arguments
    (:class:`~steerkernel.ops.args.JunctionArgs`, positional or by keyword).

    Checks the metadata with the shared :func:`~steerkernel.ops.checks.check_structure`
    (``RuntimeError`` before any write; values are the public wrapper's) and runs
    :func:`launch`.  ``path`` ("row", "chunked", "tile") forces a kernel.
    """
    call = JunctionArgs(*args, **kwargs)
    launch(call, check_structure(call, MODEL_DTYPES, complete=True), path=path)


def launch(call: JunctionArgs, dims: Dims, *, path: Optional[str] = None) -> None:
    """Launch the kernels on a call that :func:`check_structure` accepted (``dims``: its
    sizes).  Writes ``residual`` (in place), ``scores``, ``norms``, ``out`` and ``latch``; slots
    outside ``[0, P)`` act as slot 0 and gate concepts outside ``[-1, K)`` never fire.  By
    default :func:`choose_path` picks the kernel.
    """
    T, d, K, P = dims
    if T == 0:
        return
    (residual, V, x, slot, shift, lo, hi, gate_concept, gate_threshold, gate_above, latch,
     weight, eps, scores, norms, out) = call
    dev = residual.device
    has_x = x is not None
    has_slot = slot is not None
    has_gate = has_slot and gate_concept is not None
    has_latch = has_gate and latch is not None
    has_w = weight is not None and out is not None
    dummy = norms  # any fp32 tensor: pointer of an argument the kernel never reads
    v_ = V if V is not None else dummy
    scores_, sc_s0, sc_s1 = (scores, scores.stride(0), scores.stride(1)) if K else (dummy, 0, 0)
    if has_slot:
        slot_, shift_, lo_, hi_ = slot, shift, lo, hi
    else:
        P = 1
        slot_ = shift_ = lo_ = hi_ = dummy
    if has_gate:
        gc_, thr_, above_ = gate_concept, gate_threshold, gate_above.view(torch.uint8)
    else:
        gc_ = thr_ = above_ = dummy
    if has_latch:
        # decisions read the latch as of call start; fired slots are merged after the kernel
        fired = torch.zeros(P, dtype=torch.int32, device=dev)
        latch_ = latch
    else:
        fired = latch_ = dummy
    w_ = weight if has_w else dummy
    out_ = out if has_w else dummy
    args = (residual, residual.stride(0), x if has_x else dummy,
            x.stride(0) if has_x else 0, v_,
            slot_, shift_, lo_, hi_, gc_, thr_, above_, latch_, fired,
            w_, out_, out_.stride(0) if has_w else 0,
            scores_, sc_s0, sc_s1, norms, norms.stride(0))
    flags = dict(HAS_X=has_x, HAS_SLOT=has_slot, HAS_GATE=has_gate, HAS_LATCH=has_latch,
                 HAS_W=has_w)
    which = path or choose_path(T, d, K, P)
    kp = triton.next_power_of_2(K)
    if which in ("row", "chunked"):
        block_d = triton.next_power_of_2(d)
        if which == "chunked":
            block_d = min(ROW_CHUNK_D, block_d)
        warps = _row_warps(block_d)
        block_k = max(1, min(kp, ROW_TILE_PER_THREAD * 32 * warps // block_d))
        kernel = _junction_row_kernel if which == "row" else _junction_chunked_kernel
        kernel[(T,)](*args, d, K, P, float(eps), **flags, BLOCK_D=block_d, BLOCK_K=block_k,
                     num_warps=warps)
    elif which == "tile":
        if not _tile_fits(d, K, P):
            raise ValueError(f"triton junction: the tile kernel takes K <= {TILE_MAX_K} and "
                             f"K*d, P*K < 2^31 (got K={K}, d={d}, P={P})")
        v_split = v_.dtype == torch.float32
        cfg = tile_config(max(16, kp), v_split)
        n_prog = triton.cdiv(T, cfg["BLOCK_T"])
        dq = (torch.empty((n_prog * cfg["BLOCK_T"], cfg["BLOCK_K"]), dtype=torch.float32,
                          device=dev) if has_slot else scores_)
        _junction_tile_kernel[(n_prog,)](
            *args, dq, T, d, K, P, float(eps), **flags,
            H_SPLIT=residual.dtype == torch.float32, V_SPLIT=v_split,
            num_stages=TILE_NUM_STAGES, **cfg)
    else:
        raise ValueError(f"triton junction: unknown path {which!r} (row, chunked, tile)")
    if has_latch:
        latch.masked_fill_(fired != 0, 1)


# Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
_lib = torch.library.Library("steerkernel", "IMPL")
_lib.impl("junction_triton", junction_triton_, "CUDA")
_lib.impl("junction_triton", junction_triton_, "CPU")
library.register_backend("triton", torch.ops.steerkernel.junction_triton.default)
