// steerkernel: CUDA kernels of the fused junction op (docs/design.md §2).  Torch-free (CUDA
// headers only): the torch op in cuda_ops.cpp validates the tensors and packs them into the
// shared `JunctionParams` (check_and_pack, junction_params.h), then calls `launch` below.
// Oracle: steerkernel/ops/reference.py.
//
// ============================================================================== numerics
// All arithmetic fp32, every rounding round-to-nearest-even.  The added row h = rne(residual +
// x) is stored exactly as torch's `residual + x` (fp32 add, one __float2bfloat16_rn /
// __float2half_rn rounding), so rows that are not steered are bit-identical to it; the update,
// the norm and the RMSNorm read the stored value.  Norm and RMSNorm scale use correctly rounded
// __fsqrt_rn / __fdiv_rn (no rsqrtf, no approximate division).  Without V (K == 0) the
// projection loops are empty: a plain add + RMSNorm.
//
// Batch invariance (docs/design.md §2: a row's results never depend on the other rows of the
// call, nor on the launch configuration chosen from T).  Every kernel computes a row's
// reductions with ONE formulation, a function of d and the residual dtype only:
//   layout   a row is cut into slots of VEC = 16 / sizeof(T) elements (8 bf16/fp16, 4 fp32);
//            NV = the smallest power of 2 with ceil(nslots / NV) <= 512, threads =
//            round_up(ceil(nslots / NV), 32); thread j owns slots j + i * threads, i < NV.
//   p[t][k]  per thread: acc = 0, then acc = fmaf(V[k][j], h[t][j], acc) over its slots i
//            ascending and their elements ascending; then the warp xor-butterfly (lane bits
//            4, 3, 2, 1, 0; warp_reduce_scatter gives the same bits for any N: checked
//            against warp_sum in a float32 simulation); then warps summed in order from 0.f.
//   ||h||^2  the same with fmaf(h, h, acc) (before and, for changed rows, after the update).
//   update   per element: h = fmaf(dq_k, V[k][j], h) over the concepts with dq_k != 0 *for
//            this row*, ascending k; one rounding to T at the end.
// rows_kernel for any R, project_kernel (split path) and rows_smem_kernel (fallback, scalar
// accesses, same layout and chains) all follow it, so the scores, norms, gate decisions,
// residual and out of a row are the same bits on every path; T (and alignment) only choose
// the path.  This is also why the projection stays on CUDA cores: see "Tensor cores" below.
//
// Aliasing: x may *be* the residual and out may *be* x (the only sharing the public op
// allows).  So no __ldg / ld.global.nc anywhere (the non-coherent path is undefined for data
// the kernel writes); each element is read and written by the one thread that owns its slot,
// and a row's stores come after all of its loads.
//
// ============================================================================== kernels
//   rows_kernel<T, VT, NV, R>     the register kernel: one block per R consecutive rows, all
//       phases; h lives in registers (float h[R][NV][VEC]) from the add to the RMSNorm, so
//       residual and x are read once and residual and out written at most once (an unchanged
//       row without x is not written).  Needs d % VEC == 0, 16-byte aligned base pointers and
//       row strides, NV <= 4 (d <= 16384 bf16/fp16, 8192 fp32).  R * NV * VEC fp32 of h per
//       thread: <= 64 with NV = 1 (R = 8 for bf16/fp16, d <= 4096), else <= 32 (see
//       rows_fn for the instantiated (NV, R)).  aux.have_p: p is read back from scores (the
//       split path) instead of projected.
//   project_kernel<T, VT, NV, R>  split-path projection: block (tb, kb) = R rows x 4 concepts
//       over all of d, writes scores only (same load / project / reduce code as rows_kernel).
//   rows_smem_kernel<T, VT>       fallback for every other layout (odd d, unaligned views,
//       larger d): one block per row, element accesses, h in shared memory fp32 [d].
// Phases of a block: (1) issue all 2 * R * NV 16-byte row loads (residual, x), add, round,
// ||h||^2 (loads issued 4 rows at a time at R = 8); (2) projection, groups of G = 16 / R
// concepts: V loads batched (<= 8 16-byte words per thread in flight, 4 when h takes 64
// registers or NV = 4), R * G = 16 partial sums per thread, one 16-value warp reduce-scatter
// (16 shuffles instead of 5 per value) and one barrier per group (double-buffered partials);
// (3) norms, slots, gates (threads < R), the latch ticket; (4) only for steered blocks: dq,
// warp-0 compaction of the concepts with a nonzero dq, update unrolled over batches of up to
// 8 V words per thread (loads issued together); stores; (5) RMSNorm: weight loaded once for
// the R rows, 16-byte stores.  SASS (cuobjdump -sass, sm_90): phase 1 is 2 * min(R, 4) * NV
// back-to-back LDG.E.128 before the first use, V batches 4-8 LDG.E.128, stores STG.E.128.
//
// ============================================================================== kernel choice
// (make_plan; mirror it in a shape-aware dispatcher; `steerkernel._C_cuda.plan()` reports it)
//   layout        as above from d and dtype.
//   smem kernel   unless d % VEC == 0, NV <= 4, and residual, x, out, V, weight are 16-byte
//                 aligned with row strides multiples of VEC.  One row per block.
//   Rmax          rows_kernel: 8 if NV = 1, else 32 / (NV * VEC) (bf16/fp16: NV 2 -> 2, 4 -> 1;
//                 fp32: 2 -> 4, 4 -> 2).  Rp_max (project_kernel) = min(Rmax, 4).
//   R (fused)     Rmax, halved while ceil(T / R) < #SMs, then while (R + 1) * K fp32 exceed
//                 the shared memory of a block.
//   split         K >= 32 and R < Rp_max (few rows: T < 4 #SMs for d <= 4096 bf16), i.e.
//                 when the fused kernel would stream V from L2 more often than the projection
//                 kernel, its few blocks each pulling all of V through one SM.  project_kernel
//                 grid (ceil(T / Rp), ceil(K / 4)), Rp = Rp_max halved while the grid has
//                 < 2 #SMs blocks; then rows_kernel<R = 1> (T blocks).  Two launches.
//   fused         otherwise: rows_kernel<R>, ceil(T / R) blocks.  One launch.
//   Path::row / Path::split (STEERKERNEL_CUDA_PATH, set_path) force fused / split where the
//   register kernels apply.  Results are the same bits on every path.
//
// ============================================================================== latch
// Folded into the kernel that decides (no memset, no merge launch): a firing gate sets the
// slot's bit in a per-device scratch that is zero at rest (`__device__` module memory,
// allocated and zeroed by the driver at module load: nothing to allocate, also under graph
// capture; 4 lanes picked by a hash of the stream, so calls on different streams rarely
// share one); every block takes a ticket with a release atomic after its decisions; the block
// with the last ticket merges the bits into latch (latch[s] = 1) and re-zeroes bits and
// counter.  Decisions read the latch as of call start (no block writes it before every block
// has decided); deterministic (the result is a set); CUDA-graph capturable.  P > 65536 slots:
// the caller passes a scratch buffer that launch() zeroes (cudaMemsetAsync).  Not supported:
// two latched calls *running concurrently* on one device whose streams hash to the same lane.
//
// ============================================================================== performance
// Registers (ptxas -v, sm_90, printed by tests/test_cuda_compile.py; 74 kernels per arch):
// rows_kernel 72-128, project_kernel 32-114, rows_smem_kernel 78-128; no spills, no stack
// frame, on sm_80 and sm_90.
// Block = layout threads: 512 for d = 4096 bf16/fp16 (NV = 1) and fp32 (NV = 2).  With > 64
// registers that is 1 block (16 warps, 25 % occupancy) per SM for rows_kernel; capping at 64
// registers (2 blocks / SM) spills in most variants (25 of 30 when tried), so the MLP comes
// from inside the block instead.  Bytes in flight per SM (d = 4096 bf16): phase 1 = 512
// threads x 2 x min(R, 4) x 16 B = 64 KB at R >= 4 (16 KB at R = 1, decode), projection
// 512 x 4..8 x 16 B = 32-64 KB, the update the same; Little's law needs ~20-25 KB per SM for
// HBM (3.35 TB/s x ~0.8 us / 132).
// What one block/SM costs: a block's phases do not overlap each other, so HBM idles on an SM
// while its block projects (see the K = 16 estimate).
//
// Per row (d = 4096, bf16, x, out): 32 KB of HBM traffic (read residual, x; write residual,
// out); projection 2 K d FLOP = 1.4 MFLOP at K = 171 (as K d = 0.70 M FMA); update 2 nnz d
// FLOP (nnz = concepts with dq != 0, usually 1); V = K d x 4 B = 2.8 MB (fp32 V; 1.4 MB bf16)
// read from L2 once per block, i.e. once per R rows.  Predictions (H100 SXM: 132 SMs, ~3.0
// TB/s copy, L2 ~5.5 TB/s, 128 FMA / clk / SM at 1.755 GHz = 29.7 T FMA/s; not measured):
//   prefill T = 8192, K = 171, fp32 V, fused R = 8: floor 271 MB / 3.0 TB/s = 90 us.  L2: 1024
//     blocks x 2.8 MB = 2.9 GB -> ~0.52 ms; FMA 5.7 G FMA / (29.7 T x ~0.55 issue efficiency:
//     128 FMA per group against ~100 instructions of reduce-scatter, barrier, loads) -> ~0.35
//     ms.  L2-bound: ~15-17 % of the floor (was ~9 % at R = 4).  bf16 V: L2 ~0.26 ms, then
//     FMA-bound at ~0.35-0.4 ms: ~22-25 %.
//   prefill T = 8192, K = 16, fp32 V: HBM 90 us, L2 1024 x 256 KB = 0.27 GB -> ~49 us, FMA
//     ~33 us; overlapped across SMs but not within one -> ~70-85 % (bf16 V ~80-90 %).
//   prefill K = 0 (add + RMSNorm): HBM only, 64 KB in flight per SM -> ~85-90 %.
//   decode T = 1, K = 171, fp32 V (split): project_kernel 43 blocks x 64 KB of V (~1 us at
//     ~64 KB in flight per SM) + rows_kernel (~2 us, latency-bound) + 2 launches; floor 2.8
//     MB -> ~0.95 us: ~25 %.  V traffic per call is the floor itself: bf16 V halves it.
// So the ≥ 85 % prefill target at K = 171 is out of reach of any CUDA-core formulation: even
// with V read once per call the 0.70 M FMA per row cost ~195 us at 100 % FMA issue (~45 % of
// the floor).  It needs tensor cores, below.
//
// ============================================================================== tensor cores
// NOT BUILT (designed only): a wrong kernel that nobody could run here is worse than a slow
// correct one.  Two facts shape it.  (1) Batch invariance: an MMA sums in a hardware-defined
// order, so the projection formulation must change on EVERY path at once (decode included),
// or a row's scores would change bits when T crosses the prefill threshold.  (2) The update
// stays as it is (CUDA cores, sparse dq, the same fmaf chain), so only p changes.
// Formulation M (replacing "p[t][k]" above):
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (sm_80+), A = a V tile (16 concepts
//   x 16 of d), B = a tile of h^T (16 of d x 8 rows), fp32 accumulator; lane g = lane / 4,
//   q = lane % 4: a0 = V[m+g][c+2q, +1], a1 = V[m+g+8][c+2q, +1], a2 = V[m+g][c+2q+8, +9],
//   a3 = V[m+g+8][c+2q+8, +9]; b0 = h[n+g][c+2q, +1], b1 = h[n+g][c+2q+8, +9]; d0, d1 =
//   p[n+2q, +1][m+g], d2, d3 = p[n+2q, +1][m+g+8] (rows n.., concepts m..).  Same orientation
//   on every path.  d is cut into S = 8 fixed segments of whole 16-chunks (a function of d
//   only; zero padding); per segment one MMA chain from 0 over its chunks ascending; p =
//   ((P0 + P1) + ...) + P7 in fp32 adds.  Decode parallelism: S x ceil(K / 16) warps per
//   8-row tile; prefill keeps segment partials and totals (2 x 4 registers per 16 x 8 tile).
//   Operands in bf16 pieces, exact or near-exact, the small products first in each chunk:
//   bf16 h exact; fp16 h = hi + lo exactly (lo has <= 3 significant bits); fp32 h and fp32 V
//   3-way (hi, mid, lo: 24 bits; a 2-way bf16 split leaves ~2^-16 relative per element, i.e.
//   ~9e-6 on a unit-direction score at d = 4096: over 10^6 scores its 5-sigma tail exceeds
//   the 2e-5 score tolerance); bf16 h x fp32 V = 3 MMAs per chunk; inf / NaN stay in hi
//   (lo = 0), as in the Triton tile kernel.  To verify on hardware: that an MMA's output
//   element does not depend on the other rows of its tile (tests/test_batch_invariance.py
//   puts the probe row at several positions).
// Prefill data flow for ≥ 85 %: each row must be read once, so a CTA keeps its rows whole in
// shared memory (BM x d x 2 B <= ~200 KB: BM = 16 at d = 4096), and V must then reach the
// CTA from L2 once per 16 rows (2.8 MB x T / 16 = 1.4 GB at T = 8192: ~260 us, ✗) unless a
// cluster of 8 CTAs shares each V tile by TMA multicast (sm_90 only; 180 MB -> ~33 us, hidden
// under the 90 us of HBM).  Tensor work: 3 x 2 T K d = 34 GFLOP (bf16 h x fp32 V) -> ~55-70
// us of mma.sync on an H100, concurrent with the memory stream: feasible but tight on an H200
// (floor ~63 us): bf16 V (1 MMA per chunk) makes it comfortable.  A multi-pass tile kernel
// (re-reading rows from L2, as the Triton tile kernel does) is capped by its extra traffic.
// Routing prefill to another backend (e.g. the Triton tile kernel) by T breaks batch
// invariance the same way: the two backends' scores differ in the last bits.
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
constexpr int kMaxThreads = 512;          // block size limit of every kernel
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kGroup = 16;                // values per reduce-scatter in rows_kernel (R * G)
constexpr int kProjG = 4;                 // concepts per project_kernel block
constexpr int kMaxNV = 4;                 // slots per thread of the register kernels
constexpr int kBatchWords = 8;            // 16-byte V loads in flight per thread and batch
constexpr int kStaticSmemReserve = 4096;  // bytes of static shared memory (upper bound)

// Path threshold (tunable from benchmarks/gpu_check.py numbers): the split path needs many
// concepts to pay for its second launch.
constexpr int64_t kSplitMinK = 32;

// ----------------------------------------------------------------------------- latch scratch
// Per-device latch scratch, zero at rest: word 0 is the ticket counter, words 1 .. hold one
// "fired" bit per slot.  Module globals are allocated and zeroed by the driver when the module
// loads on a device, so there is nothing to allocate (or to do during graph capture).  Calls
// on streams that may run concurrently should not share one scratch: the launcher picks one
// of kLatchLanes by a hash of the stream (see launch()).
constexpr int kLatchLanes = 4;
constexpr int64_t kLatchSlots = 65536;
constexpr int64_t kLatchWords = 1 + kLatchSlots / 32;
__device__ uint32_t g_latch_scratch[kLatchLanes][kLatchWords];

// Per-launch extras that are not part of the op's arguments.
struct Aux {
  uint32_t* scratch = nullptr;  // latch scratch (ticket, fired bits); null: g_latch_scratch[lane]
  int lane = 0;
  bool have_p = false;          // rows_kernel: p is already in `scores` (split path)
};

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

// v rounded to nearest-even in S and widened back: the value a store of v to S keeps.
template <typename S>
__device__ __forceinline__ float rne(float v) {
  return to_f32(from_f32<S>(v));
}

// N elements of S in one or two aligned 16-byte words.
template <typename S, int N>
struct alignas(16) Vec {
  S v[N];
};

// The raw 16-byte words of one slot (VEC elements of S): 1 word, or 2 for an fp32 V / weight
// slot next to a 16-bit residual (VEC = 8).
template <typename S, int VEC>
struct Words {
  static constexpr int n = VEC * static_cast<int>(sizeof(S)) / 16;
  static_assert(n * 16 == VEC * static_cast<int>(sizeof(S)), "a slot is whole 16-byte words");
  uint4 w[n];
};

// Plain (coherent) 16-byte loads: no __ldg anywhere.  x may *be* the residual and out may *be*
// x, both written by this kernel, so the non-coherent path is undefined for them; V, weight
// and the tables are never written, but the raw op does not check their aliasing either.
template <typename S, int VEC>
__device__ __forceinline__ void ld_words(const S* p, Words<S, VEC>& out) {
  const uint4* src = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int b = 0; b < Words<S, VEC>::n; ++b) out.w[b] = src[b];
}

