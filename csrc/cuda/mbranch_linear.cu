// CUDA kernels of mbranch_linear: mbl_grouped_forward, mbl_all_forward, mbl_grouped_backward
// (contracts in csrc/registry.cpp; oracle saml_kernels/reference/mbranch_linear.py).
//
// GEMM engine: cuBLAS through ATen (at::mm_out / addmm_ / bmm), NOT a hand-written tensor-core kernel.
// Why: each GEMM here is a plain dense GEMM once rows are grouped (per-scenario contiguous segments, or one
// GEMM against the packed [K, M*N] weights); cuBLAS(Lt) picks tuned HMMA/HGMMA kernels per shape and arch
// (wgmma on sm_90 needs sm_90a + TMA pipelines to be competitive), which a hand mma.sync kernel written
// without a GPU to tune it would not beat. The Triton backend (saml_kernels/triton/mbranch_linear.py) is the
// fully fused, sync-free grouped GEMM (in-kernel row gather, on-device tile schedule); this backend trades
// one small host sync for cuBLAS speed:
//   - grouping: stable at::sort of the scenario ids + at::searchsorted -> perm, seg [M+1] on the device;
//   - ONE host sync per call: seg (M+1 int64) is copied to the host to size the per-scenario cuBLAS calls
//     (cuBLAS has no grouped GEMM whose group sizes live in device memory). Not CUDA-graph capturable.
//   - rows are gathered once (index_select: one pass over x, cheap next to the GEMM), the fused epilogue
//     kernel adds the bias, applies the activation and scatters rows back to their original order.
// All-branch forward with a shared x: one GEMM x @ Wp, Wp [K, M*N] the packed weights (one copy of W), whose
// [B, M*N] output is the contract's [M, B, N] view (strides (N, M*N, 1)); epilogue in place. Per-branch x: bmm.
// The aux operand is a second GEMM accumulated into the same output (addmm_, beta = 1): the concat [x ; aux]
// is never built. For float16/bfloat16 cuBLAS accumulates in float32 but the x@W partial is rounded to the
// input dtype before the aux GEMM adds to it (one extra rounding when aux is given; float32 is exact).
// Backward (deterministic, no atomics): dz rows gathered by perm; dW_m = X_m^T dZ_m and dWa_m by one cuBLAS GEMM
// per scenario segment (each output owned by one GEMM), db_m = column sums per segment (at::sum_out), dx_sorted
// = dZ_m W_m^T per segment, scattered back with index_copy_ (perm is a permutation: no collisions).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "mbranch_common.cuh"
#include "saml_common.h"

namespace {

using at::Tensor;
using saml_cuda::activate;

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8));
}

// y[perm[i], n] = act(zs[i, n] + bias[s_i, n]); z likewise without act (when z != nullptr).
template <typename scalar_t>
__global__ void grouped_epilogue_kernel(const scalar_t* __restrict__ zs, const int64_t* __restrict__ perm,
                                        const int64_t* __restrict__ ssorted, const scalar_t* __restrict__ bias,
                                        int64_t sbm, int64_t sbn, scalar_t* __restrict__ y,
                                        scalar_t* __restrict__ z, int64_t B, int64_t N, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * N;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / N, n = idx - i * N;
    const int64_t r = perm[i];
    acc_t v = static_cast<acc_t>(zs[idx]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[ssorted[i] * sbm + n * sbn]);
    if (z != nullptr) z[r * N + n] = static_cast<scalar_t>(v);
    y[r * N + n] = static_cast<scalar_t>(activate(v, act));
  }
}

// In place over a contiguous z buffer laid out [B, M, N] (shared x) or [M, B, N] (per-branch x):
// v = z + z2[b, m*N + n] (aux GEMM, per-branch layout only) + bias[m, n]; z = v (when keep_z); y = act(v).
template <typename scalar_t>
__global__ void all_epilogue_kernel(scalar_t* __restrict__ zbuf, const scalar_t* __restrict__ z2,
                                    const scalar_t* __restrict__ bias, int64_t sbm, int64_t sbn,
                                    scalar_t* __restrict__ y, int64_t M, int64_t B, int64_t N, bool branch_major,
                                    bool keep_z, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = M * B * N;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = idx % N;
    const int64_t q = idx / N;
    const int64_t m = branch_major ? q / B : q % M;
    const int64_t b = branch_major ? q % B : q / M;
    acc_t v = static_cast<acc_t>(zbuf[idx]);
    if (z2 != nullptr) v += static_cast<acc_t>(z2[(b * M + m) * N + n]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[m * sbm + n * sbn]);
    if (keep_z) zbuf[idx] = static_cast<scalar_t>(v);
    y[idx] = static_cast<scalar_t>(activate(v, act));
  }
}

