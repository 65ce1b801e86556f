// steerkernel::junction schema, its CPU registration and the Python module steerkernel._C.
#include <torch/extension.h>
#include <torch/library.h>

#include "junction.h"

// The schema generated from the argument table in steerkernel/ops/args.py (SCHEMA), spelled
// out here so the extension stands alone; tests/test_junction.py holds the two equal.
TORCH_LIBRARY(steerkernel, m) {
  m.def(
      "junction(Tensor(a!) residual, Tensor? V, Tensor? x, Tensor? slot, Tensor? shift, "
      "Tensor? lo, Tensor? hi, Tensor? gate_concept, Tensor? gate_threshold, "
      "Tensor? gate_above, Tensor(b!)? latch, Tensor? weight, float eps, Tensor(c!)? scores, "
      "Tensor(d!) norms, Tensor(e!)? out) -> ()");
}

TORCH_LIBRARY_IMPL(steerkernel, CPU, m) { m.impl("junction", &steerkernel::junction_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "steerkernel native ops (CPU); registers torch.ops.steerkernel.junction";
  m.def("simd_description", &steerkernel::simd_description,
        "The instruction set the CPU kernel dispatched to on this machine.");
}
