// Shared device and host helpers of the CUDA scenario_embedding_bag kernels
// (scenario_embedding_bag_forward.cu, scenario_embedding_bag_backward.cu).
//
// Contract: csrc/registry.cpp (seb_forward / seb_backward_rows / seb_backward_update_) and the Python oracle
// saml_kernels/reference/scenario_embedding_bag.py. Bag (f, b) = indices[offsets[f*B+b] : offsets[f*B+b+1]]:
//   global row   = feature_rows[f] + id                               (valid iff 0 <= id < rows of f)
//   scenario row = scenario[b] * Rs + feature_scenario_rows[f] + local(id)    (aware features, scenario in [0, M);
//                  local(id) = saml::seb_scenario_local: id, or its hash mod Rs_f for a hashed feature)
//
// Thread layout: a "group" of G lanes (a power of two <= 32, inside one warp) owns one bag (forward) or one
// unique row (backward); lane l covers columns (l + k*G) * VEC .. + VEC, VEC = 16 bytes / sizeof(scalar) when
// D and the pointers allow 16-byte accesses, else 1. A gather is bound by memory latency, so the id loop is
// unrolled (UNROLL independent row loads in flight per lane) and each warp serves 32/G bags at once.
// Rows are int64 before the multiply by D. Accumulation: float32 (float64 for double tables).
// Backward: keys kernel (2 entries per id: global row, R + scenario row, or a sentinel) -> at::sort(stable)
// -> one group per unique row sums its entries in sorted (= id) order, read straight from the incoming gradient
// (a hot row: first in pieces of <= 32 entries into float partials, the main float scratch): deterministic, no
// float atomics. Every path schedules the segments on the device (see `schedule`); the training paths (dense
// gradients, fused SGD / row-wise Adagrad) have no host read; only seb_backward_rows, whose outputs have
// data-dependent shapes, reads two counts. Scratch contract: scenario_embedding_bag_backward.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "saml_common.h"

namespace saml {
namespace seb {

using saml::kMean;
using saml::kNone;
using saml::kSum;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kChunks = 4;  // column chunks per lane kept in registers by the segment kernel
constexpr int64_t kSentinel = int64_t(1) << 62;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> zero_vec() {
  Vec<T, N> z;
#pragma unroll
  for (int k = 0; k < N; ++k) z.v[k] = T(0);
  return z;
}

template <typename T, typename A, int N>
__device__ __forceinline__ void store_vec(T* p, const A (&a)[N], A mult) {
  Vec<T, N> o;
#pragma unroll
  for (int k = 0; k < N; ++k) o.v[k] = T(a[k] * mult);
  *reinterpret_cast<Vec<T, N>*>(p) = o;
}

// The fused update's store of a weight row's columns [d, d + N): a 16-bit table with sr rounds stochastically
// (saml_common.h, sr_round with sr_bits: 16 random bits of the row's key and each column, one mix per pair of
// columns), anything else as store_vec.
template <typename T, typename A, int N>
__device__ __forceinline__ void store_vec_update(T* p, const A (&a)[N], bool sr, uint32_t key, int64_t d) {
  if constexpr (saml::sr_applies<T>()) {
    if (sr) {
      Vec<T, N> o;
      if (N % 2 == 0 && (d & 1) == 0) {  // whole pairs: one mix for two columns (bitwise sr_bits)
#pragma unroll
        for (int k = 0; k + 1 < N; k += 2) {
          const uint32_t h = saml::sr_pair_bits(key, (d + k) >> 1);
          o.v[k] = saml::sr_round<T>(float(a[k]), h & 0xFFFFu);
          o.v[k + 1] = saml::sr_round<T>(float(a[k + 1]), h >> 16);
        }
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) o.v[k] = saml::sr_round<T>(float(a[k]), saml::sr_bits(key, d + k));
      }
      *reinterpret_cast<Vec<T, N>*>(p) = o;
      return;
    }
  }
  store_vec<T, A, N>(p, a, A(1));
}

// Lanes of this thread's group (G lanes starting at a multiple of G): the mask for group shuffles.
__device__ __forceinline__ unsigned group_mask(int G) {
  if (G == 32) return 0xffffffffu;
  const int first = (threadIdx.x & 31) & ~(G - 1);
  return ((1u << G) - 1u) << first;
}

template <typename T>
__device__ __forceinline__ T group_sum(T v, int G, unsigned mask) {
  for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, G);
  return v;
}

