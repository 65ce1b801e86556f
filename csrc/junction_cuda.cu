// steerkernel: CUDA kernels of the fused junction op (docs/design.md §2).  Torch-free (CUDA
// headers only): the torch op in cuda_ops.cpp validates the tensors and packs them into the
// shared `JunctionParams` (check_and_pack, junction_params.h), then calls `launch` below.
// Oracle: steerkernel/ops/reference.py.
//
// Numerics: all arithmetic fp32, every rounding round-to-nearest-even.  The added row
// h = rne(residual + x) is stored exactly as torch's `residual + x` (fp32 add, one
// __float2bfloat16 / __float2half rounding), so rows that are not steered are bit-identical to
// it; the update, the norm and the RMSNorm read the stored value.  Concepts with dq = q - p ==
// 0 are skipped in the update (adding 0 changes nothing).  Without V (K == 0) the projection
// loops are empty: a plain add + RMSNorm.
//
// Thread layout of a row (as in vLLM's fused_add_rms_norm): a row is cut into "slots" of VEC
// elements (VEC = 16 bytes / element size: 8 bf16/fp16 or 4 fp32); thread `tid` of a block
// of `nthreads` (<= 512) owns slots tid, tid + nthreads, ..., NV of them (NV in {1, 2, 4}),
// and every slot access is one 16-byte load or store (two for an fp32 V or weight slot next
// to a 16-bit residual).  The thread keeps its slots of h in registers (float h[R][NV][VEC])
// from the add to the RMSNorm, so residual and x are read once and residual and out written
// at most once.
//
// Projection p = V h (the only part with reuse).  For each group of G = 16 / R concepts every
// thread loads its slots of those V rows (coalesced 16-byte loads: the block reads each V row
// once, front to back) and forms partial dot products with all R rows it holds: acc[R * G]
// per thread.  A warp "reduce-scatter" butterfly (4 halving exchange stages + 1 plain stage:
// 16 shuffles for 16 values, against 5 per value for 16 separate warp sums) leaves lane pair
// (2i, 2i+1) with the warp's sum of value i; a double-buffered [warps][16] shared array and
// one __syncthreads per group finish the block sum, summed over warps in a fixed order, so
// every result is deterministic.  V is not staged in shared memory: every block streams it
// through L1/L2 (K * d elements, a few MB at most, L2-resident across the blocks of a call).
//
// Kernels:
//   rows_kernel<T, VT, NV, R>   the register kernel: one block per R consecutive rows, all
//       phases.  Needs d % VEC == 0, 16-byte aligned base pointers and row strides, and
//       d <= 512 * 4 * VEC (16384 bf16/fp16, 8192 fp32).  R > 1 (prefill) reuses every V
//       load for R rows (V traffic from L2: ceil(T / R) * K * d elements); instantiated
//       (NV, R): (1,1) (2,1) (4,1) (1,4) (2,2), i.e. at most 32 fp32 registers of h.
//       project == false skips the projection and reads p back from `scores`.
//   rows_smem_kernel<T, VT>     fallback for every other row layout (odd d, unaligned views,
//       larger d): one block per row, coalesced scalar accesses, h in shared memory (fp32
//       [d]), the same phases and rounding points.
//   project_kernel<T, VT>       decode helper: block (kb, tb) computes the 4 x 8 tile
//       scores[4 tb .. +4, 8 kb .. +8] = rne(residual + x) V^T over all of d (<= 256 threads
//       striding over the slots; 32 partial dot products per thread; one 32-value
//       reduce-scatter per warp).  Nothing is stored except scores.
//
// Paths (make_plan; Path::row / Path::split force one where the register kernel applies):
//   row    rows_kernel with projection, R rows per block (R = 4 / 2 once T fills two blocks
//          per SM).  One launch.
//   split  project_kernel, then rows_kernel<R = 1, project = false>.  Two launches; taken
//          for decode (T <= kSplitMaxT) with many concepts (K >= kSplitMinK): one block per
//          row would have each of T blocks stream all of V (K = 171, d = 4096: 1.4 MB bf16)
//          through one SM, while the split spreads V over ceil(K / 8) * ceil(T / 4) blocks.
// What neither path does: use tensor cores.  For prefill with K in the hundreds the
// projection is 2 K d FLOPs per row on CUDA cores (K = 171, d = 4096: 1.4 MFLOP, ~21 ns per
// row at the H100's ~67 fp32 TFLOP/s, about twice the ~10 ns of HBM traffic of a bf16 row),
// and V is re-read from L2 once per R rows; so K ~ 171 prefill is compute- / L2-bound at
// roughly half of the memory floor, while K <= ~64 stays memory-bound.
//
// Latch: no block reads another block's decision.  `launch` zeroes the scratch `fired[P]`
// (cudaMemsetAsync), the kernels store 1 for each slot whose gate fires (idempotent plain
// stores), and latch_merge_kernel then sets latch[s] = 1 where fired[s] != 0; all on one
// stream, so decisions read the latch as of call start.  No allocation, no host
// synchronisation: CUDA-graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "junction_cuda.cuh"