void check_common(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                  const c10::optional<Tensor>& aux, const c10::optional<Tensor>& aux_weight, const char* op) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), op, ": x and weight must be CUDA tensors");
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be [M, K, N], got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight dtypes differ");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == weight.size(2), op,
                ": bias must be [M, N], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype differs from weight");
  }
  TORCH_CHECK(aux.has_value() == aux_weight.has_value(), op, ": aux and aux_weight go together");
  if (aux.has_value()) {
    TORCH_CHECK(aux->dim() == 2 && aux_weight->dim() == 3 && aux_weight->size(0) == weight.size(0) &&
                    aux_weight->size(1) == aux->size(1) && aux_weight->size(2) == weight.size(2),
                op, ": aux [B, Ka] / aux_weight [M, Ka, N] mismatch: ", aux->sizes(), " / ", aux_weight->sizes());
    TORCH_CHECK(aux->scalar_type() == x.scalar_type() && aux_weight->scalar_type() == x.scalar_type(), op,
                ": aux / aux_weight dtypes differ from x");
  }
}

// Packed weights Wp [K, M*N], Wp[k, m*N + n] = W[m, k, n] (one copy).
Tensor packed(const Tensor& w) { return w.permute({1, 0, 2}).reshape({w.size(1), w.size(0) * w.size(2)}).contiguous(); }

std::vector<int64_t> host_segments(const Tensor& seg) {
  auto h = seg.to(at::kCPU);  // the one host sync of this backend (M+1 integers)
  auto p = h.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + h.numel());
}

std::tuple<Tensor, Tensor> grouped_forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                           const c10::optional<Tensor>& aux,
                                           const c10::optional<Tensor>& aux_weight, const Tensor& scenario,
                                           int64_t activation) {
  check_common(x, weight, bias, aux, aux_weight, "mbl_grouped_forward");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "mbl_grouped_forward: x must be [B, K]");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), M = weight.size(0), N = weight.size(2);
  const bool keep_z = saml_cuda::needs_preactivation(activation);
  auto y = at::empty({B, N}, x.options());
  auto z = keep_z ? at::empty({B, N}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || N == 0) return {y, z};
  Tensor perm, ssorted, seg;
  std::tie(perm, ssorted, seg) = saml_cuda::sort_by_scenario(scenario, M);
  auto segh = host_segments(seg);
  auto xs = x.index_select(0, perm);
  Tensor as;
  if (aux.has_value()) as = aux->index_select(0, perm);
  auto zs = at::empty({B, N}, x.options());
  for (int64_t m = 0; m < M; ++m) {
    const int64_t lo = segh[m], n = segh[m + 1] - segh[m];
    if (n == 0) continue;
    auto out = zs.narrow(0, lo, n);
    at::mm_out(out, xs.narrow(0, lo, n), weight[m]);
    if (aux.has_value()) out.addmm_(as.narrow(0, lo, n), (*aux_weight)[m]);
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_grouped_forward_cuda", [&] {
    grouped_epilogue_kernel<scalar_t><<<blocks_for(B * N), kThreads, 0, stream>>>(
        zs.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), ssorted.data_ptr<int64_t>(),
        bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, bias.has_value() ? bias->stride(0) : 0,
        bias.has_value() ? bias->stride(1) : 0, y.data_ptr<scalar_t>(), keep_z ? z.data_ptr<scalar_t>() : nullptr,
        B, N, static_cast<int>(activation));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, z};
}

