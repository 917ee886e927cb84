// CPU kernels of the M-branch linear layer (contract in csrc/registry.cpp, saml_kernels/ops/mbranch_linear.py).
//
// The CPU win comes from doing only the necessary work with no redundant copies, not from a hand GEMM: the
// GEMMs are MKL's (at::mm_out into slices of preallocated buffers); the kernels here do the counting sort by
// scenario, the row gathers (with the dtype conversion folded in), and one fused epilogue pass
// (bias + relu/leaky_relu, scatter back to the original row order, conversion to the output dtype).
//
// Accumulation: float32 (float64 for float64 inputs). float16/bfloat16 rows are converted to float32 while they
// are gathered, so every GEMM runs in float32 and rounding to the input dtype happens once, at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <vector>

#include "saml_common.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Act : int64_t { kNone = 0, kRelu = 1, kLeaky = 2, kGelu = 3, kSilu = 4 };
constexpr double kLeakySlope = 0.01;

bool needs_z(int64_t act) { return act == kGelu || act == kSilu; }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows of each scenario, contiguous: perm[start[m] .. start[m+1]) are the rows of scenario m in their original
// order (a stable counting sort, O(B)). Out-of-range scenarios are an error (checked while counting).
struct Groups {
  Tensor perm;                 // int64 [B]
  std::vector<int64_t> start;  // [M + 1]
};

Groups group_rows(const Tensor& scenario, int64_t M) {
  const int64_t B = scenario.numel();
  Groups g;
  g.perm = at::empty({B}, scenario.options().dtype(at::kLong));
  g.start.assign(M + 1, 0);
  int64_t* perm = g.perm.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(scenario.scalar_type(), "mbl_group_rows", [&] {
    const index_t* s = scenario.data_ptr<index_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t v = s[b];
      TORCH_CHECK(v >= 0 && v < M, "mbranch_linear: scenario[", b, "] = ", v, " is out of range [0, ", M, ")");
      ++g.start[v + 1];
    }
    for (int64_t m = 0; m < M; ++m) g.start[m + 1] += g.start[m];
    std::vector<int64_t> pos(g.start.begin(), g.start.end() - 1);
    for (int64_t b = 0; b < B; ++b) perm[pos[s[b]]++] = b;
  });
  return g;
}

// dst[i] = src[perm[i]] converted to acc_t (dst is [R, C] contiguous acc_t, src [*, C] contiguous scalar_t).
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* src, const int64_t* perm, acc_t* dst, int64_t R, int64_t C) {
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* s = src + perm[r] * C;
      acc_t* d = dst + r * C;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(d, s, C * sizeof(acc_t));
      } else {
        for (int64_t c = 0; c < C; ++c) d[c] = static_cast<acc_t>(s[c]);
      }
    }
  });
}

// Per-thread, grow-only scratch buffers for the sorted row tiles. The CPU allocator does not cache, and every
// fresh page of a multi-MB buffer costs a page fault on first touch: measured here (2-core VM), three fresh 4 MB
// buffers per call cost about as much as the call's GEMMs. Scratch never escapes a kernel call; slots used in one
// call are distinct. Buffers above kScratchCap bytes are not kept.
enum Slot : int { kRowsA = 0, kRowsB = 1, kRowsC = 2, kNumSlots = 3 };
constexpr int64_t kScratchCap = int64_t(1) << 30;

Tensor scratch(Slot slot, int64_t rows, int64_t cols, at::ScalarType dt) {
  thread_local std::array<Tensor, kNumSlots> ws;
  const int64_t n = rows * cols;
  if (n * static_cast<int64_t>(c10::elementSize(dt)) > kScratchCap) return at::empty({rows, cols}, at::dtype(dt));
  Tensor& w = ws[slot];
  if (!w.defined() || w.scalar_type() != dt || w.numel() < n) w = at::empty({std::max<int64_t>(n, 1)}, at::dtype(dt));
  return w.narrow(0, 0, n).view({rows, cols});
}

