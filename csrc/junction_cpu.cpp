// steerkernel: CPU kernel of the fused junction op (docs/design.md §2).
//
// Structure:
//   * cpu_vec.h             one SIMD `Vec` type per instruction set (AVX-512, AVX2, portable)
//   * junction_cpu_kernel.h the row-tile kernel, written once against `Vec`; included below
//                           once per instruction set, each copy compiled for its own target
//   * this file             the op: check_and_pack (checks.cpp) into the shared
//                           JunctionParams, instruction-set choice at run time, threading
//                           (at::parallel_for over row ranges, each split into L2-sized tiles)
//                           and the latch merge after the parallel region.
//
// Residual / x / out: fp32, bf16 or fp16; V and weight: fp32 or the residual's dtype; all
// arithmetic fp32.  The instruction set is the best one this CPU supports, or a lower one named
// by $STEERKERNEL_CPU_ISA (avx512 | avx2 | portable), read once per process.  With AVX512-BF16
// bf16 residuals use vcvtneps2bf16 stores, and with bf16 V the vdpbf16ps projection
// ("avx512bf16").
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "junction.h"

namespace steerkernel {
namespace cpu {

// Per-thread scratch of the tile kernel (sized by tile_scratch_floats / _ints for n_max rows):
//   hbuf   [n_max, ldh]  fp32 copies of the rows the projection reads (16-bit rows; fp32 rows
//                        too when copy_f32: a padded stride keeps the rows of a register
//                        block out of one L1 set when the residual's row stride is a
//                        multiple of 1 KiB)
//   p, dq  [n_max, K]    projections and q - p of steered rows
//   sumsq  [n_max]       ||h||^2 per row
//   nks    [kMaxTileRows], ks [groups, K]: concept lists of the steering update
struct TileScratch {
  float* hbuf;
  float* p;
  float* dq;
  float* sumsq;
  int32_t* nks;
  int32_t* ks;
  bool copy_f32;
};

// The tile kernel reads the shared JunctionParams (junction_params.h); it only reads `latch`
// (state at call start) and flags firing slots in the per-call `fired` [P].
using TileFn = void (*)(const JunctionParams&, int64_t t0, int n, const TileScratch&);

template <class T>
constexpr bool kIsF32 = std::is_same<T, float>::value;
template <class T>
constexpr bool kIsBF16 = std::is_same<T, bf16>::value;
constexpr int kMaxTileRows = 64;

// Row stride of the fp32 h scratch of a tile: d rounded up to 16 floats, plus 16 when that
// is a multiple of 256 floats (so that consecutive rows start in different L1 sets).
inline int64_t h_stride(int64_t d) {
  const int64_t s = (d + 15) / 16 * 16;
  return s % 256 == 0 ? s + 16 : s;
}

inline int64_t tile_scratch_floats(int64_t n, int64_t K, int64_t ldh, bool hbuf) {
  return (hbuf ? n * ldh : 0) + 2 * n * K + n;
}
inline int64_t tile_scratch_ints(int64_t n, int64_t K) {
  return kMaxTileRows + ((n + 3) / 4) * K;
}

namespace portable {
#include "junction_cpu_kernel.h"
}  // namespace portable

#if STEERKERNEL_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "junction_cpu_kernel.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "junction_cpu_kernel.h"
}  // namespace avx512
#pragma GCC pop_options

// AVX-512 plus AVX512-BF16 (Zen 4+, Cooper Lake, Sapphire Rapids+): the bf16-residual kernels
// (bf16 stores by vcvtneps2bf16; with bf16 V, the projection by vdpbf16ps); fp32 and fp16
// residuals run the avx512 kernels.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
#define STEERKERNEL_BF16_DOT 1
#include "junction_cpu_kernel.h"
#undef STEERKERNEL_BF16_DOT
inline TileFn tile_fn_bf16(bool v32, bool w32) {
  if (v32) return w32 ? &junction_tile<bf16, float, float> : &junction_tile<bf16, float, bf16>;
  return w32 ? &junction_tile<bf16, bf16, float> : &junction_tile<bf16, bf16, bf16>;
}
}  // namespace avx512bf16
#pragma GCC pop_options
#endif

