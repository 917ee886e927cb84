// Device helpers shared by csrc/cuda/mbranch_linear.cu and csrc/cuda/mutual_unit.cu: the activations (codes
// saml::Activation of saml_common.h), the device-side grouping of rows by scenario, and the sync-free tiled GEMM
// engine of the mbranch/mutual ops (section "gemm" below).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "saml_common.h"

namespace saml_cuda {

// gelu and silu need the pre-activation z in the backward; relu/leaky_relu recover act'(z) from y = act(z).
inline bool needs_preactivation(int64_t act) { return act == saml::kActGelu || act == saml::kActSilu; }

template <typename A>
__device__ __forceinline__ A activate(A z, int act) {
  switch (act) {
    case saml::kActRelu: return z < A(0) ? A(0) : z;  // keeps NaN, as torch.relu
    case saml::kActLeakyRelu: return z > A(0) ? z : z * A(saml::kLeakyReluSlope);
    case saml::kActGelu: return A(0.5) * z * (A(1) + erf(z * A(0.70710678118654752440)));
    case saml::kActSilu: return z / (A(1) + exp(-z));
    default: return z;
  }
}

// act'(z); at z == 0 relu gives 0 and leaky_relu the slope, as torch's threshold/leaky_relu backward (z > 0 test).
template <typename A>
__device__ __forceinline__ A activate_grad(A z, int act) {
  switch (act) {
    case saml::kActRelu: return z > A(0) ? A(1) : A(0);
    case saml::kActLeakyRelu: return z > A(0) ? A(1) : A(saml::kLeakyReluSlope);
    case saml::kActGelu: return A(0.5) * (A(1) + erf(z * A(0.70710678118654752440))) +
                   z * exp(A(-0.5) * z * z) * A(0.39894228040143267794);
    case saml::kActSilu: {
      A sg = A(1) / (A(1) + exp(-z));
      return sg * (A(1) + z * (A(1) - sg));
    }
    default: return A(1);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the same, fixed-order (deterministic) sum
}

// Rows grouped by scenario on the device, no host sync: (perm int64 [B] (stable: original order inside a
// scenario), sorted scenario ids int64 [B], seg int64 [M+1]; rows of scenario m are perm[seg[m]:seg[m+1]]).
// A scenario outside [0, M) lands before seg[0] or after seg[M]: in no segment, so the GEMMs below never read
// W out of bounds for it; the row GEMM writes its rows as zeros and the weight gradient skips them (the contract
// for unchecked input, docs/design.md section 5; the Python op checks the range by default).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_scenario(const at::Tensor& scenario, int64_t M) {
  auto s = scenario.to(at::kLong);
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(s, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto bounds = at::arange(M + 1, s.options());
  auto seg = at::searchsorted(sorted, bounds);
  return {perm, sorted, seg};
}

// ================================================================================================ gemm
// A small tiled GEMM engine whose tile schedule lives on the device, so no host ever needs the segment sizes
// (no host sync, CUDA-graph capturable). CTA tile kBM x kBN, kThreads threads, K step BK; operands are read with
// arbitrary strides (row gather by perm fused into the A-tile load); accumulation in float32 (float64 for
// double), one rounding to the output type in the epilogue. Inner product: tensor cores through WMMA
// (16x16x16, fp32 accumulators) for float16/bfloat16 on sm_80+, plain FMA ("SIMT") otherwise: float32 is exact
// fp32 (never TF32), float64 exact fp64. No double buffering yet: correctness first, tuned on a GPU later.
namespace gemm {

constexpr int kBM = 64, kBN = 64, kThreads = 256;

enum class Engine { kAuto, kSimt, kCublas };

// SAML_CUDA_GROUPED = auto (default: tensor cores for float16/bfloat16) | simt (FMA tiles for every dtype, a
// debugging aid) | cublas (the old per-scenario cuBLAS path: ONE host sync per call, for benchmarking only).
inline Engine engine_from_env() {
  const char* e = std::getenv("SAML_CUDA_GROUPED");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return Engine::kAuto;
  if (std::strcmp(e, "simt") == 0) return Engine::kSimt;
  if (std::strcmp(e, "cublas") == 0) return Engine::kCublas;
  TORCH_CHECK(false, "SAML_CUDA_GROUPED must be auto, simt or cublas, got '", e, "'");
}

inline bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Whether float16/bfloat16 tiles run on tensor cores (WMMA bf16 needs sm_80; the build targets 8.0 and 9.0).
inline bool use_tensor_cores(at::ScalarType t, Engine e) {
  return e == Engine::kAuto && is_half(t) && at::cuda::getCurrentDeviceProperties()->major >= 8;
}

template <typename T>
struct Tile {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int BK = kHalf ? 32 : 16;
};

// Shared-memory layout (one raw buffer: the accumulator tile C reuses the bytes of the A/B tiles after the main
// loop). With tensor cores the paddings keep every WMMA pointer 32-byte aligned and ldm a multiple of 8 (16-bit)
// or 4 (float) elements: lda = 40, ldb = 72, ldc = 68; without, an odd padding spreads the banks.
template <typename T, bool TC>
struct Smem {
  using acc_t = typename Tile<T>::acc_t;
  static constexpr int BK = Tile<T>::BK;
  static constexpr int LDA = BK + (TC ? 8 : 1);
  static constexpr int LDB = kBN + (TC ? 8 : 1);
  static constexpr int LDC = kBN + (TC ? 4 : 1);
  static constexpr int kABytes = kBM * LDA * int(sizeof(T));
  static constexpr int kABBytes = kABytes + BK * LDB * int(sizeof(T));
  static constexpr int kCBytes = kBM * LDC * int(sizeof(acc_t));
  static constexpr int kBytes = kABBytes > kCBytes ? kABBytes : kCBytes;
  static_assert(!TC || kABytes % 32 == 0, "B tile must stay 32-byte aligned for WMMA");
  __device__ static T* a(unsigned char* s) { return reinterpret_cast<T*>(s); }
  __device__ static T* b(unsigned char* s) { return reinterpret_cast<T*>(s + kABytes); }
  __device__ static acc_t* c(unsigned char* s) { return reinterpret_cast<acc_t*>(s); }
};

// C_tile += A_tile [kBM x BK] (row-major, lda) @ B_tile [BK x kBN] (row-major, ldb), per-thread accumulators.
template <typename T, bool TC>
struct Mma;

// FMA: thread (ty, tx) of a 16 x 16 grid owns rows ty + 16 i and columns tx + 16 j, i, j < 4.
template <typename T>
struct Mma<T, false> {
  using S = Smem<T, false>;
  using acc_t = typename S::acc_t;
  acc_t c[4][4];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = acc_t(0);
  }
  __device__ void step(const T* As, const T* Bs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int kk = 0; kk < S::BK; ++kk) {
      acc_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = static_cast<acc_t>(As[(ty + 16 * i) * S::LDA + kk]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = static_cast<acc_t>(Bs[kk * S::LDB + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c[i][j] += a[i] * b[j];
    }
  }
  __device__ void store(acc_t* Cs) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * S::LDC + tx + 16 * j] = c[i][j];
  }
};

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> { using type = __half; };
template <>
struct WmmaType<at::BFloat16> { using type = __nv_bfloat16; };

// Tensor cores: warp w (8 warps) owns rows 16 (w / 2) .. +16 and columns 32 (w % 2) .. +32 (two 16x16 fragments).
template <typename T>
struct Mma<T, true> {
  using S = Smem<T, true>;
  using W = typename WmmaType<T>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2];
  __device__ void zero() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    nvcuda::wmma::fill_fragment(c[0], 0.0f);
    nvcuda::wmma::fill_fragment(c[1], 0.0f);
#endif
  }
  __device__ void step(const T* As, const T* Bs) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    const int w = threadIdx.x / 32, r0 = 16 * (w / 2), c0 = 32 * (w % 2);
    const W* a = reinterpret_cast<const W*>(As);
    const W* b = reinterpret_cast<const W*>(Bs);
#pragma unroll
    for (int kk = 0; kk < S::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a + r0 * S::LDA + kk, S::LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b + kk * S::LDB + c0 + 16 * j, S::LDB);
        wmma::mma_sync(c[j], fa, fb, c[j]);
      }
    }