template <typename S, int VEC>
__device__ __forceinline__ void zero_words(Words<S, VEC>& out) {
#pragma unroll
  for (int b = 0; b < Words<S, VEC>::n; ++b) out.w[b] = make_uint4(0u, 0u, 0u, 0u);
}

template <typename S, int VEC>
__device__ __forceinline__ void to_floats(const Words<S, VEC>& in, float (&f)[VEC]) {
  Vec<S, VEC> v;
  memcpy(&v, in.w, sizeof(v));
#pragma unroll
  for (int e = 0; e < VEC; ++e) f[e] = to_f32(v.v[e]);
}

// Round VEC fp32 values to S and store them as one 16-byte word.
template <typename S, int VEC>
__device__ __forceinline__ void st_slot(S* p, const float (&f)[VEC]) {
  static_assert(VEC * sizeof(S) == 16, "a row slot is one 16-byte word");
  Vec<S, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_f32<S>(f[e]);
  *reinterpret_cast<Vec<S, VEC>*>(p) = v;
}

// V slots per load batch: at most kBatchWords 16-byte words in flight per thread (half that
// with NV = 4, whose 4 slots per row already make up a batch: keeps sm_80 spill-free).
constexpr int batch_of(int n, int words_per_item, int nv) {
  const int b = (nv >= 4 ? kBatchWords / 2 : kBatchWords) / words_per_item;
  return b < 1 ? 1 : (b > n ? n : b);
}

