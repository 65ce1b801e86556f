// steerkernel: the CUDA implementation of the op steerkernel::junction and the Python module
// steerkernel._C_cuda.  Importing the module registers the CUDA kernel; the op's schema comes
// from steerkernel._C (csrc/ops.cpp), which must be imported first.
//
// This file is the torch side only: check_and_pack (checks.cpp, shared with the CPU impl) into
// the torch-free JunctionParams, device guard, the device's current stream, and (only for a
// latch over more than 65536 slots) a latch scratch from the caching allocator.  The kernels
// (docs/design.md §2), the latch merge and the launch logic live in junction_cuda.cu.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "junction.h"
#include "junction_cuda.cuh"

namespace steerkernel {
namespace {

// Which kernels the CUDA impl uses: "auto" (default), "row" or "split" (see
// junction_cuda.cu).  Initialised from $STEERKERNEL_CUDA_PATH, changed by set_path().
std::atomic<int> g_path{-1};

cuda::Path parse_path(const std::string& name) {
  if (name == "auto" || name.empty()) return cuda::Path::automatic;
  if (name == "row") return cuda::Path::row;
  if (name == "split") return cuda::Path::split;
  TORCH_CHECK(false, "steerkernel: unknown CUDA path '", name, "' (auto | row | split)");
}

const char* path_name(cuda::Path p) {
  switch (p) {
    case cuda::Path::row: return "row";
    case cuda::Path::split: return "split";
    default: return "auto";
  }
}

cuda::Path current_path() {
  int v = g_path.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("STEERKERNEL_CUDA_PATH");
    v = static_cast<int>(parse_path(env != nullptr ? env : "auto"));
    g_path.store(v, std::memory_order_relaxed);
  }
  return static_cast<cuda::Path>(v);
}

// SM count and opt-in shared memory per block, queried once per device (attribute queries:
// no synchronisation, fine during graph capture).
cuda::DeviceInfo device_info(c10::DeviceIndex index) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sms[kMaxDevices] = {};
  static std::atomic<int> smem[kMaxDevices] = {};
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "steerkernel: CUDA device index ", index,
              " out of range");
  cuda::DeviceInfo info;
  info.num_sms = sms[index].load(std::memory_order_relaxed);
  info.max_smem_optin = smem[index].load(std::memory_order_relaxed);
  if (info.num_sms == 0 || info.max_smem_optin == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem_optin,
                                          cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
    sms[index].store(info.num_sms, std::memory_order_relaxed);
    smem[index].store(info.max_smem_optin, std::memory_order_relaxed);
  }
  return info;
}

}  // namespace

void junction_cuda(const at::Tensor& residual, const OptTensor& V, const OptTensor& x,
                   const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                   const OptTensor& hi, const OptTensor& gate_concept,
                   const OptTensor& gate_threshold, const OptTensor& gate_above,
                   const OptTensor& latch, const OptTensor& weight, double eps,
                   const OptTensor& scores, const at::Tensor& norms, const OptTensor& out) {
  cuda::Params p = check_and_pack(residual, V, x, slot, shift, lo, hi, gate_concept,
                                  gate_threshold, gate_above, latch, weight, eps, scores, norms,
                                  out, c10::DeviceType::CUDA);
  if (p.T == 0) return;
  // Everything below (attribute queries, the scratch allocation, the launches) runs on
  // residual's device, on that device's current stream.
  const c10::cuda::CUDAGuard guard(residual.device());
  const c10::DeviceIndex index = residual.device().index();
  const cuda::DeviceInfo dev = device_info(index);
  const char* why = cuda::unsupported(p, dev);
  TORCH_CHECK(why == nullptr, "steerkernel.junction (cuda): d = ", p.d, ", K = ", p.K, ": ",
              why != nullptr ? why : "");
  // The latch merge happens inside the kernel, on a per-device scratch that is zero at rest
  // (module memory: nothing to allocate, also during graph capture).  Only a latch over more
  // slots than that scratch holds needs a buffer: per call, from the caching allocator
  // (graph-capture safe; launch() zeroes it on the stream).
  at::Tensor scratch;
  const int64_t words = cuda::latch_scratch_words(p);
  if (words > 0) {
    scratch = at::empty({words}, latch->options());
    p.fired = scratch.data_ptr<int32_t>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(index).stream();
  C10_CUDA_CHECK(cuda::launch(p, current_path(), dev, stream));
}

}  // namespace steerkernel

TORCH_LIBRARY_IMPL(steerkernel, CUDA, m) { m.impl("junction", &steerkernel::junction_cuda); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "steerkernel native ops (CUDA): importing registers the CUDA kernel of "
      "torch.ops.steerkernel.junction (import steerkernel._C first; it defines the schema).";
  m.def(
      "set_path",
      [](const std::string& name) {
        steerkernel::g_path.store(static_cast<int>(steerkernel::parse_path(name)));
      },
      "Force the CUDA kernels used by later calls: 'auto' (default), 'row' (one fused kernel, "
      "rows per block from T) or 'split' (projection kernel + row kernel; register-kernel "
      "layouts only).  Overrides $STEERKERNEL_CUDA_PATH.");
  m.def(
      "get_path", []() { return std::string(steerkernel::path_name(steerkernel::current_path())); },
      "The CUDA path setting: 'auto', 'row' or 'split'.");
  m.def(
      "plan",
      [](const at::Tensor& residual, const steerkernel::OptTensor& V,
         const steerkernel::OptTensor& x, const steerkernel::OptTensor& weight,
         const steerkernel::OptTensor& out) {
        TORCH_CHECK(residual.is_cuda() && residual.dim() == 2,
                    "plan: residual [T, d] (and V [K, d] or None) CUDA tensors");
        steerkernel::OptTensor scores;
        if (V) scores = at::empty({residual.size(0), V->size(0)},
                                  residual.options().dtype(at::kFloat));
        const at::Tensor norms = at::empty({residual.size(0)},
                                           residual.options().dtype(at::kFloat));
        const steerkernel::cuda::Params p = steerkernel::check_and_pack(
            residual, V, x, {}, {}, {}, {}, {}, {}, {}, {}, weight, 1e-6, scores, norms, out,
            c10::DeviceType::CUDA);
        int rows = 0;
        const auto path = steerkernel::cuda::choose_path(
            p, steerkernel::device_info(residual.device().index()), &rows);
        return std::make_tuple(std::string(steerkernel::path_name(path)), rows);
      },
      pybind11::arg("residual"), pybind11::arg("V"), pybind11::arg("x") = pybind11::none(),
      pybind11::arg("weight") = pybind11::none(), pybind11::arg("out") = pybind11::none(),
      "(path, rows_per_block) that 'auto' picks for these tensors: path 'row' or 'split'; "
      "rows_per_block 0 means the shared-memory fallback kernel (unaligned rows or large d).");
}