#else
    __trap();  // never launched: the host picks tensor cores only on sm_80+
#endif
  }
  __device__ void store(float* Cs) const {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    const int w = threadIdx.x / 32, r0 = 16 * (w / 2), c0 = 32 * (w % 2);
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(Cs + r0 * S::LDC + c0 + 16 * j, c[j], S::LDC, nvcuda::wmma::mem_row_major);
#endif
  }
};

// Global loads of the tile loaders are announced to the CPU emulation (tests/test_cuda_sync_free.py): it counts the
// 32-byte sectors each warp-wide load touches and the rows each CTA reads. `ptr` is null for a masked lane. Nothing
// on the device.
#ifndef SAML_EMU_LOAD
#define SAML_EMU_LOAD(site, ptr)
#endif
enum LoadSite { kSiteRowA = 0, kSiteRowB = 1, kSiteWgradA = 2, kSiteWgradG = 3 };

// Device tile schedule of a grouped GEMM: group g owns positions [seg[g], seg[g+1]), cut into tiles of `tile`
// rows; tiles are numbered group after group. Tile t -> (group, [lo, hi)), false when t is past the last tile.
// With `outside`, two more groups come first and last: g = -1 owns [0, seg[0]) and g = M owns [seg[M], B), the
// positions of the rows whose scenario is outside [0, M) (sort_by_scenario puts them there); their CTAs write
// the rows' zeros (the unchecked-input contract). Every CTA of a launch evaluates this for its own t (O(M) reads
// of seg, cached): no host sync, no extra kernel.
// Grid bound: sum_g ceil(c_g / tile) <= sum_g (c_g / tile + 1) = B / tile + #groups, so
// grouped_tiles(B, M, tile, outside) CTAs along x always suffice (tests/test_cuda_sync_free.py mirrors this).
__device__ __forceinline__ bool find_tile(const int64_t* seg, int M, int64_t B, bool outside, int64_t tile, int64_t t,
                                          int& g, int64_t& lo, int64_t& hi) {
  for (int m = outside ? -1 : 0; m < (outside ? M + 1 : M); ++m) {
    const int64_t a = m < 0 ? 0 : seg[m], b = m < M ? seg[m + 1] : B;
    const int64_t n = b > a ? (b - a + tile - 1) / tile : 0;
    if (t < n) {
      g = m;
      lo = a + t * tile;
      hi = b < lo + tile ? b : lo + tile;
      return true;
    }
    t -= n;
  }
  return false;
}

