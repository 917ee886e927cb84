// Row-level pieces shared by the CPU kernels of the M-branch linear layer (mbranch_linear.cpp: routes "own" and
// the grouped backward; mbranch_linear_all.cpp: route "all"): accumulation dtype, stable grouping of rows by
// scenario, per-thread scratch, and the per-row loops that convert, add the bias, and apply relu / leaky_relu or
// their derivative.
//
// Accumulation: float32 (float64 for float64 inputs). float16/bfloat16 rows are converted to float32 while they
// are read, so every GEMM runs in float32 and rounding to the input dtype happens once, when a row is stored.
#pragma once

#include <ATen/ATen.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/scratch.h"
#include "saml_common.h"

namespace saml::mbranch {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// gelu / silu keep the pre-activation z (their backward needs it); relu / leaky_relu recover act'(z) from y.
inline bool needs_z(int64_t act) { return act == kActGelu || act == kActSilu; }

// Weights in the accumulation dtype, contiguous (no copy for float32/float64 contiguous weights).
inline Tensor to_acc(const Tensor& w) { return w.to(acc_type(w.scalar_type())).contiguous(); }

// Rows of each scenario, contiguous: perm[start[m] .. start[m+1]) are the rows of scenario m in their original
// order (a stable counting sort, O(B)). Rows whose scenario is outside [0, M) (unchecked input: the public op
// checks the range unless check_scenario=False) follow in perm[start[M] .. B): they belong to no group, so no GEMM
// reads a weight for them; zero_outside_rows writes their zeros (docs/design.md section 5).
struct Groups {
  Tensor perm;                 // int64 [B]
  std::vector<int64_t> start;  // [M + 1]
};

inline Groups group_rows(const Tensor& scenario, int64_t M) {
  const int64_t B = scenario.numel();
  Groups g;
  g.perm = at::empty({B}, scenario.options().dtype(at::kLong));
  g.start.assign(M + 1, 0);
  int64_t* perm = g.perm.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(scenario.scalar_type(), "mbl_group_rows", [&] {
    const index_t* s = scenario.data_ptr<index_t>();
    auto in = [&](int64_t v) { return v >= 0 && v < M; };
    for (int64_t b = 0; b < B; ++b)
      if (in(s[b])) ++g.start[s[b] + 1];
    for (int64_t m = 0; m < M; ++m) g.start[m + 1] += g.start[m];
    std::vector<int64_t> pos(g.start.begin(), g.start.end());
    for (int64_t b = 0; b < B; ++b) perm[in(s[b]) ? pos[s[b]]++ : pos[M]++] = b;
  });
  return g;
}

// C = op(A) op(B) + beta C for row-major matrices (op(A) [m, k], op(B) [k, n], C [m, n], leading dimensions =
// row strides; ta / tb: A is stored [k, m] / B is stored [n, k]), float or double. Why not at::mm_out: a tile GEMM
// of a small batch is a few microseconds of work, and the dispatcher round trip with the views it needs (w[m], .t(),
// the out= checks) cost as much again; this calls the BLAS sgemm_ / dgemm_ that ATen's CPU matmul calls for these
// dtypes (MKL in torch's x86 builds; the same call, so the same bits), looked up once in the loaded torch library.
// Where torch exports no BLAS symbol, at::mm_out / addmm_ on views of the same memory do it.
template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                          const T*, const int*, const T*, T*, const int*);

template <typename T>
inline BlasGemm<T> blas_gemm() {
  static const BlasGemm<T> fn = reinterpret_cast<BlasGemm<T>>(
      dlsym(RTLD_DEFAULT, std::is_same_v<T, double> ? "dgemm_" : "sgemm_"));
  return fn;
}