// Gathers x's rows (perm order) into a [R, C] scratch buffer of the accumulation dtype.
Tensor gather(const Tensor& x, const int64_t* perm, int64_t R, Slot slot) {
  const int64_t C = x.size(-1);
  Tensor out = scratch(slot, R, C, acc_type(x.scalar_type()));
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_gather", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gather_rows<scalar_t, acc_t>(x.data_ptr<scalar_t>(), perm, out.data_ptr<acc_t>(), R, C);
  });
  return out;
}

// The fused epilogue. For every row r of src [R, C] (acc dtype):
//   v = src[r] + bias_row(r)   (no bias: bias_row returns nullptr)
//   v = act(v) for relu / leaky_relu (gelu / silu: the caller applies ATen's vectorised op to the stored z)
//   out[dst_row(r)] = v, converted to scalar_t.
// out may alias src (same dtype, identity dst_row): each element is read before it is written.
template <typename scalar_t, typename acc_t, typename BiasRow, typename DstRow>
void epilogue(const acc_t* src, int64_t R, int64_t C, BiasRow bias_row, DstRow dst_row, scalar_t* out, int64_t act) {
  const int64_t inline_act = needs_z(act) ? kNone : act;
  const acc_t slope = static_cast<acc_t>(kLeakySlope);
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* s = src + r * C;
      const acc_t* b = bias_row(r);
      scalar_t* d = out + dst_row(r) * C;
      // One loop per case so the compiler vectorises each; max/min keep relu / leaky_relu branch-free (a
      // data-dependent branch on random signs mispredicts half the time: ~10x slower, measured).
      if (b != nullptr) {
        if (inline_act == kRelu) {
          for (int64_t c = 0; c < C; ++c) { acc_t v = s[c] + b[c]; d[c] = static_cast<scalar_t>(std::max(v, acc_t(0))); }
        } else if (inline_act == kLeaky) {
          for (int64_t c = 0; c < C; ++c) { acc_t v = s[c] + b[c]; d[c] = static_cast<scalar_t>(std::max(v, acc_t(0)) + slope * std::min(v, acc_t(0))); }
        } else {
          for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(s[c] + b[c]);
        }
      } else {
        if (inline_act == kRelu) {
          for (int64_t c = 0; c < C; ++c) { acc_t v = s[c]; d[c] = static_cast<scalar_t>(std::max(v, acc_t(0))); }
        } else if (inline_act == kLeaky) {
          for (int64_t c = 0; c < C; ++c) { acc_t v = s[c]; d[c] = static_cast<scalar_t>(std::max(v, acc_t(0)) + slope * std::min(v, acc_t(0))); }
        } else if (static_cast<const void*>(d) != static_cast<const void*>(s)) {
          for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(s[c]);
        }
      }
    }
  });
}

// gelu / silu on the stored pre-activation z (ATen's vectorised, parallel kernels), written into y.
void apply_smooth_act(const Tensor& z, Tensor& y, int64_t act) {
  if (act == kGelu) {
    at::gelu_out(y, z, "none");
  } else if (act == kSilu) {
    at::silu_out(y, z);
  }
}

void check_common(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& aux,
                  const OptTensor& aux_weight, int64_t act) {
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
  TORCH_CHECK(act >= kNone && act <= kSilu, op, ": unknown activation code ", act);
}

// Weights in the accumulation dtype, contiguous (no copy for float32/float64 contiguous weights).
Tensor to_acc(const Tensor& w) { return w.to(acc_type(w.scalar_type())).contiguous(); }

// ------------------------------------------------------------------------------------------------ grouped forward