inline int64_t grouped_tiles(int64_t B, int64_t M, int64_t tile, bool outside) {
  return (B + tile - 1) / tile + M + (outside ? 2 : 0);
}

// One "A rows x W[m]" product: A row r of group m at a + m*sam + r*sar + k*sak, W[m][k][n] at w + m*swm + k*swk +
// n*swn, 0 <= k < K. A transposed weight (dx = dz W^T) is the same with swk/swn swapped.
template <typename T>
struct RowOperand {
  const T* a;
  int64_t sam, sar, sak;
  const T* w;
  int64_t swm, swk, swn;
  int64_t K;
};

// Row GEMM (forward of both routes, dx/daux of the backward, mutual_linear's pre-activation):
//   for every group m and every position p of m, with r = perm ? perm[p] : p:
//   v = sum_o A_o[m][r] @ W_o[m] (+ bias[m]);  z[m*som + r*sor + n*son] = v (if z);  y[...] = act(v).
// Schedule: seg != nullptr -> grouped over rows = B positions: group m owns [seg[m], seg[m+1]) and the rows whose
// scenario is outside [0, M) get y = z = 0 (the outside groups of find_tile), grid.x =
// grouped_tiles(B, M, kBM, true), blockIdx.z = 0; seg == nullptr -> dense: every group owns [0, rows),
// m = blockIdx.z, grid.x = ceil(rows / kBM). grid.y = ceil(N / kBN). Each output element is written by exactly
// one CTA (no atomics).
template <typename T, typename OutT>
struct RowGemmArgs {
  RowOperand<T> op[2];
  int nops;
  const int64_t* seg;
  const int64_t* perm;
  int64_t rows;
  int M;
  int64_t N;
  const T* bias;
  int64_t sbm, sbn;
  OutT* y;
  OutT* z;
  int64_t som, sor, son;
  int act;
};

