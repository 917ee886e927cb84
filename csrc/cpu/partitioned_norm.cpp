// CPU kernels of the partitioned (scenario-wise) normalisation (contract: csrc/registry.cpp,
// saml_kernels/ops/partitioned_norm.py).
//
// x [B, N] rows of any scenarios in any order, s_b in [0, M):
//   pn_stats:    mean_m, var_m (biased) over the rows of scenario m, count_m           (two passes: exact variance)
//   pn_forward:  y_b = (x_b - mean_{s_b}) rstd_{s_b} scale_{s_b} + shift_{s_b}
//   pn_backward: dscale_m = sum dy xhat, dshift_m = sum dy over the rows of m;
//                dx = scale rstd (dy - (dshift + xhat dscale) / n) with batch statistics, scale rstd dy without.
// The segmented sums run over fixed blocks of rows (a block's partial [M, N] sums, then the blocks added in
// order), so results do not depend on the thread count. Arithmetic in float32 (float64 for float64 x).
// (No `#pragma omp simd` in the loops: they sit inside the dispatch macro's argument, where a pragma is not allowed;
// the compiler vectorises the plain loops.)
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "saml_common.h"

namespace {

constexpr int64_t kMinBlockRows = 256;  // rows per block at least (a block's partial sums are M x N values)
constexpr int64_t kMaxBlocks = 256;     // at most this many partial [M, N] sums

void check_rows(const at::Tensor& x, const at::Tensor& scenario, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), what, ": x must be a contiguous [B, N] tensor, got ", x.sizes());
  TORCH_CHECK(scenario.dim() == 1 && scenario.size(0) == x.size(0), what, ": scenario must be [B] with B = ",
              x.size(0), ", got ", scenario.sizes());
}

void check_stat(const at::Tensor& t, int64_t M, int64_t N, at::ScalarType dtype, const char* what, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N && t.is_contiguous() && t.scalar_type() == dtype, what,
              ": ", name, " must be a contiguous [M, N] = [", M, ", ", N, "] ", dtype, " tensor, got ", t.sizes(), " ",
              t.scalar_type());
}

// The scenario ids as int64, checked in range (an out-of-range id would index outside the [M, N] statistics).
std::vector<int64_t> scenario_ids(const at::Tensor& scenario, int64_t M, const char* what) {
  const auto sc = scenario.contiguous();
  std::vector<int64_t> ids(sc.size(0));
  AT_DISPATCH_INDEX_TYPES(sc.scalar_type(), "pn_scenario_ids", [&] {
    const index_t* p = sc.data_ptr<index_t>();
    for (size_t b = 0; b < ids.size(); ++b) {
      const int64_t s = static_cast<int64_t>(p[b]);
      TORCH_CHECK(s >= 0 && s < M, what, ": scenario[", b, "] = ", s, " out of range [0, ", M, ")");
      ids[b] = s;
    }
  });
  return ids;
}

// [parts, M, N] sums: add_row(b, dst, part_stride) adds row b's contribution to dst[k * part_stride + n]
// (dst already points at the row's scenario). Fixed blocks of rows, partials added in block order.
template <typename acc_t, typename RowFn>
at::Tensor segmented_sums(int64_t B, int64_t M, int64_t N, int64_t parts, const std::vector<int64_t>& seg,
                          const at::TensorOptions& opt, RowFn add_row) {
  const int64_t rows = std::max<int64_t>(kMinBlockRows, (B + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t nblk = (B + rows - 1) / rows;
  auto partial = at::zeros({std::max<int64_t>(nblk, 1), parts, M, N}, opt);
  acc_t* p = partial.data_ptr<acc_t>();
  const int64_t stride = M * N;
  at::parallel_for(0, nblk, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t blk = k0; blk < k1; ++blk) {
      acc_t* base = p + blk * parts * stride;
      const int64_t end = std::min(B, (blk + 1) * rows);
      for (int64_t b = blk * rows; b < end; ++b) add_row(b, base + seg[b] * N, stride);
    }
  });
  if (nblk <= 1) return partial[0];
  auto out = partial[0].clone();
  for (int64_t blk = 1; blk < nblk; ++blk) out.add_(partial[blk]);  // fixed order: deterministic
  return out;
}

at::Tensor counts(const std::vector<int64_t>& seg, int64_t M, const at::Tensor& like) {
  auto c = at::zeros({M}, like.options().dtype(at::kLong));
  int64_t* cp = c.data_ptr<int64_t>();
  for (int64_t s : seg) ++cp[s];
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pn_stats(const at::Tensor& x, const at::Tensor& scenario,
                                                        int64_t num_scenarios) {
  check_rows(x, scenario, "pn_stats");
  TORCH_CHECK(num_scenarios >= 1, "pn_stats: num_scenarios must be >= 1, got ", num_scenarios);
  const int64_t B = x.size(0), N = x.size(1), M = num_scenarios;
  const auto seg = scenario_ids(scenario, M, "pn_stats");
  auto count = counts(seg, M, x);
  at::Tensor mean, var;
  SAML_DISPATCH_FLOATING(x.scalar_type(), "pn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const auto n = count.clamp_min(1).to(opt.dtype()).unsqueeze(1);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    mean = segmented_sums<acc_t>(B, M, N, 1, seg, opt, [&](int64_t b, acc_t* dst, int64_t) {
             const scalar_t* xr = xp + b * N;
             for (int64_t i = 0; i < N; ++i) dst[i] += static_cast<acc_t>(xr[i]);
           })[0].div_(n);
    const acc_t* mp = mean.data_ptr<acc_t>();
    var = segmented_sums<acc_t>(B, M, N, 1, seg, opt, [&](int64_t b, acc_t* dst, int64_t) {
            const scalar_t* xr = xp + b * N;
            const acc_t* mr = mp + seg[b] * N;
            for (int64_t i = 0; i < N; ++i) {
              const acc_t d = static_cast<acc_t>(xr[i]) - mr[i];
              dst[i] += d * d;
            }
          })[0].div_(n);
  });
  return {mean, var, count};
}

