// steerkernel: the row-tile kernel of the CPU junction op (docs/design.md §2).
//
// Written once against the `Vec` interface of cpu_vec.h and compiled once per instruction set:
// junction_cpu.cpp includes this file inside each ISA namespace of cpu_vec.h (where `Vec` is
// that ISA's type), under that ISA's `#pragma GCC target`, after declaring `TileFn`, `h_stride`,
// `kIsF32`, `kIsBF16` and `kMaxTileRows` (the call's parameters: JunctionParams of
// junction_params.h; K == 0, i.e. no V, skips the projection and the readout).  No include
// guard on purpose.
// Nothing from std:: or ATen is called here (see cpu_vec.h for why).
//
// One call handles n <= kMaxTileRows consecutive rows t0 .. t0+n-1 (a "tile") in five passes
// while the tile is hot in L2:
//   1. h = residual + x, stored in the residual dtype; sumsq = ||h||^2; for 16-bit rows an fp32
//      copy of the stored value feeds the fp32 projection (fp32 rows are read in place)
//   2. p = V h for the whole tile, in register blocks of kRows rows x kDotK concepts, each
//      block of V rows reused across the tile's rows (bf16 x bf16 with AVX512-BF16: vdpbf16ps
//      straight on the stored residual rows)
//   3. scores, norms, slot / gate / latch decisions, dq = clamp(p + shift, lo, hi) - p
//   4. for steered rows only: h += V^T dq over the concepts with dq != 0 (NaN counts as != 0),
//      in blocks of kRows rows x kUpdV vectors of columns, V panel reused across the tile;
//      read from and stored back to the residual row (fp32 in registers, one rounding)
//   5. out = h * rsqrt(mean(h^2) + eps) * weight from the stored residual (sumsq recomputed
//      only for steered rows)

constexpr int kRows = 4;                       // rows per register block
constexpr int kDotK = Vec::W == 16 ? 4 : 2;    // concepts per projection block (acc = 16 / 8)
constexpr int kUpdV = Vec::W == 16 ? 4 : 2;    // vectors per update block (acc = 16 / 8)

// p[r * ldp + c] = sum_j h[r][j] * V[c * d + j]  for r < R, c < KB (fp32 accumulation).
template <int R, int KB, class Vt>
inline void dot_block(const float* const* h, const Vt* V, int64_t d, float* p, int64_t ldp) {
  constexpr int W = Vec::W;
  const int64_t dv = d - d % W;
  Vec acc[R][KB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < KB; ++c) acc[r][c] = Vec::zero();
  for (int64_t j = 0; j < dv; j += W) {
    Vec hv[R];
    for (int r = 0; r < R; ++r) hv[r] = Vec::load(h[r] + j);
    for (int c = 0; c < KB; ++c) {
      const Vec v = Vec::load(V + c * d + j);
      for (int r = 0; r < R; ++r) acc[r][c] = fma(hv[r], v, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s[KB];
    if constexpr (KB == 4)
      reduce_add4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s);
    else
      for (int c = 0; c < KB; ++c) s[c] = reduce_add(acc[r][c]);
    for (int c = 0; c < KB; ++c) {
      for (int64_t j = dv; j < d; ++j) s[c] += h[r][j] * to_f32(V[c * d + j]);
      p[r * ldp + c] = s[c];
    }
  }
}

#ifdef STEERKERNEL_BF16_DOT
// The same on bf16 rows and bf16 V with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs
// (products exact in fp32) and accumulates in fp32, twice the fp32 FMA rate.  Loads are masked
// (zero-filled past d), so the tail needs no scalar loop.  The instruction reads inputs below
// 2^-126 as zero and flushes tiny products (DAZ / FTZ): an error below 1e-38 per term.
template <int R, int KB>
inline void dot_block(const bf16* const* h, const bf16* V, int64_t d, float* p, int64_t ldp) {
  __m512 acc[R][KB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < KB; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t dv = d - d % 32;
  for (int64_t j = 0; j < dv; j += 32) {
    __m512i hv[R];
    for (int r = 0; r < R; ++r) hv[r] = _mm512_loadu_si512(h[r] + j);
    for (int c = 0; c < KB; ++c) {
      const __m512i v = _mm512_loadu_si512(V + c * d + j);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)hv[r], (__m512bh)v);
    }
  }
  if (dv < d) {  // tail: masked loads, zero past d
    const __mmask32 m = static_cast<__mmask32>((1u << (d - dv)) - 1u);
    __m512i hv[R];
    for (int r = 0; r < R; ++r) hv[r] = _mm512_maskz_loadu_epi16(m, h[r] + dv);
    for (int c = 0; c < KB; ++c) {
      const __m512i v = _mm512_maskz_loadu_epi16(m, V + c * d + dv);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)hv[r], (__m512bh)v);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s[KB];
    if constexpr (KB == 4)
      reduce_add4(Vec{acc[r][0]}, Vec{acc[r][1]}, Vec{acc[r][2]}, Vec{acc[r][3]}, s);
    else
      for (int c = 0; c < KB; ++c) s[c] = reduce_add(Vec{acc[r][c]});
    for (int c = 0; c < KB; ++c) p[r * ldp + c] = s[c];
  }
}
#endif