// ----------------------------------------------------------------------------- reductions
// Warp reduce-scatter of N values per lane (N a power of 2, <= 32).  Returns, on every lane,
// the sum over the warp of value number lane / (32 / N).  log2(N) halving stages (lanes l and
// l ^ off swap halves: the lane with `off` set keeps the upper half) then log2(32 / N) plain
// butterfly stages: N - 1 + log2(32 / N) shuffles in all.  Clobbers v.
//
// Batch invariance: whatever N and whichever value, the sum is the same tree over the 32 lane
// partials (pairs differing in lane bit 4, then bit 3, ..., then bit 0; each add a + b with the
// two lanes' copies equal because fp32 addition is commutative), so every N gives the same
// bits as a plain xor butterfly (warp_sum).
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Sum of R values over the block (the warp tree, then warps 0, 1, ... in order from 0.f);
// every thread gets the R totals back in v.  wsum: [kMaxWarps][R], tot: [R] shared scratch not
// reused before the call returns.  Two __syncthreads: call under block-uniform control flow.
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

// ----------------------------------------------------------------------------- shared phases
// Phase 1 of the register kernels: h[r][i] = rne(residual + x) of slot tid + i * nthreads of
// row t0 + r (h = residual without x); zero for rows >= rows and slots >= nvec.  Every load of
// the block's rows is issued before any is used (x may alias the residual, so the compiler
// may not move a load across a store; there is none here: the stores come after the
// decisions).  Loads in flight per thread: R * NV residual words + as many x words.
template <typename T, int NV, int R>
__device__ __forceinline__ void load_rows(const Params& prm, int64_t t0, int rows, int64_t nvec,
                                          float (&h)[R][NV][16 / sizeof(T)]) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int RB = R < 4 ? R : 4;  // rows per load batch: <= 8 words in flight per thread
  static_assert(R % RB == 0, "R is 1, 2, 4 or 8");
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const T* const res = static_cast<const T*>(prm.residual);
  const T* const xin = static_cast<const T*>(prm.x);