// ------------------------------------------------------------------------------------------------ host side

struct Args {
  at::Tensor indices, offsets, scenario, gw, sw, fr, fsr, slot, psw;
  int64_t F = 0, B = 0, D = 0, R = 0, M = 0, Rs = 0, nbags = 0, nnz = 0;
};

inline Args prepare(const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& scenario,
                    const at::Tensor& gw, const at::Tensor& sw, const at::Tensor& fr, const at::Tensor& fsr,
                    const at::Tensor& slot, const c10::optional<at::Tensor>& psw, const char* op) {
  TORCH_CHECK(indices.is_cuda(), op, ": indices must be a CUDA tensor");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(), op, ": offsets dtype ", offsets.scalar_type(),
              " differs from indices dtype ", indices.scalar_type());
  TORCH_CHECK(gw.dim() == 2 && sw.dim() == 3 && sw.size(2) == gw.size(1), op,
              ": global_weight must be [R, D] and scenario_weight [M, Rs, D] with the same D");
  TORCH_CHECK(gw.scalar_type() == sw.scalar_type(), op, ": table dtypes differ");
  TORCH_CHECK(fr.numel() >= 2 && fsr.numel() == fr.numel() && slot.numel() >= fr.numel() - 1, op,
              ": feature_rows / feature_scenario_rows need F+1 entries and aware_slot F");
  Args a;
  a.indices = indices.contiguous();
  a.offsets = offsets.contiguous();
  a.scenario = scenario.to(at::kLong).contiguous();
  a.gw = gw.contiguous();
  a.sw = sw.contiguous();
  a.fr = fr.to(indices.device(), at::kLong).contiguous();
  a.fsr = fsr.to(indices.device(), at::kLong).contiguous();
  a.slot = slot.to(indices.device(), at::kLong).contiguous();
  if (psw.has_value()) a.psw = psw->to(gw.scalar_type()).contiguous();
  a.F = fr.numel() - 1;
  TORCH_CHECK((offsets.numel() - 1) % a.F == 0, op, ": offsets must have F*B+1 entries, F = ", a.F);
  a.nbags = offsets.numel() - 1;
  a.B = a.nbags / a.F;
  TORCH_CHECK(a.scenario.numel() == a.B, op, ": scenario must have B = ", a.B, " entries");
  a.D = gw.size(1);
  a.R = gw.size(0);
  a.M = sw.size(0);
  a.Rs = sw.size(1);
  a.nnz = indices.numel();
  if (a.psw.defined()) TORCH_CHECK(a.psw.numel() == a.nnz, op, ": per_sample_weights needs nnz entries");
  return a;
}

// Lanes per bag / row: enough lanes of VEC columns to cover D, at most a warp.
inline int group_size(int64_t D, int vec) {
  const int64_t cols = (D + vec - 1) / vec;
  int g = 1;
  while (g < 32 && g < cols) g <<= 1;
  return g;
}

inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Calls fn(std::integral_constant<int, VEC>) with the widest VEC (16 bytes) when D and every pointer allow it.
template <typename scalar_t, typename Fn>
void with_vec(int64_t D, std::initializer_list<at::Tensor> ts, Fn&& fn) {
  constexpr int kVec = 16 / int(sizeof(scalar_t));
  bool ok = D % kVec == 0;
  for (const auto& t : ts) ok = ok && aligned16(t);
  if (ok) fn(std::integral_constant<int, kVec>{});
  else fn(std::integral_constant<int, 1>{});
}

inline int64_t blocks_for(int64_t groups, int G) {
  const int64_t per_block = kThreads / G;
  return (groups + per_block - 1) / per_block;
}

}  // namespace seb
}  // namespace saml