enum class Isa { portable = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

Isa detect_isa() {
  Isa best = Isa::portable;
#if STEERKERNEL_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
  if (best == Isa::avx512 && __builtin_cpu_supports("avx512bf16")) best = Isa::avx512bf16;
#endif
  if (const char* env = std::getenv("STEERKERNEL_CPU_ISA")) {
    Isa want = best;
    if (std::strcmp(env, "portable") == 0) want = Isa::portable;
    if (std::strcmp(env, "avx2") == 0) want = Isa::avx2;
    if (std::strcmp(env, "avx512") == 0) want = Isa::avx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

TileFn select_tile_fn(Dtype st, bool v32, bool w32) {
  switch (active_isa()) {
#if STEERKERNEL_X86_SIMD
    case Isa::avx512bf16:
      if (st == Dtype::bf16) return avx512bf16::tile_fn_bf16(v32, w32);
      return avx512::tile_fn(st, v32, w32);
    case Isa::avx512: return avx512::tile_fn(st, v32, w32);
    case Isa::avx2: return avx2::tile_fn(st, v32, w32);
#endif
    default: return portable::tile_fn(st, v32, w32);
  }
}

}  // namespace cpu

std::string simd_description() {
  switch (cpu::active_isa()) {
    case cpu::Isa::avx512bf16:
      return "avx512bf16 (AVX-512F/BW/VL/DQ + FMA + F16C, 16 fp32 lanes; AVX512-BF16: bf16 "
             "stores, and the dot for bf16 residual with bf16 V)";
    case cpu::Isa::avx512: return "avx512 (AVX-512F/BW/VL/DQ + FMA + F16C, 16 fp32 lanes)";
    case cpu::Isa::avx2: return "avx2 (AVX2 + FMA + F16C, 8 fp32 lanes)";
    default: return "portable (compiler vector extensions, 4 fp32 lanes)";
  }
}

void junction_cpu(const at::Tensor& residual, const OptTensor& V, const OptTensor& x,
                  const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                  const OptTensor& hi, const OptTensor& gate_concept,
                  const OptTensor& gate_threshold, const OptTensor& gate_above,
                  const OptTensor& latch, const OptTensor& weight, double eps,
                  const OptTensor& scores, const at::Tensor& norms, const OptTensor& out) {
  JunctionParams a = check_and_pack(residual, V, x, slot, shift, lo, hi, gate_concept,
                                    gate_threshold, gate_above, latch, weight, eps, scores,
                                    norms, out, c10::DeviceType::CPU);
  const int64_t T = a.T, d = a.d, K = a.K, P = a.P;
  if (T == 0) return;

  const bool f32 = a.dtype == Dtype::f32;
  const cpu::TileFn tile = cpu::select_tile_fn(a.dtype, a.v_f32, a.weight_f32);
  std::vector<int32_t> fired(a.latch != nullptr ? P : 0, 0);
  a.fired = a.latch != nullptr ? fired.data() : nullptr;
  const int64_t ldh = cpu::h_stride(d);
  // fp32 rows are read in place by the projection, except when their stride (a multiple of
  // 1 KiB) would put a register block's rows in one L1 set and the projection is heavy
  // enough (many concepts, several rows) to repay the copy: then pass A also writes them to
  // the padded scratch (bit-identical values either way, so the choice may depend on T)
  const bool copy_f32 = f32 && K >= 64 && T >= 16 && (a.residual_stride % 256) == 0;
  const bool hbuf = !f32 || copy_f32;

  // Tiles: as many rows (4 .. 64, a multiple of 4) as keep the tile's fp32 rows and its p / dq
  // scratch within ~192 KiB of L2.  Threads: chunks of at least ~2^18 multiply-adds of work
  // (d * (K + 4) per row), so small calls stay on the calling thread.
  const int64_t row_bytes = 4 * ldh + 8 * K;  // fp32 row (in place or copy) + p, dq
  const int64_t tile_rows =
      std::min<int64_t>(cpu::kMaxTileRows, std::max<int64_t>(4, (192 * 1024 / row_bytes) / 4 * 4));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (d * (K + 4)));

  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    // equal tiles (a multiple of 4 rows, at most tile_rows) rather than full tiles and a stub
    const int64_t rows = end - begin, ntiles = (rows + tile_rows - 1) / tile_rows;
    const int64_t n_max = std::min(rows, ((rows + ntiles - 1) / ntiles + 3) / 4 * 4);
    const int64_t nf = cpu::tile_scratch_floats(n_max, K, ldh, hbuf);
    std::unique_ptr<float[]> fs(new float[nf]);
    std::unique_ptr<int32_t[]> is(new int32_t[cpu::tile_scratch_ints(n_max, K)]);
    cpu::TileScratch sc;
    sc.hbuf = fs.get();
    sc.p = sc.hbuf + (hbuf ? n_max * ldh : 0);
    sc.dq = sc.p + n_max * K;
    sc.sumsq = sc.dq + n_max * K;
    sc.nks = is.get();
    sc.ks = sc.nks + cpu::kMaxTileRows;
    sc.copy_f32 = copy_f32;
    for (int64_t t0 = begin; t0 < end; t0 += n_max)
      tile(a, t0, static_cast<int>(std::min(n_max, end - t0)), sc);
  });

  if (a.latch != nullptr) {  // slots with a firing token latch on, after every decision
    for (int64_t s = 0; s < P; ++s)
      if (fired[s]) a.latch[s] = 1;
  }
}

}  // namespace steerkernel
