// steerkernel: validate-and-pack for the native junction impls (CPU and CUDA).
//
// The checks mirror steerkernel/ops/checks.py check_structure(complete=True), in the same order
// and with the same messages, for the raw op called directly; the public Python op has already
// run them (plus values, aliasing and autograd) before it calls a backend.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "junction.h"

#define SK_CHECK(cond, ...) TORCH_CHECK(cond, "steerkernel.junction: ", __VA_ARGS__)

namespace steerkernel {

namespace {

void check_tensor(const at::Tensor& t, const char* name, const at::Device& dev, int64_t ndim) {
  SK_CHECK(t.device() == dev, name, " is on ", t.device(), " but residual is on ", dev);
  SK_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got shape ", t.sizes());
}

// A [T, d] tensor whose rows are contiguous and do not overlap.
void check_rows(const at::Tensor& t, const char* name) {
  SK_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name,
           " must have unit stride along its last dim (got strides ", t.strides(), ")");
  SK_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), name, " has overlapping rows (strides ",
           t.strides(), ")");
}

void check_table(const at::Tensor& t, const char* name, const at::Device& dev,
                 at::IntArrayRef shape, at::ScalarType dtype) {
  check_tensor(t, name, dev, static_cast<int64_t>(shape.size()));
  SK_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  SK_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  SK_CHECK(t.is_contiguous(), name, " must be contiguous");
}

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return Dtype::bf16;
    case at::kHalf: return Dtype::f16;
    default: return Dtype::f32;
  }
}

}  // namespace