std::tuple<Tensor, Tensor> grouped_forward(const Tensor& x_, const Tensor& weight_, const OptTensor& bias_,
                                           const OptTensor& aux_, const OptTensor& aux_weight_,
                                           const Tensor& scenario_, int64_t act) {
  check_common("mbl_grouped_forward", x_, weight_, bias_, aux_, aux_weight_, act);
  TORCH_CHECK(x_.dim() == 2, "mbl_grouped_forward: x must be [B, K], got ", x_.sizes());
  const Tensor x = x_.contiguous(), scenario = scenario_.contiguous();
  const int64_t B = x.size(0), M = weight_.size(0), N = weight_.size(2);
  TORCH_CHECK(scenario.numel() == B, "mbl_grouped_forward: scenario has ", scenario.numel(), " entries, x has ", B);
  Tensor y = at::empty({B, N}, x.options());
  Tensor z = needs_z(act) ? at::empty({B, N}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || N == 0) return {y, z};

  const Groups g = group_rows(scenario, M);
  const int64_t* perm = g.perm.data_ptr<int64_t>();
  const Tensor w = to_acc(weight_);
  const Tensor xs = gather(x, perm, B, kRowsA);  // rows sorted by scenario, acc dtype
  Tensor auxs, wa;
  if (aux_.has_value()) {
    auxs = gather(aux_->contiguous(), perm, B, kRowsB);
    wa = to_acc(*aux_weight_);
  }
  // ys: z in sorted row order, one GEMM per scenario straight into its slice (no per-group allocation).
  Tensor ys = scratch(kRowsC, B, N, xs.scalar_type());
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r0 = g.start[m], n = g.start[m + 1] - r0;
    if (n == 0) continue;
    Tensor out = ys.narrow(0, r0, n);
    at::mm_out(out, xs.narrow(0, r0, n), w[m]);
    if (aux_.has_value()) out.addmm_(auxs.narrow(0, r0, n), wa[m]);
  }
  // Epilogue: bias of the row's scenario (+ relu/leaky), scatter back to the original row, convert.
  Tensor bias = bias_.has_value() ? to_acc(*bias_) : Tensor();
  Tensor& first = needs_z(act) ? z : y;
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_grouped_epilogue", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(scenario.scalar_type(), "mbl_grouped_epilogue_idx", [&] {
      const index_t* s = scenario.data_ptr<index_t>();
      epilogue<scalar_t, acc_t>(
          ys.data_ptr<acc_t>(), B, N,
          [&](int64_t r) -> const acc_t* { return bp ? bp + static_cast<int64_t>(s[perm[r]]) * N : nullptr; },
          [&](int64_t r) { return perm[r]; }, first.data_ptr<scalar_t>(), act);
    });
  });
  apply_smooth_act(z, y, act);
  return {y, z};
}

// ------------------------------------------------------------------------------------------------ all forward

std::tuple<Tensor, Tensor> all_forward(const Tensor& x_, const Tensor& weight_, const OptTensor& bias_,
                                       const OptTensor& aux_, const OptTensor& aux_weight_, int64_t act) {
  check_common("mbl_all_forward", x_, weight_, bias_, aux_, aux_weight_, act);
  TORCH_CHECK(x_.dim() == 2 || x_.dim() == 3, "mbl_all_forward: x must be [B, K] or [M, B, K], got ", x_.sizes());
  const int64_t M = weight_.size(0), K = weight_.size(1), N = weight_.size(2);
  const bool shared = x_.dim() == 2;
  if (!shared) TORCH_CHECK(x_.size(0) == M, "mbl_all_forward: per-branch x has ", x_.size(0), " branches, M = ", M);
  const int64_t B = x_.size(-2);
  const at::ScalarType dt = x_.scalar_type(), acc = acc_type(dt);
  const bool same = dt == acc;
  const Tensor w = to_acc(weight_);
  Tensor bias = bias_.has_value() ? to_acc(*bias_) : Tensor();

  // buf: z in acc dtype. Shared x: [B, M*N] = x @ Wp with Wp [K, M*N] the packed weights (one GEMM); y is then
  // the [M, B, N] view (strides (N, M*N, 1)) of this buffer. Per-branch x: [M, B, N] by one batched GEMM.
  // buf is scratch unless it becomes y itself (float32/float64 without a stored z).
  const bool buf_is_y = same && !needs_z(act);
  auto make_buf = [&](at::IntArrayRef shape, int64_t rows, int64_t cols) {
    return buf_is_y ? at::empty(shape, x_.options().dtype(acc)) : scratch(kRowsA, rows, cols, acc).view(shape);
  };
  Tensor buf;
  int64_t R, C;
  if (shared) {
    R = B, C = M * N;
    buf = make_buf({B, M * N}, B, M * N);
    if (B > 0 && C > 0) {
      at::mm_out(buf, x_.to(acc), w.permute({1, 0, 2}).reshape({K, M * N}));
      if (aux_.has_value())
        buf.addmm_(aux_->to(acc), to_acc(*aux_weight_).permute({1, 0, 2}).reshape({aux_weight_->size(1), M * N}));
    }
  } else {
    R = M * B, C = N;
    buf = make_buf({M, B, N}, M * B, N);
    if (B > 0 && C > 0) {
      at::bmm_out(buf, x_.to(acc), w);
      if (aux_.has_value()) {
        const Tensor a = aux_->to(acc), wa = to_acc(*aux_weight_);
        for (int64_t m = 0; m < M; ++m) buf[m].addmm_(a, wa[m]);
      }
    }
  }
  // Epilogue in place when the dtype allows (float32/float64), else into a new tensor of the input dtype.
  Tensor first = buf_is_y ? buf : at::empty(buf.sizes(), x_.options());
  Tensor y, z;
  if (R > 0 && C > 0) {
    SAML_DISPATCH_FLOATING(dt, "mbl_all_epilogue", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
      // Shared: bias row = packed bias [M*N] for every row. Per-branch: row r = (m, b) uses bias[m].
      auto bias_row = [&](int64_t r) -> const acc_t* {
        return bp == nullptr ? nullptr : (shared ? bp : bp + (r / B) * N);
      };
      epilogue<scalar_t, acc_t>(buf.data_ptr<acc_t>(), R, C, bias_row, [](int64_t r) { return r; },
                                first.data_ptr<scalar_t>(), act);
    });
  }
  if (needs_z(act)) {
    z = first;
    y = at::empty_like(z);
    apply_smooth_act(z, y, act);
  } else {
    y = first;
    z = at::empty({0}, x_.options());
  }
  if (shared) {
    y = y.view({B, M, N}).permute({1, 0, 2});
    if (needs_z(act)) z = z.view({B, M, N}).permute({1, 0, 2});
  }
  return {y, z};
}