template <typename T, typename OutT, bool TC>
__global__ void __launch_bounds__(kThreads) row_gemm_kernel(const RowGemmArgs<T, OutT> p) {
  using S = Smem<T, TC>;
  using acc_t = typename S::acc_t;
  constexpr int BK = S::BK;
  __shared__ __align__(128) unsigned char smem[S::kBytes];
  __shared__ int64_t rows_s[kBM];  // original row of each tile row, -1 past the group's end
  int m;
  int64_t lo, hi;
  if (p.seg != nullptr) {
    if (!find_tile(p.seg, p.M, p.rows, true, kBM, blockIdx.x, m, lo, hi)) return;  // uniform: no barrier skipped
  } else {
    m = blockIdx.z;
    lo = int64_t(blockIdx.x) * kBM;
    hi = p.rows < lo + kBM ? p.rows : lo + kBM;
  }
  const bool outside = m < 0 || m >= p.M;  // rows of an out-of-range scenario: zeros, W never read
  const int tid = threadIdx.x;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  T* As = S::a(smem);
  T* Bs = S::b(smem);
  if (tid < kBM) {
    const int64_t pos = lo + tid;
    rows_s[tid] = pos < hi ? (p.perm != nullptr ? p.perm[pos] : pos) : -1;
  }
  __syncthreads();
  Mma<T, TC> mma;
  mma.zero();
  for (int o = 0; o < (outside ? 0 : p.nops); ++o) {
    const RowOperand<T> op = p.op[o];
    const T* a = op.a + m * op.sam;
    const T* w = op.w + m * op.swm;
    // B tile [BK x kBN]: consecutive threads go along W's unit-stride dimension, so the 32 lanes of a warp load
    // consecutive elements (2 sectors of 32 bytes for 16-bit types, 4 for float32): along n for x W (swn == 1),
    // along k for dz W^T (swk == 1). The alternative, transposing W once per backward, costs an M*K*N buffer and
    // a read + write of W (at B / kBM >> M about what the tiles read anyway) and one more kernel; loading along k
    // costs only shared-memory bank conflicts on the tile stores (at most 4-way: LDB is fixed by WMMA's ldm
    // rule), which the global loads it saves outweigh (32 sectors per warp load before).
    const bool b_along_k = op.swk == 1 && op.swn != 1;
    for (int64_t k0 = 0; k0 < op.K; k0 += BK) {
      for (int e = tid; e < kBM * BK; e += kThreads) {  // consecutive threads along k: coalesced when sak == 1
        const int i = e / BK, kk = e % BK;
        const int64_t r = rows_s[i], k = k0 + kk;
        const T* src = (r >= 0 && k < op.K) ? a + (r * op.sar + k * op.sak) : nullptr;
        SAML_EMU_LOAD(kSiteRowA, src);
        As[i * S::LDA + kk] = src != nullptr ? *src : T(0);
      }
      for (int e = tid; e < BK * kBN; e += kThreads) {
        const int kk = b_along_k ? e % BK : e / kBN, j = b_along_k ? e / BK : e % kBN;
        const int64_t k = k0 + kk, n = n0 + j;
        const T* src = (k < op.K && n < p.N) ? w + (k * op.swk + n * op.swn) : nullptr;
        SAML_EMU_LOAD(kSiteRowB, src);
        Bs[kk * S::LDB + j] = src != nullptr ? *src : T(0);
      }
      __syncthreads();
      mma.step(As, Bs);
      __syncthreads();  // also orders the last reads of As/Bs before C overwrites their bytes
    }
  }
  acc_t* Cs = S::c(smem);
  mma.store(Cs);
  __syncthreads();
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int i = e / kBN, j = e % kBN;
    const int64_t r = rows_s[i], n = n0 + j;
    if (r < 0 || n >= p.N) continue;
    const int64_t off = (outside ? 0 : m * p.som) + r * p.sor + n * p.son;
    if (outside) {
      if (p.z != nullptr) p.z[off] = static_cast<OutT>(acc_t(0));
      p.y[off] = static_cast<OutT>(acc_t(0));
      continue;
    }
    acc_t v = Cs[i * S::LDC + j];
    if (p.bias != nullptr) v += static_cast<acc_t>(p.bias[m * p.sbm + n * p.sbn]);
    if (p.z != nullptr) p.z[off] = static_cast<OutT>(v);
    p.y[off] = static_cast<OutT>(activate(v, p.act));
  }
}