namespace steerkernel {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 512;              // rows_kernel block size limit
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kGroup = 16;                    // values per reduce-scatter in rows_kernel
constexpr int kProjThreads = 256;             // project_kernel block size limit
constexpr int kProjRows = 4;                  // TB: rows per project_kernel block
constexpr int kProjConcepts = 8;              // KB: concepts per project_kernel block
constexpr int kMaxNV = 4;                     // slots per thread (register kernel)
constexpr int kStaticSmemReserve = 4096;      // bytes of static shared memory (upper bound)

// Path thresholds (tunable from benchmarks/gpu_check.py numbers).
constexpr int64_t kSplitMaxT = 64;            // split only for decode-sized T ...
constexpr int64_t kSplitMinK = 32;            // ... and many concepts
constexpr int64_t kSplitHardMaxT = 65535LL * kProjRows;  // grid.y limit of project_kernel

// ----------------------------------------------------------------------------- numerics
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename S>
__device__ __forceinline__ S from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);  // what c10::BFloat16(float) does on sm_80+
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);  // what c10::Half(float) does on the device
}

// N elements of S in one or two aligned 16-byte words.
template <typename S, int N>
struct alignas(16) Vec {
  S v[N];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Warp reduce-scatter of N values per lane (N a power of 2, <= 32).  Returns, on every lane,
// the sum over the warp of value number (lane / (32 / N)).  log2(N) halving stages (lanes
// l and l ^ off swap halves: the lane with `off` set keeps the upper half) then
// log2(32 / N) plain butterfly stages: N - 1 + log2(32 / N) shuffles in all.  Clobbers v.
// (Recursion over the stages keeps every array index a compile-time constant, so v stays in
// registers.)
template <int HALF, int OFF, int N>
__device__ __forceinline__ void halving_stages(float (&v)[N], int lane) {
  if constexpr (HALF >= 1) {
    const bool upper = (lane & OFF) != 0;
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
      const float keep = upper ? v[j + HALF] : v[j];
      const float send = upper ? v[j] : v[j + HALF];
      v[j] = keep + __shfl_xor_sync(kFullMask, send, OFF);
    }
    halving_stages<HALF / 2, OFF / 2>(v, lane);
  }
}

template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of 2 <= 32");
  halving_stages<N / 2, 16>(v, lane);
  float s = v[0];
#pragma unroll
  for (int off = 16 / N; off >= 1; off /= 2) s += __shfl_xor_sync(kFullMask, s, off);
  return s;
}

// Sum of R values over the block (fixed order: warps 0, 1, ...); every thread gets the R
// totals back in v.  wsum: [kMaxWarps][R] and tot: [R] shared scratch, not reused elsewhere
// before the call returns.  Two __syncthreads (so call it under block-uniform control flow).
template <int R>
__device__ __forceinline__ void block_sum_rows(float (&v)[R], float (*wsum)[R], float* tot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = warp_sum(v[r]);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) wsum[warp][r] = v[r];
  }
  __syncthreads();
  if (threadIdx.x < R) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += wsum[w][threadIdx.x];
    tot[threadIdx.x] = s;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = tot[r];
}