// dot_block for a runtime row count 1 <= R <= kRows (rows: fp32 h, or bf16 with BF16 dot).
template <int KB, class Ht, class Vt>
inline void dot_rows(const Ht* const* h, int R, const Vt* V, int64_t d, float* p,
                     int64_t ldp) {
  switch (R) {
    case 4: dot_block<4, KB>(h, V, d, p, ldp); break;
    case 3: dot_block<3, KB>(h, V, d, p, ldp); break;
    case 2: dot_block<2, KB>(h, V, d, p, ldp); break;
    default: dot_block<1, KB>(h, V, d, p, ldp); break;
  }
}

// p[r * K + k] = <h[r], V[k]> for the n rows of a tile: blocks of kDotK concepts (outer loop,
// so a block of V rows stays in L1/L2 while every row of the tile passes; the K % kDotK rest is
// one narrower block, not one pass over the tile per concept) x kRows rows.
template <class Ht, class Vt>
inline void project_tile(const Ht* const* h, int n, const Vt* V, int64_t d, int64_t K,
                         float* p) {
  for (int64_t k0 = 0; k0 < K; k0 += kDotK) {
    const int64_t kb = K - k0 < kDotK ? K - k0 : kDotK;
    for (int r0 = 0; r0 < n; r0 += kRows) {
      const int R = n - r0 < kRows ? n - r0 : kRows;
      const Vt* const Vb = V + k0 * d;
      float* const pb = p + r0 * K + k0;
      switch (kb) {
        case 4: dot_rows<4>(h + r0, R, Vb, d, pb, K); break;
        case 3: dot_rows<3>(h + r0, R, Vb, d, pb, K); break;
        case 2: dot_rows<2>(h + r0, R, Vb, d, pb, K); break;
        default: dot_rows<1>(h + r0, R, Vb, d, pb, K); break;
      }
    }
  }
}