// Segment weight gradient (deterministic, no atomics, no host sync):
//   dw[m][k][n] = sum_{p in [seg[m], seg[m+1])} A[perm[p]][k] G[perm[p]][n]   (if dw; contiguous [M, K, N])
//   db[m][n]    = sum_p G[perm[p]][n]                                         (if db)
// Rows whose scenario is outside [0, M) are in no group: they add nothing. An empty group writes zeros.
// A at a + r*sar + k*sak, G at g + r*sgr + n*sgn.
// Two schedules, chosen on the host from (B, M, K, N) only (plan_wgrad), so the bits never depend on the device:
//   direct (chunk_rows == 0): grid (ceil(K / kBM) or 1, ceil(N / kBN), M); CTA (kt, nt, m) walks all rows of
//     group m in order and writes dw / db (by the kt == 0 CTAs). Used when the (K, N) tiles alone fill the GPU.
//   split (chunk_rows > 0): level 1, grid (same, same, grouped_tiles(B, M, chunk_rows, false)): CTA (kt, nt, t)
//     takes chunk t of find_tile (at most chunk_rows rows of one group) and writes its partial sums in acc_t to
//     part_w[t][k][n] / part_b[t][n]; level 2 (wgrad_reduce_kernel) adds a group's chunk partials in chunk order.
//     A skewed mix (70% of the rows in one scenario) then spreads over many CTAs instead of the few of its
//     group; the fixed chunking and the fixed reduction order keep the result bitwise reproducible.
template <typename T>
struct WgradArgs {
  using acc_t = at::opmath_type<T>;
  const T* a;
  int64_t sar, sak, K;
  const T* g;
  int64_t sgr, sgn, N;
  const int64_t* seg;
  const int64_t* perm;
  int M;
  T* dw;  // null: not wanted
  T* db;  // null: not wanted
  int64_t chunk_rows = 0;  // set by launch_wgrad: 0 direct, else split into part_w / part_b
  acc_t* part_w = nullptr;
  acc_t* part_b = nullptr;
};

template <typename T, bool TC>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradArgs<T> p) {
  using S = Smem<T, TC>;
  using acc_t = typename S::acc_t;
  constexpr int BK = S::BK;
  __shared__ __align__(128) unsigned char smem[S::kBytes];
  const int tid = threadIdx.x;
  const bool split = p.chunk_rows > 0;
  int m;
  int64_t lo, hi;
  if (split) {
    if (!find_tile(p.seg, p.M, 0, false, p.chunk_rows, blockIdx.z, m, lo, hi)) return;  // uniform over the CTA
  } else {
    m = blockIdx.z;
    lo = p.seg[m];
    hi = p.seg[m + 1];
  }
  const int64_t k0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const bool do_dw = p.dw != nullptr, do_db = p.db != nullptr && blockIdx.x == 0;
  T* As = S::a(smem);
  T* Bs = S::b(smem);
  Mma<T, TC> mma;
  mma.zero();
  acc_t colsum = acc_t(0);  // db of column n0 + tid (tid < kBN)
  for (int64_t p0 = lo; p0 < hi; p0 += BK) {
    if (do_dw) {
      for (int e = tid; e < kBM * BK; e += kThreads) {  // A^T tile: consecutive threads along k (coalesced)
        const int i = e % kBM, kk = e / kBM;
        const int64_t pos = p0 + kk, k = k0 + i;
        const T* src = (pos < hi && k < p.K) ? p.a + (p.perm[pos] * p.sar + k * p.sak) : nullptr;
        SAML_EMU_LOAD(kSiteWgradA, src);
        As[i * S::LDA + kk] = src != nullptr ? *src : T(0);
      }
    }
    for (int e = tid; e < BK * kBN; e += kThreads) {
      const int kk = e / kBN, j = e % kBN;
      const int64_t pos = p0 + kk, n = n0 + j;
      const T* src = (pos < hi && n < p.N) ? p.g + (p.perm[pos] * p.sgr + n * p.sgn) : nullptr;
      SAML_EMU_LOAD(kSiteWgradG, src);
      Bs[kk * S::LDB + j] = src != nullptr ? *src : T(0);
    }
    __syncthreads();
    if (do_dw) mma.step(As, Bs);
    if (do_db && tid < kBN)
      for (int kk = 0; kk < BK; ++kk) colsum += static_cast<acc_t>(Bs[kk * S::LDB + tid]);
    __syncthreads();
  }
  const int64_t t = blockIdx.z;  // the chunk (split schedule)
  if (do_db && tid < kBN && n0 + tid < p.N) {
    if (split)
      p.part_b[t * p.N + n0 + tid] = colsum;
    else
      p.db[m * p.N + n0 + tid] = static_cast<T>(colsum);
  }
  if (!do_dw) return;
  acc_t* Cs = S::c(smem);
  mma.store(Cs);
  __syncthreads();
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int i = e / kBN, j = e % kBN;
    const int64_t k = k0 + i, n = n0 + j;
    if (k >= p.K || n >= p.N) continue;
    if (split)
      p.part_w[(t * p.K + k) * p.N + n] = Cs[i * S::LDC + j];
    else
      p.dw[(m * p.K + k) * p.N + n] = static_cast<T>(Cs[i * S::LDC + j]);
  }
}