std::tuple<Tensor, Tensor> all_forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                       const c10::optional<Tensor>& aux, const c10::optional<Tensor>& aux_weight,
                                       int64_t activation) {
  check_common(x, weight, bias, aux, aux_weight, "mbl_all_forward");
  const bool shared = x.dim() == 2;
  TORCH_CHECK(shared || (x.dim() == 3 && x.size(0) == weight.size(0)), "mbl_all_forward: x must be [B,K] or [M,B,K]");
  TORCH_CHECK(x.size(-1) == weight.size(1), "mbl_all_forward: x's last dim must be K = ", weight.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = weight.size(0), K = weight.size(1), N = weight.size(2), B = x.size(-2);
  const bool keep_z = saml_cuda::needs_preactivation(activation);
  Tensor zbuf, z2;
  if (shared) {
    zbuf = at::mm(x, packed(weight));                                    // [B, M*N]
    if (aux.has_value()) zbuf.addmm_(*aux, packed(*aux_weight));
  } else {
    zbuf = at::bmm(x, weight).contiguous();                              // [M, B, N]
    if (aux.has_value()) z2 = at::mm(*aux, packed(*aux_weight)).contiguous();  // [B, M*N]
  }
  (void)K;
  auto y = at::empty_like(zbuf, at::MemoryFormat::Contiguous);
  if (zbuf.numel() > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_all_forward_cuda", [&] {
      all_epilogue_kernel<scalar_t><<<blocks_for(zbuf.numel()), kThreads, 0, stream>>>(
          zbuf.data_ptr<scalar_t>(), z2.defined() ? z2.data_ptr<scalar_t>() : nullptr,
          bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, bias.has_value() ? bias->stride(0) : 0,
          bias.has_value() ? bias->stride(1) : 0, y.data_ptr<scalar_t>(), M, B, N, /*branch_major=*/!shared,
          keep_z, static_cast<int>(activation));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto as_mbn = [&](const Tensor& t) { return shared ? t.view({B, M, N}).permute({1, 0, 2}) : t.view({M, B, N}); };
  return {as_mbn(y), keep_z ? as_mbn(zbuf) : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_backward(
    const Tensor& dz, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& aux,
    const c10::optional<Tensor>& aux_weight, const Tensor& scenario, bool need_dx, bool need_dweight,
    bool need_dbias, bool need_daux, bool need_daux_weight) {
  check_common(x, weight, c10::nullopt, aux, aux_weight, "mbl_grouped_backward");
  TORCH_CHECK(dz.dim() == 2 && dz.size(0) == x.size(0) && dz.size(1) == weight.size(2),
              "mbl_grouped_backward: dz must be [B, N]");
  TORCH_CHECK(dz.scalar_type() == x.scalar_type(), "mbl_grouped_backward: dz dtype differs from x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), M = weight.size(0), K = weight.size(1), N = weight.size(2);
  need_daux = need_daux && aux.has_value();
  need_daux_weight = need_daux_weight && aux.has_value();
  // Outputs not asked for are distinct empty tensors (custom ops forbid aliased outputs).
  auto empty = [&] { return at::empty({0}, dz.options()); };
  Tensor dx = need_dx ? at::empty({B, K}, x.options()) : empty();
  Tensor dw = need_dweight ? at::empty({M, K, N}, weight.options()) : empty();
  Tensor db = need_dbias ? at::empty({M, N}, weight.options()) : empty();
  Tensor daux = need_daux ? at::empty({B, aux->size(1)}, aux->options()) : empty();
  Tensor dwa = need_daux_weight ? at::empty(aux_weight->sizes(), aux_weight->options()) : empty();
  if (B == 0 || N == 0) {
    for (Tensor* t : {&dx, &dw, &db, &daux, &dwa})
      if (t->numel() > 0) t->zero_();
    return {dx, dw, db, daux, dwa};
  }
  Tensor perm, ssorted, seg;
  std::tie(perm, ssorted, seg) = saml_cuda::sort_by_scenario(scenario, M);
  auto segh = host_segments(seg);
  auto dzs = dz.index_select(0, perm);
  Tensor xs = need_dweight ? x.index_select(0, perm) : Tensor();
  Tensor as = need_daux_weight ? aux->index_select(0, perm) : Tensor();
  Tensor dxs = need_dx ? at::empty({B, K}, x.options()) : Tensor();
  Tensor das = need_daux ? at::empty({B, aux->size(1)}, aux->options()) : Tensor();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t lo = segh[m], n = segh[m + 1] - segh[m];
    if (n == 0) {  // empty scenario: no rows to write, parameter gradients are exactly zero
      if (need_dweight) dw[m].zero_();
      if (need_dbias) db[m].zero_();
      if (need_daux_weight) dwa[m].zero_();
      continue;
    }
    auto g = dzs.narrow(0, lo, n);
    if (need_dx) { auto o = dxs.narrow(0, lo, n); at::mm_out(o, g, weight[m].t()); }
    if (need_daux) { auto o = das.narrow(0, lo, n); at::mm_out(o, g, (*aux_weight)[m].t()); }
    if (need_dweight) { auto o = dw[m]; at::mm_out(o, xs.narrow(0, lo, n).t(), g); }
    if (need_daux_weight) { auto o = dwa[m]; at::mm_out(o, as.narrow(0, lo, n).t(), g); }
    if (need_dbias) { auto o = db[m]; at::sum_out(o, g, {0}); }
  }
  if (need_dx) dx.index_copy_(0, perm, dxs);
  if (need_daux) daux.index_copy_(0, perm, das);
  return {dx, dw, db, daux, dwa};
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CUDA, m) {
  m.impl("mbl_grouped_forward", &grouped_forward);
  m.impl("mbl_all_forward", &all_forward);
  m.impl("mbl_grouped_backward", &grouped_backward);
}
