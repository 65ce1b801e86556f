// steerkernel: CPU kernel of the fused junction op (math: junction.h).
//
// Structure:
//   * cpu_vec.h             one SIMD `Vec` type per instruction set (AVX-512, AVX2, portable)
//   * junction_cpu_kernel.h the row-tile kernel, written once against `Vec`; included below
//                           once per instruction set, each copy compiled for its own target
//   * this file             argument checks, instruction-set choice at run time, threading
//                           (at::parallel_for over row ranges, each split into L2-sized tiles)
//                           and the latch merge after the parallel region.
//
// Residual / x / out: fp32, bf16 or fp16; V and weight: fp32 or the residual's dtype; all
// arithmetic fp32.  The instruction set is the best one this CPU supports, or a lower one named
// by $STEERKERNEL_CPU_ISA (avx512 | avx2 | portable), read once per process.  With AVX512-BF16
// the bf16-residual, bf16-V projection uses vdpbf16ps ("avx512bf16").
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

// Everything the tile kernel reads or writes, as raw pointers and element strides.
struct JunctionArgs {
  int64_t T, d, K, P, ldh;  // ldh: row stride of the fp32 h scratch (16-bit residuals)
  void* residual;
  int64_t residual_stride;
  const void* x;  // nullable
  int64_t x_stride;
  const void* V;
  const int32_t* slot;  // nullable: monitoring only
  const float *shift, *lo, *hi;
  const int32_t* gate_concept;  // nullable: no gates
  const float* gate_threshold;
  const bool* gate_above;
  const int32_t* latch;  // nullable; read only (state at call start)
  int32_t* fired;        // [P] per-call flags, non-null iff latch
  const void* weight;    // nullable iff out is null
  void* out;
  int64_t out_stride;
  float eps;
  float* scores;
  int64_t scores_s0, scores_s1;
  float* norms;
  int64_t norms_stride;
};

using TileFn = void (*)(const JunctionArgs&, int64_t t0, int n, float* fs, int32_t* is);
enum class ScalarKind { f32, bf16, f16 };
template <class T>
constexpr bool kIsF32 = std::is_same<T, float>::value;
template <class T>
constexpr bool kIsBF16 = std::is_same<T, bf16>::value;
constexpr int kMaxTileRows = 64;