// Level 2 of the split schedule: grid (ceil(E / kThreads), M) with E = K*N (dw) or N (db only); thread e of
// group m: dw[m] flat e = sum of part_w[t] flat e over the chunks t of m, in chunk order (db likewise for e < N).
// The chunks of m are t0 .. t0 + c - 1, t0 = sum_{g < m} ceil(c_g / chunk_rows): the numbering of find_tile.
template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_reduce_kernel(const WgradArgs<T> p) {
  using acc_t = at::opmath_type<T>;
  __shared__ int64_t range_s[2];
  const int m = blockIdx.y;
  if (threadIdx.x == 0) {
    int64_t t0 = 0;
    for (int g = 0; g < m; ++g) t0 += (p.seg[g + 1] - p.seg[g] + p.chunk_rows - 1) / p.chunk_rows;
    range_s[0] = t0;
    range_s[1] = t0 + (p.seg[m + 1] - p.seg[m] + p.chunk_rows - 1) / p.chunk_rows;
  }
  __syncthreads();
  const int64_t t0 = range_s[0], t1 = range_s[1];
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (p.dw != nullptr && e < p.K * p.N) {
    acc_t v = acc_t(0);
    for (int64_t t = t0; t < t1; ++t) v += p.part_w[t * p.K * p.N + e];
    p.dw[m * p.K * p.N + e] = static_cast<T>(v);
  }
  if (p.db != nullptr && e < p.N) {
    acc_t v = acc_t(0);
    for (int64_t t = t0; t < t1; ++t) v += p.part_b[t * p.N + e];
    p.db[m * p.N + e] = static_cast<T>(v);
  }
}

inline unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// The weight-gradient schedule of (B, M, K, N): split rows into chunks when the (K, N) tiles leave the GPU idle.
// S = ceil(kWgradTargetCtas / tiles) row splits, chunk_rows = max(kWgradMinChunk, ceil(B / S) rounded up to 32),
// so the level-1 grid has about kWgradTargetCtas CTAs and at most chunk_rows rows each. Workspace (acc_t):
// chunks * (K*N + N) elements, chunks = ceil(B / chunk_rows) + M <= S + M + 1, about kWgradTargetCtas * kBM *
// kBN + (M + 1) K N elements at most (16 MiB + (M + 1) K N * 4 bytes in float32). Device-independent constants:
// the same shapes give the same bits on every GPU.
constexpr int64_t kWgradTargetCtas = 1024, kWgradMinChunk = 256;
struct WgradPlan {
  int64_t chunk_rows = 0;  // 0: direct schedule
  int64_t chunks = 0;
  int64_t workspace = 0;  // acc_t elements
};
inline WgradPlan plan_wgrad(int64_t B, int64_t M, int64_t K, int64_t N, bool want_w) {
  WgradPlan plan;
  const int64_t tiles = int64_t(want_w ? cdiv(K, kBM) : 1u) * cdiv(N, kBN);
  if (B == 0 || M == 0 || tiles == 0) return plan;
  const int64_t splits = (kWgradTargetCtas + tiles - 1) / tiles;
  int64_t chunk = (B + splits - 1) / splits;
  chunk = std::max<int64_t>(kWgradMinChunk, (chunk + 31) / 32 * 32);
  const int64_t chunks = grouped_tiles(B, M, chunk, false);
  if (chunk >= B || chunks > 65535) return plan;  // one chunk per group anyway (or grid.z too large): direct
  plan.chunk_rows = chunk;
  plan.chunks = chunks;
  plan.workspace = chunks * ((want_w ? K * N : 0) + N);
  return plan;
}

