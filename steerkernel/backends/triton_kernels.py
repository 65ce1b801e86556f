"""The Triton junction kernels (docs/design.md §2); launched by :mod:`.triton_junction`.

The design, the byte / FLOP / register arithmetic and the batch-invariance argument are in the
header of :mod:`steerkernel.backends.triton_junction`.  This module holds the ``@triton.jit``
code, shared by both paths:

* ``_tile_kernel``          one program per ``BT`` rows does the whole call (prefill sizes),
  after ``_vcat_kernel`` has stored V's bf16 pieces, transposed, once for the call;
* ``_split_proj_kernel``    split path, launch 1: projection partials per
  ``(row tile, K-chunk, d-segment)``, reduced by the last-arriving programs, which also make
  the gate decisions and merge the latch;
* ``_split_update_kernel``  split path, launch 2: update, residual store, RMSNorm of the
  unsteered rows, per ``(row tile, d-chunk)``;
* ``_split_norm_kernel``    split path, launch 3 (norm with steering): RMSNorm of the steered
  rows.

Every path computes a row with the same helpers on operands of the same shapes, in the same
order, so a row's bits do not depend on the path, the batch size or the row's position.

MMA operands.  Every product is a bf16 tensor-core MMA with fp32 accumulation over
bf16-exact pieces (:func:`_pieces`), the pieces of one product *interleaved along the
reduction dimension* (:func:`_cat`, :func:`_cat_k`) so that each product is ONE ``tl.dot``:
no dot feeds another (Triton would then give the chain a replicated warp layout and convert
the accumulator between the dots), and dots that are summed get an accumulator Triton cannot
prove zero (:func:`_opaque_zero`), which keeps it from fusing ``u0 + dot(a, b)`` into a
chain.  ``INTERP`` (the CPU interpreter): fp32 operands and integer-op roundings (the
interpreter's bf16 matmul multiplies raw bits and its bf16 conversions truncate).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


# ----------------------------------------------------------------------------- elementwise
@triton.jit
def _rne(h, DST: tl.constexpr, INTERP: tl.constexpr):
    """fp32 tensor ``h`` rounded to nearest-even in ``DST`` (fp32 / bf16 / fp16): the
    hardware conversion on the GPU; for bf16 under the interpreter integer ops
    (``(u + 0x7FFF + lsb) >> 16``, NaN kept quiet), the same bits as torch's conversion."""
    if INTERP and DST == tl.bfloat16:
        u = h.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(h != h, (u >> 16) | 0x40, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = h.to(DST)
    return out


@triton.jit
def _f32(x, INTERP: tl.constexpr):
    """fp32 / bf16 / fp16 tensor widened to fp32 exactly (bf16 by a 16-bit shift under the
    interpreter, whose own conversion gets bf16 subnormals wrong)."""
    if INTERP and x.dtype == tl.bfloat16:
        out = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def _is_inf(a):
    return (a == float("inf")) | (a == float("-inf"))


@triton.jit
def _fin(a):
    """``a`` with ±inf zeroed (NaN kept): a piece as a cross term may multiply it."""
    return tl.where(_is_inf(a), 0.0, a)


@triton.jit
def _bf16_near(a, INTERP: tl.constexpr):
    """The bf16-representable fp32 value nearest to ``a`` (ties to even); NaN and ±inf kept;
    a finite ``a`` beyond bf16's range truncated instead of becoming inf."""
    hi = _f32(_rne(a, tl.bfloat16, INTERP), INTERP)
    trunc = (a.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    return tl.where(_is_inf(hi) & ~_is_inf(a) & (a == a), trunc, hi)


@triton.jit
def _pieces(a, INTERP: tl.constexpr):
    """``a ~ hi + lo``, both bf16-exact fp32 tensors, ``|a - hi - lo| <= 2^-16 |a|``;
    non-finite values stay whole in ``hi`` (``lo = 0``)."""
    hi = _bf16_near(a, INTERP)
    lo = _bf16_near(tl.where(_is_inf(hi) | (hi != hi), 0.0, a - hi), INTERP)
    return hi, lo


@triton.jit
def _cat(a, b):
    """``[M, N]`` x2 -> ``[M, 2N]``, interleaved along the last dimension (``2n + i``)."""
    return tl.reshape(tl.join(a, b), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _cat4(a, b, c, e):
    return _cat(_cat(a, b), _cat(c, e))


@triton.jit
def _cat_k(a, b):
    """``[N, M]`` x2 -> ``[2N, M]``, interleaved along the first dimension (``2n + i``): the
    same pairing as :func:`_cat` on the other operand of a product."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [2 * a.shape[0], a.shape[1]])


@triton.jit
def _cat_k4(a, b, c, e):
    return _cat_k(_cat_k(a, b), _cat_k(c, e))


@triton.jit
def _c_order(x):
    """``x`` itself; under the interpreter a C-ordered copy (a round trip through 1-D)."""
    return tl.reshape(tl.reshape(x, [x.shape[0] * x.shape[1]]), [x.shape[0], x.shape[1]])


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    """``acc + a @ b`` for bf16-exact fp32 operands: one bf16 tensor-core MMA with fp32
    accumulation on the GPU (exact products); an fp32 matmul under the interpreter, on
    C-ordered copies (numpy's matmul sums in an order that depends on the operands' memory
    order, which differs between a loaded tile and a transposed one)."""
    if INTERP:
        out = tl.dot(_c_order(a), _c_order(b), acc, input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return out


@triton.jit
def _opaque_zero(eps, BT: tl.constexpr, BN: tl.constexpr):
    """A ``[BT, BN]`` fp32 zero Triton cannot prove zero (``eps`` is finite)."""
    return tl.zeros([BT, BN], dtype=tl.float32) + eps * 0.0


@triton.jit
def _sq_sum(hf, INTERP: tl.constexpr):
    """Row sums of ``hf²`` over a ``[BT, BD]`` chunk (``mul.rn`` on the GPU: ptxas cannot
    contract the squares into the reduction's adds differently in different kernels)."""
    if INTERP:
        sq = hf * hf
    else:
        sq = libdevice.mul_rn(hf, hf)
    return tl.sum(sq, axis=1)


@triton.jit
def _clamp(q, lo, hi):
    """``where(q < lo, lo, q)`` then ``where(q > hi, hi, q)``: torch.clamp incl. NaN q -> NaN."""
    q = tl.where(q < lo, lo, q)
    return tl.where(q > hi, hi, q)


@triton.jit
def _valid_slot(s, P):
    """Slots outside ``[0, P)`` behave as the identity slot 0."""
    return tl.where((s >= 0) & (s < P), s, 0)


@triton.jit
def _inv_rms(sumsq, d, eps):
    return 1.0 / tl.sqrt_rn(sumsq / d + eps)


# ----------------------------------------------------------------------------- operands
# Terms of a product.  Projection ``h·v`` (reduction over d): bf16 h and V: ``h·v``; bf16 h,
# split V: ``fin(h)·v_lo + h·v_hi``; split h and V: ``h_lo·fin(v_hi) + fin(h_hi)·v_lo +
# h_hi·v_hi + h_lo·v_lo``.  Update ``dq·v`` (reduction over K; dq always split): bf16 V:
# ``dq_lo·fin(v) + dq_hi·v``; split V: the four terms.  ``fin`` (±inf zeroed) keeps a lo piece
# that is 0 because its value is infinite from making inf·0 = NaN in a cross term: ±inf and
# NaN reach a product through ``hi·hi`` only, as in an unsplit product.
@triton.jit
def _proj_a(hs, hf, H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """Left operand of the projection: ``[BT, NP·BD]`` (NP = 1, 2, 4 terms); built from the
    stored bf16 ``hs`` on the GPU when h needs no split."""
    if H_SPLIT:
        h_hi, h_lo = _pieces(hf, INTERP)
        a = _cat4(h_lo, _fin(h_hi), h_hi, h_lo)
    else:
        if INTERP:
            h = hf
        else:
            h = hs
        if V_SPLIT:
            a = _cat(_fin(h), h)
        else:
            a = h
    return a


@triton.jit
def _vcat(v, H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """V's pieces for the projection, ``[KC, NP·BD]`` (the right operand transposed)."""
    if V_SPLIT:
        v_hi, v_lo = _pieces(v, INTERP)
        if H_SPLIT:
            t = _cat4(_fin(v_hi), v_lo, v_hi, v_lo)
        else:
            t = _cat(v_lo, v_hi)
    else:
        t = v
    return t


@triton.jit
def _upd_a(b, H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr):
    """Left operand of the transposed update ``updᵀ = Vᵀ dQᵀ``: ``[BD, NQ·KC]``, from the
    projection's right operand ``b = _vcat(v)ᵀ`` ``[NP·BD, KC]`` (pieces interleaved along
    d) -> pieces interleaved along K."""
    BD: tl.constexpr = b.shape[0] // (4 if H_SPLIT else (2 if V_SPLIT else 1))
    KC: tl.constexpr = b.shape[1]
    if H_SPLIT:
        # rows 4i + s hold piece s = (fin v_hi, v_lo, v_hi, v_lo) of d-column i
        a = tl.reshape(tl.permute(tl.reshape(b, [BD, 4, KC]), (0, 2, 1)), [BD, 4 * KC])
    elif V_SPLIT:
        lo, hi = tl.split(tl.permute(tl.reshape(b, [BD, 2, KC]), (0, 2, 1)))
        a = _cat4(_fin(hi), lo, hi, lo)
    else:
        a = _cat(_fin(b), b)
    return a


@triton.jit
def _upd_b(dq, V_SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """Right operand of the transposed update: ``dQᵀ``'s pieces ``[NQ·KC, BT]``, interleaved
    along K as :func:`_upd_a`'s (terms ``dq_lo·fin(v_hi) + fin(dq_hi)·v_lo + dq_hi·v_hi +
    dq_lo·v_lo``; bf16 V: ``dq_lo·fin(v) + dq_hi·v``)."""
    q_hi, q_lo = _pieces(tl.trans(dq), INTERP)
    if V_SPLIT:
        b = _cat_k4(q_lo, _fin(q_hi), q_hi, q_lo)
    else:
        b = _cat_k(q_lo, q_hi)
    if not INTERP:
        b = b.to(tl.bfloat16)
    return b


@triton.jit
def _load_h(res_ptr, res_stride, x_ptr, x_stride, rows64, tmask, offs_d, dmask,
            HAS_X: tl.constexpr, INTERP: tl.constexpr):
    """``h = rne(r + x)`` on a ``[BT, BD]`` tile: (stored dtype, fp32)."""
    DT: tl.constexpr = res_ptr.dtype.element_ty
    m2 = tmask[:, None] & dmask[None, :]
    r = tl.load(res_ptr + rows64[:, None] * res_stride + offs_d[None, :], mask=m2, other=0.0)
    if HAS_X:
        xv = tl.load(x_ptr + rows64[:, None] * x_stride + offs_d[None, :], mask=m2, other=0.0)
        hs = _rne(_f32(r, INTERP) + _f32(xv, INTERP), DT, INTERP)
    else:
        hs = r
    return hs, _f32(hs, INTERP)


@triton.jit
def _load_v(V_ptr, kc, d, K, offs_d, dmask, KC: tl.constexpr, INTERP: tl.constexpr):
    """V's ``[KC, BD]`` tile (K-chunk ``kc``), fp32."""
    offs_k = kc * KC + tl.arange(0, KC)
    v = tl.load(V_ptr + offs_k[:, None].to(tl.int64) * d + offs_d[None, :],
                mask=(offs_k < K)[:, None] & dmask[None, :], other=0.0)
    return _f32(v, INTERP)


@triton.jit
def _load_vct(Vt_ptr, kc, j, KP, NPd, KC: tl.constexpr, NPBD: tl.constexpr,
              INTERP: tl.constexpr):
    """The ``[NP·BD, KC]`` tile (d-chunk ``j``, K-chunk ``kc``) of V's stored pieces
    ``Vt [NP·d, KP]`` (bf16; fp32 under the interpreter): the projection's right operand."""
    rows = j * NPBD + tl.arange(0, NPBD)
    cols = kc * KC + tl.arange(0, KC)
    t = tl.load(Vt_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :],
                mask=(rows < NPd)[:, None], other=0.0)
    if INTERP:
        t = _f32(t, INTERP)
    return t


@triton.jit
def _dq(p, s, apply, kc, K, shift_ptr, lo_ptr, hi_ptr, KC: tl.constexpr):
    """``where(apply, clamp(p + shift[s], lo[s], hi[s]) - p, 0)`` on a ``[BT, KC]`` chunk."""
    offs_k = kc * KC + tl.arange(0, KC)
    am = apply[:, None] & (offs_k < K)[None, :]
    tab = s.to(tl.int64)[:, None] * K + offs_k[None, :]
    q = p + tl.load(shift_ptr + tab, mask=am, other=0.0)
    q = _clamp(q, tl.load(lo_ptr + tab, mask=am, other=0.0),
               tl.load(hi_ptr + tab, mask=am, other=0.0))
    return tl.where(am, q - p, 0.0)


@triton.jit
def _pick(p, kc, gc, KC: tl.constexpr):
    """``p[t, gc[t]]`` where column ``gc[t]`` lies in K-chunk ``kc`` of ``p`` (else 0)."""
    offs_k = kc * KC + tl.arange(0, KC)
    return tl.sum(tl.where(offs_k[None, :] == gc[:, None], p, 0.0), axis=1)


@triton.jit
def _decide(s, gc, pg, thr_ptr, above_ptr, latch_ptr, fired_ptr, K,
            HAS_GATE: tl.constexpr, HAS_LATCH: tl.constexpr):
    """Whether each row is steered: slot ``s != 0`` and its gate open (docs/design.md §2;
    ``pg`` is the gate concept's projection).  Writes ``fired[s] = 1`` for firing rows; the
    latch itself is only read here (the call's last program merges ``fired`` into it)."""
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


@triton.jit
def _arrive(count_ptr, n):
    """Count this program in at ``count_ptr`` (acq_rel, after a CTA barrier so that every
    thread's earlier stores are released); True for the ``n``-th (last) arrival, which also
    re-arms the counter for the next call."""
    tl.debug_barrier()
    old = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == n - 1
    if last:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _merge_latch(latch_ptr, fired_ptr, P, P_BLOCK: tl.constexpr):
    """``latch[s] = 1`` for every slot that fired during the call; ``fired`` re-zeroed."""
    for p0 in range(0, P, P_BLOCK):
        offs = p0 + tl.arange(0, P_BLOCK)
        f = tl.load(fired_ptr + offs, mask=offs < P, other=0, cache_modifier=".cg")
        m = (offs < P) & (f != 0)
        tl.store(latch_ptr + offs, 1, mask=m)
        tl.store(fired_ptr + offs, 0, mask=m)


# ----------------------------------------------------------------------------- V pieces
@triton.jit
def _vcat_kernel(V_ptr, Vt_ptr, d, K, KP,
                 H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr, INTERP: tl.constexpr,
                 KC: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr):
    """``Vt [NP·d, KP]`` bf16 = :func:`_vcat` of every ``[KC, BD]`` tile of V, transposed
    (grid: K-chunks x d-chunks; ``KP = NKC·KC``, the padding columns zero): the tile path's
    MMAs then read V's pieces straight from memory as their right operand."""
    kc = tl.program_id(0)
    j = tl.program_id(1)
    offs_d = j * BD + tl.arange(0, BD)
    v = _load_v(V_ptr, kc, d, K, offs_d, offs_d < d, KC, INTERP)
    t = tl.trans(_rne(_vcat(v, H_SPLIT, V_SPLIT, INTERP), tl.bfloat16, INTERP))
    rows = j * (NP * BD) + tl.arange(0, NP * BD)
    cols = kc * KC + tl.arange(0, KC)
    tl.store(Vt_ptr + rows[:, None].to(tl.int64) * KP + cols[None, :], t,
             mask=(rows < NP * d)[:, None])


# ----------------------------------------------------------------------------- tile path
@triton.jit
def _upd_chunk(bt, dqb, zacc, H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr,
               INTERP: tl.constexpr):
    """``(dQ_kc V_kc)ᵀ`` on a d-chunk ``[BD, BT]``: one MMA, ``bt`` the chunk's projection
    right operand ``[NP·BD, KC]``, ``dqb`` = :func:`_upd_b` of ``dQ_kc``."""
    return _dot(_upd_a(bt, H_SPLIT, V_SPLIT), dqb, zacc, INTERP)


@triton.jit
def _tile_pass2(res_ptr, res_stride, rows64, tmask, apply, d, Vt_ptr, KP, w_ptr, out_ptr,
                out_stride, inv, eps, dqb0, dqb1, dqb2, dqb3, n_dchunks,
                UPDATE: tl.constexpr, HAS_W: tl.constexpr, H_SPLIT: tl.constexpr,
                V_SPLIT: tl.constexpr, INTERP: tl.constexpr, BT: tl.constexpr,
                BD: tl.constexpr, KC: tl.constexpr, NKC: tl.constexpr, NP: tl.constexpr,
                STAGES: tl.constexpr):
    """Pass 2 of the tile kernel: ``out`` of the unsteered rows and, with ``UPDATE``, the
    steered rows' ``h = rne(h + Σ_kc dQ_kc V_kc)`` stored; returns their ``Σ h²``."""
    DT: tl.constexpr = res_ptr.dtype.element_ty
    sq2 = tl.zeros([BT], dtype=tl.float32)
    offs = tl.arange(0, BD)
    if HAS_W:
        need = tmask
    else:
        need = apply
    zacc = _opaque_zero(eps, BD, BT)
    for j in tl.range(0, n_dchunks, num_stages=STAGES):
        offs_d = j * BD + offs
        dmask = offs_d < d
        rp = res_ptr + rows64[:, None] * res_stride + offs_d[None, :]
        hs = tl.load(rp, mask=need[:, None] & dmask[None, :], other=0.0)
        hf = _f32(hs, INTERP)
        if UPDATE:
            updt = tl.zeros([BD, BT], dtype=tl.float32)
            updt += _upd_chunk(_load_vct(Vt_ptr, 0, j, KP, NP * d, KC, NP * BD, INTERP), dqb0,
                               zacc, H_SPLIT, V_SPLIT, INTERP)
            if NKC > 1:
                updt += _upd_chunk(_load_vct(Vt_ptr, 1, j, KP, NP * d, KC, NP * BD, INTERP),
                                   dqb1, zacc, H_SPLIT, V_SPLIT, INTERP)
            if NKC > 2:
                updt += _upd_chunk(_load_vct(Vt_ptr, 2, j, KP, NP * d, KC, NP * BD, INTERP),
                                   dqb2, zacc, H_SPLIT, V_SPLIT, INTERP)
            if NKC > 3:
                updt += _upd_chunk(_load_vct(Vt_ptr, 3, j, KP, NP * d, KC, NP * BD, INTERP),
                                   dqb3, zacc, H_SPLIT, V_SPLIT, INTERP)
            hn = _rne(hf + tl.trans(updt), DT, INTERP)
            tl.store(rp, hn, mask=apply[:, None] & dmask[None, :])
            sq2 += _sq_sum(_f32(hn, INTERP), INTERP)
        if HAS_W:
            w = _f32(tl.load(w_ptr + offs_d, mask=dmask, other=0.0), INTERP)
            o = _rne(hf * inv[:, None] * w[None, :], DT, INTERP)
            tl.store(out_ptr + rows64[:, None] * out_stride + offs_d[None, :], o,
                     mask=(tmask & ~apply)[:, None] & dmask[None, :])
    return sq2


@triton.jit
def _tile_kernel(
    res_ptr, res_stride, x_ptr, x_stride, Vt_ptr, KP,
    slot_ptr, shift_ptr, lo_ptr, hi_ptr, gc_ptr, thr_ptr, above_ptr, latch_ptr,
    fired_ptr, count_ptr,
    w_ptr, out_ptr, out_stride, scores_ptr, sc_stride0, sc_stride1, norms_ptr, norms_stride,
    T, d, K, P, eps,
    HAS_X: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_LATCH: tl.constexpr, HAS_W: tl.constexpr, H_SPLIT: tl.constexpr,
    V_SPLIT: tl.constexpr, INTERP: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, NKC: tl.constexpr,
    SEG_CHUNKS: tl.constexpr, P_BLOCK: tl.constexpr, STAGES: tl.constexpr,
    STAGES2: tl.constexpr,
):
    """One program per ``BT`` rows (``NKC <= 4`` K-chunks of ``KC``: the projection lives in
    registers).  ``Vt``: V's pieces, transposed, ``[NP·d, KP]`` (:func:`_vcat_kernel`).

    Pass 1 over the d-chunks: ``h = rne(r + x)`` stored (with x), ``Σ h²``, and per K-chunk
    the projection, a chain of MMAs per d-segment (``pt``, ``SEG_CHUNKS`` chunks, the last
    segment up to the last chunk) summed over segments in order (``acc``): the split path's
    reduction structure.  Then scores, norms,
    the decisions (latch as of call start; the program that arrives last merges ``fired``
    into the latch) and ``dQ``'s pieces (the update's loop-invariant right operand).  Pass 2
    re-reads the tile: ``out`` of the unsteered rows, and the update of the steered rows when
    the tile has one.  Pass 3 (norm, tile with a steered row): ``out`` of the steered rows.
    """
    DT: tl.constexpr = res_ptr.dtype.element_ty
    NP: tl.constexpr = 4 if H_SPLIT else (2 if V_SPLIT else 1)
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    tmask = rows < T
    rows64 = rows.to(tl.int64)
    offs = tl.arange(0, BD)
    n_dchunks = tl.cdiv(d, BD)      # the last segment may be shorter (as on the split path)

    # pass 1: add, store, sum of squares, projection
    zero = tl.zeros([BT, KC], dtype=tl.float32)
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    pt0 = zero
    pt1 = zero
    pt2 = zero
    pt3 = zero
    sq = tl.zeros([BT], dtype=tl.float32)
    for j in tl.range(0, n_dchunks, num_stages=STAGES):
        offs_d = j * BD + offs
        dmask = offs_d < d
        hs, hf = _load_h(res_ptr, res_stride, x_ptr, x_stride, rows64, tmask, offs_d, dmask,
                         HAS_X, INTERP)
        if HAS_X:
            tl.store(res_ptr + rows64[:, None] * res_stride + offs_d[None, :], hs,
                     mask=tmask[:, None] & dmask[None, :])
        sq += _sq_sum(hf, INTERP)
        if NKC > 0:
            a = _proj_a(hs, hf, H_SPLIT, V_SPLIT, INTERP)
            pt0 = _dot(a, _load_vct(Vt_ptr, 0, j, KP, NP * d, KC, NP * BD, INTERP), pt0,
                       INTERP)
            if NKC > 1:
                pt1 = _dot(a, _load_vct(Vt_ptr, 1, j, KP, NP * d, KC, NP * BD, INTERP), pt1,
                           INTERP)
            if NKC > 2:
                pt2 = _dot(a, _load_vct(Vt_ptr, 2, j, KP, NP * d, KC, NP * BD, INTERP), pt2,
                           INTERP)
            if NKC > 3:
                pt3 = _dot(a, _load_vct(Vt_ptr, 3, j, KP, NP * d, KC, NP * BD, INTERP), pt3,
                           INTERP)
            if (j % SEG_CHUNKS == SEG_CHUNKS - 1) | (j == n_dchunks - 1):
                acc0 += pt0
                pt0 = zero
                if NKC > 1:
                    acc1 += pt1
                    pt1 = zero
                if NKC > 2:
                    acc2 += pt2
                    pt2 = zero
                if NKC > 3:
                    acc3 += pt3
                    pt3 = zero

    tl.store(norms_ptr + rows64 * norms_stride, tl.sqrt_rn(sq), mask=tmask)
    offs_kc = tl.arange(0, KC)
    sc_rows = scores_ptr + rows64[:, None] * sc_stride0
    if NKC > 0:
        k = offs_kc
        tl.store(sc_rows + k[None, :].to(tl.int64) * sc_stride1, acc0,
                 mask=tmask[:, None] & (k < K)[None, :])
    if NKC > 1:
        k = KC + offs_kc
        tl.store(sc_rows + k[None, :].to(tl.int64) * sc_stride1, acc1,
                 mask=tmask[:, None] & (k < K)[None, :])
    if NKC > 2:
        k = 2 * KC + offs_kc
        tl.store(sc_rows + k[None, :].to(tl.int64) * sc_stride1, acc2,
                 mask=tmask[:, None] & (k < K)[None, :])
    if NKC > 3:
        k = 3 * KC + offs_kc
        tl.store(sc_rows + k[None, :].to(tl.int64) * sc_stride1, acc3,
                 mask=tmask[:, None] & (k < K)[None, :])

    inv = _inv_rms(sq, d, eps)
    if HAS_SLOT:
        s = _valid_slot(tl.load(slot_ptr + rows, mask=tmask, other=0), P)
        if HAS_GATE:
            gc = tl.load(gc_ptr + s)
            pg = _pick(acc0, 0, gc, KC)
            if NKC > 1:
                pg += _pick(acc1, 1, gc, KC)
            if NKC > 2:
                pg += _pick(acc2, 2, gc, KC)
            if NKC > 3:
                pg += _pick(acc3, 3, gc, KC)
        else:
            gc = tl.full([BT], -1, dtype=tl.int32)
            pg = tl.zeros([BT], dtype=tl.float32)
        apply = _decide(s, gc, pg, thr_ptr, above_ptr, latch_ptr, fired_ptr, K,
                        HAS_GATE, HAS_LATCH)
        if HAS_LATCH:
            if _arrive(count_ptr, tl.num_programs(0)):
                _merge_latch(latch_ptr, fired_ptr, P, P_BLOCK)
        n_apply = tl.sum(apply.to(tl.int32), axis=0)
        tl.debug_barrier()
        if n_apply > 0:
            dqb0 = _upd_b(_dq(acc0, s, apply, 0, K, shift_ptr, lo_ptr, hi_ptr, KC), V_SPLIT,
                          INTERP)
            dqb1 = dqb0
            dqb2 = dqb0
            dqb3 = dqb0
            if NKC > 1:
                dqb1 = _upd_b(_dq(acc1, s, apply, 1, K, shift_ptr, lo_ptr, hi_ptr, KC),
                              V_SPLIT, INTERP)
            if NKC > 2:
                dqb2 = _upd_b(_dq(acc2, s, apply, 2, K, shift_ptr, lo_ptr, hi_ptr, KC),
                              V_SPLIT, INTERP)
            if NKC > 3:
                dqb3 = _upd_b(_dq(acc3, s, apply, 3, K, shift_ptr, lo_ptr, hi_ptr, KC),
                              V_SPLIT, INTERP)
            sq2 = _tile_pass2(res_ptr, res_stride, rows64, tmask, apply, d, Vt_ptr, KP, w_ptr,
                              out_ptr, out_stride, inv, eps, dqb0, dqb1, dqb2, dqb3,
                              n_dchunks, True, HAS_W, H_SPLIT, V_SPLIT, INTERP, BT, BD, KC,
                              NKC, NP, STAGES2)
            if HAS_W:
                # pass 3: out of the steered rows, from the stored values
                tl.debug_barrier()
                inv2 = _inv_rms(sq2, d, eps)
                for j in tl.range(0, n_dchunks, num_stages=STAGES):
                    offs_d = j * BD + offs
                    dmask = offs_d < d
                    m2 = apply[:, None] & dmask[None, :]
                    hf = _f32(tl.load(res_ptr + rows64[:, None] * res_stride + offs_d[None, :],
                                      mask=m2, other=0.0), INTERP)
                    w = _f32(tl.load(w_ptr + offs_d, mask=dmask, other=0.0), INTERP)
                    o = _rne(hf * inv2[:, None] * w[None, :], DT, INTERP)
                    tl.store(out_ptr + rows64[:, None] * out_stride + offs_d[None, :], o,
                             mask=m2)
        elif HAS_W:
            _tile_pass2(res_ptr, res_stride, rows64, tmask, apply, d, Vt_ptr, KP, w_ptr,
                        out_ptr, out_stride, inv, eps, zero, zero, zero, zero, n_dchunks,
                        False, HAS_W, H_SPLIT, V_SPLIT, INTERP, BT, BD, KC, NKC, NP, STAGES)
    elif HAS_W:
        tl.debug_barrier()
        apply = tl.zeros([BT], dtype=tl.int1)
        _tile_pass2(res_ptr, res_stride, rows64, tmask, apply, d, Vt_ptr, KP, w_ptr,
                    out_ptr, out_stride, inv, eps, zero, zero, zero, zero, n_dchunks,
                    False, HAS_W, H_SPLIT, V_SPLIT, INTERP, BT, BD, KC, NKC, NP, STAGES)


# ----------------------------------------------------------------------------- split path
@triton.jit
def _split_proj_kernel(
    res_ptr, res_stride, x_ptr, x_stride, V_ptr,
    slot_ptr, shift_ptr, lo_ptr, hi_ptr, gc_ptr, thr_ptr, above_ptr, latch_ptr,
    fired_ptr, count_ptr,
    scores_ptr, sc_stride0, sc_stride1, norms_ptr, norms_stride,
    part_ptr, sqp_ptr, pscr_ptr, dq_ptr, inv_ptr, apply_ptr,
    T, d, K, P, eps, Tpad, part_stride,
    HAS_X: tl.constexpr, HAS_V: tl.constexpr, HAS_SLOT: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_LATCH: tl.constexpr, HAS_W: tl.constexpr,
    H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr, INTERP: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    P_BLOCK: tl.constexpr,
):
    """Split path, launch 1.  Grid ``(row tiles, K-chunks (1 without V), d-segments)``.

    Program ``(rt, kc, sg)``: the projection of its ``BT`` rows on K-chunk ``kc`` over the
    (up to ``SEG_CHUNKS``) d-chunks of segment ``sg`` (a chain from 0: the tile's ``pt``) into
    ``part[sg]``, and (``kc == 0``) each chunk's ``Σ h²`` into ``sqp``.  The last of the
    ``n_seg`` programs of ``(rt, kc)`` sums ``part`` over segments in order (the tile
    kernel's ``acc``) -> scores and ``pscr``; the last of those of row tile ``rt`` reduces
    ``sqp`` (norms, ``inv``), decides (``apply``) and writes ``dQ``; the last of those merges
    the latch.  Scratch (``Tpad = n_rt·BT`` rows, ``KP = NKC·KC``): fp32 ``part [n_seg, Tpad,
    KP]`` (``part_stride = Tpad·KP``), ``sqp [n_dchunks, Tpad]``, ``pscr`` / ``dq [Tpad, KP]``,
    ``inv [Tpad]``; int32 ``apply [Tpad]``; ``count`` int32 ``[n_rt·NKC + n_rt + 1]``, zero
    between calls.
    """
    rt = tl.program_id(0)
    kc = tl.program_id(1)
    sg = tl.program_id(2)
    n_rt = tl.num_programs(0)
    n_kc = tl.num_programs(1)
    n_seg = tl.num_programs(2)
    n_dchunks = tl.cdiv(d, BD)
    KP = n_kc * KC
    rows = rt * BT + tl.arange(0, BT)
    tmask = rows < T
    rows64 = rows.to(tl.int64)
    offs = tl.arange(0, BD)
    offs_kc = tl.arange(0, KC)

    pt = tl.zeros([BT, KC], dtype=tl.float32)
    for c in range(0, tl.minimum(SEG_CHUNKS, n_dchunks - sg * SEG_CHUNKS)):
        j = sg * SEG_CHUNKS + c
        offs_d = j * BD + offs
        dmask = offs_d < d
        hs, hf = _load_h(res_ptr, res_stride, x_ptr, x_stride, rows64, tmask, offs_d, dmask,
                         HAS_X, INTERP)
        if kc == 0:
            tl.store(sqp_ptr + j.to(tl.int64) * Tpad + rows, _sq_sum(hf, INTERP))
        if HAS_V:
            a = _proj_a(hs, hf, H_SPLIT, V_SPLIT, INTERP)
            bt = tl.trans(_vcat(_load_v(V_ptr, kc, d, K, offs_d, dmask, KC, INTERP), H_SPLIT,
                                V_SPLIT, INTERP))
            if not INTERP:
                bt = bt.to(tl.bfloat16)
            pt = _dot(a, bt, pt, INTERP)
    loc = rows64[:, None] * KP + (kc * KC + offs_kc)[None, :]          # [BT, KC] in [Tpad, KP]
    if HAS_V:
        tl.store(part_ptr + sg * part_stride + loc, pt)

    if _arrive(count_ptr + rt * n_kc + kc, n_seg):
        if HAS_V:
            p = tl.zeros([BT, KC], dtype=tl.float32)
            for s_ in range(0, n_seg):
                p += tl.load(part_ptr + s_ * part_stride + loc, cache_modifier=".cg")
            k = kc * KC + offs_kc
            tl.store(scores_ptr + rows64[:, None] * sc_stride0
                     + k[None, :].to(tl.int64) * sc_stride1, p,
                     mask=tmask[:, None] & (k < K)[None, :])
            tl.store(pscr_ptr + loc, p)
        if _arrive(count_ptr + n_rt * n_kc + rt, n_kc):
            sq = tl.zeros([BT], dtype=tl.float32)
            for j in range(0, n_dchunks):
                sq += tl.load(sqp_ptr + j * Tpad + rows, cache_modifier=".cg")
            tl.store(norms_ptr + rows64 * norms_stride, tl.sqrt_rn(sq), mask=tmask)
            if HAS_W:
                tl.store(inv_ptr + rows, _inv_rms(sq, d, eps))
            if HAS_SLOT:
                s = _valid_slot(tl.load(slot_ptr + rows, mask=tmask, other=0), P)
                if HAS_GATE:
                    gc = tl.load(gc_ptr + s)
                    gok = (gc >= 0) & (gc < K)
                    pg = tl.load(pscr_ptr + rows64 * KP + tl.where(gok, gc, 0), mask=gok,
                                 other=0.0, cache_modifier=".cg")
                else:
                    gc = tl.full([BT], -1, dtype=tl.int32)
                    pg = tl.zeros([BT], dtype=tl.float32)
                apply = _decide(s, gc, pg, thr_ptr, above_ptr, latch_ptr, fired_ptr, K,
                                HAS_GATE, HAS_LATCH)
                tl.store(apply_ptr + rows, apply.to(tl.int32))
                for kk in range(0, n_kc):
                    lk = rows64[:, None] * KP + (kk * KC + offs_kc)[None, :]
                    p = tl.load(pscr_ptr + lk, cache_modifier=".cg")
                    tl.store(dq_ptr + lk, _dq(p, s, apply, kk, K, shift_ptr, lo_ptr, hi_ptr,
                                              KC))
                if HAS_LATCH:
                    if _arrive(count_ptr + n_rt * n_kc + n_rt, n_rt):
                        _merge_latch(latch_ptr, fired_ptr, P, P_BLOCK)


@triton.jit
def _split_update_kernel(
    res_ptr, res_stride, x_ptr, x_stride, V_ptr,
    w_ptr, out_ptr, out_stride, dq_ptr, inv_ptr, apply_ptr, sq2_ptr,
    T, d, K, eps, Tpad, n_kc,
    HAS_X: tl.constexpr, HAS_SLOT: tl.constexpr, HAS_W: tl.constexpr,
    H_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr, INTERP: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr,
):
    """Split path, launch 2.  Grid ``(row tiles, d-chunks)``: ``h = rne(r + x)``; steered
    rows ``h = rne(h + Σ_kc dQ_kc V_kc)`` (the tile kernel's pass 2; with a weight ``Σ h²``
    per chunk into ``sq2``); the residual stored; ``out`` of the unsteered rows (``inv``
    from launch 1)."""
    DT: tl.constexpr = res_ptr.dtype.element_ty
    rt = tl.program_id(0)
    j = tl.program_id(1)
    rows = rt * BT + tl.arange(0, BT)
    tmask = rows < T
    rows64 = rows.to(tl.int64)
    offs_d = j * BD + tl.arange(0, BD)
    dmask = offs_d < d
    m2 = tmask[:, None] & dmask[None, :]
    hs, hf = _load_h(res_ptr, res_stride, x_ptr, x_stride, rows64, tmask, offs_d, dmask,
                     HAS_X, INTERP)
    if HAS_SLOT:
        apply = tl.load(apply_ptr + rows) != 0
        if tl.sum(apply.to(tl.int32), axis=0) > 0:
            offs_kc = tl.arange(0, KC)
            KP = n_kc * KC
            zacc = _opaque_zero(eps, BD, BT)
            updt = tl.zeros([BD, BT], dtype=tl.float32)
            for kk in range(0, n_kc):
                dq = tl.load(dq_ptr + rows64[:, None] * KP + (kk * KC + offs_kc)[None, :])
                bt = tl.trans(_vcat(_load_v(V_ptr, kk, d, K, offs_d, dmask, KC, INTERP),
                                    H_SPLIT, V_SPLIT, INTERP))
                if not INTERP:
                    bt = bt.to(tl.bfloat16)
                updt += _upd_chunk(bt, _upd_b(dq, V_SPLIT, INTERP), zacc, H_SPLIT, V_SPLIT,
                                   INTERP)
            hn = _rne(hf + tl.trans(updt), DT, INTERP)
            if HAS_W:
                tl.store(sq2_ptr + j.to(tl.int64) * Tpad + rows,
                         _sq_sum(_f32(hn, INTERP), INTERP))
            hs = tl.where(apply[:, None], hn, hs)
    else:
        apply = tl.zeros([BT], dtype=tl.int1)
    rp = res_ptr + rows64[:, None] * res_stride + offs_d[None, :]
    if HAS_X:
        tl.store(rp, hs, mask=m2)
    elif HAS_SLOT:
        tl.store(rp, hs, mask=m2 & apply[:, None])
    if HAS_W:
        inv = tl.load(inv_ptr + rows)
        w = _f32(tl.load(w_ptr + offs_d, mask=dmask, other=0.0), INTERP)
        o = _rne(hf * inv[:, None] * w[None, :], DT, INTERP)
        tl.store(out_ptr + rows64[:, None] * out_stride + offs_d[None, :], o,
                 mask=m2 & ~apply[:, None])


@triton.jit
def _split_norm_kernel(
    res_ptr, res_stride, w_ptr, out_ptr, out_stride, apply_ptr, sq2_ptr,
    T, d, eps, Tpad, n_chunks,
    INTERP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """Split path, launch 3 (norm with steering).  Grid ``(row tiles, d-chunks)``: ``out``
    of the steered rows from the stored values, ``Σ h²`` summed over ``sq2``'s chunks in
    order (the tile kernel's pass 3)."""
    DT: tl.constexpr = res_ptr.dtype.element_ty
    rt = tl.program_id(0)
    j = tl.program_id(1)
    rows = rt * BT + tl.arange(0, BT)
    apply = (tl.load(apply_ptr + rows) != 0) & (rows < T)
    if tl.sum(apply.to(tl.int32), axis=0) > 0:
        sq2 = tl.zeros([BT], dtype=tl.float32)
        for jj in range(0, n_chunks):
            sq2 += tl.load(sq2_ptr + jj * Tpad + rows, mask=apply, other=0.0)
        inv2 = _inv_rms(sq2, d, eps)
        rows64 = rows.to(tl.int64)
        offs_d = j * BD + tl.arange(0, BD)
        dmask = offs_d < d
        m2 = apply[:, None] & dmask[None, :]
        hf = _f32(tl.load(res_ptr + rows64[:, None] * res_stride + offs_d[None, :], mask=m2,
                          other=0.0), INTERP)
        w = _f32(tl.load(w_ptr + offs_d, mask=dmask, other=0.0), INTERP)
        o = _rne(hf * inv2[:, None] * w[None, :], DT, INTERP)
        tl.store(out_ptr + rows64[:, None] * out_stride + offs_d[None, :], o, mask=m2)
