// steerkernel: the torch-free interface between the CUDA junction kernels (junction_cuda.cu,
// compiled by nvcc with only the CUDA headers) and the torch op (cuda_ops.cpp, compiled by the
// host compiler).  Plain C++: no __global__ code here, so both sides include it.
//
// The kernels implement docs/design.md §2 on the shared parameter block JunctionParams
// (junction_params.h: pointers, sizes, strides, flags), which cuda_ops.cpp fills with
// check_and_pack, the same validate-and-pack the CPU op uses.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "junction_params.h"

namespace steerkernel {
namespace cuda {

using Params = JunctionParams;

// Which kernels a call uses (see junction_cuda.cu, "kernel choice"): automatic, the fused
// rows kernel, or the split path (projection kernel, then the rows kernel).  Every path gives
// the same bits.
enum class Path : int { automatic = 0, row = 1, split = 2 };

// What the device offers (queried once per device by the caller).
struct DeviceInfo {
  int num_sms = 1;
  int max_smem_optin = 48 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
};

// nullptr when `launch` can take these sizes on this device, else why not (the one limit:
// shared memory per block must hold the K fp32 projections (and the K-entry update list) of
// the rows of a block, plus the fp32 row itself when the row layout needs the shared-memory
// fallback kernel).
const char* unsupported(const Params& p, const DeviceInfo& dev);

// int32 words of latch scratch the caller must pass in `Params::fired` (any contents) for
// this call: 0, the usual case, when the kernels use their built-in per-device scratch (a
// latch over at most 65536 slots, or no latch); else 1 + ceil(P / 32).
int64_t latch_scratch_words(const Params& p);

// Launch the junction on `stream`: one kernel (two on the split path), no allocation, no host
// sync, CUDA-graph capturable; the latch merge happens inside the (last) kernel.
// Preconditions (checked by the caller): the Params shapes of junction_params.h,
// unsupported() == nullptr, and `fired` set when latch_scratch_words() > 0.  Returns the
// first launch error (cudaSuccess when every launch went out); the caller turns it into an
// exception.
cudaError_t launch(const Params& p, Path path, const DeviceInfo& dev, cudaStream_t stream);

// The path `launch` takes for these sizes under Path::automatic, and the rows per block of the
// row kernel it then uses (for benchmarks and `steerkernel doctor`).
Path choose_path(const Params& p, const DeviceInfo& dev, int* rows_per_block);

}  // namespace cuda
}  // namespace steerkernel
