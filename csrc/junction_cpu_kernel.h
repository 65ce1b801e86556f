// steerkernel: the row-tile kernel of the CPU junction op (docs/design.md §2).
//
// Written once against the `Vec` interface of cpu_vec.h and compiled once per instruction set:
// junction_cpu.cpp includes this file inside each ISA namespace of cpu_vec.h (where `Vec` is
// that ISA's type), under that ISA's `#pragma GCC target`, after declaring `TileFn`,
// `h_stride`, `kIsF32`, `kIsBF16`, `kMaxTileRows` and `TileScratch` (the call's parameters:
// JunctionParams of junction_params.h; K == 0, i.e. no V, skips the projection and the
// readout).  No include guard on purpose.
// Nothing from std:: or ATen is called here (see cpu_vec.h for why).
//
// One call handles n <= kMaxTileRows consecutive rows t0 .. t0+n-1 (a "tile", sized by the
// caller to stay in L2) in five passes:
//   A. row by row: h = residual + x, stored in the residual dtype; sumsq = ||h||^2; the fp32
//      value of the stored h also goes to the scratch row the projection reads when the rows
//      are 16-bit, or fp32 with a row stride that would alias in L1 (fp32 rows are otherwise
//      read in place).
//   B. p = V h for the whole tile, in register blocks of kRows rows x (up to) kDotK concepts;
//      concept blocks are the outer loop, so a block of V rows is fetched once per tile and
//      reused from L1/L2 by every row block (bf16 x bf16 with AVX512-BF16: vdpbf16ps straight
//      on the stored residual rows).
//   C. scores, norms, slot / gate / latch decisions, dq = clamp(p + shift, lo, hi) - p
//   D. for steered rows only: h += V^T dq over the concepts with dq != 0 (NaN counts as != 0),
//      in blocks of kRows rows x kUpdV vectors of columns, V panel reused across the tile;
//      read from and stored back to the residual row (fp32 in registers, one rounding)
//   E. out = h * rsqrt(mean(h^2) + eps) * weight from the stored h: the residual row, or for
//      unsteered rows its exact fp32 copy when there is one (still in L2 after pass B);
//      sumsq recomputed only for steered rows
//
// Row results never depend on the tile: every per-row sum (projection, sumsq) is accumulated
// in the same order whatever the row's block, tile or thread (each (row, concept) projection
// is one vector accumulator over the column steps in order, then the same reduce_add4 tree
// whatever its position), so a row's outputs are bit-identical for any batch size or position
// (tests/test_batch_invariance.py).
//
// Restructurings measured on Zen 4 (2-core VM, 1 thread, 2026-12-03) and not kept (each gave
// the same bits as this layout, so only speed decided):
//   * pass A fused with the bf16 projection of the first 16 concepts, column chunks of 512
//     with V's chunk packed in L1 and the next row's chunk prefetched (T = 256, d = 2048, K =
//     16): 243 us against 220 us for passes A + B.  The bf16 add pass is bound by instruction
//     throughput (~8.5 cycles per 16 elements: widen, add, round, store, square), not by
//     memory, so the projection's vdpbf16ps work had nothing to hide behind.
//   * pass B cut into column chunks of 1 KiB of V per concept (so the block's V chunk stays
//     in L1 across row blocks, accumulators parked between chunks): fp32 K = 171 fell from
//     63-79 to 37-52 GFLOP/s.  Whole-row streams suit the hardware prefetcher better than
//     short chunks, and L2 -> L1 bandwidth was not the limit.

constexpr int kRows = 4;                     // rows per register block
constexpr int kDotK = Vec::W == 16 ? 6 : 2;  // concepts per projection block (acc = 24 / 8)
constexpr int kUpdV = Vec::W == 16 ? 4 : 2;  // vectors per update block (acc = 16 / 8)

