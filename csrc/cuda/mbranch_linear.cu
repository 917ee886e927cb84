// CUDA kernels of mbranch_linear: mbl_grouped_forward, mbl_all_forward, mbl_grouped_backward
// (contracts in csrc/registry.cpp; oracle saml_kernels/reference/mbranch_linear.py).
//
// No host sync, CUDA-graph capturable (default engine). Rows are grouped by scenario on the device (stable
// at::sort + at::searchsorted -> perm [B], seg [M+1]); the GEMMs are the tiled engine of mbranch_common.cuh, whose
// tile schedule is computed by each CTA from the device-side seg, so the host never learns the segment sizes:
//   - grouped forward: grid ceil(B/64) + M row tiles (a bound known without reading data; CTAs without a tile
//     exit), each CTA gathers its rows through perm while loading the A tile, accumulates x W_m and aux Wa_m in
//     float32 (float64 for double), adds the bias, applies the activation and scatters the rows back to their
//     original order: one kernel, no gathered copies of x, one rounding of z;
//   - grouped backward: dx/daux by the same kernel against W^T (strides swapped); dW_m = X_m^T dZ_m (and dWa_m,
//     db_m) by a grid over (K tile, N tile, m) that reads its scenario's row range from seg on the device and loops
//     over those rows in order: deterministic, no atomics, zeros for an empty scenario;
//   - all-route forward: float16/bfloat16 run the same engine on a dense schedule (tensor cores, float32
//     accumulation of x W + aux Wa + bias, ONE rounding). float32/float64 keep cuBLAS (one GEMM x @ Wp against the
//     packed [K, M*N] weights, no sync either; float32 exact unless torch allows TF32 for cuBLAS, float64 exact)
//     and a fused bias/activation epilogue.
// Why not at::_grouped_mm: it needs torch >= 2.8 and sm_90 with bf16 only, while the package must build with
// torch >= 2.6 and serve every dtype (float32 exact, float64): a general sync-free kernel is needed anyway.
// Why a hand-written kernel and not cuBLAS per scenario: cuBLAS has no grouped GEMM whose group sizes live in
// device memory, so sizing per-scenario calls costs one host sync per call (seg to the host).
//
// Precision: the all route rounds z once, after float32 accumulation of x W + aux Wa + bias. Rounding the partial
// products to bfloat16 first (cuBLAS writes its output in the input dtype and may use reduced-precision split-K)
// would add up to three roundings of O(1) partials (~4e-3 each) before the activation; for z that close to 0 the
// sign of z can differ from the float32-accumulated z of the contract, and relu'/leaky_relu' jump there (1 vs the
// slope): an O(1) error in dz and so in dW/dx. With one rounding the sign of y is the sign of the float32 z (wrong
// only for |z| ~ 1e-7 |partials|).
//
// SAML_CUDA_GROUPED=cublas selects per-scenario cuBLAS GEMMs for the grouped route (sized by ONE host sync per
// call, index_select gathers, not capturable) and the cuBLAS all route for every dtype: for benchmarking only.
// SAML_CUDA_GROUPED=simt runs the tiled engine with FMA tiles for every dtype and route (a debugging aid).
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
namespace gemm = saml_cuda::gemm;

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8));
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

// A (rows, [B, K] shared or [M, B, K] per branch) times W [M, K, N], or W^T (wt: the product's K is W's N).
template <typename T>
gemm::RowOperand<T> row_operand(const Tensor& a, const Tensor& w, bool wt) {
  return {a.data_ptr<T>(), a.dim() == 3 ? a.stride(0) : 0, a.stride(-2), a.stride(-1), w.data_ptr<T>(), w.stride(0),
          wt ? w.stride(2) : w.stride(1), wt ? w.stride(1) : w.stride(2), wt ? w.size(2) : w.size(1)};
}

template <typename T>
const T* ptr_or_null(const c10::optional<Tensor>& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; }

// ------------------------------------------------------------------------------------- tiled engine (default)