// ----------------------------------------------------------------------------- slot access
// Slot vi of a row of S (elements [vi * VEC, vi * VEC + VEC)) as fp32: one or two aligned
// 16-byte loads.  Read-only data (V, x, weight) goes through the non-coherent path (__ldg);
// the residual is read with ordinary loads because the kernel writes it.
template <int VEC, bool RO, typename S>
__device__ __forceinline__ void load_slot(const S* row, int64_t vi, float (&f)[VEC]) {
  constexpr int kWords = VEC * sizeof(S) / 16;  // 1 or 2
  static_assert(kWords * 16 == VEC * sizeof(S), "a slot is whole 16-byte words");
  const uint4* src = reinterpret_cast<const uint4*>(row + vi * VEC);
  uint4 w[kWords];
#pragma unroll
  for (int b = 0; b < kWords; ++b) w[b] = RO ? __ldg(src + b) : src[b];
  Vec<S, VEC> v;
  memcpy(&v, w, sizeof(v));
#pragma unroll
  for (int e = 0; e < VEC; ++e) f[e] = to_f32(v.v[e]);
}

// Round VEC fp32 values to S and store them to slot vi of a row (one 16-byte store).
template <int VEC, typename S>
__device__ __forceinline__ void store_slot(S* row, int64_t vi, const float (&f)[VEC]) {
  Vec<S, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_f32<S>(f[e]);
  *reinterpret_cast<Vec<S, VEC>*>(row + vi * VEC) = v;
}

// h = rne(r + x) for slot vi (h = r without x), stored back to r when STORE.
template <int VEC, bool STORE, typename T>
__device__ __forceinline__ void load_h(T* rrow, const T* xrow, int64_t vi, float (&h)[VEC]) {
  load_slot<VEC, false>(rrow, vi, h);
  if (xrow != nullptr) {
    float xv[VEC];
    load_slot<VEC, true>(xrow, vi, xv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) h[e] = to_f32(from_f32<T>(h[e] + xv[e]));
    if constexpr (STORE) store_slot<VEC>(rrow, vi, h);  // h is exact in T
  }
}

// ----------------------------------------------------------------------------- shared phases
// Block sum of one projection group.  acc[n] (n = r * G + g) is this thread's partial dot
// product of row t0 + r with concept k0 + g; the totals go to psm[r * K + k0 + g] and, for
// real rows, to scores.  red: one half of the [2][kMaxWarps][16] double buffer (the caller
// alternates halves; one __syncthreads here).
template <int G>
__device__ __forceinline__ void finish_group(float (&acc)[kGroup], float (*red)[kGroup],
                                             int64_t k0, const Params& prm, float* psm,
                                             int64_t t0, int rows) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const float s = warp_reduce_scatter<kGroup>(acc, lane);  // value lane / 2
  if ((lane & 1) == 0) red[warp][lane >> 1] = s;
  __syncthreads();
  if (tid < kGroup) {
    float sum = 0.f;
    for (int w = 0; w < nwarps; ++w) sum += red[w][tid];
    const int r = tid / G;
    const int64_t k = k0 + tid % G;
    if (k < prm.K) {
      psm[r * prm.K + k] = sum;
      if (r < rows) prm.scores[(t0 + r) * prm.scores_s0 + k * prm.scores_s1] = sum;
    }
  }
  // No barrier needed before the next group: it writes the other half of the buffer, and
  // this half is rewritten only after the next group's barrier, which these readers reach
  // only once they are done.
}

// Phase 3 for rows t0 .. t0 + R - 1 (threads 0 .. R-1): norms (sqrt of the pre-update sum
// of squares ss_pre[r]), slot (outside [0, P) -> 0) and gate -> rslot[r] = slot applied
// (0 = not steered); fired[s] = 1 for a gate that fires.  psm: p [R][K].  Caller syncs after.
template <int R>
__device__ __forceinline__ void decide_rows(const Params& prm, const float* psm,
                                            const float* ss_pre, int64_t t0, int rows,
                                            int* rslot) {
  const int r = threadIdx.x;
  if (r >= R) return;
  int s = 0;
  if (r < rows && prm.slot != nullptr) {
    s = prm.slot[t0 + r];
    if (s < 0 || s >= prm.P) s = 0;
  }
  bool apply = s != 0;
  if (apply && prm.gate_concept != nullptr) {
    const int c = prm.gate_concept[s];
    if (c != -1) {  // gated; a concept outside [0, K) never fires
      bool fires = false;
      if (c >= 0 && c < prm.K) {
        const float pg = psm[r * prm.K + c], thr = prm.gate_threshold[s];
        fires = prm.gate_above[s] ? (pg > thr) : (pg < thr);
      }
      if (fires && prm.fired != nullptr) prm.fired[s] = 1;
      apply = fires || (prm.latch != nullptr && prm.latch[s] != 0);
    }
  }
  rslot[r] = apply ? s : 0;
  if (r < rows) prm.norms[(t0 + r) * prm.norms_stride] = sqrtf(ss_pre[r]);
}