template <typename T>
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T beta, const T* a, int64_t lda, const T* b,
             int64_t ldb, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const BlasGemm<T> fn = blas_gemm<T>();
  const bool fits = std::max({m, n, k, lda, ldb, ldc}) < (int64_t(1) << 31);
  if (fn != nullptr && fits && k > 0) {
    // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B first
    const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
    const int M = int(n), N = int(m), K = int(k), LB = int(ldb), LA = int(lda), LC = int(ldc);
    const T one = T(1);
    fn(&opb, &opa, &M, &N, &K, &one, b, &LB, a, &LA, &beta, c, &LC);
    return;
  }
  const auto opts = at::dtype(c10::CppTypeToScalarType<T>::value);
  Tensor A = ta ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  Tensor Bm = tb ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                 : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(C, A, Bm);
  } else {
    C.addmm_(A, Bm, beta);
  }
}

// Zeros into the rows of t [B, ...] whose scenario is outside [0, M) (perm[start[M] ..), see group_rows).
inline void zero_outside_rows(const Groups& g, const Tensor& t) {
  const int64_t B = g.perm.numel(), first = g.start.back();
  if (first < B && t.numel() > 0) t.index_fill_(0, g.perm.narrow(0, first, B - first), 0);
}

// Per-thread, grow-only scratch (common/scratch.h): the CPU allocator does not cache, and every fresh page of a
// multi-MB buffer costs a page fault on first touch (three fresh 4 MB buffers per call can cost about as much as
// the call's GEMMs). Scratch never escapes a kernel call, and the slots one thread uses in one call are
// distinct. The kTile* slots are taken inside parallel regions (each worker thread has its own); the others are
// taken by the calling thread before a parallel region, whose workers then write disjoint parts of them. Requests
// above kScratchCap bytes get an ordinary tensor (not kept).
enum Slot : int {
  kWeightParts = 0,     // own route's backward: weight-gradient partial sums
  kAllRouteOut = 0,     // all route's forward: its GEMM output (never live together with kWeightParts)
  kAuxWeightParts = 1,  // own route's backward: aux-weight-gradient partial sums
  kTileIn = 2,          // one tile of gathered input rows
  kTileAux = 3,         // one tile of gathered aux rows
  kTileOut = 4,         // one tile of GEMM output rows
  kTileGrad = 5,        // one tile of dz rows
};
constexpr int64_t kScratchCap = int64_t(1) << 30;

inline Tensor scratch(Slot slot, int64_t rows, int64_t cols, at::ScalarType dt) {
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(dt));
  if (bytes > kScratchCap) return at::empty({rows, cols}, at::dtype(dt));
  return saml::cpu::scratch_tensor(slot, {rows, cols}, dt);
}

// Row b of scenario m of a [B, C] or [M, B, C] tensor (stride(-1) == 1; a 2-D tensor ignores m).
template <typename T>
struct RowSrc {
  const T* p = nullptr;
  int64_t s_m = 0, s_b = 0;
  RowSrc() = default;
  explicit RowSrc(const Tensor& t) : p(t.data_ptr<T>()), s_m(t.dim() == 3 ? t.stride(0) : 0), s_b(t.stride(-2)) {}
  const T* row(int64_t m, int64_t b) const { return p + m * s_m + b * s_b; }
};

inline Tensor unit_stride_rows(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Rows touched in a gather / scatter loop are prefetched this many rows ahead. Rows come in random order, so the
// hardware prefetcher misses the start of every row (a tile's gather stalled on L3 latency without this).
constexpr int64_t kPrefetchRows = 4;

// Prefetches the C elements at p: for reading, or (write) for a row about to be overwritten.
template <typename T>
inline void prefetch_row(const T* p, int64_t C, bool write = false) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = C * static_cast<int64_t>(sizeof(T));
  if (write) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1);
  } else {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0);
  }
}

// d = s converted to the accumulation dtype.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* __restrict__ s, acc_t* __restrict__ d, int64_t C) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(d, s, C * sizeof(acc_t));
  } else {
    for (int64_t c = 0; c < C; ++c) d[c] = static_cast<acc_t>(s[c]);
  }
}