#pragma unroll
  for (int r0 = 0; r0 < R; r0 += RB) {
    Words<T, VEC> rw[RB][NV];
    Words<T, VEC> xw[RB][NV];
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
      const int r = r0 + rb;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
        if (r < rows && vi < nvec)
          ld_words(res + (t0 + r) * prm.residual_stride + vi * VEC, rw[rb][i]);
        else
          zero_words(rw[rb][i]);
      }
    }
    if (xin != nullptr) {
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) {
        const int r = r0 + rb;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
          if (r < rows && vi < nvec)
            ld_words(xin + (t0 + r) * prm.x_stride + vi * VEC, xw[rb][i]);
          else
            zero_words(xw[rb][i]);
        }
      }
    }
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        float* const hv = h[r0 + rb][i];
        float rv[VEC];
        to_floats(rw[rb][i], rv);
        if (xin != nullptr) {
          float xv[VEC];
          to_floats(xw[rb][i], xv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) hv[e] = rne<T>(rv[e] + xv[e]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) hv[e] = rv[e];
        }
      }
    }
  }
}

// Partial dot products of this thread's slots of R rows with concepts k0 .. k0 + G - 1:
// acc[r * G + g] += sum over (i, e) ascending of V[k0 + g][slot i, e] * h[r][i][e], one fmaf
// chain per value, in the same order as rows_smem_kernel.  V loads are batched: B concepts x
// NV slots (<= kBatchWords 16-byte words) issued before their FMAs.
template <typename VT, int VEC, int NV, int R, int G>
__device__ __forceinline__ void project_group(const float (&h)[R][NV][VEC], const VT* V,
                                              int64_t d, int K, int k0, int64_t nvec,
                                              float (&acc)[R * G]) {
  using W = Words<VT, VEC>;
  constexpr int B = batch_of(G, NV * W::n, NV);
  const int tid = threadIdx.x, nthreads = blockDim.x;
#pragma unroll
  for (int gb = 0; gb < G; gb += B) {
    W v[B][NV];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int k = k0 + gb + b;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
        if (gb + b < G && k < K && vi < nvec)
          ld_words(V + static_cast<int64_t>(k) * d + vi * VEC, v[b][i]);
        else
          zero_words(v[b][i]);
      }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int g = gb + b;
      if (g < G && k0 + g < K) {
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
          if (vi < nvec) {
            float vf[VEC];
            to_floats(v[b][i], vf);
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
              for (int e = 0; e < VEC; ++e)
                acc[r * G + g] = fmaf(vf[e], h[r][i][e], acc[r * G + g]);
            }
          }
        }
      }
    }
  }
}

// Block sum of one projection group.  acc[n] (n = r * G + g) is this thread's partial dot
// product of row t0 + r with concept k0 + g; the totals go to psm[r * K + k0 + g] (when psm is
// given) and, for real rows, to scores.  red: [kMaxWarps][kGroup] shared; callers that loop
// over groups alternate two buffers (one __syncthreads here: the next group writes the other
// buffer, and this one is rewritten only after the next group's barrier, which the readers
// below reach only once they are done).
template <int N, int G>
__device__ __forceinline__ void finish_group(float (&acc)[N], float (*red)[kGroup], int k0,
                                             const Params& prm, float* psm, int64_t t0,
                                             int rows) {
  static_assert(N <= kGroup && N % G == 0, "N = R * G values, at most kGroup");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  constexpr int kLanesPerValue = 32 / N;
  const float s = warp_reduce_scatter<N>(acc, lane);  // value lane / kLanesPerValue
  if (lane % kLanesPerValue == 0) red[warp][lane / kLanesPerValue] = s;
  __syncthreads();
  if (tid < N) {
    float sum = 0.f;
    for (int w = 0; w < nwarps; ++w) sum += red[w][tid];
    const int r = tid / G;
    const int k = k0 + tid % G;
    if (k < prm.K) {
      if (psm != nullptr) psm[r * prm.K + k] = sum;
      if (r < rows) prm.scores[(t0 + r) * prm.scores_s0 + k * prm.scores_s1] = sum;
    }
  }
}

__device__ __forceinline__ uint32_t* latch_scratch(const Aux& aux) {
  return aux.scratch != nullptr ? aux.scratch : g_latch_scratch[aux.lane];
}

// Phase 3 for rows t0 .. t0 + R - 1 (threads 0 .. R-1): norms (sqrt of the pre-update sum of
// squares ss_pre[r]), slot (outside [0, P) -> 0) and gate -> rslot[r] = slot applied (0 = not
// steered), and rmark[r] = the slot whose latch this row's firing gate must set (0 = none; a
// slot whose latch is already 1 needs nothing).  Decisions read `latch` itself, which no block
// writes before every block has decided (see latch_take / latch_merge), i.e. as of call
// start.  psm: p [R][K].  Caller syncs after.
template <int R>
__device__ __forceinline__ void decide_rows(const Params& prm, const float* psm,
                                            const float* ss_pre, int64_t t0, int rows,
                                            int* rslot, int* rmark) {
  const int r = threadIdx.x;
  if (r >= R) return;
  int s = 0, mark = 0;
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
      const int latched = prm.latch != nullptr ? prm.latch[s] : 0;
      if (fires && prm.latch != nullptr && latched != 1) mark = s;
      apply = fires || latched != 0;
    }
  }
  rslot[r] = apply ? s : 0;
  rmark[r] = mark;
  if (r < rows) prm.norms[(t0 + r) * prm.norms_stride] = __fsqrt_rn(ss_pre[r]);
}

// The latch merge, folded into the kernel (threadfence-reduction pattern, no extra launch).
// Lane 0 of the block's last warp (which has no stores in flight at that point, so its
// release is cheap) calls latch_take once, after decide_rows and a barrier: it sets the fired
// bits of rmark in the scratch and takes a ticket with a release atomic (the canonical
// pattern: writes, barrier, release, ticket; the barrier also orders the block's reads of
// `latch` before it).  The ticket's value is first used at the end of the kernel
// (latch_merge), so the atomic's latency hides behind the block's remaining work.  The block
// with the last ticket merges: latch[s] = 1 for every fired bit, clearing the bits and the
// counter as it goes, so the scratch is zero again for the next call.  No block writes
// `latch` before every block has taken its ticket, i.e. has decided: decisions see the latch
// as of call start, and the result (a set of slots) does not depend on block order.

// atomicAdd with release semantics at GPU scope (`atom.release.gpu`: MEMBAR.ALL.GPU + ATOMG,
// no L1 invalidation).
__device__ __forceinline__ unsigned atomic_add_release_gpu(uint32_t* p, unsigned v) {
  unsigned old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], %2;"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ void fence_acq_rel_gpu() {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
}

template <int R>
__device__ __forceinline__ unsigned latch_take(const Aux& aux, const int* rmark) {
  uint32_t* const sc = latch_scratch(aux);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int s = rmark[r];
    if (s != 0) atomicOr(sc + 1 + (s >> 5), 1u << (s & 31));
  }
  return atomic_add_release_gpu(sc, 1u);
}