// The row-GEMM arguments a forward shares: z = x W (+ aux Wa) + bias, y = act(z) (and z kept when keep_z). The
// caller sets the schedule (seg / perm) and the output strides.
template <typename T>
gemm::RowGemmArgs<T, T> forward_args(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                     const c10::optional<Tensor>& aux, const c10::optional<Tensor>& aux_weight,
                                     const Tensor& y, const Tensor& z, bool keep_z, int64_t activation) {
  gemm::RowGemmArgs<T, T> p{};
  p.op[0] = row_operand<T>(x, weight, false);
  p.nops = 1;
  if (aux.has_value()) p.op[p.nops++] = row_operand<T>(*aux, *aux_weight, false);
  p.rows = x.size(-2);
  p.M = static_cast<int>(weight.size(0));
  p.N = weight.size(2);
  p.bias = ptr_or_null<T>(bias);
  p.sbm = bias.has_value() ? bias->stride(0) : 0;
  p.sbn = bias.has_value() ? bias->stride(1) : 0;
  p.y = y.data_ptr<T>();
  p.z = keep_z ? z.data_ptr<T>() : nullptr;
  p.act = static_cast<int>(activation);
  return p;
}

std::tuple<Tensor, Tensor> grouped_forward_tiled(const Tensor& x, const Tensor& weight,
                                                 const c10::optional<Tensor>& bias, const c10::optional<Tensor>& aux,
                                                 const c10::optional<Tensor>& aux_weight, const Tensor& scenario,
                                                 int64_t activation, gemm::Engine engine) {
  const int64_t B = x.size(0), M = weight.size(0), N = weight.size(2);
  const bool keep_z = saml_cuda::needs_preactivation(activation);
  auto y = at::empty({B, N}, x.options());
  auto z = keep_z ? at::empty({B, N}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || N == 0) return {y, z};
  gemm::check_grid(N, M, "mbl_grouped_forward");
  Tensor perm, ssorted, seg;
  std::tie(perm, ssorted, seg) = saml_cuda::sort_by_scenario(scenario, M);
  const bool tc = gemm::use_tensor_cores(x.scalar_type(), engine);
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_grouped_forward_cuda", [&] {
    auto p = forward_args<scalar_t>(x, weight, bias, aux, aux_weight, y, z, keep_z, activation);
    p.seg = seg.data_ptr<int64_t>();
    p.perm = perm.data_ptr<int64_t>();
    p.som = 0;
    p.sor = N;
    p.son = 1;
    gemm::launch_grouped_row_gemm(p, tc, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, z};
}