// ------------------------------------------------------------------------------------------------ grouped backward

// Row b of scenario m of a [B, C] or [M, B, C] tensor (stride(-1) == 1; a 2-D tensor ignores m).
template <typename T>
struct RowSrc {
  const T* p = nullptr;
  int64_t s_m = 0, s_b = 0;
  RowSrc() = default;
  explicit RowSrc(const Tensor& t) : p(t.data_ptr<T>()), s_m(t.dim() == 3 ? t.stride(0) : 0), s_b(t.stride(-2)) {}
  const T* row(int64_t m, int64_t b) const { return p + m * s_m + b * s_b; }
};

Tensor unit_stride_rows(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// dst[r] = act'-weighted own row of src for original row b = perm[r] of scenario m = s[b]:
//   act none: src[m, b]; relu: src * (saved > 0); leaky: src * (saved > 0 ? 1 : slope). dst is [B, C] acc.
Tensor gather_own(const Tensor& src_, const Tensor& saved_, const Tensor& scenario, const int64_t* perm, int64_t act,
                  Slot slot) {
  const Tensor src = unit_stride_rows(src_);
  const Tensor saved = act == kNone ? Tensor() : unit_stride_rows(saved_);
  const int64_t R = scenario.numel(), C = src.size(-1);
  Tensor out = scratch(slot, R, C, acc_type(src.scalar_type()));
  SAML_DISPATCH_FLOATING(src.scalar_type(), "mbl_gather_own", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const RowSrc<scalar_t> g(src);
    const RowSrc<scalar_t> v = saved.defined() ? RowSrc<scalar_t>(saved) : RowSrc<scalar_t>();
    acc_t* dst = out.data_ptr<acc_t>();
    AT_DISPATCH_INDEX_TYPES(scenario.scalar_type(), "mbl_gather_own_idx", [&] {
      const index_t* s = scenario.data_ptr<index_t>();
      at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = perm[r], m = s[b];
          const scalar_t* __restrict__ gr = g.row(m, b);
          acc_t* __restrict__ d = dst + r * C;  // scratch: never aliases dy or saved
          if (act == kRelu) {
            const scalar_t* __restrict__ vr = v.row(m, b);
            // Select, not branch (vectorised compare + blend; a branch on random signs mispredicts).
            for (int64_t c = 0; c < C; ++c) {
              const acc_t gv = static_cast<acc_t>(gr[c]);
              d[c] = static_cast<acc_t>(vr[c]) > acc_t(0) ? gv : acc_t(0);
            }
          } else if (act == kLeaky) {
            const scalar_t* __restrict__ vr = v.row(m, b);
            for (int64_t c = 0; c < C; ++c) {
              const acc_t gv = static_cast<acc_t>(gr[c]);
              // Two "p ? a : 0" selects (compiled to masks, like relu's; one term is exactly 0, so the sum is exact).
              const bool p = static_cast<acc_t>(vr[c]) > acc_t(0);
              d[c] = (p ? gv : acc_t(0)) + (p ? acc_t(0) : gv * static_cast<acc_t>(kLeakySlope));
            }
          } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
            std::memcpy(d, gr, C * sizeof(acc_t));
          } else {
            for (int64_t c = 0; c < C; ++c) d[c] = static_cast<acc_t>(gr[c]);
          }
        }
      });
    });
  });
  return out;
}