// Called by every lane of the last warp at the very end of the kernel; `ticket` is
// latch_take's value on lane 0 (ignored on the other lanes).
__device__ __forceinline__ void latch_merge(const Params& prm, const Aux& aux,
                                            unsigned ticket) {
  const int lane = threadIdx.x & 31;
  int last = 0;
  if (lane == 0 && ticket == gridDim.x * gridDim.y - 1u) {
    fence_acq_rel_gpu();  // acquire: lane 0 read the last ticket; every block released before
    last = 1;
  }
  last = __shfl_sync(kFullMask, last, 0);
  if (last == 0) return;
  __syncwarp();  // orders lane 0's acquire before the other lanes' reads
  uint32_t* const sc = latch_scratch(aux);
  const int64_t words = (prm.P + 31) / 32;
  for (int64_t w = lane; w < words; w += 32) {
    uint32_t m = atomicExch(sc + 1 + w, 0u);  // read and clear at the coherence point
    while (m != 0u) {
      const int b = __ffs(m) - 1;
      m &= m - 1u;
      prm.latch[w * 32 + b] = 1;
    }
  }
  if (lane == 0) atomicExch(sc, 0u);
}

// psm[r][k] <- dq = clamp(p + shift[s][k], lo[s][k], hi[s][k]) - p for steered rows (s =
// rslot[r] != 0), 0 for the others.  Each entry is read and written by the same thread.
// Callers sync before (psm, rslot) and after.
template <int R>
__device__ __forceinline__ void compute_dq(const Params& prm, float* psm, const int* rslot) {
  const int K = static_cast<int>(prm.K);
  for (int idx = threadIdx.x; idx < R * K; idx += blockDim.x) {
    const int r = idx / K;
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

// Warp 0: the concepts with a nonzero dq in any of the R rows, ascending, into nzk[0 .. *nnz),
// and rchg[r] = row r has a nonzero dq (a NaN dq counts: it is applied and poisons the row,
// as in the reference).  No barrier inside; callers sync before and after.
template <int R>
__device__ __forceinline__ void compact_nonzero(const float* psm, int K, int* nzk, int* nnz,
                                                int* rchg) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int base = 0;
  unsigned rowbits = 0u;
  for (int k0 = 0; k0 < K; k0 += 32) {
    const int k = k0 + lane;
    unsigned rb = 0u;
    if (k < K) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (psm[r * K + k] != 0.f) rb |= 1u << r;
    }
    rowbits |= rb;
    const unsigned m = __ballot_sync(kFullMask, rb != 0u);
    if (rb != 0u) nzk[base + __popc(m & ((1u << lane) - 1u))] = k;
    base += __popc(m);
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) rowbits |= __shfl_xor_sync(kFullMask, rowbits, off);
  if (lane == 0) {
    *nnz = base;
#pragma unroll
    for (int r = 0; r < R; ++r) rchg[r] = (rowbits >> r) & 1u;
  }
}

// RMSNorm scale of a row from the sum of squares of its stored values: 1 / sqrt(ss / d + eps),
// every step correctly rounded (no approximate rsqrt / division), so it is a function of ss,
// d and eps only.
__device__ __forceinline__ float rms_inv(float ss, int64_t d, float eps) {
  return __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(d)), eps)));
}

// ----------------------------------------------------------------------------- kernels
// Register kernel: one block per R consecutive rows [t0, t0 + R); every row / V / weight
// access a 16-byte word (the launcher checked alignment).  blockDim.x = layout threads (a
// multiple of 32, <= 512, blockDim.x * NV * VEC >= d).  Dynamic shared memory: psm fp32
// [R][K] (p, then dq), nzk int32 [K].  aux.have_p: p is read back from scores (written by
// project_kernel) instead of projected here.
template <typename T, typename VT, int NV, int R>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rows_kernel(const Params prm, const Aux aux) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int G = kGroup / R;  // concepts per projection group
  static_assert(G * R == kGroup, "R must divide 16");
  using VW = Words<VT, VEC>;
  // concepts per update batch (half the words when h takes 64 registers)
  constexpr int U = batch_of(kGroup, NV * VW::n * (R * NV * VEC >= 64 ? 2 : 1), NV);
  extern __shared__ float psm[];                    // [R][K], then nzk [K]
  __shared__ float red[2][kMaxWarps][kGroup];       // projection partials, double-buffered
  __shared__ float wsum[2][kMaxWarps][R];           // sum-of-squares partials (pre / post)
  __shared__ float tot[2][R];                       // sums of squares (pre / post update)
  __shared__ int rslot[R];                          // slot applied to row r (0 = none)
  __shared__ int rchg[R];                           // row r has a nonzero dq
  __shared__ int rmark[R];                          // slot whose latch row r sets (0 = none)
  __shared__ int s_nnz;

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t d = prm.d;
  const int K = static_cast<int>(prm.K);
  const int64_t nvec = d / VEC;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * R;
  const int rows = prm.T - t0 < R ? static_cast<int>(prm.T - t0) : R;
  const VT* const V = static_cast<const VT*>(prm.V);
  int* const nzk = reinterpret_cast<int*>(psm + R * K);

  // Phase 1: h = rne(residual + x) in registers (stored later, once); pre-update ||h||^2.
  float h[R][NV][VEC];
  load_rows<T, NV, R>(prm, t0, rows, nvec, h);
  float ss[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    ss[r] = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (tid + static_cast<int64_t>(i) * nthreads < nvec) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) ss[r] = fmaf(h[r][i][e], h[r][i][e], ss[r]);
      }
    }
  }
  block_sum_rows<R>(ss, wsum[0], tot[0]);

  // Phase 2: p [R][K] into psm (and scores), or read back from scores.
  if (!aux.have_p) {
    int buf = 0;
    for (int k0 = 0; k0 < K; k0 += G, buf ^= 1) {
      float acc[kGroup];
#pragma unroll
      for (int n = 0; n < kGroup; ++n) acc[n] = 0.f;
      project_group<VT, VEC, NV, R, G>(h, V, d, K, k0, nvec, acc);
      finish_group<kGroup, G>(acc, red[buf], k0, prm, psm, t0, rows);
    }
  } else {
    for (int idx = tid; idx < R * K; idx += nthreads) {
      const int r = idx / K, k = idx - r * K;
      psm[idx] = r < rows ? prm.scores[(t0 + r) * prm.scores_s0 + k * prm.scores_s1] : 0.f;
    }
  }
  __syncthreads();

  // Phase 3: norms, slots, gates; the latch ticket (merged at the end by the last block).
  decide_rows<R>(prm, psm, tot[0], t0, rows, rslot, rmark);
  __syncthreads();
  const bool ticket_lane = prm.latch != nullptr && tid == nthreads - 32;
  const unsigned ticket = ticket_lane ? latch_take<R>(aux, rmark) : 0u;

  // Phase 4: the update h += sum_k dq_k V_k over the concepts with a nonzero dq, ascending,
  // per row (a row skips concepts whose dq is 0 for it: the same chain as with R = 1).
  bool steered = false;
#pragma unroll
  for (int r = 0; r < R; ++r) steered = steered || rslot[r] != 0;
  bool chg[R];