// Contiguous buffers [B, M*N] (shared x: the contract's [M, B, N] view) or [M, B, N] (per-branch x).
std::tuple<Tensor, Tensor> all_forward_tiled(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                             const c10::optional<Tensor>& aux,
                                             const c10::optional<Tensor>& aux_weight, int64_t activation,
                                             gemm::Engine engine) {
  const bool shared = x.dim() == 2;
  const int64_t M = weight.size(0), N = weight.size(2), B = x.size(-2);
  const bool keep_z = saml_cuda::needs_preactivation(activation);
  auto shape = shared ? std::vector<int64_t>{B, M * N} : std::vector<int64_t>{M, B, N};
  auto y = at::empty(shape, x.options());
  auto z = keep_z ? at::empty(shape, x.options()) : at::empty({0}, x.options());
  if (y.numel() > 0) {
    gemm::check_grid(N, M, "mbl_all_forward");
    const bool tc = gemm::use_tensor_cores(x.scalar_type(), engine);
    SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_all_forward_cuda", [&] {
      auto p = forward_args<scalar_t>(x, weight, bias, aux, aux_weight, y, z, keep_z, activation);
      p.seg = nullptr;  // dense schedule: every row through every branch
      p.perm = nullptr;
      p.som = shared ? N : B * N;
      p.sor = shared ? M * N : N;
      p.son = 1;
      gemm::launch_dense_row_gemm(p, tc, at::cuda::getCurrentCUDAStream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto as_mbn = [&](const Tensor& t) { return shared ? t.view({B, M, N}).permute({1, 0, 2}) : t; };
  return {as_mbn(y), keep_z ? as_mbn(z) : z};
}

void grouped_backward_tiled(const Tensor& dz, const Tensor& x, const Tensor& weight,
                            const c10::optional<Tensor>& aux, const c10::optional<Tensor>& aux_weight,
                            const Tensor& scenario, Tensor& dx, Tensor& dw, Tensor& db, Tensor& daux, Tensor& dwa,
                            gemm::Engine engine) {
  const int64_t B = x.size(0), M = weight.size(0), K = weight.size(1), N = weight.size(2);
  gemm::check_grid(std::max<int64_t>({N, K, aux.has_value() ? aux->size(1) : 0}), M, "mbl_grouped_backward");
  Tensor perm, ssorted, seg;
  std::tie(perm, ssorted, seg) = saml_cuda::sort_by_scenario(scenario, M);
  const bool tc = gemm::use_tensor_cores(x.scalar_type(), engine);
  auto stream = at::cuda::getCurrentCUDAStream();
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_grouped_backward_cuda", [&] {
    using T = scalar_t;
    // dx[b] = dz[b] @ W[s_b]^T (and daux with Wa): the grouped row GEMM, rows scattered back by perm.
    auto input_grad = [&](Tensor& out, const Tensor& w) {
      if (out.numel() == 0) return;
      gemm::RowGemmArgs<T, T> p{};
      p.op[0] = row_operand<T>(dz, w, /*wt=*/true);
      p.nops = 1;
      p.seg = seg.data_ptr<int64_t>();
      p.perm = perm.data_ptr<int64_t>();
      p.rows = B;
      p.M = static_cast<int>(M);
      p.N = out.size(1);
      p.y = out.data_ptr<T>();
      p.sor = out.size(1);
      p.son = 1;
      gemm::launch_grouped_row_gemm(p, tc, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    input_grad(dx, weight);
    if (aux.has_value()) input_grad(daux, *aux_weight);
    // dW_m = X_m^T dZ_m with db_m alongside; dWa_m = Aux_m^T dZ_m.
    auto weight_grad = [&](const Tensor& a, Tensor& w_out, Tensor* b_out) {
      const bool want_w = w_out.numel() > 0, want_b = b_out != nullptr && b_out->numel() > 0;
      if (!want_w && !want_b) return;
      gemm::WgradArgs<T> p{a.data_ptr<T>(), a.stride(0), a.stride(1), a.size(1), dz.data_ptr<T>(), dz.stride(0),
                           dz.stride(1), N, seg.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), static_cast<int>(M),
                           want_w ? w_out.data_ptr<T>() : nullptr, want_b ? b_out->data_ptr<T>() : nullptr};
      // Row-split partials (acc_t) when the (K, N) tiles alone would leave the GPU idle; sized from B, M, K, N.
      const auto plan = gemm::plan_wgrad(B, M, p.K, N, want_w);
      using acc_t = typename gemm::WgradArgs<T>::acc_t;
      auto ws = at::empty({plan.workspace}, dz.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      gemm::launch_wgrad(p, plan, ws.data_ptr<acc_t>(), tc, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    weight_grad(x, dw, &db);
    if (aux.has_value()) weight_grad(*aux, dwa, nullptr);
  });
}

// ------------------------------------------------------------------------------------- cuBLAS (benchmarking)

std::vector<int64_t> host_segments(const Tensor& seg) {
  auto h = seg.to(at::kCPU);  // SAML_CUDA_GROUPED=cublas only: the one host sync of that path (M+1 integers)
  auto p = h.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + h.numel());
}

// y[perm[i], n] = act(zs[i, n] + bias[s_i, n]); z likewise without act (when z != nullptr); 0 where s_i is
// outside [0, M).
template <typename scalar_t>
__global__ void grouped_epilogue_kernel(const scalar_t* __restrict__ zs, const int64_t* __restrict__ perm,
                                        const int64_t* __restrict__ ssorted, const scalar_t* __restrict__ bias,
                                        int64_t sbm, int64_t sbn, scalar_t* __restrict__ y,
                                        scalar_t* __restrict__ z, int64_t B, int64_t M, int64_t N, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * N;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / N, n = idx - i * N;
    const int64_t r = perm[i], m = ssorted[i];
    if (m < 0 || m >= M) {  // unchecked out-of-range scenario: zeros (zs holds no value there; bias not read)
      if (z != nullptr) z[r * N + n] = scalar_t(0);
      y[r * N + n] = scalar_t(0);
      continue;
    }
    acc_t v = static_cast<acc_t>(zs[idx]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[m * sbm + n * sbn]);
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

// Packed weights Wp [K, M*N], Wp[k, m*N + n] = W[m, k, n] (one copy).
Tensor packed(const Tensor& w) { return w.permute({1, 0, 2}).reshape({w.size(1), w.size(0) * w.size(2)}).contiguous(); }

// cuBLAS all route: float32/float64 by default; every dtype with SAML_CUDA_GROUPED=cublas (float16/bfloat16 then
// round the x @ Wp partial before the aux GEMM and the bias are added: more roundings, see "Precision" at the top).
std::tuple<Tensor, Tensor> all_forward_cublas(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                              const c10::optional<Tensor>& aux,
                                              const c10::optional<Tensor>& aux_weight, int64_t activation) {
  const bool shared = x.dim() == 2;
  const int64_t M = weight.size(0), N = weight.size(2), B = x.size(-2);
  const bool keep_z = saml_cuda::needs_preactivation(activation);
  Tensor zbuf, z2;
  if (shared) {
    zbuf = at::mm(x, packed(weight));                                    // [B, M*N]
    if (aux.has_value()) zbuf.addmm_(*aux, packed(*aux_weight));
  } else {
    zbuf = at::bmm(x, weight).contiguous();                              // [M, B, N]
    if (aux.has_value()) z2 = at::mm(*aux, packed(*aux_weight)).contiguous();  // [B, M*N]
  }
  auto y = at::empty_like(zbuf, at::MemoryFormat::Contiguous);
  if (zbuf.numel() > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_all_forward_cuda", [&] {
      all_epilogue_kernel<scalar_t><<<blocks_for(zbuf.numel()), kThreads, 0, stream>>>(
          zbuf.data_ptr<scalar_t>(), z2.defined() ? z2.data_ptr<scalar_t>() : nullptr, ptr_or_null<scalar_t>(bias),
          bias.has_value() ? bias->stride(0) : 0, bias.has_value() ? bias->stride(1) : 0, y.data_ptr<scalar_t>(), M,
          B, N, /*branch_major=*/!shared, keep_z, static_cast<int>(activation));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto as_mbn = [&](const Tensor& t) { return shared ? t.view({B, M, N}).permute({1, 0, 2}) : t.view({M, B, N}); };
  return {as_mbn(y), keep_z ? as_mbn(zbuf) : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor> grouped_forward_cublas(const Tensor& x, const Tensor& weight,
                                                  const c10::optional<Tensor>& bias, const c10::optional<Tensor>& aux,
                                                  const c10::optional<Tensor>& aux_weight, const Tensor& scenario,
                                                  int64_t activation) {
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
        zs.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), ssorted.data_ptr<int64_t>(), ptr_or_null<scalar_t>(bias),
        bias.has_value() ? bias->stride(0) : 0, bias.has_value() ? bias->stride(1) : 0, y.data_ptr<scalar_t>(),
        keep_z ? z.data_ptr<scalar_t>() : nullptr, B, M, N, static_cast<int>(activation));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, z};
}

void grouped_backward_cublas(const Tensor& dz, const Tensor& x, const Tensor& weight,
                             const c10::optional<Tensor>& aux, const c10::optional<Tensor>& aux_weight,
                             const Tensor& scenario, Tensor& dx, Tensor& dw, Tensor& db, Tensor& daux, Tensor& dwa) {
  const int64_t B = x.size(0), M = weight.size(0), K = weight.size(1);
  const bool need_dx = dx.numel() > 0, need_dweight = dw.numel() > 0, need_dbias = db.numel() > 0;
  const bool need_daux = daux.numel() > 0, need_daux_weight = dwa.numel() > 0;
  Tensor perm, ssorted, seg;
  std::tie(perm, ssorted, seg) = saml_cuda::sort_by_scenario(scenario, M);
  auto segh = host_segments(seg);
  auto dzs = dz.index_select(0, perm);
  Tensor xs = need_dweight ? x.index_select(0, perm) : Tensor();
  Tensor as = need_daux_weight ? aux->index_select(0, perm) : Tensor();
  // zeros: the rows of an out-of-range scenario are in no segment and keep them (the unchecked-input contract)
  Tensor dxs = need_dx ? at::zeros({B, K}, x.options()) : Tensor();
  Tensor das = need_daux ? at::zeros({B, aux->size(1)}, aux->options()) : Tensor();
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
}

// ------------------------------------------------------------------------------------- registered ops

std::tuple<Tensor, Tensor> grouped_forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                           const c10::optional<Tensor>& aux,
                                           const c10::optional<Tensor>& aux_weight, const Tensor& scenario,
                                           int64_t activation) {
  check_common(x, weight, bias, aux, aux_weight, "mbl_grouped_forward");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "mbl_grouped_forward: x must be [B, K]");
  TORCH_CHECK(scenario.dim() == 1 && scenario.size(0) == x.size(0), "mbl_grouped_forward: scenario must be [B]");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto engine = gemm::engine_from_env();
  if (engine == gemm::Engine::kCublas)
    return grouped_forward_cublas(x, weight, bias, aux, aux_weight, scenario, activation);
  return grouped_forward_tiled(x, weight, bias, aux, aux_weight, scenario, activation, engine);
}

std::tuple<Tensor, Tensor> all_forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                       const c10::optional<Tensor>& aux, const c10::optional<Tensor>& aux_weight,
                                       int64_t activation) {
  check_common(x, weight, bias, aux, aux_weight, "mbl_all_forward");
  const bool shared = x.dim() == 2;
  TORCH_CHECK(shared || (x.dim() == 3 && x.size(0) == weight.size(0)), "mbl_all_forward: x must be [B,K] or [M,B,K]");
  TORCH_CHECK(x.size(-1) == weight.size(1), "mbl_all_forward: x's last dim must be K = ", weight.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto engine = gemm::engine_from_env();
  const bool tiled = engine == gemm::Engine::kSimt || (engine == gemm::Engine::kAuto && gemm::is_half(x.scalar_type()));
  if (tiled) return all_forward_tiled(x, weight, bias, aux, aux_weight, activation, engine);
  return all_forward_cublas(x, weight, bias, aux, aux_weight, activation);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_backward(
    const Tensor& dz, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& aux,
    const c10::optional<Tensor>& aux_weight, const Tensor& scenario, bool need_dx, bool need_dweight,
    bool need_dbias, bool need_daux, bool need_daux_weight) {
  check_common(x, weight, c10::nullopt, aux, aux_weight, "mbl_grouped_backward");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "mbl_grouped_backward: x must be [B, K]");
  TORCH_CHECK(dz.dim() == 2 && dz.size(0) == x.size(0) && dz.size(1) == weight.size(2),
              "mbl_grouped_backward: dz must be [B, N]");
  TORCH_CHECK(dz.scalar_type() == x.scalar_type(), "mbl_grouped_backward: dz dtype differs from x");
  TORCH_CHECK(scenario.dim() == 1 && scenario.size(0) == x.size(0), "mbl_grouped_backward: scenario must be [B]");
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
  const auto engine = gemm::engine_from_env();
  if (engine == gemm::Engine::kCublas)
    grouped_backward_cublas(dz, x, weight, aux, aux_weight, scenario, dx, dw, db, daux, dwa);
  else
    grouped_backward_tiled(dz, x, weight, aux, aux_weight, scenario, dx, dw, db, daux, dwa, engine);
  return {dx, dw, db, daux, dwa};
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CUDA, m) {
  m.impl("mbl_grouped_forward", &grouped_forward);
  m.impl("mbl_all_forward", &all_forward);
  m.impl("mbl_grouped_backward", &grouped_backward);
}