// Concepts in the projection block starting at k0: kmax (kDotK, or 4 where kDotK rows of V
// plus the block's h rows would all fall in one L1 set), fewer for the last block.  The block
// structure does not change any result: each (row, concept) sum is the same whatever block
// it is computed in.
inline int block_width(int64_t K, int64_t k0, int kmax) {
  return K - k0 < kmax ? static_cast<int>(K - k0) : kmax;
}

// Pass A for one row: h = residual + x, stored in the residual dtype; with `copy` the stored
// value also goes to the fp32 row hr (the projection's input); returns sumsq.
template <bool kCopy, class St>
inline float add_row(St* rr, const St* xr, float* hr, int64_t d) {
  constexpr int W = Vec::W;
  constexpr bool f32 = kIsF32<St>;
  const int64_t dv = d - d % W;
  Vec acc = Vec::zero();
  if (xr) {
    for (int64_t j = 0; j < dv; j += W) {
      Vec v = Vec::load(rr + j) + Vec::load(xr + j);
      v.store(rr + j);
      if constexpr (!f32) v = Vec::load(rr + j);  // the stored (rounded) value
      if constexpr (kCopy) v.store(hr + j);
      acc = fma(v, v, acc);
    }
  } else {
    for (int64_t j = 0; j < dv; j += W) {
      const Vec v = Vec::load(rr + j);
      if constexpr (kCopy) v.store(hr + j);
      acc = fma(v, v, acc);
    }
  }
  float ss = reduce_add(acc);
  for (int64_t j = dv; j < d; ++j) {
    if (xr) from_f32(to_f32(rr[j]) + to_f32(xr[j]), rr + j);
    const float v = to_f32(rr[j]);
    if constexpr (kCopy) hr[j] = v;
    ss += v * v;
  }
  return ss;
}

// Pass E for one row: o = h * inv * w, h read back from the stored residual row (Ht = St) or
// from its exact fp32 copy (Ht = float).
template <class Ht, class Wt, class St>
inline void norm_row(const Ht* hr, float inv, const Wt* w, St* o, int64_t d) {
  constexpr int W = Vec::W;
  const int64_t dv = d - d % W;
  const Vec vinv = Vec::set1(inv);
  for (int64_t j = 0; j < dv; j += W) (Vec::load(hr + j) * vinv * Vec::load(w + j)).store(o + j);
  for (int64_t j = dv; j < d; ++j) from_f32(to_f32(hr[j]) * inv * to_f32(w[j]), o + j);
}

template <class St>
inline float sumsq_row(const St* hr, int64_t d) {
  constexpr int W = Vec::W;
  const int64_t dv = d - d % W;
  Vec acc = Vec::zero();
  for (int64_t j = 0; j < dv; j += W) {
    const Vec v = Vec::load(hr + j);
    acc = fma(v, v, acc);
  }
  float ss = reduce_add(acc);
  for (int64_t j = dv; j < d; ++j) ss += to_f32(hr[j]) * to_f32(hr[j]);
  return ss;
}

inline float rms_inv(float ss, int64_t d, float eps) {
  return 1.f / __builtin_sqrtf(ss / static_cast<float>(d) + eps);
}

// Sums of the KB accumulators of one row, each by the same reduce_add4 tree (zero vectors
// fill the last group), plus the scalar tail columns: p[c] for c < KB.
template <int KB, class Ht, class Vt>
inline void finish_row(const Vec* acc, const Ht* h, const Vt* const* vp, int64_t dv, int64_t d,
                       float* p) {
  float s[(KB + 3) / 4 * 4];
#pragma GCC unroll 4
  for (int c = 0; c < KB; c += 4)
    reduce_add4(acc[c], c + 1 < KB ? acc[c + 1] : Vec::zero(),
                c + 2 < KB ? acc[c + 2] : Vec::zero(), c + 3 < KB ? acc[c + 3] : Vec::zero(),
                s + c);
  for (int c = 0; c < KB; ++c) {
    for (int64_t j = dv; j < d; ++j) s[c] += to_f32(h[j]) * to_f32(vp[c][j]);
    p[c] = s[c];
  }
}

