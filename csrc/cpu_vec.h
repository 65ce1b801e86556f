// steerkernel: the small SIMD layer of the CPU kernel.
//
// One `Vec` type per instruction set, each in its own namespace, all with the same interface:
//   Vec::W                      fp32 lanes
//   Vec::zero(), Vec::set1(f)
//   Vec::load(p)                W elements at p (float, bf16 or f16) widened to fp32
//   v.store(p)                  W fp32 lanes narrowed to p's type, round-to-nearest-even
//   fma(a, b, c) = a*b + c,  a + b,  a * b,  reduce_add(v) = sum of the lanes,
//   reduce_add4(a, b, c, d, out): out[0..3] = reduce_add of a, b, c, d (one shuffle tree)
//
//   avx512::Vec  16 lanes, AVX-512F/BW/VL/DQ + FMA + F16C   (x86-64 with GCC)
//   avx512bf16::Vec  the same plus AVX512-BF16 (bf16 stores by vcvtneps2bf16)
//   avx2::Vec     8 lanes, AVX2 + FMA + F16C                (x86-64 with GCC)
//   portable::Vec 4 lanes, GCC/Clang vector extensions      (any target: SSE2, NEON, ...)
//
// The x86 namespaces are compiled under `#pragma GCC target`, so one binary carries all of them
// and the caller picks one at run time (see junction_cpu.cpp).  Nothing from the standard
// library or ATen is instantiated inside those regions (an inline function emitted there could
// be picked by the linker for the whole program and then run on a CPU without the extension).
//
// Rounding: fp32 -> bf16 is round-to-nearest-even with every NaN mapped to 0x7FC0 (exactly
// c10::BFloat16); fp32 -> f16 is round-to-nearest-even (F16C / IEEE), NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STEERKERNEL_X86_SIMD 1
#include <immintrin.h>
#else
#define STEERKERNEL_X86_SIMD 0
#endif

namespace steerkernel {
namespace cpu {

// 16-bit storage types: raw bit patterns, layout-compatible with c10::BFloat16 / c10::Half.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// ---------------------------------------------------------------- scalar conversions (tails)
inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// bf16 = upper half of the fp32 pattern; rounding adds 0x7FFF plus the kept lsb (ties to even).
inline float bf16_to_f32(uint16_t b) { return bits_to_f32(uint32_t(b) << 16); }
inline uint16_t f32_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = f32_to_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_to_f32(sign | 0x7F800000u | (m << 13));  // inf / NaN
  if (e == 0) {                                                        // zero / subnormal
    const float mag = static_cast<float>(m) * 5.9604644775390625e-8f;   // m * 2^-24, exact
    return sign ? -mag : mag;
  }
  return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));  // rebias 127 - 15 = 112
}
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {
    // below 2^-14: the result is subnormal (units of 2^-24).  Adding 0.5 puts |f| where the
    // fp32 ulp is 2^-24, so the hardware add does the round-to-nearest-even for us.
    return static_cast<uint16_t>(sign | (f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3F000000u));
  }
  // normal: rebias the exponent (-112 << 23), round the 13 dropped bits to nearest even
  const uint32_t r = a + 0xC8000FFFu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float to_f32(float v) { return v; }
inline float to_f32(bf16 v) { return bf16_to_f32(v.bits); }
inline float to_f32(f16 v) { return f16_to_f32(v.bits); }
inline void from_f32(float v, float* p) { *p = v; }
inline void from_f32(float v, bf16* p) { p->bits = f32_to_bf16(v); }
inline void from_f32(float v, f16* p) { p->bits = f32_to_f16(v); }

// ------------------------------------------------------------------------------- portable
namespace portable {
struct Vec {
  static constexpr int W = 4;
  typedef float raw_t __attribute__((vector_size(16)));
  raw_t v;

  static Vec zero() { return Vec{raw_t{0.f, 0.f, 0.f, 0.f}}; }
  static Vec set1(float f) { return Vec{raw_t{f, f, f, f}}; }
  static Vec load(const float* p) {
    Vec r;
    std::memcpy(&r.v, p, sizeof(raw_t));
    return r;
  }
  template <class T>
  static Vec load(const T* p) {
    return Vec{raw_t{to_f32(p[0]), to_f32(p[1]), to_f32(p[2]), to_f32(p[3])}};
  }
  void store(float* p) const { std::memcpy(p, &v, sizeof(raw_t)); }
  template <class T>
  void store(T* p) const {
    for (int i = 0; i < W; ++i) from_f32(v[i], p + i);
  }
};
inline Vec operator+(Vec a, Vec b) { return Vec{a.v + b.v}; }
inline Vec operator*(Vec a, Vec b) { return Vec{a.v * b.v}; }
inline Vec fma(Vec a, Vec b, Vec c) { return Vec{a.v * b.v + c.v}; }
inline float reduce_add(Vec a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
inline void reduce_add4(Vec a, Vec b, Vec c, Vec d, float* out) {
  out[0] = reduce_add(a);
  out[1] = reduce_add(b);
  out[2] = reduce_add(c);
  out[3] = reduce_add(d);
}
}  // namespace portable

#if STEERKERNEL_X86_SIMD
// ---------------------------------------------------------------------------------- AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
struct Vec {
  static constexpr int W = 8;
  __m256 v;

  static Vec zero() { return Vec{_mm256_setzero_ps()}; }
  static Vec set1(float f) { return Vec{_mm256_set1_ps(f)}; }
  static Vec load(const float* p) { return Vec{_mm256_loadu_ps(p)}; }
  static Vec load(const bf16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return Vec{_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static Vec load(const f16* p) {
    return Vec{_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    r = _mm256_srli_epi32(r, 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    // pack 8 x u32 (all <= 0xFFFF) to u16: packus works per 128-bit lane, then fix the order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  void store(f16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
inline Vec operator+(Vec a, Vec b) { return Vec{_mm256_add_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return Vec{_mm256_mul_ps(a.v, b.v)}; }
inline Vec fma(Vec a, Vec b, Vec c) { return Vec{_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline float reduce_add(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Sums of four 8-lane vectors: two rounds of pairwise hadd give, per 128-bit half, the partial
// sums [a, b, c, d]; adding the halves finishes them.
inline __m128 reduce_add4_256(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
inline void reduce_add4(Vec a, Vec b, Vec c, Vec d, float* out) {
  _mm_storeu_ps(out, reduce_add4_256(a.v, b.v, c.v, d.v));
}
}  // namespace avx2
#pragma GCC pop_options

// -------------------------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "cpu_vec_avx512.h"
}  // namespace avx512
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 with AVX512-BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
#define STEERKERNEL_VEC_CVTNEPS2BF16 1
#include "cpu_vec_avx512.h"
#undef STEERKERNEL_VEC_CVTNEPS2BF16
}  // namespace avx512bf16
#pragma GCC pop_options
#endif  // STEERKERNEL_X86_SIMD

}  // namespace cpu
}  // namespace steerkernel
