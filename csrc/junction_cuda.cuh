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

// Which kernels a call uses (see junction_cuda.cu, "Paths").
enum class Path : int { automatic = 0, row = 1, split = 2 };

// What the device offers (queried once per device by the caller).
struct DeviceInfo {
  int num_sms = 1;
  int max_smem_optin = 48 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
};

// nullptr when `launch` can take these sizes on this device, else why not (the one limit:
// shared memory per block must hold the K fp32 projections of the rows of a block, plus the
// fp32 row itself when the row layout needs the shared-memory fallback kernel).
const char* unsupported(const Params& p, const DeviceInfo& dev);

// Launch the junction on `stream` (no allocation, no host sync; CUDA-graph capturable).
// Preconditions (checked by the caller): the Params shapes of junction_params.h, `fired` set
// (any contents: launch zeroes it) when `latch` is, and unsupported() == nullptr.  Returns the
// first launch error (cudaSuccess when every launch went out); the caller turns it into an
// exception.
cudaError_t launch(const Params& p, Path path, const DeviceInfo& dev, cudaStream_t stream);

// The path `launch` takes for these sizes under Path::automatic, and the rows per block of the
// row kernel it then uses (for benchmarks and `steerkernel doctor`).
Path choose_path(const Params& p, const DeviceInfo& dev, int* rows_per_block);

}  // namespace cuda
}  // namespace steerkernel
