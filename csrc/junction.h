// steerkernel: the fused junction op (docs/design.md §2), torch-side declarations shared by the
// native backends.  The op's arguments are defined once, in steerkernel/ops/args.py; ops.cpp
// spells the schema generated from them (a test holds the two equal).
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <string>

#include "junction_params.h"

namespace steerkernel {

using OptTensor = std::optional<at::Tensor>;

// Checks shapes, dtypes, devices and strides of a junction call (TORCH_CHECK, so a bad call
// raises before anything is written; the same checks as steerkernel/ops/checks.py
// check_structure(complete=True)) and packs its tensors into the parameter block every native
// kernel reads.  `fired` is left null: it is the backend's per-call scratch.
JunctionParams check_and_pack(const at::Tensor& residual, const OptTensor& V, const OptTensor& x,
                              const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                              const OptTensor& hi, const OptTensor& gate_concept,
                              const OptTensor& gate_threshold, const OptTensor& gate_above,
                              const OptTensor& latch, const OptTensor& weight, double eps,
                              const OptTensor& scores, const at::Tensor& norms,
                              const OptTensor& out, c10::DeviceType device_type);

void junction_cpu(const at::Tensor& residual, const OptTensor& V, const OptTensor& x,
                  const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                  const OptTensor& hi, const OptTensor& gate_concept,
                  const OptTensor& gate_threshold, const OptTensor& gate_above,
                  const OptTensor& latch, const OptTensor& weight, double eps,
                  const OptTensor& scores, const at::Tensor& norms, const OptTensor& out);

// Which SIMD variant of the CPU kernel runs on this machine (for `steerkernel doctor`).
std::string simd_description();

}  // namespace steerkernel