// psm[r][k] <- dq = clamp(p + shift[s][k], lo[s][k], hi[s][k]) - p for steered rows (s =
// rslot[r] != 0), 0 for the others.  Each entry is read and written by the same thread.
// Callers sync before (psm, rslot) and after.
template <int R>
__device__ __forceinline__ void compute_dq(const Params& prm, float* psm, const int* rslot) {
  const int64_t K = prm.K;
  for (int64_t idx = threadIdx.x; idx < R * K; idx += blockDim.x) {
    const int r = static_cast<int>(idx / K);
    const int s = rslot[r];
    float dq = 0.f;
    if (s != 0) {
      const int64_t tk = static_cast<int64_t>(s) * K + (idx - r * K);
      const float p = psm[idx], l = prm.lo[tk], u = prm.hi[tk];
      float q = p + prm.shift[tk];
      q = q < l ? l : q;  // NaN-propagating clamp: a NaN q fails both tests
      q = q > u ? u : q;
      dq = q - p;
    }
    psm[idx] = dq;
  }
}

// ----------------------------------------------------------------------------- kernels
// Register kernel: one block per R consecutive rows [t0, t0 + R), every access a 16-byte
// vector (the launcher checked alignment).  blockDim.x: a multiple of 32, <= 512, with
// blockDim.x * NV * VEC >= d.  Dynamic shared memory: psm fp32 [R][K] (p, then dq).
// project == false: p is read back from scores (written by project_kernel) instead.
template <typename T, typename VT, int NV, int R>
__global__ void __launch_bounds__(kMaxThreads, 1) rows_kernel(const Params prm, const bool project) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int G = kGroup / R;  // concepts per projection group
  static_assert(G * R == kGroup, "R must divide 16");
  extern __shared__ float psm[];                    // [R][K]
  __shared__ float red[2][kMaxWarps][kGroup];       // projection partials, double-buffered
  __shared__ float wsum[2][kMaxWarps][R];           // sum-of-squares partials (pre / post)
  __shared__ float tot[2][R];                       // sums of squares (pre / post update)
  __shared__ int rslot[R];                          // slot applied to row r (0 = none)

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t d = prm.d, K = prm.K;
  const int64_t nvec = d / VEC;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * R;
  const int rows = prm.T - t0 < R ? static_cast<int>(prm.T - t0) : R;
  T* const res = static_cast<T*>(prm.residual);
  const T* const xin = static_cast<const T*>(prm.x);
  const VT* const V = static_cast<const VT*>(prm.V);

  // Phase 1: h = rne(residual + x), stored; sum of squares of the stored values.
  float h[R][NV][VEC];
  float ss[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    ss[r] = 0.f;
    T* const rrow = res + (t0 + r) * prm.residual_stride;
    const T* const xrow = xin != nullptr ? xin + (t0 + r) * prm.x_stride : nullptr;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
      if (r < rows && vi < nvec) {
        load_h<VEC, true>(rrow, xrow, vi, h[r][i]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) h[r][i][e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss[r] = fmaf(h[r][i][e], h[r][i][e], ss[r]);
    }
  }
  block_sum_rows<R>(ss, wsum[0], tot[0]);

  // Phase 2: p [R][K] into psm (and scores), or read back from scores.
  if (project) {
    int buf = 0;
    for (int64_t k0 = 0; k0 < K; k0 += G, buf ^= 1) {
      float acc[kGroup];
#pragma unroll
      for (int n = 0; n < kGroup; ++n) acc[n] = 0.f;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (k0 + g < K) {
          const VT* const vrow = V + (k0 + g) * d;
#pragma unroll
          for (int i = 0; i < NV; ++i) {
            const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
            if (vi < nvec) {
              float v[VEC];
              load_slot<VEC, true>(vrow, vi, v);
#pragma unroll
              for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int e = 0; e < VEC; ++e)
                  acc[r * G + g] = fmaf(v[e], h[r][i][e], acc[r * G + g]);
              }
            }
          }
        }
      }
      finish_group<G>(acc, red[buf], k0, prm, psm, t0, rows);
    }
  } else {
    for (int64_t idx = tid; idx < R * K; idx += nthreads) {
      const int64_t r = idx / K, k = idx - r * K;
      psm[idx] = r < rows ? prm.scores[(t0 + r) * prm.scores_s0 + k * prm.scores_s1] : 0.f;
    }
  }
  __syncthreads();

  // Phase 3: norms, slots, gates.
  decide_rows<R>(prm, psm, tot[0], t0, rows, rslot);
  __syncthreads();

  // Phase 4: the update, only when some row of the block is steered (block-uniform test).
  bool applied[R];
  bool any = false;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    applied[r] = rslot[r] != 0;
    any = any || applied[r];
  }
  if (any) {
    compute_dq<R>(prm, psm, rslot);
    __syncthreads();
    for (int64_t k = 0; k < K; ++k) {
      float dk[R];
      bool nz = false;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        dk[r] = applied[r] ? psm[r * K + k] : 0.f;
        nz = nz || dk[r] != 0.f;  // NaN != 0: a NaN dq is applied (and poisons the row)
      }
      if (!nz) continue;  // block-uniform: every thread reads the same psm entries
      const VT* const vrow = V + k * d;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
        if (vi < nvec) {
          float v[VEC];
          load_slot<VEC, true>(vrow, vi, v);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (applied[r]) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) h[r][i][e] = fmaf(dk[r], v[e], h[r][i][e]);
            }
          }
        }
      }
    }
    float ss2[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      ss2[r] = 0.f;
      if (applied[r]) {
        T* const rrow = res + (t0 + r) * prm.residual_stride;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
          if (vi < nvec) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              h[r][i][e] = to_f32(from_f32<T>(h[r][i][e]));  // the stored value
              ss2[r] = fmaf(h[r][i][e], h[r][i][e], ss2[r]);
            }
            store_slot<VEC>(rrow, vi, h[r][i]);
          }
        }
      }
    }
    block_sum_rows<R>(ss2, wsum[1], tot[1]);
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (applied[r]) ss[r] = ss2[r];
  }

  // Phase 5: fused RMSNorm of the stored h.
  if (prm.out != nullptr) {
    T* const outp = static_cast<T*>(prm.out);
    const float inv_d = 1.f / static_cast<float>(d);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {
        const float inv = rsqrtf(ss[r] * inv_d + prm.eps);
        T* const orow = outp + (t0 + r) * prm.out_stride;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
          if (vi < nvec) {
            float w[VEC], o[VEC];
            if (prm.weight_f32)
              load_slot<VEC, true>(static_cast<const float*>(prm.weight), vi, w);
            else
              load_slot<VEC, true>(static_cast<const T*>(prm.weight), vi, w);
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[e] = h[r][i][e] * inv * w[e];
            store_slot<VEC>(orow, vi, o);
          }
        }
      }
    }
  }
}