#pragma unroll
  for (int r = 0; r < R; ++r) chg[r] = false;
  if (steered) {  // block-uniform
    compute_dq<R>(prm, psm, rslot);
    __syncthreads();
    compact_nonzero<R>(psm, K, nzk, &s_nnz, rchg);
    __syncthreads();
    const int nnz = s_nnz;
#pragma unroll
    for (int r = 0; r < R; ++r) chg[r] = rchg[r] != 0;
    for (int c = 0; c < nnz; c += U) {
      int kk[U];
      VW v[U][NV];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        kk[u] = c + u < nnz ? nzk[c + u] : -1;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
          if (kk[u] >= 0 && vi < nvec)
            ld_words(V + static_cast<int64_t>(kk[u]) * d + vi * VEC, v[u][i]);
          else
            zero_words(v[u][i]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (kk[u] >= 0) {
          float dk[R];
#pragma unroll
          for (int r = 0; r < R; ++r) dk[r] = psm[r * K + kk[u]];
#pragma unroll
          for (int i = 0; i < NV; ++i) {
            float vf[VEC];
            to_floats(v[u][i], vf);
#pragma unroll
            for (int r = 0; r < R; ++r) {
              if (dk[r] != 0.f) {  // NaN != 0: a NaN dq is applied
#pragma unroll
                for (int e = 0; e < VEC; ++e) h[r][i][e] = fmaf(dk[r], vf[e], h[r][i][e]);
              }
            }
          }
        }
      }
    }
  }

  // Store: changed rows get rne(h) (and its sum of squares); with x every other row gets the
  // added h; without x an unchanged row is not written at all.
  bool any_chg = false;
  float ss2[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    any_chg = any_chg || chg[r];
    ss2[r] = 0.f;
    if (r < rows && (chg[r] || prm.x != nullptr)) {
      T* const rrow = static_cast<T*>(prm.residual) + (t0 + r) * prm.residual_stride;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
        if (vi < nvec) {
          if (chg[r]) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              h[r][i][e] = rne<T>(h[r][i][e]);  // the stored value
              ss2[r] = fmaf(h[r][i][e], h[r][i][e], ss2[r]);
            }
          }
          st_slot<T, VEC>(rrow + vi * VEC, h[r][i]);
        }
      }
    }
  }
  if (any_chg) {  // block-uniform (chg comes from shared rchg)
    block_sum_rows<R>(ss2, wsum[1], tot[1]);
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (chg[r]) ss[r] = ss2[r];
  }

  // Phase 5: fused RMSNorm of the stored h (weight loaded once for the R rows).
  if (prm.out != nullptr) {
    float w[NV][VEC];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
      if (prm.weight_f32) {
        Words<float, VEC> ww;
        if (vi < nvec) ld_words(static_cast<const float*>(prm.weight) + vi * VEC, ww);
        else zero_words(ww);
        to_floats(ww, w[i]);
      } else {
        Words<T, VEC> ww;
        if (vi < nvec) ld_words(static_cast<const T*>(prm.weight) + vi * VEC, ww);
        else zero_words(ww);
        to_floats(ww, w[i]);
      }
    }
    T* const outp = static_cast<T*>(prm.out);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {
        const float inv = rms_inv(ss[r], d, prm.eps);
        T* const orow = outp + (t0 + r) * prm.out_stride;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
          if (vi < nvec) {
            float o[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[e] = h[r][i][e] * inv * w[i][e];
            st_slot<T, VEC>(orow + vi * VEC, o);
          }
        }
      }
    }
  }
  if (prm.latch != nullptr && tid >= nthreads - 32) latch_merge(prm, aux, ticket);
}

// Projection kernel of the split path (aligned rows only; the rows_kernel layout).  Block
// (tb, kb) = rows [R tb, R tb + R) x concepts [4 kb, 4 kb + 4); writes scores for its tile and
// nothing else (rows_kernel with aux.have_p = true then adds, decides, updates and stores).
// The same phase-1, project_group and finish_group code as rows_kernel, with the same thread
// layout, so every score has the same bits on both paths.
template <typename T, typename VT, int NV, int R>
__global__ void __launch_bounds__(kMaxThreads, 1) project_kernel(const Params prm) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int G = kProjG, N = R * G;
  __shared__ float red[kMaxWarps][kGroup];
  const int64_t nvec = prm.d / VEC;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * R;
  const int k0 = static_cast<int>(blockIdx.y) * G;
  const int rows = prm.T - t0 < R ? static_cast<int>(prm.T - t0) : R;
  float h[R][NV][VEC];
  load_rows<T, NV, R>(prm, t0, rows, nvec, h);
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.f;
  project_group<VT, VEC, NV, R, G>(h, static_cast<const VT*>(prm.V), prm.d,
                                   static_cast<int>(prm.K), k0, nvec, acc);
  finish_group<N, G>(acc, red, k0, prm, nullptr, t0, rows);
}