// Input gradient rows back to their place: dst[perm[r]] (2-D like) or dst[s_b, b] of a zeroed [M, B, C] (3-D like).
Tensor scatter_own(const Tensor& src, const int64_t* perm, const Tensor& scenario, const Tensor& like) {
  const int64_t R = src.size(0), C = src.size(1);
  const bool three = like.dim() == 3;
  Tensor out = three ? at::zeros({like.size(0), R, C}, like.options()) : at::empty({R, C}, like.options());
  SAML_DISPATCH_FLOATING(out.scalar_type(), "mbl_scatter", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AT_DISPATCH_INDEX_TYPES(scenario.scalar_type(), "mbl_scatter_idx", [&] {
      const index_t* s = scenario.data_ptr<index_t>();
      epilogue<scalar_t, acc_t>(
          src.data_ptr<acc_t>(), R, C, [](int64_t) -> const acc_t* { return nullptr; },
          [&](int64_t r) { return three ? static_cast<int64_t>(s[perm[r]]) * R + perm[r] : perm[r]; },
          out.data_ptr<scalar_t>(), kNone);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const char* op, const Tensor& dy, const Tensor& saved, const Tensor& x, const Tensor& weight, const OptTensor& aux,
    const OptTensor& aux_weight, const Tensor& scenario_, int64_t act, bool need_dx, bool need_dw, bool need_db,
    bool need_daux, bool need_dwa) {
  check_common(op, x, weight, std::nullopt, aux, aux_weight, act);
  TORCH_CHECK(act == kNone || act == kRelu || act == kLeaky, op, ": fused activation backward supports codes 0-2, got ",
              act);
  const int64_t M = weight.size(0), K = weight.size(1), N = weight.size(2);
  const int64_t B = x.size(-2);
  TORCH_CHECK(x.dim() == 2 || (x.dim() == 3 && x.size(0) == M), op, ": x must be [B, K] or [M, B, K], got ", x.sizes());
  TORCH_CHECK((dy.dim() == 2 && dy.size(0) == B && dy.size(1) == N) ||
                  (dy.dim() == 3 && dy.size(0) == M && dy.size(1) == B && dy.size(2) == N),
              op, ": dy must be [B, N] or [M, B, N] with B = ", B, ", N = ", N, ", got ", dy.sizes());
  if (act != kNone)
    TORCH_CHECK(saved.sizes() == dy.sizes() && saved.scalar_type() == dy.scalar_type(), op,
                ": saved must be shaped like dy for relu/leaky_relu, got ", saved.sizes());
  TORCH_CHECK(scenario_.numel() == B, op, ": scenario has ", scenario_.numel(), " entries, x has ", B);
  const bool has_aux = aux.has_value();
  need_daux = need_daux && has_aux;
  need_dwa = need_dwa && has_aux;
  const int64_t Ka = has_aux ? aux->size(1) : 0;
  const auto opts = x.options();
  const at::ScalarType acc = acc_type(x.scalar_type());
  // Distinct empty tensors: outputs of an op must not alias each other.
  auto empty = [&] { return at::empty({0}, opts); };
  Tensor dx = empty(), dw = empty(), db = empty(), daux = empty(), dwa = empty();
  if (B == 0) {
    if (need_dx) dx = at::empty(x.sizes(), opts);
    if (need_dw) dw = at::zeros({M, K, N}, opts);
    if (need_db) db = at::zeros({M, N}, opts);
    if (need_daux) daux = at::empty({0, Ka}, opts);
    if (need_dwa) dwa = at::zeros({M, Ka, N}, opts);
    return {dx, dw, db, daux, dwa};
  }
  const Tensor scenario = scenario_.contiguous();
  const Groups g = group_rows(scenario, M);
  const int64_t* perm = g.perm.data_ptr<int64_t>();
  const Tensor dzs = gather_own(dy, saved, scenario, perm, act, kRowsA);  // act'-weighted own dy rows, sorted

  // Parameter gradients: one GEMM per scenario over its own rows (X_m^T dZ_m), written into its slice.
  auto param_grad = [&](const Tensor& inp, int64_t F) {
    const Tensor rows = gather_own(inp, Tensor(), scenario, perm, kNone, kRowsB);  // consumed before reuse
    Tensor out = at::empty({M, F, N}, opts.dtype(acc));
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r0 = g.start[m], n = g.start[m + 1] - r0;
      Tensor o = out[m];
      if (n == 0) o.zero_(); else at::mm_out(o, rows.narrow(0, r0, n).t(), dzs.narrow(0, r0, n));
    }
    return out.to(x.scalar_type());
  };
  // Input gradients: dZ_m W_m^T per scenario into the sorted buffer, then one scatter back.
  auto input_grad = [&](const Tensor& wt, int64_t F, const Tensor& like) {
    const Tensor w = to_acc(wt);
    Tensor rows = scratch(kRowsC, B, F, acc);  // consumed by the scatter before the next use
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r0 = g.start[m], n = g.start[m + 1] - r0;
      if (n == 0) continue;
      Tensor o = rows.narrow(0, r0, n);
      at::mm_out(o, dzs.narrow(0, r0, n), w[m].t());
    }
    return scatter_own(rows, perm, scenario, like);
  };
  if (need_dw) dw = param_grad(x, K);
  if (need_dwa) dwa = param_grad(*aux, Ka);
  if (need_db) {
    Tensor out = at::empty({M, N}, opts.dtype(acc));
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r0 = g.start[m], n = g.start[m + 1] - r0;
      Tensor o = out[m];
      if (n == 0) o.zero_(); else at::sum_out(o, dzs.narrow(0, r0, n), std::vector<int64_t>{0});
    }
    db = out.to(x.scalar_type());
  }
  if (need_dx) dx = input_grad(weight, K, x);
  if (need_daux) daux = input_grad(*aux_weight, Ka, *aux);
  return {dx, dw, db, daux, dwa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_backward(
    const Tensor& dz, const Tensor& x, const Tensor& weight, const OptTensor& aux, const OptTensor& aux_weight,
    const Tensor& scenario, bool need_dx, bool need_dw, bool need_db, bool need_daux, bool need_dwa) {
  TORCH_CHECK(x.dim() == 2, "mbl_grouped_backward: x must be [B, K], got ", x.sizes());
  TORCH_CHECK(dz.dim() == 2, "mbl_grouped_backward: dz must be [B, N], got ", dz.sizes());
  return backward_impl("mbl_grouped_backward", dz, Tensor(), x, weight, aux, aux_weight, scenario, kNone, need_dx,
                       need_dw, need_db, need_daux, need_dwa);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_backward_act(
    const Tensor& dy, const Tensor& saved, const Tensor& x, const Tensor& weight, const OptTensor& aux,
    const OptTensor& aux_weight, const Tensor& scenario, int64_t act, bool need_dx, bool need_dw, bool need_db,
    bool need_daux, bool need_dwa) {
  return backward_impl("mbl_grouped_backward_act", dy, saved, x, weight, aux, aux_weight, scenario, act, need_dx,
                       need_dw, need_db, need_daux, need_dwa);
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) {
  m.impl("mbl_grouped_forward", &grouped_forward);
  m.impl("mbl_all_forward", &all_forward);
  m.impl("mbl_grouped_backward", &grouped_backward);
  m.impl("mbl_grouped_backward_act", &grouped_backward_act);
}