// Fallback kernel for rows the register kernel cannot take (d not a multiple of VEC, a
// pointer or row stride not 16-byte aligned, or d above 512 * 4 * VEC): one block per row,
// element-wise (coalesced scalar) accesses, h kept in shared memory.  Same phases and the
// same arithmetic as rows_kernel<R = 1> (same rounding points, concepts added in ascending
// order), so the two agree to fp32 reassociation of the dot products.  Dynamic shared
// memory: psm fp32 [K], then hs fp32 [d].
template <typename T, typename VT>
__global__ void __launch_bounds__(kMaxThreads, 1) rows_smem_kernel(const Params prm) {
  extern __shared__ float psm[];                    // [K], then hs [d]
  __shared__ float red[2][kMaxWarps][kGroup];
  __shared__ float wsum[2][kMaxWarps][1];
  __shared__ float tot[2][1];
  __shared__ int rslot[1];

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t d = prm.d, K = prm.K, t = blockIdx.x;
  float* const hs = psm + K;
  T* const rrow = static_cast<T*>(prm.residual) + t * prm.residual_stride;
  const T* const xrow = prm.x != nullptr ? static_cast<const T*>(prm.x) + t * prm.x_stride : nullptr;
  const VT* const V = static_cast<const VT*>(prm.V);

  float ss[1] = {0.f};
  for (int64_t j = tid; j < d; j += nthreads) {
    float v = to_f32(rrow[j]);
    if (xrow != nullptr) {
      const T r = from_f32<T>(v + to_f32(__ldg(xrow + j)));
      rrow[j] = r;
      v = to_f32(r);
    }
    hs[j] = v;  // read back only by this thread
    ss[0] = fmaf(v, v, ss[0]);
  }
  block_sum_rows<1>(ss, wsum[0], tot[0]);

  int buf = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kGroup, buf ^= 1) {
    float acc[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) acc[g] = 0.f;
    for (int64_t j = tid; j < d; j += nthreads) {
      const float hj = hs[j];
#pragma unroll
      for (int g = 0; g < kGroup; ++g)
        if (k0 + g < K) acc[g] = fmaf(to_f32(__ldg(V + (k0 + g) * d + j)), hj, acc[g]);
    }
    finish_group<kGroup>(acc, red[buf], k0, prm, psm, t, 1);
  }
  __syncthreads();

  decide_rows<1>(prm, psm, tot[0], t, 1, rslot);
  __syncthreads();

  if (rslot[0] != 0) {
    compute_dq<1>(prm, psm, rslot);
    __syncthreads();
    float ss2[1] = {0.f};
    for (int64_t j = tid; j < d; j += nthreads) {
      float v = hs[j];
      for (int64_t k = 0; k < K; ++k) {
        const float dk = psm[k];
        if (dk != 0.f) v = fmaf(dk, to_f32(__ldg(V + k * d + j)), v);
      }
      const T r = from_f32<T>(v);
      rrow[j] = r;
      v = to_f32(r);
      hs[j] = v;
      ss2[0] = fmaf(v, v, ss2[0]);
    }
    block_sum_rows<1>(ss2, wsum[1], tot[1]);
    ss[0] = ss2[0];
  }

  if (prm.out != nullptr) {
    T* const orow = static_cast<T*>(prm.out) + t * prm.out_stride;
    const float inv = rsqrtf(ss[0] * (1.f / static_cast<float>(d)) + prm.eps);
    for (int64_t j = tid; j < d; j += nthreads) {
      const float w = prm.weight_f32 ? __ldg(static_cast<const float*>(prm.weight) + j)
                                     : to_f32(__ldg(static_cast<const T*>(prm.weight) + j));
      orow[j] = from_f32<T>(hs[j] * inv * w);
    }
  }
}