// Projection of one register block: p[r][c] = <h[r], V[c]> for R rows x KB concepts (fp32
// accumulation over the column steps in order).
template <int R, int KB, class Ht, class Vt>
__attribute__((noinline)) void dot_block(const Ht* const* h_, const Vt* const* vp_, int64_t d,
                                         float* const* p) {
  constexpr int W = Vec::W;
  const int64_t dv = d - d % W;
  const Ht* h[R];  // local copies: registers, not reloaded around the loads
  const Vt* vp[KB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) h[r] = h_[r];
#pragma GCC unroll 8
  for (int c = 0; c < KB; ++c) vp[c] = vp_[c];
  Vec acc[R][KB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < KB; ++c) acc[r][c] = Vec::zero();
  for (int64_t j = 0; j < dv; j += W) {
    Vec hv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) hv[r] = Vec::load(h[r] + j);
#pragma GCC unroll 8
    for (int c = 0; c < KB; ++c) {
      const Vec v = Vec::load(vp[c] + j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][c] = fma(hv[r], v, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) finish_row<KB>(acc[r], h[r], vp, dv, d, p[r]);
}

template <int KB, class Ht, class Vt>
inline void dot_rows(int R, const Ht* const* h, const Vt* const* vp, int64_t d,
                     float* const* p) {
  switch (R) {
    case 4: return dot_block<4, KB>(h, vp, d, p);
    case 3: return dot_block<3, KB>(h, vp, d, p);
    case 2: return dot_block<2, KB>(h, vp, d, p);
    default: return dot_block<1, KB>(h, vp, d, p);
  }
}

// p for R <= kRows rows x KB <= kDotK concepts.
template <class Ht, class Vt>
inline void dot_any(int R, int KB, const Ht* const* h, const Vt* const* vp, int64_t d,
                    float* const* p) {
  if constexpr (kDotK == 6) {
    switch (KB) {
      case 6: return dot_rows<6>(R, h, vp, d, p);
      case 5: return dot_rows<5>(R, h, vp, d, p);
      case 4: return dot_rows<4>(R, h, vp, d, p);
      case 3: return dot_rows<3>(R, h, vp, d, p);
      default: break;
    }
  }
  if (KB == 2) return dot_rows<2>(R, h, vp, d, p);
  dot_rows<1>(R, h, vp, d, p);
}

#ifdef STEERKERNEL_BF16_DOT
// The same on bf16 rows and bf16 V with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs
// (products exact in fp32) and accumulates in fp32, twice the fp32 FMA rate.  Loads are masked
// (zero-filled past d), so the tail needs no scalar loop.  The instruction reads inputs below
// 2^-126 as zero and flushes tiny products (DAZ / FTZ): an error below 1e-38 per term.
template <int R, int KB>
__attribute__((noinline)) void pair_dot_block(const bf16* const* h_, const bf16* const* vp_,
                                              int64_t d, float* const* p) {
  const bf16* h[R];
  const bf16* vp[KB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) h[r] = h_[r];
#pragma GCC unroll 8
  for (int c = 0; c < KB; ++c) vp[c] = vp_[c];
  __m512 acc[R][KB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < KB; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t dv = d - d % 32;
  for (int64_t j = 0; j < dv; j += 32) {
    __m512i hv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) hv[r] = _mm512_loadu_si512(h[r] + j);
#pragma GCC unroll 8
    for (int c = 0; c < KB; ++c) {
      const __m512i v = _mm512_loadu_si512(vp[c] + j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)hv[r], (__m512bh)v);
    }
  }
  if (dv < d) {  // tail: masked loads, zero past d
    const __mmask32 m = static_cast<__mmask32>((1u << (d - dv)) - 1u);
    __m512i hv[R];
    for (int r = 0; r < R; ++r) hv[r] = _mm512_maskz_loadu_epi16(m, h[r] + dv);
    for (int c = 0; c < KB; ++c) {
      const __m512i v = _mm512_maskz_loadu_epi16(m, vp[c] + dv);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)hv[r], (__m512bh)v);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s[(KB + 3) / 4 * 4];
#pragma GCC unroll 4
    for (int c = 0; c < KB; c += 4)
      reduce_add4(Vec{acc[r][c]}, c + 1 < KB ? Vec{acc[r][c + 1]} : Vec::zero(),
                  c + 2 < KB ? Vec{acc[r][c + 2]} : Vec::zero(),
                  c + 3 < KB ? Vec{acc[r][c + 3]} : Vec::zero(), s + c);
    for (int c = 0; c < KB; ++c) p[r][c] = s[c];
  }
}

