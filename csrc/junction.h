// steerkernel: the fused junction op, shared declarations for the native backends.
//
// Per token row t of a [T, d] hidden state (fp32 arithmetic):
//   h = residual[t] + x[t];  p = V h  (V: [K, d]);  scores[t] = p;  norms[t] = ||h||
//   s = slot[t]; if s != 0 and gate open: h += V^T (clamp(p + shift[s], lo[s], hi[s]) - p)
//   residual[t] = h (stored in the residual's dtype; later reads see the stored value)
//   out[t] = h * rsqrt(mean(h^2) + eps) * weight
// Gate: gate_concept[s] == -1 -> open; else opens when p[c] > thr (gate_above) or p[c] < thr,
// or when latch[s] != 0 at call start.  Latches of slots with a firing token are set to 1 at
// the end of the call.  Out-of-range slots act as slot 0; out-of-range gate concepts never fire.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <string>

namespace steerkernel {

using OptTensor = std::optional<at::Tensor>;

// Checks shapes, dtypes, devices and strides shared by every native impl (TORCH_CHECK, so a
// bad call raises before anything is written).  Returns the number of slots P (0 = no slot).
int64_t check_junction_args(const at::Tensor& residual, const at::Tensor& V, const OptTensor& x,
                            const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                            const OptTensor& hi, const OptTensor& gate_concept,
                            const OptTensor& gate_threshold, const OptTensor& gate_above,
                            const OptTensor& latch, const OptTensor& weight,
                            const at::Tensor& scores, const at::Tensor& norms,
                            const OptTensor& out, c10::DeviceType device_type);

void junction_cpu(const at::Tensor& residual, const at::Tensor& V, const OptTensor& x,
                  const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                  const OptTensor& hi, const OptTensor& gate_concept,
                  const OptTensor& gate_threshold, const OptTensor& gate_above,
                  const OptTensor& latch, const OptTensor& weight, double eps,
                  const at::Tensor& scores, const at::Tensor& norms, const OptTensor& out);

// Which SIMD variant of the CPU kernel runs on this machine (for `steerkernel doctor`).
std::string simd_description();

}  // namespace steerkernel