// Decode helper of the split path (aligned rows only).  Block (kb, tb) = concepts
// [8 kb, 8 kb + 8) x rows [4 tb, 4 tb + 4); blockDim.x: a multiple of 32, <= 256.  Writes
// scores[t, k] = sum_j V[k, j] * rne(residual[t, j] + x[t, j]) for its tile, over all of d
// (threads stride over the slots; 32 partial dot products per thread; one 32-value
// reduce-scatter per warp).  Stores nothing else: the rows_kernel that follows adds and
// stores the same h.
template <typename T, typename VT>
__global__ void __launch_bounds__(kProjThreads, 1) project_kernel(const Params prm) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int TB = kProjRows, KB = kProjConcepts, N = TB * KB;
  static_assert(N == 32, "one value per lane after the reduce-scatter");
  __shared__ float red[kProjThreads / 32][N];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nthreads = blockDim.x, nwarps = nthreads >> 5;
  const int64_t d = prm.d, K = prm.K;
  const int64_t nvec = d / VEC;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * KB;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * TB;
  const int rows = prm.T - t0 < TB ? static_cast<int>(prm.T - t0) : TB;
  const int nk = K - k0 < KB ? static_cast<int>(K - k0) : KB;
  T* const res = static_cast<T*>(prm.residual);
  const T* const xin = static_cast<const T*>(prm.x);
  const VT* const V = static_cast<const VT*>(prm.V);

  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.f;
  for (int64_t vi = tid; vi < nvec; vi += nthreads) {
    float h[TB][VEC];
#pragma unroll
    for (int r = 0; r < TB; ++r) {
      if (r < rows) {
        load_h<VEC, false>(res + (t0 + r) * prm.residual_stride,
                           xin != nullptr ? xin + (t0 + r) * prm.x_stride : nullptr, vi, h[r]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) h[r][e] = 0.f;
      }
    }
#pragma unroll
    for (int g = 0; g < KB; ++g) {
      if (g < nk) {
        float v[VEC];
        load_slot<VEC, true>(V + (k0 + g) * d, vi, v);
#pragma unroll
        for (int r = 0; r < TB; ++r) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r * KB + g] = fmaf(v[e], h[r][e], acc[r * KB + g]);
        }
      }
    }
  }
  const float s = warp_reduce_scatter<N>(acc, lane);  // value `lane`
  red[warp][lane] = s;
  __syncthreads();
  if (warp == 0) {
    float sum = 0.f;
    for (int w = 0; w < nwarps; ++w) sum += red[w][lane];
    const int r = lane / KB, g = lane % KB;
    if (r < rows && g < nk) prm.scores[(t0 + r) * prm.scores_s0 + (k0 + g) * prm.scores_s1] = sum;
  }
}

