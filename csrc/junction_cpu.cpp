// steerkernel: CPU kernel of the fused junction op (see junction.h for the math).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "junction.h"

namespace steerkernel {

std::string simd_description() { return "scalar"; }

namespace {

template <typename scalar_t, typename v_t>
void junction_rows(const at::Tensor& residual, const at::Tensor& V, const OptTensor& x,
                   const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                   const OptTensor& hi, const OptTensor& gate_concept,
                   const OptTensor& gate_threshold, const OptTensor& gate_above,
                   const OptTensor& latch, const OptTensor& weight, double eps,
                   const at::Tensor& scores, const at::Tensor& norms, const OptTensor& out,
                   int64_t P, std::vector<int32_t>& fired) {
  const int64_t T = residual.size(0), d = residual.size(1), K = V.size(0);
  scalar_t* res = residual.data_ptr<scalar_t>();
  const int64_t rs = residual.stride(0);
  const scalar_t* xp = x ? x->data_ptr<scalar_t>() : nullptr;
  const int64_t xs = x ? x->stride(0) : 0;
  const v_t* Vp = V.data_ptr<v_t>();
  const int32_t* sl = slot ? slot->data_ptr<int32_t>() : nullptr;
  const float* shp = shift ? shift->data_ptr<float>() : nullptr;
  const float* lop = lo ? lo->data_ptr<float>() : nullptr;
  const float* hip = hi ? hi->data_ptr<float>() : nullptr;
  const int32_t* gc = gate_concept ? gate_concept->data_ptr<int32_t>() : nullptr;
  const float* gt = gate_threshold ? gate_threshold->data_ptr<float>() : nullptr;
  const bool* ga = gate_above ? gate_above->data_ptr<bool>() : nullptr;
  const int32_t* la = latch ? latch->data_ptr<int32_t>() : nullptr;
  float* sc = scores.data_ptr<float>();
  const int64_t ss0 = scores.stride(0), ss1 = scores.stride(1);
  float* nm = norms.data_ptr<float>();
  const int64_t ns = norms.stride(0);
  scalar_t* op = out ? out->data_ptr<scalar_t>() : nullptr;
  const int64_t os = out ? out->stride(0) : 0;
  const bool w32 = weight && weight->scalar_type() == at::kFloat;
  const float* wf = w32 ? weight->data_ptr<float>() : nullptr;
  const scalar_t* ws = (weight && !w32) ? weight->data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(d), p(K), dq(K);
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* r = res + t * rs;
      double ss = 0;
      for (int64_t j = 0; j < d; ++j) {
        float v = static_cast<float>(r[j]);
        if (xp) {
          scalar_t stored = static_cast<scalar_t>(v + static_cast<float>(xp[t * xs + j]));
          r[j] = stored;
          v = static_cast<float>(stored);
        }
        h[j] = v;
      }
      float sumsq = 0.f;
      for (int64_t j = 0; j < d; ++j) sumsq += h[j] * h[j];
      for (int64_t k = 0; k < K; ++k) {
        float acc = 0.f;
        const v_t* vk = Vp + k * d;
        for (int64_t j = 0; j < d; ++j) acc += static_cast<float>(vk[j]) * h[j];
        p[k] = acc;
        sc[t * ss0 + k * ss1] = acc;
      }
      nm[t * ns] = std::sqrt(sumsq);
      int32_t s = sl ? sl[t] : 0;
      if (s < 0 || s >= P) s = 0;
      bool apply = s != 0;
      if (apply && gc && gc[s] != -1) {
        const int32_t c = gc[s];
        bool fires = false;
        if (c >= 0 && c < K) fires = ga[s] ? (p[c] > gt[s]) : (p[c] < gt[s]);
        if (fires && la) fired[s] = 1;  // benign race: every writer stores 1
        apply = fires || (la && la[s] != 0);
      }
      if (apply) {
        bool any = false;
        for (int64_t k = 0; k < K; ++k) {
          float q = p[k] + shp[s * K + k];
          const float l = lop[s * K + k], u = hip[s * K + k];
          q = q < l ? l : q;
          q = q > u ? u : q;
          dq[k] = q - p[k];
          any |= dq[k] != 0.f || std::isnan(dq[k]);
        }
        if (any) {
          for (int64_t k = 0; k < K; ++k) {
            if (dq[k] == 0.f) continue;
            const v_t* vk = Vp + k * d;
            for (int64_t j = 0; j < d; ++j) h[j] += dq[k] * static_cast<float>(vk[j]);
          }
          for (int64_t j = 0; j < d; ++j) {
            scalar_t stored = static_cast<scalar_t>(h[j]);
            r[j] = stored;
            h[j] = static_cast<float>(stored);
          }
        }
      }
      if (op) {
        float sq = 0.f;
        for (int64_t j = 0; j < d; ++j) sq += h[j] * h[j];
        const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + static_cast<float>(eps));
        scalar_t* o = op + t * os;
        for (int64_t j = 0; j < d; ++j) {
          const float w = wf ? wf[j] : static_cast<float>(ws[j]);
          o[j] = static_cast<scalar_t>(h[j] * inv * w);
        }
      }
    }
  });
}

}  // namespace

void junction_cpu(const at::Tensor& residual, const at::Tensor& V, const OptTensor& x,
                  const OptTensor& slot, const OptTensor& shift, const OptTensor& lo,
                  const OptTensor& hi, const OptTensor& gate_concept,
                  const OptTensor& gate_threshold, const OptTensor& gate_above,
                  const OptTensor& latch, const OptTensor& weight, double eps,
                  const at::Tensor& scores, const at::Tensor& norms, const OptTensor& out) {
  const int64_t P = check_junction_args(residual, V, x, slot, shift, lo, hi, gate_concept,
                                        gate_threshold, gate_above, latch, weight, scores,
                                        norms, out, c10::DeviceType::CPU);
  if (residual.size(0) == 0) return;
  std::vector<int32_t> fired(P > 0 ? P : 1, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, residual.scalar_type(),
                                  "steerkernel_junction_cpu", [&] {
    if (V.scalar_type() == at::kFloat) {
      junction_rows<scalar_t, float>(residual, V, x, slot, shift, lo, hi, gate_concept,
                                     gate_threshold, gate_above, latch, weight, eps, scores,
                                     norms, out, P, fired);
    } else {
      junction_rows<scalar_t, scalar_t>(residual, V, x, slot, shift, lo, hi, gate_concept,
                                        gate_threshold, gate_above, latch, weight, eps, scores,
                                        norms, out, P, fired);
    }
  });
  if (latch) {
    int32_t* la = latch->data_ptr<int32_t>();
    for (int64_t s = 0; s < P; ++s)
      if (fired[s]) la[s] = 1;
  }
}

}  // namespace steerkernel