// Fallback for every row layout the register kernels cannot take (d not a multiple of VEC, a
// pointer or row stride not 16-byte aligned, or d above 512 * 4 * VEC): one block per row,
// element-wise accesses, h kept in shared memory.  It uses the register kernels' thread
// layout (thread tid owns slots tid + i * blockDim.x of VEC elements, i < nv, the last slot
// possibly partial) and the same chains and reductions, so where both apply it gives the same
// bits.  Dynamic shared memory: psm fp32 [K], nzk int32 [K], hs fp32 [d].
template <typename T, typename VT>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rows_smem_kernel(const Params prm, const Aux aux, const int nv) {
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ float psm[];
  __shared__ float red[2][kMaxWarps][kGroup];
  __shared__ float wsum[2][kMaxWarps][1];
  __shared__ float tot[2][1];
  __shared__ int rslot[1], rchg[1], rmark[1];
  __shared__ int s_nnz;

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t d = prm.d, t = blockIdx.x;
  const int K = static_cast<int>(prm.K);
  const int64_t nvec = (d + VEC - 1) / VEC;
  int* const nzk = reinterpret_cast<int*>(psm + K);
  float* const hs = psm + 2 * K;
  T* const rrow = static_cast<T*>(prm.residual) + t * prm.residual_stride;
  const T* const xrow =
      prm.x != nullptr ? static_cast<const T*>(prm.x) + t * prm.x_stride : nullptr;
  const VT* const V = static_cast<const VT*>(prm.V);

  // Phase 1: the slot's loads first, then h (into hs, stored to the residual later).
  float ss[1] = {0.f};
  for (int i = 0; i < nv; ++i) {
    const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
    if (vi >= nvec) break;
    const int64_t j0 = vi * VEC;
    const int n = d - j0 < VEC ? static_cast<int>(d - j0) : VEC;
    float rv[VEC], xv[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) rv[e] = e < n ? to_f32(rrow[j0 + e]) : 0.f;
    if (xrow != nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) xv[e] = e < n ? to_f32(xrow[j0 + e]) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (e < n) {
        const float v = xrow != nullptr ? rne<T>(rv[e] + xv[e]) : rv[e];
        hs[j0 + e] = v;  // read back only by this thread
        ss[0] = fmaf(v, v, ss[0]);
      }
    }
  }
  block_sum_rows<1>(ss, wsum[0], tot[0]);

  // Phase 2: projection, groups of 16 concepts (as rows_kernel<R = 1>).
  int buf = 0;
  for (int k0 = 0; k0 < K; k0 += kGroup, buf ^= 1) {
    float acc[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) acc[g] = 0.f;
    for (int i = 0; i < nv; ++i) {
      const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
      if (vi >= nvec) break;
      const int64_t j0 = vi * VEC;
      const int n = d - j0 < VEC ? static_cast<int>(d - j0) : VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e < n) {
          const float hj = hs[j0 + e];
#pragma unroll
          for (int g = 0; g < kGroup; ++g)
            if (k0 + g < K)
              acc[g] = fmaf(to_f32(V[static_cast<int64_t>(k0 + g) * d + j0 + e]), hj, acc[g]);
        }
      }
    }
    finish_group<kGroup, kGroup>(acc, red[buf], k0, prm, psm, t, 1);
  }
  __syncthreads();

  decide_rows<1>(prm, psm, tot[0], t, 1, rslot, rmark);
  __syncthreads();
  const bool ticket_lane = prm.latch != nullptr && tid == nthreads - 32;
  const unsigned ticket = ticket_lane ? latch_take<1>(aux, rmark) : 0u;

  bool chg = false;
  if (rslot[0] != 0) {  // block-uniform
    compute_dq<1>(prm, psm, rslot);
    __syncthreads();
    compact_nonzero<1>(psm, K, nzk, &s_nnz, rchg);
    __syncthreads();
    chg = rchg[0] != 0;
  }
  if (chg || xrow != nullptr) {
    const int nnz = chg ? s_nnz : 0;
    float ss2[1] = {0.f};
    for (int i = 0; i < nv; ++i) {
      const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
      if (vi >= nvec) break;
      const int64_t j0 = vi * VEC;
      const int n = d - j0 < VEC ? static_cast<int>(d - j0) : VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e < n) {
          float v = hs[j0 + e];
          if (chg) {
            for (int c = 0; c < nnz; ++c) {
              const int k = nzk[c];
              v = fmaf(psm[k], to_f32(V[static_cast<int64_t>(k) * d + j0 + e]), v);
            }
            v = rne<T>(v);
            hs[j0 + e] = v;
            ss2[0] = fmaf(v, v, ss2[0]);
          }
          rrow[j0 + e] = from_f32<T>(v);
        }
      }
    }
    if (chg) {  // block-uniform
      block_sum_rows<1>(ss2, wsum[1], tot[1]);
      ss[0] = ss2[0];
    }
  }

  if (prm.out != nullptr) {  // each element by the thread that owns its slot, as above
    T* const orow = static_cast<T*>(prm.out) + t * prm.out_stride;
    const float inv = rms_inv(ss[0], d, prm.eps);
    for (int i = 0; i < nv; ++i) {
      const int64_t vi = tid + static_cast<int64_t>(i) * nthreads;
      if (vi >= nvec) break;
      const int64_t j0 = vi * VEC;
      const int n = d - j0 < VEC ? static_cast<int>(d - j0) : VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e < n) {
          const int64_t j = j0 + e;
          const float w = prm.weight_f32 ? static_cast<const float*>(prm.weight)[j]
                                         : to_f32(static_cast<const T*>(prm.weight)[j]);
          orow[j] = from_f32<T>(hs[j] * inv * w);
        }
      }
    }
  }
  if (prm.latch != nullptr && tid >= nthreads - 32) latch_merge(prm, aux, ticket);
}

// ----------------------------------------------------------------------------- host side
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

int elem_size(Dtype dt) { return dt == Dtype::f32 ? 4 : 2; }

// Every row / V / weight access of the call can be a 16-byte word.
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

// The thread layout of a row, a function of d and the residual dtype only (so every kernel
// that computes a row's reductions uses the same one): slots of VEC elements, nv slots per
// thread (the smallest power of 2 that keeps the block within 512 threads), threads rounded
// up to a warp.
struct Layout {
  int vec = 8;
  int64_t nvec = 0;
  int nv = 1;
  int threads = 32;
};

Layout layout_of(const Params& p) {
  Layout L;
  L.vec = 16 / elem_size(p.dtype);
  L.nvec = (p.d + L.vec - 1) / L.vec;
  while ((L.nvec + L.nv - 1) / L.nv > kMaxThreads) L.nv *= 2;
  const int64_t n = (L.nvec + L.nv - 1) / L.nv;
  L.threads = n <= 32 ? 32 : static_cast<int>((n + 31) / 32 * 32);
  return L;
}

enum class Kind { smem, fused, split };

struct Plan {
  Kind kind = Kind::fused;
  Layout L;
  int rows = 1;   // rows per rows_kernel block (fused), 1 for the split path's second kernel
  int prows = 1;  // rows per project_kernel block (split)
  size_t smem = 0;
};

