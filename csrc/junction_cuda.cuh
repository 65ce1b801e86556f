// steerkernel: the torch-free interface between the CUDA junction kernels (junction_cuda.cu,
// compiled by nvcc with only the CUDA headers) and the torch op (cuda_ops.cpp, compiled by the
// host compiler).  Plain C++: no __global__ code here, so both sides include it.
//
// Math (per token row t of a [T, d] hidden state; all arithmetic fp32; see junction.h):
//   h = rne(residual[t] + x[t])            rne: one round-to-nearest-even into the residual dtype
//   p = V h (V [K, d]);  scores[t] = p;  norms[t] = ||h||            (pre-intervention)
//   s = slot[t] (0 when outside [0, P));  steered = s != 0 and gate open
//   gate open: gate_concept[s] == -1, or latch[s] != 0 (as of call start), or
//              p[c] > thr (gate_above) / p[c] < thr, c = gate_concept[s] in [0, K)
//   if steered: h = rne(h + V^T (clamp(p + shift[s], lo[s], hi[s]) - p))
//               clamp(q, l, u) = (q < l ? l : q) then (q > u ? u : q)   (NaN stays NaN)
//   residual[t] = h;  out[t] = rne(h * rsqrt(mean(h^2) + eps) * weight)
//   latch[s] = 1 (after every decision of the call) for every s whose gate fired
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace steerkernel {
namespace cuda {

// Element type of residual / x / out (and of V or weight when they are not fp32).
enum class Dtype : int { f32 = 0, bf16 = 1, f16 = 2 };

// Which kernels a call uses (see junction_cuda.cu, "Paths").
enum class Path : int { automatic = 0, row = 1, split = 2 };

// Raw pointers and element strides of one junction call.  Shapes:
//   residual, x, out  [T, d]   (row strides residual_stride, x_stride, out_stride; unit inner)
//   V                 [K, d]   contiguous, fp32 or the residual dtype (v_f32)
//   weight            [d]      fp32 or the residual dtype (weight_f32); null iff out is null
//   slot              [T]      int32; null = monitor only (no update pass at all)
//   shift, lo, hi     [P, K]   fp32, contiguous (non-null iff slot is)
//   gate_concept      [P]      int32, gate_threshold fp32 [P], gate_above bool [P] (or all null)
//   latch             [P]      int32; null = no latch.  Decisions read it as of call start;
//                              after the kernels latch[s] = 1 wherever a gate of slot s fired
//   fired             [P]      int32 scratch (any contents; launch zeroes it), non-null iff
//                              latch is
//   scores            [T, K]   fp32, element strides scores_s0, scores_s1 (any)
//   norms             [T]      fp32, element stride norms_stride
struct Params {
  int64_t T = 0, d = 0, K = 0, P = 0;
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

// What the device offers (queried once per device by the caller).
struct DeviceInfo {
  int num_sms = 1;
  int max_smem_optin = 48 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
};

// nullptr when `launch` can take these sizes on this device, else why not (the one limit:
// shared memory per block must hold the K fp32 projections of the rows of a block, plus the
// fp32 row itself when the row layout needs the shared-memory fallback kernel).
const char* unsupported(const Params& p, Dtype dtype, const DeviceInfo& dev);

// Launch the junction on `stream` (no allocation, no host sync; CUDA-graph capturable).
// Preconditions (checked by the caller): the Params shapes above and unsupported() ==
// nullptr.  Returns the first launch error (cudaSuccess when every launch went out); the
// caller turns it into an exception.
cudaError_t launch(const Params& p, Dtype dtype, Path path, const DeviceInfo& dev,
                   cudaStream_t stream);

// The path `launch` takes for these sizes under Path::automatic, and the rows per block of the
// row kernel it then uses (for benchmarks and `steerkernel doctor`).
Path choose_path(const Params& p, Dtype dtype, const DeviceInfo& dev, int* rows_per_block);

}  // namespace cuda
}  // namespace steerkernel