inline bool empty_grid(const dim3& g) { return g.x == 0 || g.y == 0 || g.z == 0; }

// Launchers (tensor cores only for 16-bit types; `tc` comes from use_tensor_cores). They need nvcc's <<< >>>:
// tests/test_cuda_sync_free.py compiles this header with a host compiler after rewriting each launch into its
// CPU emulation (one std::thread per CUDA thread), so it runs these very functions. Every launcher returns
// without launching when a grid dimension is 0 (CUDA rejects such a launch: "invalid configuration argument"):
// an empty grid has no element to write.
#if defined(__CUDACC__)

template <typename T, typename OutT>
void launch_row_gemm(const RowGemmArgs<T, OutT>& p, dim3 grid, bool tc, cudaStream_t stream) {
  if (empty_grid(grid)) return;
  if constexpr (Tile<T>::kHalf) {
    if (tc) {
      row_gemm_kernel<T, OutT, true><<<grid, kThreads, 0, stream>>>(p);
      return;
    }
  }
  row_gemm_kernel<T, OutT, false><<<grid, kThreads, 0, stream>>>(p);
}

// Grouped schedule over p.rows = B positions (p.seg, p.perm set), out-of-range rows zeroed.
template <typename T, typename OutT>
void launch_grouped_row_gemm(const RowGemmArgs<T, OutT>& p, bool tc, cudaStream_t stream) {
  launch_row_gemm(p, dim3(static_cast<unsigned>(grouped_tiles(p.rows, p.M, kBM, true)), cdiv(p.N, kBN), 1), tc,
                  stream);
}

// Dense schedule: p.rows rows through each of the p.M groups.
template <typename T, typename OutT>
void launch_dense_row_gemm(const RowGemmArgs<T, OutT>& p, bool tc, cudaStream_t stream) {
  launch_row_gemm(p, dim3(cdiv(p.rows, kBM), cdiv(p.N, kBN), static_cast<unsigned>(p.M)), tc, stream);
}

// dw / db of B positions (p.seg, p.perm, p.M set; p.dw / p.db null when not wanted) with plan_wgrad(B, ...)'s
// schedule; `workspace` holds plan.workspace acc_t elements (unused by the direct schedule).
template <typename T>
void launch_wgrad(WgradArgs<T> p, const WgradPlan& plan, typename WgradArgs<T>::acc_t* workspace, bool tc,
                  cudaStream_t stream) {
  if (p.dw == nullptr && p.db == nullptr) return;
  p.chunk_rows = plan.chunk_rows;
  if (plan.chunk_rows > 0) {
    p.part_w = workspace;
    p.part_b = workspace + (p.dw != nullptr ? plan.chunks * p.K * p.N : 0);
  }
  const dim3 grid(p.dw != nullptr ? cdiv(p.K, kBM) : 1u, cdiv(p.N, kBN),
                  static_cast<unsigned>(plan.chunk_rows > 0 ? plan.chunks : p.M));
  if (empty_grid(grid)) return;
  bool launched = false;
  if constexpr (Tile<T>::kHalf) {
    if (tc) {
      wgrad_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
      launched = true;
    }
  }
  if (!launched) wgrad_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  if (plan.chunk_rows > 0) {
    const dim3 rgrid(cdiv(p.dw != nullptr ? p.K * p.N : p.N, kThreads), static_cast<unsigned>(p.M));
    if (empty_grid(rgrid)) return;
    wgrad_reduce_kernel<T><<<rgrid, kThreads, 0, stream>>>(p);
  }
}

#endif  // __CUDACC__

// Grid limits of the launches above (y and z are 16-bit in CUDA).
inline void check_grid(int64_t N, int64_t M, const char* op) {
  TORCH_CHECK(N <= int64_t(65535) * kBN, op, ": N = ", N, " too large for the tiled GEMM grid");
  TORCH_CHECK(M <= 65535, op, ": at most 65535 branches, got ", M);
}

}  // namespace gemm
}  // namespace saml_cuda