// Largest R for a layout: rows_kernel keeps R * NV * VEC fp32 of h in registers, at most 64
// with NV = 1 (R = 8 for a 16-bit residual) and 32 otherwise (more spills); project_kernel
// at most R = 4 (R * 4 values per reduce) within the same bound.
int max_rows(int nv, int vec) { return nv == 1 ? 8 : 32 / (nv * vec); }
int max_project_rows(int nv, int vec) {
  const int r = max_rows(nv, vec);
  return r < 4 ? r : 4;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Plan make_plan(const Params& p, Path requested, const DeviceInfo& dev) {
  Plan pl;
  pl.L = layout_of(p);
  const bool regs = vector_ok(p, pl.L.vec) && pl.L.nv <= kMaxNV;
  if (!regs) {
    pl.kind = Kind::smem;
    pl.smem = static_cast<size_t>(2 * p.K + p.d) * sizeof(float);
    return pl;
  }
  const int64_t sms = dev.num_sms > 0 ? dev.num_sms : 1;
  // Fused rows per block: the largest R that still gives every SM a block, and whose psm
  // fits in shared memory.
  int fused_rows = max_rows(pl.L.nv, pl.L.vec);
  while (fused_rows > 1 && cdiv(p.T, fused_rows) < sms) fused_rows /= 2;
  while (fused_rows > 1 && (fused_rows + 1) * p.K * 4 > dyn_smem_limit(dev)) fused_rows /= 2;
  // Split when the fused kernel would read V (from L2) more often than the projection kernel
  // does: few rows (T < 4 x #SMs), where the fused kernel's few blocks would each stream all
  // of V through one SM.  Needs concepts to pay for the second launch.
  bool split;
  if (requested == Path::split) split = true;
  else if (requested == Path::row) split = false;
  else split = p.K >= kSplitMinK && fused_rows < max_project_rows(pl.L.nv, pl.L.vec);
  if (p.K == 0 || cdiv(p.K, kProjG) > 65535) split = false;  // grid.y of project_kernel
  if (split) {
    pl.kind = Kind::split;
    pl.rows = 1;
    pl.prows = max_project_rows(pl.L.nv, pl.L.vec);
    while (pl.prows > 1 && cdiv(p.T, pl.prows) * cdiv(p.K, kProjG) < 2 * sms) pl.prows /= 2;
  } else {
    pl.kind = Kind::fused;
    pl.rows = fused_rows;
  }
  pl.smem = static_cast<size_t>(pl.rows + 1) * static_cast<size_t>(p.K) * sizeof(float);
  return pl;
}

cudaError_t set_smem(const void* fn, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

using RowsFn = void (*)(const Params, const Aux);
using ProjFn = void (*)(const Params);

// Instantiated (NV, R), exactly what make_plan can ask for (max_rows / max_project_rows):
//   rows_kernel     16-bit T: (1, 1) (1, 2) (1, 4) (1, 8) (2, 1) (2, 2) (4, 1)
//                   fp32 T:   the same and (2, 4) (4, 2)
//   project_kernel  16-bit T: (1, 1) (1, 2) (1, 4) (2, 1) (2, 2) (4, 1)
//                   fp32 T:   the same and (2, 4) (4, 2)
template <typename T, typename VT>
RowsFn rows_fn(int nv, int rows) {
  if (nv == 1) {
    if (rows == 8) return &rows_kernel<T, VT, 1, 8>;
    if (rows == 4) return &rows_kernel<T, VT, 1, 4>;
    if (rows == 2) return &rows_kernel<T, VT, 1, 2>;
    return &rows_kernel<T, VT, 1, 1>;
  }
  if constexpr (sizeof(T) == 4) {
    if (nv == 2 && rows == 4) return &rows_kernel<T, VT, 2, 4>;
    if (nv == 4 && rows == 2) return &rows_kernel<T, VT, 4, 2>;
  }
  if (nv == 2) return rows == 2 ? &rows_kernel<T, VT, 2, 2> : &rows_kernel<T, VT, 2, 1>;
  return &rows_kernel<T, VT, 4, 1>;
}

template <typename T, typename VT>
ProjFn project_fn(int nv, int rows) {
  if (nv == 1) {
    if (rows == 4) return &project_kernel<T, VT, 1, 4>;
    if (rows == 2) return &project_kernel<T, VT, 1, 2>;
    return &project_kernel<T, VT, 1, 1>;
  }
  if constexpr (sizeof(T) == 4) {
    if (nv == 2 && rows == 4) return &project_kernel<T, VT, 2, 4>;
    if (nv == 4 && rows == 2) return &project_kernel<T, VT, 4, 2>;
  }
  if (nv == 2) return rows == 2 ? &project_kernel<T, VT, 2, 2> : &project_kernel<T, VT, 2, 1>;
  return &project_kernel<T, VT, 4, 1>;
}

template <typename T, typename VT>
cudaError_t launch_typed(const Params& p, const Plan& pl, const Aux& aux, cudaStream_t stream) {
  cudaError_t e;
  if (pl.kind == Kind::smem) {
    const void* fn = reinterpret_cast<const void*>(&rows_smem_kernel<T, VT>);
    e = set_smem(fn, pl.smem);
    if (e != cudaSuccess) return e;
    rows_smem_kernel<T, VT>
        <<<static_cast<unsigned>(p.T), pl.L.threads, pl.smem, stream>>>(p, aux, pl.L.nv);
    return cudaGetLastError();
  }
  Aux a = aux;
  if (pl.kind == Kind::split) {
    const dim3 grid(static_cast<unsigned>(cdiv(p.T, pl.prows)),
                    static_cast<unsigned>(cdiv(p.K, kProjG)));
    project_fn<T, VT>(pl.L.nv, pl.prows)<<<grid, pl.L.threads, 0, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    a.have_p = true;
  }
  const RowsFn fn = rows_fn<T, VT>(pl.L.nv, pl.rows);
  e = set_smem(reinterpret_cast<const void*>(fn), pl.smem);
  if (e != cudaSuccess) return e;
  fn<<<static_cast<unsigned>(cdiv(p.T, pl.rows)), pl.L.threads, pl.smem, stream>>>(p, a);
  return cudaGetLastError();
}

// Which latch-scratch lane a stream uses (a hash of its handle).
int lane_of(cudaStream_t stream) {
  uint64_t v = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(stream));
  v ^= v >> 31;
  v *= 0x9e3779b97f4a7c15ull;
  return static_cast<int>(v >> 62) % kLatchLanes;
}

}  // namespace

const char* unsupported(const Params& p, const DeviceInfo& dev) {
  const Plan pl = make_plan(p, Path::automatic, dev);
  if (static_cast<int64_t>(pl.smem) > dyn_smem_limit(dev))
    return pl.kind != Kind::smem
               ? "K fp32 projections exceed the shared memory of one block"
               : "this row layout takes the shared-memory kernel, and 2 K + d fp32 values "
                 "exceed the shared memory of one block";
  return nullptr;
}

int64_t latch_scratch_words(const Params& p) {
  if (p.latch == nullptr || p.P <= kLatchSlots) return 0;
  return 1 + (p.P + 31) / 32;
}

Path choose_path(const Params& p, const DeviceInfo& dev, int* rows_per_block) {
  const Plan pl = make_plan(p, Path::automatic, dev);
  if (rows_per_block != nullptr) *rows_per_block = pl.kind == Kind::smem ? 0 : pl.rows;
  return pl.kind == Kind::split ? Path::split : Path::row;
}

cudaError_t launch(const Params& p, Path path, const DeviceInfo& dev, cudaStream_t stream) {
  if (p.T <= 0) return cudaSuccess;
  const Plan pl = make_plan(p, path, dev);
  Aux aux;
  aux.lane = lane_of(stream);
  if (latch_scratch_words(p) > 0) {
    // More slots than the built-in scratch holds: the caller's buffer, zeroed here (the
    // kernel leaves it zero again, but it is a fresh allocation each call).
    if (p.fired == nullptr) return cudaErrorInvalidValue;
    aux.scratch = reinterpret_cast<uint32_t*>(p.fired);
    const cudaError_t e = cudaMemsetAsync(
        p.fired, 0, static_cast<size_t>(latch_scratch_words(p)) * sizeof(uint32_t), stream);
    if (e != cudaSuccess) return e;
  }
  switch (p.dtype) {
    case Dtype::f32: return launch_typed<float, float>(p, pl, aux, stream);
    case Dtype::bf16:
      return p.v_f32 ? launch_typed<__nv_bfloat16, float>(p, pl, aux, stream)
                     : launch_typed<__nv_bfloat16, __nv_bfloat16>(p, pl, aux, stream);
    case Dtype::f16:
      return p.v_f32 ? launch_typed<__half, float>(p, pl, aux, stream)
                     : launch_typed<__half, __half>(p, pl, aux, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace steerkernel