template <int KB>
inline void pair_dot_rows(int R, const bf16* const* h, const bf16* const* vp, int64_t d,
                          float* const* p) {
  switch (R) {
    case 4: return pair_dot_block<4, KB>(h, vp, d, p);
    case 3: return pair_dot_block<3, KB>(h, vp, d, p);
    case 2: return pair_dot_block<2, KB>(h, vp, d, p);
    default: return pair_dot_block<1, KB>(h, vp, d, p);
  }
}

inline void pair_dot_any(int R, int KB, const bf16* const* h, const bf16* const* vp, int64_t d,
                         float* const* p) {
  switch (KB) {
    case 6: return pair_dot_rows<6>(R, h, vp, d, p);
    case 5: return pair_dot_rows<5>(R, h, vp, d, p);
    case 4: return pair_dot_rows<4>(R, h, vp, d, p);
    case 3: return pair_dot_rows<3>(R, h, vp, d, p);
    case 2: return pair_dot_rows<2>(R, h, vp, d, p);
    default: return pair_dot_rows<1>(R, h, vp, d, p);
  }
}
#endif

// Columns [j, j + NV*W) of R steered residual rows, in fp32 and stored back in St:
//   res[r] += sum_{i < nk} dq[r][ks[i]] * V[ks[i]]
template <int R, int NV, class St, class Vt>
inline void update_block(St* const* res, const float* const* dq, const int32_t* ks, int nk,
                         const Vt* V, int64_t d, int64_t j) {
  constexpr int W = Vec::W;
  Vec acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec::load(res[r] + j + c * W);
  for (int i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    Vec v[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) v[c] = Vec::load(V + k * d + j + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec s = Vec::set1(dq[r][k]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] = fma(s, v[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c].store(res[r] + j + c * W);
}

template <int NV, class St, class Vt>
inline void update_rows(St* const* res, const float* const* dq, int R, const int32_t* ks,
                        int nk, const Vt* V, int64_t d, int64_t j) {
  switch (R) {
    case 4: update_block<4, NV>(res, dq, ks, nk, V, d, j); break;
    case 3: update_block<3, NV>(res, dq, ks, nk, V, d, j); break;
    case 2: update_block<2, NV>(res, dq, ks, nk, V, d, j); break;
    default: update_block<1, NV>(res, dq, ks, nk, V, d, j); break;
  }
}

// Rows t0 .. t0+n-1 (n <= kMaxTileRows).  Scratch: see TileScratch (junction_cpu.cpp).
template <class St, class Vt, class Wt>
void junction_tile(const JunctionParams& a, int64_t t0, int n, const TileScratch& sc) {
  constexpr bool f32 = kIsF32<St>;
  const int64_t d = a.d, K = a.K, ldh = h_stride(d);
  St* const res0 = static_cast<St*>(a.residual);
  const St* const x0 = static_cast<const St*>(a.x);
  const Vt* const V = static_cast<const Vt*>(a.V);
  const Wt* const w = static_cast<const Wt*>(a.weight);
  St* const out0 = static_cast<St*>(a.out);

#ifdef STEERKERNEL_BF16_DOT
  constexpr bool kPairDot = kIsBF16<St> && kIsBF16<Vt>;  // bf16 dot on the stored rows
#else
  constexpr bool kPairDot = false;
#endif
  constexpr bool kCopyH = !f32 && !kPairDot;  // fp32 copy of 16-bit rows for the projection

  float* const p = sc.p;          // [n, K]  projections
  float* const dq = sc.dq;        // [n, K]  q - p of steered rows
  float* const sumsq = sc.sumsq;  // [n]     ||h||^2 after pass A
  St* res[kMaxTileRows];
  float* h[kMaxTileRows];
  bool steered[kMaxTileRows];
  for (int r = 0; r < n; ++r) {
    res[r] = res0 + (t0 + r) * a.residual_stride;
    h[r] = f32 && !sc.copy_f32 ? reinterpret_cast<float*>(res[r]) : sc.hbuf + r * ldh;
    steered[r] = false;
  }
  // ---- A: row by row (sequential streams, what the hardware prefetcher follows best)
  const bool copy = K > 0 && (kCopyH || (f32 && sc.copy_f32));
  for (int r = 0; r < n; ++r) {
    const St* const xr = x0 ? x0 + (t0 + r) * a.x_stride : nullptr;
    sumsq[r] = copy ? add_row<true>(res[r], xr, h[r], d) : add_row<false>(res[r], xr, h[r], d);
  }
  if (K > 0) {
    // ---- B: concept blocks outer, row blocks inner
    // rows read in place at a stride of a multiple of 1 KiB share their L1 set with each
    // other (and with V's rows when d is such a multiple too): at most 4 concepts per block
    const bool in_place = kPairDot || (f32 && !sc.copy_f32);
    const bool aliased = (a.residual_stride * static_cast<int64_t>(sizeof(St))) % 1024 == 0;
    const int kmax = in_place && aliased && kDotK > 4 ? 4 : kDotK;
    for (int64_t k0 = 0; k0 < K; k0 += kmax) {
      const int kb = block_width(K, k0, kmax);
      const Vt* vp[kDotK];
      for (int c = 0; c < kb; ++c) vp[c] = V + (k0 + c) * d;
      for (int r0 = 0; r0 < n; r0 += kRows) {
        const int R = n - r0 < kRows ? n - r0 : kRows;
        float* pr[kRows];
        for (int i = 0; i < R; ++i) pr[i] = p + (r0 + i) * K + k0;
        if constexpr (kPairDot)
          pair_dot_any(R, kb, res + r0, vp, d, pr);
        else
          dot_any(R, kb, h + r0, vp, d, pr);
      }
    }
  }

  // ---- C. readout, decisions, dq
  int nsteer = 0;
  for (int r = 0; r < n; ++r) {
    const int64_t t = t0 + r;
    const float* const pr = p + r * K;
    if (K > 0) {
      float* const so = a.scores + t * a.scores_s0;
      for (int64_t k = 0; k < K; ++k) so[k * a.scores_s1] = pr[k];
    }
    a.norms[t * a.norms_stride] = __builtin_sqrtf(sumsq[r]);
    if (!a.slot) continue;
    int32_t s = a.slot[t];
    if (s < 0 || s >= a.P) s = 0;
    if (s == 0) continue;
    if (a.gate_concept && a.gate_concept[s] != -1) {
      const int32_t c = a.gate_concept[s];
      const bool fires = c >= 0 && c < K &&
                         (a.gate_above[s] ? pr[c] > a.gate_threshold[s]
                                          : pr[c] < a.gate_threshold[s]);
      if (fires && a.fired) __atomic_store_n(a.fired + s, 1, __ATOMIC_RELAXED);
      if (!fires && !(a.latch && a.latch[s] != 0)) continue;
    }
    const float* const sh = a.shift + s * K;
    const float* const lo = a.lo + s * K;
    const float* const hi = a.hi + s * K;
    float* const dr = dq + r * K;
    bool any = false;
    for (int64_t k = 0; k < K; ++k) {
      float q = pr[k] + sh[k];
      q = q < lo[k] ? lo[k] : q;  // NaN stays NaN, as torch.clamp
      q = q > hi[k] ? hi[k] : q;
      dr[k] = q - pr[k];
      any |= dr[k] != 0.f;  // true for NaN
    }
    steered[r] = any;
    nsteer += any;
  }

  // ---- D. h += V^T dq for steered rows, in groups of kRows rows sharing one concept list;
  //         columns in panels of kUpdV vectors (outer), so a V panel stays in L1 for all groups
  if (nsteer > 0) {
    constexpr int W = Vec::W;
    const int64_t dv = d - d % W;
    St* rs[kMaxTileRows];
    const float* dqs[kMaxTileRows];
    int m = 0;
    for (int r = 0; r < n; ++r)
      if (steered[r]) {
        rs[m] = res[r];
        dqs[m] = dq + r * K;
        ++m;
      }
    const int ngroups = (m + kRows - 1) / kRows;
    int32_t* const nks = sc.nks;  // [ngroups] concept count per group
    int32_t* const ks = sc.ks;    // [ngroups, K] concepts with dq != 0 in the group
    for (int g = 0; g < ngroups; ++g) {
      const int r0 = g * kRows, r1 = m < r0 + kRows ? m : r0 + kRows;
      int32_t* const kg = ks + g * K;
      int nk = 0;
      for (int64_t k = 0; k < K; ++k) {
        bool need = false;
        for (int i = r0; i < r1; ++i) need |= dqs[i][k] != 0.f;
        if (need) kg[nk++] = static_cast<int32_t>(k);
      }
      nks[g] = nk;
    }
    auto group_rows = [&](int g) { return m - g * kRows < kRows ? m - g * kRows : kRows; };
    int64_t j = 0;
    for (; j + kUpdV * W <= dv; j += kUpdV * W)
      for (int g = 0; g < ngroups; ++g)
        update_rows<kUpdV>(rs + g * kRows, dqs + g * kRows, group_rows(g), ks + g * K, nks[g],
                           V, d, j);
    for (; j < dv; j += W)
      for (int g = 0; g < ngroups; ++g)
        update_rows<1>(rs + g * kRows, dqs + g * kRows, group_rows(g), ks + g * K, nks[g], V,
                       d, j);
    for (int i = 0; i < m; ++i) {
      const int32_t* const kg = ks + (i / kRows) * K;
      const int nk = nks[i / kRows];
      for (int64_t jj = dv; jj < d; ++jj) {
        float v = to_f32(rs[i][jj]);
        for (int c = 0; c < nk; ++c) v += dqs[i][kg[c]] * to_f32(V[kg[c] * d + jj]);
        from_f32(v, rs[i] + jj);
      }
    }
  }

  // ---- E. out = h * rsqrt(mean(h^2) + eps) * weight, h read back from the stored residual
  //         (unsteered rows from their fp32 copy when there is one: it holds exactly the
  //         stored value and, read by pass B, it is still in L2, unlike the residual row)
  if (out0) {
    for (int r = 0; r < n; ++r) {
      St* const o = out0 + (t0 + r) * a.out_stride;
      if (steered[r])
        norm_row(res[r], rms_inv(sumsq_row(res[r], d), d, a.eps), w, o, d);
      else if (copy)
        norm_row(h[r], rms_inv(sumsq[r], d, a.eps), w, o, d);
      else
        norm_row(res[r], rms_inv(sumsq[r], d, a.eps), w, o, d);
    }
  }
}

#ifndef STEERKERNEL_BF16_DOT
// The tile kernel for residual type St, V fp32 or St, weight fp32 or St.
template <class St>
inline TileFn tile_fn_for(bool v32, bool w32) {
  if (v32) return w32 ? &junction_tile<St, float, float> : &junction_tile<St, float, St>;
  return w32 ? &junction_tile<St, St, float> : &junction_tile<St, St, St>;
}
inline TileFn tile_fn(Dtype st, bool v32, bool w32) {
  switch (st) {
    case Dtype::bf16: return tile_fn_for<bf16>(v32, w32);
    case Dtype::f16: return tile_fn_for<f16>(v32, w32);
    default: return &junction_tile<float, float, float>;
  }
}
#endif
