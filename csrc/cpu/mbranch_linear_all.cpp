// CPU kernel of the M-branch linear layer's route "all" (contract in csrc/registry.cpp,
// saml_kernels/ops/mbranch_linear.py): every row through every branch.
//
// A shared x [B, K] takes ONE GEMM against the packed weights Wp [K, M*N] (Wp[k, m*N + n] = W[m, k, n]) into a
// [B, M*N] buffer, whose [M, B, N] view (strides (N, M*N, 1)) is y; a per-branch x [M, B, K] takes one batched
// GEMM. The GEMMs are MKL's (at::mm_out / bmm_out into the buffer); one epilogue pass adds the bias, applies
// relu / leaky_relu and converts to the output dtype (in place for float32/float64 without a stored z).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mbranch_linear_rows.h"

namespace {

using namespace saml::mbranch;
using saml::kActNone;

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

  // buf: z in acc dtype, scratch unless it becomes y itself (float32/float64 without a stored z).
  const bool buf_is_y = same && !needs_z(act);
  auto make_buf = [&](at::IntArrayRef shape, int64_t rows, int64_t cols) {
    return buf_is_y ? at::empty(shape, x_.options().dtype(acc)) : scratch(kAllRouteOut, rows, cols, acc).view(shape);
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
  // Epilogue in place when the dtype allows (float32/float64), else into a new tensor of the input dtype;
  // gelu / silu are applied afterwards by ATen on the stored z.
  Tensor first = buf_is_y ? buf : at::empty(buf.sizes(), x_.options());
  const int64_t inline_act = needs_z(act) ? kActNone : act;
  if (R > 0 && C > 0) {
    SAML_DISPATCH_FLOATING(dt, "mbl_all_epilogue", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
      const acc_t* src = buf.data_ptr<acc_t>();
      scalar_t* dst = first.data_ptr<scalar_t>();
      // under 2^16 elements in all: one thread (a parallel region's wake-up costs more than the pass)
      at::parallel_for(0, R, std::max<int64_t>(1, 65536 / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          // Shared: the packed bias [M*N] for every row. Per-branch: row r = (m, b) takes bias[m].
          const acc_t* b = bp == nullptr ? nullptr : (shared ? bp : bp + (r / B) * N);
          store_row<scalar_t, acc_t>(src + r * C, b, dst + r * C, C, inline_act);
        }
      });
    });
  }
  Tensor y, z;
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

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) { m.impl("mbl_all_forward", &all_forward); }
