// steerkernel: the AVX-512 `Vec` of cpu_vec.h (its interface is described there).  Included
// twice by cpu_vec.h: into namespace avx512 (AVX-512F/BW/VL/DQ) and into namespace avx512bf16
// (the same plus AVX512-BF16, with STEERKERNEL_VEC_CVTNEPS2BF16 defined: fp32 -> bf16 stores
// by vcvtneps2bf16, 2 instructions instead of 8).  No include guard on purpose.
struct Vec {
  static constexpr int W = 16;
  __m512 v;

  static Vec zero() { return Vec{_mm512_setzero_ps()}; }
  static Vec set1(float f) { return Vec{_mm512_set1_ps(f)}; }
  static Vec load(const float* p) { return Vec{_mm512_loadu_ps(p)}; }
  static Vec load(const bf16* p) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return Vec{_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static Vec load(const f16* p) {
    return Vec{_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16* p) const {
#ifdef STEERKERNEL_VEC_CVTNEPS2BF16
    // vcvtneps2bf16 rounds to nearest even like the integer path below, but flushes denormal
    // inputs and keeps NaN payloads: only vectors with neither take it (same bits either way)
    if (!_mm512_fpclass_ps_mask(v, 0x01 | 0x80 | 0x20)) {  // QNaN | SNaN | denormal
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
      return;
    }
#endif
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  void store(f16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
inline Vec operator+(Vec a, Vec b) { return Vec{_mm512_add_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return Vec{_mm512_mul_ps(a.v, b.v)}; }
inline Vec fma(Vec a, Vec b, Vec c) { return Vec{_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline __m256 fold_256(__m512 a);
inline float reduce_add(Vec a) {
  const __m256 s8 = fold_256(a.v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 fold_256(__m512 a) {  // 16 lanes -> 8 lanes, lane i + lane i+8
  return _mm256_add_ps(_mm512_castps512_ps256(a),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
inline void reduce_add4(Vec a, Vec b, Vec c, Vec d, float* out) {
  _mm_storeu_ps(out, avx2::reduce_add4_256(fold_256(a.v), fold_256(b.v), fold_256(c.v),
                                           fold_256(d.v)));
}