JunctionParams check_and_pack(const at::Tensor& residual, const OptTensor& V, const OptTensor& x,
                              const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                              const OptTensor& hi, const OptTensor& gate_concept,
                              const OptTensor& gate_threshold, const OptTensor& gate_above,
                              const OptTensor& latch, const OptTensor& weight, double eps,
                              const OptTensor& scores, const at::Tensor& norms,
                              const OptTensor& out, c10::DeviceType device_type) {
  const auto dev = residual.device();
  SK_CHECK(dev.type() == device_type, "residual is on ", dev, ", not a ", device_type,
           " device");
  SK_CHECK(residual.dim() == 2, "residual must be 2-D, got shape ", residual.sizes());
  const auto dt = residual.scalar_type();
  SK_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "residual dtype ", dt,
           " is not supported by this backend (supported: float32, bfloat16, float16)");
  const int64_t T = residual.size(0), d = residual.size(1);
  SK_CHECK(d > 0, "residual has hidden size 0");
  check_rows(residual, "residual");

  JunctionParams p;
  p.T = T;
  p.d = d;
  p.dtype = dtype_of(dt);
  p.residual = residual.data_ptr();
  p.residual_stride = residual.stride(0);

  if (V) {
    check_tensor(*V, "V", dev, 2);
    SK_CHECK(V->size(1) == d, "V has hidden size ", V->size(1), " but residual has ", d,
             " (V must be [K, d])");
    SK_CHECK(V->size(0) > 0, "V has no concepts (K = 0); pass V=None for a plain add + RMSNorm");
    SK_CHECK(V->scalar_type() == at::kFloat || V->scalar_type() == dt,
             "V must be float32 or the residual's dtype ", dt, ", got ", V->scalar_type());
    SK_CHECK(V->is_contiguous(), "V must be contiguous");
    p.K = V->size(0);
    p.V = V->data_ptr();
    p.v_f32 = V->scalar_type() == at::kFloat;
  }
  const int64_t K = p.K;

  if (x) {
    check_tensor(*x, "x", dev, 2);
    SK_CHECK(x->size(0) == T && x->size(1) == d, "x has shape ", x->sizes(),
             " but residual has [", T, ", ", d, "]");
    SK_CHECK(x->scalar_type() == dt, "x is ", x->scalar_type(), " but residual is ", dt);
    check_rows(*x, "x");
    p.x = x->data_ptr();
    p.x_stride = x->stride(0);
  }

  if (slot) {
    SK_CHECK(V, "slot given without V: steering acts along V's directions");
    check_tensor(*slot, "slot", dev, 1);
    SK_CHECK(slot->scalar_type() == at::kInt, "slot must be int32, got ", slot->scalar_type());
    SK_CHECK(slot->size(0) == T, "slot has ", slot->size(0), " entries but residual has ", T,
             " rows");
    SK_CHECK(slot->is_contiguous(), "slot must be contiguous");
    SK_CHECK(shift || lo || hi, "slot given without any of shift / lo / hi: nothing to apply");
    SK_CHECK(shift && lo && hi, "slot needs shift, lo and hi");
    SK_CHECK(shift->dim() == 2, "shift / lo / hi must be 2-D [P, K] tensors");
    const int64_t P = shift->size(0);
    SK_CHECK(P > 0, "intervention tables have no slots (P = 0)");
    check_table(*shift, "shift", dev, {P, K}, at::kFloat);
    check_table(*lo, "lo", dev, {P, K}, at::kFloat);
    check_table(*hi, "hi", dev, {P, K}, at::kFloat);
    p.P = P;
    p.slot = slot->data_ptr<int32_t>();
    p.shift = shift->data_ptr<float>();
    p.lo = lo->data_ptr<float>();
    p.hi = hi->data_ptr<float>();
    if (gate_concept) {
      check_table(*gate_concept, "gate_concept", dev, {P}, at::kInt);
      SK_CHECK(gate_threshold, "gate_concept given without gate_threshold");
      check_table(*gate_threshold, "gate_threshold", dev, {P}, at::kFloat);
      SK_CHECK(gate_above, "a gate needs gate_threshold and gate_above");
      check_table(*gate_above, "gate_above", dev, {P}, at::kBool);
      p.gate_concept = gate_concept->data_ptr<int32_t>();
      p.gate_threshold = gate_threshold->data_ptr<float>();
      p.gate_above = gate_above->data_ptr<bool>();
    } else {
      SK_CHECK(!gate_threshold && !gate_above,
               "gate_threshold / gate_above given without gate_concept");
    }
    if (latch) {
      SK_CHECK(gate_concept, "latch given without a gate (gate_concept)");
      check_table(*latch, "latch", dev, {P}, at::kInt);
      p.latch = latch->data_ptr<int32_t>();
    }
  }

  if (weight) {
    check_tensor(*weight, "weight", dev, 1);
    SK_CHECK(weight->size(0) == d, "weight has ", weight->size(0), " entries but hidden size is ",
             d);
    SK_CHECK(weight->scalar_type() == at::kFloat || weight->scalar_type() == dt,
             "weight must be float32 or ", dt, ", got ", weight->scalar_type());
    SK_CHECK(weight->is_contiguous(), "weight must be contiguous");
  }
  SK_CHECK(std::isfinite(eps) && eps >= 0, "eps must be a finite float >= 0, got ", eps);
  // the kernels add eps in float32: a nonzero eps must not round to 0 (or overflow to inf)
  SK_CHECK(eps == 0 || (eps >= std::numeric_limits<float>::denorm_min() &&
                        eps <= std::numeric_limits<float>::max()),
           "eps must be 0 or within float32's range [", std::numeric_limits<float>::denorm_min(),
           ", ", std::numeric_limits<float>::max(), "], got ", eps);
  p.eps = static_cast<float>(eps);

  if (scores) {
    SK_CHECK(V, "scores given without V: there are no concepts to score");
    check_tensor(*scores, "scores", dev, 2);
    SK_CHECK(scores->size(0) == T && scores->size(1) == K, "scores must have shape [", T, ", ",
             K, "], got ", scores->sizes());
    SK_CHECK(scores->scalar_type() == at::kFloat, "scores must be float32, got ",
             scores->scalar_type());
    p.scores = scores->data_ptr<float>();
    p.scores_s0 = scores->stride(0);
    p.scores_s1 = scores->stride(1);
  } else {
    SK_CHECK(!V, "V given without scores: the readout needs its buffer");
  }
  SK_CHECK(norms.defined(), "norms is required");
  check_tensor(norms, "norms", dev, 1);
  SK_CHECK(norms.size(0) == T, "norms must have shape [", T, "], got ", norms.sizes());
  SK_CHECK(norms.scalar_type() == at::kFloat, "norms must be float32, got ",
           norms.scalar_type());
  p.norms = norms.data_ptr<float>();
  p.norms_stride = norms.stride(0);
  if (out) {
    SK_CHECK(weight, "out given without weight: the fused RMSNorm needs its weight");
    check_tensor(*out, "out", dev, 2);
    SK_CHECK(out->size(0) == T && out->size(1) == d, "out must have shape [", T, ", ", d,
             "], got ", out->sizes());
    SK_CHECK(out->scalar_type() == dt, "out must be ", dt, ", got ", out->scalar_type());
    check_rows(*out, "out");
    p.weight = weight->data_ptr();
    p.weight_f32 = weight->scalar_type() == at::kFloat;
    p.out = out->data_ptr();
    p.out_stride = out->stride(0);
  }
  return p;
}

}  // namespace steerkernel