// latch[s] = 1 where fired[s] != 0 (else unchanged): the reference's index_fill_, run after
// every decision of the call has been taken.  One thread per slot.
__global__ void latch_merge_kernel(int32_t* latch, const int32_t* fired, int64_t P) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < P && fired[s] != 0) latch[s] = 1;
}

// ----------------------------------------------------------------------------- host side
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

int elem_size(Dtype dt) { return dt == Dtype::f32 ? 4 : 2; }

// Every row / table access of the call can be a 16-byte vector.
bool vector_ok(const Params& p, int vec) {
  bool ok = p.d % vec == 0 && aligned16(p.residual) && p.residual_stride % vec == 0 &&
            aligned16(p.V);
  if (p.x != nullptr) ok = ok && aligned16(p.x) && p.x_stride % vec == 0;
  if (p.out != nullptr)
    ok = ok && aligned16(p.out) && p.out_stride % vec == 0 && aligned16(p.weight);
  return ok;
}

int64_t dyn_smem_limit(const DeviceInfo& dev) {
  return static_cast<int64_t>(dev.max_smem_optin) - kStaticSmemReserve;
}

int round_threads(int64_t n, int cap) {
  if (n >= cap) return cap;
  return n <= 32 ? 32 : static_cast<int>((n + 31) / 32 * 32);
}

struct Plan {
  Path path = Path::row;
  bool regs = false;  // register kernel (else rows_smem_kernel)
  int nv = 1;         // slots per thread (register kernel)
  int rows = 1;       // rows per block (register kernel)
  int threads = 32;   // block size
  size_t smem = 0;    // dynamic shared memory, bytes
};

Plan make_plan(const Params& p, Path requested, const DeviceInfo& dev) {
  Plan pl;
  const int vec = 16 / elem_size(p.dtype);
  const int64_t nvec = p.d / vec;
  while (pl.nv < kMaxNV && (nvec + pl.nv - 1) / pl.nv > kMaxThreads) pl.nv *= 2;
  pl.regs = vector_ok(p, vec) && (nvec + pl.nv - 1) / pl.nv <= kMaxThreads &&
            p.K * 4 <= dyn_smem_limit(dev);
  if (!pl.regs) {  // fallback: one row per block, one element per thread and step
    pl.path = Path::row;
    pl.threads = round_threads(p.d, kMaxThreads);
    pl.smem = static_cast<size_t>(p.K + p.d) * sizeof(float);
    return pl;
  }
  pl.threads = round_threads((nvec + pl.nv - 1) / pl.nv, kMaxThreads);
  pl.path = requested;
  if (pl.path == Path::automatic)
    pl.path = (p.T <= kSplitMaxT && p.K >= kSplitMinK) ? Path::split : Path::row;
  // split needs concepts to project (a grid of ceil(K / 8) blocks) and T within grid.y
  if (pl.path == Path::split && (p.K == 0 || p.T > kSplitHardMaxT)) pl.path = Path::row;
  if (pl.path == Path::row) {
    // Rows per block: enough blocks for two per SM; h stays within 32 floats per thread.
    const int64_t blocks = 2LL * dev.num_sms;
    if (pl.nv == 1 && p.T >= 4 * blocks) pl.rows = 4;
    else if (pl.nv == 2 && p.T >= 2 * blocks) pl.rows = 2;
    while (pl.rows > 1 && pl.rows * p.K * 4 > dyn_smem_limit(dev)) pl.rows /= 2;
    if (pl.rows == 2 && pl.nv != 2) pl.rows = 1;  // (NV, R) = (1, 2) is not instantiated
  }
  pl.smem = static_cast<size_t>(pl.rows) * static_cast<size_t>(p.K) * sizeof(float);
  return pl;
}