// d = act(s + b), converted to scalar_t; b may be nullptr (no bias). Only relu / leaky_relu are applied here
// (any other code stores s + b). d may alias s (same dtype): each element is read before it is written.
// One loop per case so the compiler vectorises each; max/min keep relu / leaky_relu branch-free (a
// data-dependent branch on random signs mispredicts half the time: ~10x slower, measured).
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* s, const acc_t* b, scalar_t* d, int64_t C, int64_t act) {
  const acc_t slope = static_cast<acc_t>(kLeakyReluSlope);
  if (b != nullptr) {
    if (act == kActRelu) {
      for (int64_t c = 0; c < C; ++c) { acc_t v = s[c] + b[c]; d[c] = static_cast<scalar_t>(std::max(v, acc_t(0))); }
    } else if (act == kActLeakyRelu) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = s[c] + b[c];
        d[c] = static_cast<scalar_t>(std::max(v, acc_t(0)) + slope * std::min(v, acc_t(0)));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(s[c] + b[c]);
    }
  } else {
    if (act == kActRelu) {
      for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(std::max(s[c], acc_t(0)));
    } else if (act == kActLeakyRelu) {
      for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(std::max(s[c], acc_t(0)) + slope * std::min(s[c], acc_t(0)));
    } else if (static_cast<const void*>(d) != static_cast<const void*>(s)) {
      for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(s[c]);
    }
  }
}

// d = g * act'(z) recovered from the saved output v = act(z): none: g; relu: g * (v > 0);
// leaky_relu: g * (v > 0 ? 1 : slope). Selects, not branches (vectorised compare + blend); for leaky_relu one of
// the two selected terms is exactly 0, so the sum is exact.
template <typename scalar_t, typename acc_t>
inline void grad_row(const scalar_t* __restrict__ g, const scalar_t* __restrict__ v, acc_t* __restrict__ d,
                     int64_t C, int64_t act) {
  if (act == kActRelu) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t gv = static_cast<acc_t>(g[c]);
      d[c] = static_cast<acc_t>(v[c]) > acc_t(0) ? gv : acc_t(0);
    }
  } else if (act == kActLeakyRelu) {
    const acc_t slope = static_cast<acc_t>(kLeakyReluSlope);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t gv = static_cast<acc_t>(g[c]);
      const bool p = static_cast<acc_t>(v[c]) > acc_t(0);
      d[c] = (p ? gv : acc_t(0)) + (p ? acc_t(0) : gv * slope);
    }
  } else {
    load_row(g, d, C);
  }
}

// gelu / silu on the stored pre-activation z (ATen's vectorised kernels), written into y.
inline void apply_smooth_act(const Tensor& z, Tensor& y, int64_t act) {
  if (act == kActGelu) {
    at::gelu_out(y, z, "none");
  } else if (act == kActSilu) {
    at::silu_out(y, z);
  }
}

inline void check_common(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                         const OptTensor& aux, const OptTensor& aux_weight, int64_t act) {
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be [M, K, N], got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x dtype ", x.scalar_type(), " != weight dtype ",
              weight.scalar_type());
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x has ", x.size(-1), " features, weight expects ", weight.size(1));
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({weight.size(0), weight.size(2)}), op, ": bias must be [M, N], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(), " != x dtype");
  }
  TORCH_CHECK(aux.has_value() == aux_weight.has_value(), op, ": aux and aux_weight must be given together");
  if (aux.has_value()) {
    TORCH_CHECK(aux->dim() == 2 && aux_weight->dim() == 3 && aux_weight->size(0) == weight.size(0) &&
                    aux_weight->size(1) == aux->size(1) && aux_weight->size(2) == weight.size(2),
                op, ": aux [B, Ka] / aux_weight [M, Ka, N] mismatch: ", aux->sizes(), " / ", aux_weight->sizes());
    TORCH_CHECK(aux->size(0) == x.size(-2), op, ": aux has ", aux->size(0), " rows, x has ", x.size(-2));
    TORCH_CHECK(aux->scalar_type() == x.scalar_type() && aux_weight->scalar_type() == x.scalar_type(), op,
                ": aux / aux_weight dtype must equal x dtype");
  }
  TORCH_CHECK(act >= kActNone && act <= kActSilu, op, ": unknown activation code ", act);
}

}  // namespace saml::mbranch