// Scratch of one tile of n rows (see junction_tile): h [n, ldh] (16-bit residuals), p and dq
// [n, K], sumsq [n]; ints: per-group concept counts and lists.
inline int64_t tile_scratch_floats(int64_t n, int64_t K, int64_t ldh, bool f32) {
  return (f32 ? 0 : n * ldh) + 2 * n * K + n;
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

// AVX-512 plus AVX512-BF16 (Zen 4+, Cooper Lake, Sapphire Rapids+): only the bf16-residual,
// bf16-V kernels differ (vdpbf16ps projection); everything else runs the avx512 kernels.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
using avx512::Vec;
#define STEERKERNEL_BF16_DOT 1
#include "junction_cpu_kernel.h"
#undef STEERKERNEL_BF16_DOT
inline TileFn tile_fn_bf16_v(bool w32) {
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

TileFn select_tile_fn(ScalarKind st, bool v32, bool w32) {
  switch (active_isa()) {
#if STEERKERNEL_X86_SIMD
    case Isa::avx512bf16:
      if (st == ScalarKind::bf16 && !v32) return avx512bf16::tile_fn_bf16_v(w32);
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
      return "avx512bf16 (AVX-512F/BW/VL/DQ + FMA + F16C, 16 fp32 lanes; AVX512-BF16 dot for "
             "bf16 residual with bf16 V)";
    case cpu::Isa::avx512: return "avx512 (AVX-512F/BW/VL/DQ + FMA + F16C, 16 fp32 lanes)";
    case cpu::Isa::avx2: return "avx2 (AVX2 + FMA + F16C, 8 fp32 lanes)";
    default: return "portable (compiler vector extensions, 4 fp32 lanes)";
  }
}

void junction_cpu(const at::Tensor& residual, const at::Tensor& V, const OptTensor& x,
                  const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                  const OptTensor& hi, const OptTensor& gate_concept,
                  const OptTensor& gate_threshold, const OptTensor& gate_above,
                  const OptTensor& latch, const OptTensor& weight, double eps,
                  const at::Tensor& scores, const at::Tensor& norms, const OptTensor& out) {
  const int64_t P = check_junction_args(residual, V, x, slot, shift, lo, hi, gate_concept,
                                        gate_threshold, gate_above, latch, weight, scores,
                                        norms, out, c10::DeviceType::CPU);
  const int64_t T = residual.size(0), d = residual.size(1), K = V.size(0);
  if (T == 0) return;

  const auto dt = residual.scalar_type();
  const cpu::ScalarKind st = dt == at::kBFloat16 ? cpu::ScalarKind::bf16
                             : dt == at::kHalf   ? cpu::ScalarKind::f16
                                                 : cpu::ScalarKind::f32;
  const bool f32 = st == cpu::ScalarKind::f32;
  const bool v32 = V.scalar_type() == at::kFloat;
  const bool w32 = !weight || weight->scalar_type() == at::kFloat;
  const cpu::TileFn tile = cpu::select_tile_fn(st, v32, w32);
  std::vector<int32_t> fired(latch ? P : 0, 0);

  cpu::JunctionArgs a{};
  a.T = T;
  a.d = d;
  a.K = K;
  a.P = P;
  a.ldh = (d + 15) / 16 * 16;
  a.residual = residual.data_ptr();
  a.residual_stride = residual.stride(0);
  a.x = x ? x->data_ptr() : nullptr;
  a.x_stride = x ? x->stride(0) : 0;
  a.V = V.data_ptr();
  if (slot) {
    a.slot = slot->data_ptr<int32_t>();
    a.shift = shift->data_ptr<float>();
    a.lo = lo->data_ptr<float>();
    a.hi = hi->data_ptr<float>();
    if (gate_concept) {
      a.gate_concept = gate_concept->data_ptr<int32_t>();
      a.gate_threshold = gate_threshold->data_ptr<float>();
      a.gate_above = gate_above->data_ptr<bool>();
    }
    if (latch) {
      a.latch = latch->data_ptr<int32_t>();
      a.fired = fired.data();
    }
  }
  a.weight = out ? weight->data_ptr() : nullptr;
  a.out = out ? out->data_ptr() : nullptr;
  a.out_stride = out ? out->stride(0) : 0;
  a.eps = static_cast<float>(eps);
  a.scores = scores.data_ptr<float>();
  a.scores_s0 = scores.stride(0);
  a.scores_s1 = scores.stride(1);
  a.norms = norms.data_ptr<float>();
  a.norms_stride = norms.stride(0);

  // Tiles: as many rows (4 .. 64, a multiple of 4) as keep the tile's fp32 rows and its p / dq
  // scratch within ~192 KiB of L2.  Threads: chunks of at least ~2^18 multiply-adds of work
  // (d * (K + 4) per row), so small calls stay on the calling thread.
  const int64_t row_bytes = 4 * a.ldh + 8 * K;
  const int64_t tile_rows =
      std::min<int64_t>(cpu::kMaxTileRows, std::max<int64_t>(4, (192 * 1024 / row_bytes) / 4 * 4));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (d * (K + 4)));

  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    // equal tiles (a multiple of 4 rows, at most tile_rows) rather than full tiles and a stub
    const int64_t rows = end - begin, ntiles = (rows + tile_rows - 1) / tile_rows;
    const int64_t n_max = std::min(rows, ((rows + ntiles - 1) / ntiles + 3) / 4 * 4);
    std::unique_ptr<float[]> fs(new float[cpu::tile_scratch_floats(n_max, K, a.ldh, f32)]);
    std::unique_ptr<int32_t[]> is(new int32_t[cpu::tile_scratch_ints(n_max, K)]);
    for (int64_t t0 = begin; t0 < end; t0 += n_max)
      tile(a, t0, static_cast<int>(std::min(n_max, end - t0)), fs.get(), is.get());
  });

  if (latch) {  // slots with a firing token latch on, after every decision has been taken
    int32_t* la = latch->data_ptr<int32_t>();
    for (int64_t s = 0; s < P; ++s)
      if (fired[s]) la[s] = 1;
  }
}

}  // namespace steerkernel
