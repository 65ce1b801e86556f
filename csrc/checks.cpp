// steerkernel: argument checks shared by the native junction impls (CPU and CUDA).
#include <ATen/ATen.h>

#include "junction.h"

namespace steerkernel {

namespace {
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "steerkernel.junction: ", name, " must be 2-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "steerkernel.junction: ", name,
              " must have unit stride along its last dim");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "steerkernel.junction: ", name,
              " has overlapping rows");
}
void check_vec(const OptTensor& t, const char* name, int64_t n, at::ScalarType dtype,
               const at::Device& dev) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "steerkernel.junction: ", name,
              " must have shape [", n, "]");
  TORCH_CHECK(t->scalar_type() == dtype, "steerkernel.junction: ", name, " must be ", dtype);
  TORCH_CHECK(t->is_contiguous() && t->device() == dev, "steerkernel.junction: ", name,
              " must be contiguous and on the residual's device");
}
}  // namespace

int64_t check_junction_args(const at::Tensor& residual, const at::Tensor& V, const OptTensor& x,
                            const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                            const OptTensor& hi, const OptTensor& gate_concept,
                            const OptTensor& gate_threshold, const OptTensor& gate_above,
                            const OptTensor& latch, const OptTensor& weight,
                            const at::Tensor& scores, const at::Tensor& norms,
                            const OptTensor& out, c10::DeviceType device_type) {
  const auto dev = residual.device();
  TORCH_CHECK(dev.type() == device_type, "steerkernel.junction: residual is on ", dev);
  const auto dt = residual.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "steerkernel.junction: residual must be float32, bfloat16 or float16, got ", dt);
  check_rows(residual, "residual");
  const int64_t T = residual.size(0), d = residual.size(1);
  TORCH_CHECK(V.dim() == 2 && V.size(1) == d && V.size(0) > 0,
              "steerkernel.junction: V must be [K, ", d, "] with K > 0");
  TORCH_CHECK(V.scalar_type() == at::kFloat || V.scalar_type() == dt,
              "steerkernel.junction: V must be float32 or the residual's dtype");
  TORCH_CHECK(V.is_contiguous() && V.device() == dev,
              "steerkernel.junction: V must be contiguous and on the residual's device");
  const int64_t K = V.size(0);
  if (x) {
    check_rows(*x, "x");
    TORCH_CHECK(x->size(0) == T && x->size(1) == d && x->scalar_type() == dt &&
                    x->device() == dev,
                "steerkernel.junction: x must match residual in shape, dtype and device");
  }
  int64_t P = 0;
  if (slot) {
    check_vec(slot, "slot", T, at::kInt, dev);
    TORCH_CHECK(shift && lo && hi, "steerkernel.junction: slot needs shift, lo and hi");
    P = shift->size(0);
    TORCH_CHECK(P > 0, "steerkernel.junction: tables need at least one slot");
    for (const auto* t : {&*shift, &*lo, &*hi}) {
      TORCH_CHECK(t->dim() == 2 && t->size(0) == P && t->size(1) == K &&
                      t->scalar_type() == at::kFloat && t->is_contiguous() && t->device() == dev,
                  "steerkernel.junction: shift / lo / hi must be contiguous float32 [P, K] on "
                  "the residual's device");
    }
    if (gate_concept) {
      check_vec(gate_concept, "gate_concept", P, at::kInt, dev);
      TORCH_CHECK(gate_threshold && gate_above,
                  "steerkernel.junction: a gate needs gate_threshold and gate_above");
      check_vec(gate_threshold, "gate_threshold", P, at::kFloat, dev);
      check_vec(gate_above, "gate_above", P, at::kBool, dev);
      check_vec(latch, "latch", P, at::kInt, dev);
    } else {
      TORCH_CHECK(!latch, "steerkernel.junction: latch needs a gate");
    }
  }
  if (weight) {
    check_vec(weight, "weight", d, weight->scalar_type(), dev);
    TORCH_CHECK(weight->scalar_type() == at::kFloat || weight->scalar_type() == dt,
                "steerkernel.junction: weight must be float32 or the residual's dtype");
  }
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == T && scores.size(1) == K &&
                  scores.scalar_type() == at::kFloat && scores.device() == dev,
              "steerkernel.junction: scores must be float32 [T, K] on the residual's device");
  TORCH_CHECK(norms.dim() == 1 && norms.size(0) == T && norms.scalar_type() == at::kFloat &&
                  norms.device() == dev,
              "steerkernel.junction: norms must be float32 [T] on the residual's device");
  TORCH_CHECK(!out || weight, "steerkernel.junction: out needs weight");
  if (out) {
    check_rows(*out, "out");
    TORCH_CHECK(out->size(0) == T && out->size(1) == d && out->scalar_type() == dt &&
                    out->device() == dev,
                "steerkernel.junction: out must match residual in shape, dtype and device");
  }
  return P;
}

}  // namespace steerkernel