// Columns [j, j + NV*W) of R steered residual rows, in fp32 and stored back in St:
//   res[r] += sum_{i < nk} dq[r][ks[i]] * V[ks[i]]
template <int R, int NV, class St, class Vt>
inline void update_block(St* const* res, const float* const* dq, const int32_t* ks, int nk,
                         const Vt* V, int64_t d, int64_t j) {
  constexpr int W = Vec::W;
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec::load(res[r] + j + c * W);
  for (int i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    Vec v[NV];
    for (int c = 0; c < NV; ++c) v[c] = Vec::load(V + k * d + j + c * W);
    for (int r = 0; r < R; ++r) {
      const Vec s = Vec::set1(dq[r][k]);
      for (int c = 0; c < NV; ++c) acc[r][c] = fma(s, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
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

// Rows t0 .. t0+n-1 (n <= kMaxTileRows).  Scratch: fs holds tile_scratch_floats(n, K, ldh, f32)
// floats, is holds tile_scratch_ints(n, K) ints (see junction_cpu.cpp).
template <class St, class Vt, class Wt>
void junction_tile(const JunctionParams& a, int64_t t0, int n, float* fs, int32_t* is) {
  constexpr int W = Vec::W;
  constexpr bool f32 = kIsF32<St>;
  const int64_t d = a.d, K = a.K, ldh = h_stride(d);
  const int64_t dv = d - d % W;
  St* const res0 = static_cast<St*>(a.residual);
  const St* const x0 = static_cast<const St*>(a.x);
  const Vt* const V = static_cast<const Vt*>(a.V);

#ifdef STEERKERNEL_BF16_DOT
  constexpr bool kPairDot = kIsBF16<St> && kIsBF16<Vt>;  // bf16 dot on the stored rows
#else
  constexpr bool kPairDot = false;
#endif
  constexpr bool kCopyH = !f32 && !kPairDot;  // fp32 copy of 16-bit rows for the projection

  float* const hbuf = fs;                          // [n, ldh]  fp32 rows (kCopyH only)
  float* const p = hbuf + (f32 ? 0 : n * ldh);     // [n, K]    projections
  float* const dq = p + n * K;                     // [n, K]    q - p of steered rows
  float* const sumsq = dq + n * K;                 // [n]       ||h||^2 after pass 1
  float* h[kMaxTileRows];                          // fp32 rows the projection reads
  St* res[kMaxTileRows];                           // residual rows
  bool steered[kMaxTileRows];

  // ---- 1. h = residual + x (stored, then re-read as stored), sumsq
  for (int r = 0; r < n; ++r) {
    St* const rr = res0 + (t0 + r) * a.residual_stride;
    const St* const xr = x0 ? x0 + (t0 + r) * a.x_stride : nullptr;
    float* const hr = f32 ? reinterpret_cast<float*>(rr) : hbuf + r * ldh;
    res[r] = rr;
    h[r] = hr;
    steered[r] = false;
    Vec acc = Vec::zero();
    for (int64_t j = 0; j < dv; j += W) {
      Vec v = Vec::load(rr + j);
      if (xr) {
        v = v + Vec::load(xr + j);
        v.store(rr + j);
        if constexpr (!f32) v = Vec::load(rr + j);
      }
      if constexpr (kCopyH) v.store(hr + j);
      acc = fma(v, v, acc);
    }
    float ss = reduce_add(acc);
    for (int64_t j = dv; j < d; ++j) {
      float v = to_f32(rr[j]);
      if (xr) {
        from_f32(v + to_f32(xr[j]), rr + j);
        v = to_f32(rr[j]);
      }
      if constexpr (kCopyH) hr[j] = v;
      ss += v * v;
    }
    sumsq[r] = ss;
  }

  // ---- 2. p = V h
  if constexpr (kPairDot)
    project_tile(res, n, V, d, K, p);
  else
    project_tile(h, n, V, d, K, p);

  // ---- 3. readout, decisions, dq
  int nsteer = 0;
  for (int r = 0; r < n; ++r) {
    const int64_t t = t0 + r;
    const float* const pr = p + r * K;
    if (K > 0) {
      float* const sc = a.scores + t * a.scores_s0;
      for (int64_t k = 0; k < K; ++k) sc[k * a.scores_s1] = pr[k];
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

  // ---- 4. h += V^T dq for steered rows, in groups of kRows rows sharing one concept list;
  //         columns in panels of kUpdV vectors (outer), so a V panel stays in L1 for all groups
  if (nsteer > 0) {
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
    int32_t* const nks = is;               // [ngroups] concept count per group
    int32_t* const ks = is + kMaxTileRows;  // [ngroups, K] concepts with dq != 0 in the group
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

  // ---- 5. out = h * rsqrt(mean(h^2) + eps) * weight, h read back from the stored residual
  if (a.out) {
    const Wt* const w = static_cast<const Wt*>(a.weight);
    St* const out0 = static_cast<St*>(a.out);
    for (int r = 0; r < n; ++r) {
      const St* const hr = res[r];
      float ss = sumsq[r];
      if (steered[r]) {
        Vec acc = Vec::zero();
        for (int64_t j = 0; j < dv; j += W) {
          const Vec v = Vec::load(hr + j);
          acc = fma(v, v, acc);
        }
        ss = reduce_add(acc);
        for (int64_t j = dv; j < d; ++j) ss += to_f32(hr[j]) * to_f32(hr[j]);
      }
      const float inv = 1.f / __builtin_sqrtf(ss / static_cast<float>(d) + a.eps);
      const Vec vinv = Vec::set1(inv);
      St* const o = out0 + (t0 + r) * a.out_stride;
      for (int64_t j = 0; j < dv; j += W) (Vec::load(hr + j) * vinv * Vec::load(w + j)).store(o + j);
      for (int64_t j = dv; j < d; ++j) from_f32(to_f32(hr[j]) * inv * to_f32(w[j]), o + j);
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
