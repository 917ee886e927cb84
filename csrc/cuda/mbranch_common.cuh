// Device helpers shared by csrc/cuda/mbranch_linear.cu and csrc/cuda/mutual_unit.cu (activation codes of
// csrc/registry.cpp: 0 none, 1 relu, 2 leaky_relu 0.01, 3 exact gelu (erf), 4 silu), and the device-side
// grouping of rows by scenario.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <tuple>

namespace saml_cuda {

constexpr int kGelu = 3;
constexpr int kSilu = 4;

inline bool needs_preactivation(int64_t act) { return act == kGelu || act == kSilu; }

template <typename A>
__device__ __forceinline__ A activate(A z, int act) {
  switch (act) {
    case 1: return z < A(0) ? A(0) : z;  // keeps NaN, as torch.relu
    case 2: return z > A(0) ? z : z * A(0.01);
    case 3: return A(0.5) * z * (A(1) + erf(z * A(0.70710678118654752440)));
    case 4: return z / (A(1) + exp(-z));
    default: return z;
  }
}

// act'(z)
template <typename A>
__device__ __forceinline__ A activate_grad(A z, int act) {
  switch (act) {
    case 1: return z > A(0) ? A(1) : A(0);
    case 2: return z > A(0) ? A(1) : A(0.01);
    case 3: return A(0.5) * (A(1) + erf(z * A(0.70710678118654752440))) +
                   z * exp(A(-0.5) * z * z) * A(0.39894228040143267794);
    case 4: {
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
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_scenario(const at::Tensor& scenario, int64_t M) {
  auto s = scenario.to(at::kLong);
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(s, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto bounds = at::arange(M + 1, s.options());
  auto seg = at::searchsorted(sorted, bounds);
  return {perm, sorted, seg};
}

}  // namespace saml_cuda
