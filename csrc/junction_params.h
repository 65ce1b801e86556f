// steerkernel: the torch-free parameter block of one junction call (docs/design.md §2), shared
// by every native kernel.  check_and_pack (checks.cpp) validates the op's tensors and fills it;
// the CPU kernel (junction_cpu.cpp) and the CUDA kernels (junction_cuda.cu, compiled by nvcc
// with only the CUDA headers) read it.  Plain C++: no torch, no CUDA.
#pragma once

#include <cstdint>

namespace steerkernel {

// Element type of residual / x / out (and of V or weight when they are not fp32).
enum class Dtype : int { f32 = 0, bf16 = 1, f16 = 2 };

// Raw pointers and element strides of one junction call.  Shapes:
//   residual, x, out  [T, d]   (row strides residual_stride, x_stride, out_stride; unit inner)
//   V                 [K, d]   contiguous, fp32 or the residual dtype (v_f32); null iff K == 0
//                              (no readout, no steering: a plain add + RMSNorm)
//   weight            [d]      fp32 or the residual dtype (weight_f32); null iff out is null
//   slot              [T]      int32; null = monitor only (no update pass at all)
//   shift, lo, hi     [P, K]   fp32, contiguous (non-null iff slot is; P = 0 without slot)
//   gate_concept      [P]      int32, gate_threshold fp32 [P], gate_above bool [P] (or all null)
//   latch             [P]      int32; null = no latch.  Decisions read it as of call start;
//                              after the kernels latch[s] = 1 wherever a gate of slot s fired
//   fired             [P]      int32 per-call scratch of the backend (non-null iff latch is;
//                              not set by check_and_pack)
//   scores            [T, K]   fp32, element strides scores_s0, scores_s1 (any); null iff K == 0
//   norms             [T]      fp32, element stride norms_stride
struct JunctionParams {
  int64_t T = 0, d = 0, K = 0, P = 0;
  Dtype dtype = Dtype::f32;
  void* residual = nullptr;
  int64_t residual_stride = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* V = nullptr;
  bool v_f32 = true;
  const void* weight = nullptr;
  bool weight_f32 = true;
  void* out = nullptr;
  int64_t out_stride = 0;
  const int32_t* slot = nullptr;
  const float* shift = nullptr;
  const float* lo = nullptr;
  const float* hi = nullptr;
  const int32_t* gate_concept = nullptr;
  const float* gate_threshold = nullptr;
  const bool* gate_above = nullptr;
  int32_t* latch = nullptr;
  int32_t* fired = nullptr;
  float* scores = nullptr;
  int64_t scores_s0 = 0, scores_s1 = 0;
  float* norms = nullptr;
  int64_t norms_stride = 0;
  float eps = 1e-6f;
};

}  // namespace steerkernel