cudaError_t set_smem(const void* fn, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

using RowsFn = void (*)(const Params, const bool);

// Instantiated (NV, R): (1, 1), (2, 1), (4, 1), (1, 4), (2, 2).
template <typename T, typename VT>
RowsFn rows_fn(int nv, int rows) {
  if (rows == 4) return &rows_kernel<T, VT, 1, 4>;
  if (rows == 2) return &rows_kernel<T, VT, 2, 2>;
  if (nv == 1) return &rows_kernel<T, VT, 1, 1>;
  if (nv == 2) return &rows_kernel<T, VT, 2, 1>;
  return &rows_kernel<T, VT, 4, 1>;
}

template <typename T, typename VT>
cudaError_t launch_typed(const Params& p, const Plan& pl, cudaStream_t stream) {
  cudaError_t e;
  if (!pl.regs) {
    e = set_smem(reinterpret_cast<const void*>(&rows_smem_kernel<T, VT>), pl.smem);
    if (e != cudaSuccess) return e;
    rows_smem_kernel<T, VT><<<static_cast<unsigned>(p.T), pl.threads, pl.smem, stream>>>(p);
    return cudaGetLastError();
  }
  const RowsFn fn = rows_fn<T, VT>(pl.nv, pl.rows);
  e = set_smem(reinterpret_cast<const void*>(fn), pl.smem);
  if (e != cudaSuccess) return e;
  bool project = true;
  if (pl.path == Path::split) {
    const int64_t nvec = p.d / (16 / static_cast<int>(sizeof(T)));
    const dim3 grid(static_cast<unsigned>((p.K + kProjConcepts - 1) / kProjConcepts),
                    static_cast<unsigned>((p.T + kProjRows - 1) / kProjRows));
    project_kernel<T, VT><<<grid, round_threads(nvec, kProjThreads), 0, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    project = false;
  }
  const unsigned blocks = static_cast<unsigned>((p.T + pl.rows - 1) / pl.rows);
  fn<<<blocks, pl.threads, pl.smem, stream>>>(p, project);
  return cudaGetLastError();
}

}  // namespace

const char* unsupported(const Params& p, const DeviceInfo& dev) {
  const Plan pl = make_plan(p, Path::automatic, dev);
  if (static_cast<int64_t>(pl.smem) > dyn_smem_limit(dev))
    return pl.regs ? "K fp32 projections exceed the shared memory of one block"
                   : "this row layout takes the shared-memory kernel, and K + d fp32 values "
                     "exceed the shared memory of one block";
  return nullptr;
}

Path choose_path(const Params& p, const DeviceInfo& dev, int* rows_per_block) {
  const Plan pl = make_plan(p, Path::automatic, dev);
  if (rows_per_block != nullptr) *rows_per_block = pl.regs ? pl.rows : 0;
  return pl.path;
}

cudaError_t launch(const Params& p, Path path, const DeviceInfo& dev, cudaStream_t stream) {
  if (p.T <= 0) return cudaSuccess;
  const Plan pl = make_plan(p, path, dev);
  cudaError_t e = cudaSuccess;
  if (p.fired != nullptr) {
    e = cudaMemsetAsync(p.fired, 0, static_cast<size_t>(p.P) * sizeof(int32_t), stream);
    if (e != cudaSuccess) return e;
  }
  switch (p.dtype) {
    case Dtype::f32: e = launch_typed<float, float>(p, pl, stream); break;
    case Dtype::bf16:
      e = p.v_f32 ? launch_typed<__nv_bfloat16, float>(p, pl, stream)
                  : launch_typed<__nv_bfloat16, __nv_bfloat16>(p, pl, stream);
      break;
    case Dtype::f16:
      e = p.v_f32 ? launch_typed<__half, float>(p, pl, stream)
                  : launch_typed<__half, __half>(p, pl, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  if (e != cudaSuccess || p.fired == nullptr) return e;
  latch_merge_kernel<<<static_cast<unsigned>((p.P + 255) / 256), 256, 0, stream>>>(
      p.latch, p.fired, p.P);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace steerkernel