at::Tensor pn_forward(const at::Tensor& x, const at::Tensor& scenario, const at::Tensor& mean, const at::Tensor& rstd,
                      const at::Tensor& scale, const at::Tensor& shift) {
  check_rows(x, scenario, "pn_forward");
  const int64_t B = x.size(0), N = x.size(1), M = scale.size(0);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_stat(mean, M, N, acc_type, "pn_forward", "mean");
  check_stat(rstd, M, N, acc_type, "pn_forward", "rstd");
  check_stat(scale, M, N, x.scalar_type(), "pn_forward", "scale");
  check_stat(shift, M, N, x.scalar_type(), "pn_forward", "shift");
  const auto seg = scenario_ids(scenario, M, "pn_forward");
  auto y = at::empty_like(x);
  SAML_DISPATCH_FLOATING(x.scalar_type(), "pn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // per scenario: y = (x - mean) a + c with a = rstd scale, c = shift (x - mean first: no cancellation)
    const auto a = rstd * scale.to(acc_type);
    const auto c = shift.to(acc_type).contiguous();
    const acc_t* ap = a.data_ptr<acc_t>();
    const acc_t* cp = c.data_ptr<acc_t>();
    const acc_t* mp = mean.data_ptr<acc_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t* ar = ap + seg[b] * N;
        const acc_t* cr = cp + seg[b] * N;
        const acc_t* mr = mp + seg[b] * N;
        const scalar_t* xr = xp + b * N;
        scalar_t* yr = yp + b * N;
        for (int64_t i = 0; i < N; ++i) yr[i] = static_cast<scalar_t>((static_cast<acc_t>(xr[i]) - mr[i]) * ar[i] + cr[i]);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pn_backward(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& scenario, const at::Tensor& mean,
                                                           const at::Tensor& rstd, const at::Tensor& scale,
                                                           const at::Tensor& count, bool batch_stats) {
  check_rows(x, scenario, "pn_backward");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "pn_backward: dy must be a contiguous tensor like x ", x.sizes(), ", got ", dy.sizes());
  const int64_t B = x.size(0), N = x.size(1), M = scale.size(0);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_stat(mean, M, N, acc_type, "pn_backward", "mean");
  check_stat(rstd, M, N, acc_type, "pn_backward", "rstd");
  check_stat(scale, M, N, x.scalar_type(), "pn_backward", "scale");
  TORCH_CHECK(count.dim() == 1 && count.size(0) == M, "pn_backward: count must be [M]");
  const auto seg = scenario_ids(scenario, M, "pn_backward");
  auto dx = at::empty_like(x);
  at::Tensor dscale, dshift;
  SAML_DISPATCH_FLOATING(x.scalar_type(), "pn_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto opt = x.options().dtype(acc_type);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    const acc_t* mp = mean.data_ptr<acc_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    const auto sums = segmented_sums<acc_t>(B, M, N, 2, seg, opt, [&](int64_t b, acc_t* dst, int64_t part) {
      const scalar_t* xr = xp + b * N;
      const scalar_t* gr = gp + b * N;
      const acc_t* mr = mp + seg[b] * N;
      const acc_t* rr = rp + seg[b] * N;
      for (int64_t i = 0; i < N; ++i) {
        const acc_t g = static_cast<acc_t>(gr[i]);
        dst[i] += g * (static_cast<acc_t>(xr[i]) - mr[i]) * rr[i];
        dst[part + i] += g;
      }
    });
    const auto ds = sums[0].contiguous(), dh = sums[1].contiguous();
    const auto g_scale = (scale.to(acc_type) * rstd).contiguous();
    const auto inv_n = (1.0 / count.clamp_min(1).to(acc_type)).contiguous();
    const acc_t* dsp = ds.data_ptr<acc_t>();
    const acc_t* dhp = dh.data_ptr<acc_t>();
    const acc_t* gsp = g_scale.data_ptr<acc_t>();
    const acc_t* inp = inv_n.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = seg[b];
        const scalar_t* xr = xp + b * N;
        const scalar_t* gr = gp + b * N;
        const acc_t *mr = mp + s * N, *rr = rp + s * N, *gs = gsp + s * N, *dsr = dsp + s * N, *dhr = dhp + s * N;
        const acc_t in = inp[s];
        scalar_t* out = dxp + b * N;
        if (batch_stats) {
          for (int64_t i = 0; i < N; ++i) {
            const acc_t xhat = (static_cast<acc_t>(xr[i]) - mr[i]) * rr[i];
            out[i] = static_cast<scalar_t>(gs[i] * (static_cast<acc_t>(gr[i]) - (dhr[i] + xhat * dsr[i]) * in));
          }
        } else {
          for (int64_t i = 0; i < N; ++i) out[i] = static_cast<scalar_t>(gs[i] * static_cast<acc_t>(gr[i]));
        }
      }
    });
    dscale = ds.to(scale.scalar_type(), false, /*copy=*/true);  // the outputs must not share storage
    dshift = dh.to(scale.scalar_type(), false, /*copy=*/true);
  });
  return {dx, dscale, dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) {
  m.impl("pn_stats", &pn_stats);
  m.impl("pn_forward", &pn_forward);
  m.impl("pn_backward", &pn_backward);
}
