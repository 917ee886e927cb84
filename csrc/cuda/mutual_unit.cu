// CUDA kernels of the mutual unit and mutual_linear: mutual_forward, mutual_backward, mutual_linear_forward,
// mutual_linear_backward (contracts in csrc/registry.cpp; oracle saml_kernels/reference/mutual_unit.py).
//
// Math (h [M,B,N], own = h[s_b, b], eps = 1e-8):
//   sim_m = <own, h_m> / (max(|own|,eps) max(|h_m|,eps)) (cosine) or <own, h_m> / sqrt(N) (dot);
//   a = softmax(sim / T); out = sum_m a_m h_m.
// Backward (other branches constant; own is also the s-th term): u_m = <g, h_m>, c_m = a_m (u_m - sum a u) / T,
//   dot:    d own = a_s g + sum_m c_m h_m / sqrt(N) + c_s own / sqrt(N)
//   cosine: d own = a_s g + sum_m c_m h_m / (n_o n_m) - (sum_m c_m sim_m) I own / (n_o |own|)
//                   + c_s (own / n_o^2 - sim_s I own / (n_o |own|)),   I = [|own| > eps].
// Overflow: |h|^2 overflows float32 for |h| > ~1.8e19, so the cosine runs on rows scaled by an exact power of two
// r_m (inv_scale: 2^-e for max|h_m| = f 2^e > 1, else 1; one extra pass for max|h_m|): dots <own r_s, h_m r_m>,
// norms |h_m r_m|, eps r_m in the clamp (same value, same eps semantics). Coefficients apply one r factor at a
// time after the O(|h|) factor c (r_s r_m underflows at |h| = 1e30).
//
// Layout: one warp per row (sample). Pass 1: for each branch the warp accumulates <own,h_m>, |h_m|^2 (and
// <g,h_m>) over its lanes' columns in float32 (float64 for double) and reduces with a fixed xor-shuffle tree:
// deterministic. Lane 0 turns the M values (in shared memory) into softmax weights / gradient coefficients.
// Pass 2: every lane writes its columns. The backward recomputes the softmax weights from its own pass-1
// values (free: M numbers per row) instead of reading the float32 attn, so float64 gradients stay exact.
// h is read through a "source" functor, so the same kernels serve
// mutual_unit (h in memory, any strides) and mutual_linear (h = act(z + bias) computed on the fly from the
// GEMM output z).
//
// mutual_linear on this backend: the all-branch pre-activation z = x W_m (+ aux Wa_m) for a chunk of rows goes
// into a scratch buffer [rows, M*N] of at most kScratchBytes (rows are processed in chunks), then the row kernel
// applies bias + activation in registers and mixes. So h itself is never stored, and the scratch is bounded
// independently of B; the backward recomputes z the same way (one extra GEMM, no M x B x N tensor kept between
// forward and backward). The Triton backend is the fully fused variant (GEMM tiles mixed in registers).
//   - float16/bfloat16: z comes from the tiled tensor-core engine of mbranch_common.cuh as FLOAT32 (x W + aux Wa
//     accumulated in float32, never rounded to 16 bits): the activation and its derivative see the same z as the
//     float32 contract (a bf16-rounded z can flip the sign of a near-zero z: relu'/leaky_relu' jump there);
//   - float32/float64: one cuBLAS GEMM against the packed [K, M*N] weights (float32 exact unless torch allows
//     TF32 for cuBLAS). SAML_CUDA_GROUPED=simt sends these through the engine too, =cublas sends the 16-bit
//     types through cuBLAS (rounded partials; benchmarking only).
// Host syncs: none (no .item(), no host copies, no data-dependent shapes; the chunk count depends on B only), so
// all four ops can be captured in a CUDA graph. A scenario outside [0, M) (the Python op checks the range unless
// check_scenario=False) gives a zero row (out, attn and the gradient; the unchecked-input contract of
// docs/design.md section 5) and no read of h. N == 0 gives an empty out and the attn of empty rows.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "mbranch_common.cuh"
#include "saml_common.h"

namespace {

using at::Tensor;

constexpr int kWarps = 4;  // rows (warps) per block
constexpr int64_t kScratchBytes = int64_t(64) << 20;
constexpr int64_t kMaxBranches = 256;  // per-warp scratch (5M+3) * 8 bytes * kWarps stays under 48 KiB

// h [M, B, N] in memory, any strides.
template <typename scalar_t>
struct HSource {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;
  int64_t sm, sb, sn;
  __device__ __forceinline__ acc_t get(int m, int64_t b, int64_t n) const {
    return static_cast<acc_t>(h[m * sm + b * sb + n * sn]);
  }
  __device__ __forceinline__ acc_t dact(int, int64_t, int64_t) const { return acc_t(1); }
};

// h[m, b, n] = act(z[b, m*N + n] + bias[m, n]) from a contiguous GEMM output z [rows, M*N] (ZT: float32 for
// 16-bit scalar_t, else scalar_t; see zt_of).
template <typename scalar_t, typename ZT>
struct LinearSource {
  using acc_t = at::opmath_type<scalar_t>;
  const ZT* z;
  const scalar_t* bias;
  int64_t sbm, sbn, MN, N;
  int act;
  __device__ __forceinline__ acc_t pre(int m, int64_t b, int64_t n) const {
    acc_t v = static_cast<acc_t>(z[b * MN + m * N + n]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[m * sbm + n * sbn]);
    return v;
  }
  __device__ __forceinline__ acc_t get(int m, int64_t b, int64_t n) const {
    return saml_cuda::activate(pre(m, b, n), act);
  }
  __device__ __forceinline__ acc_t dact(int m, int64_t b, int64_t n) const {
    return saml_cuda::activate_grad(pre(m, b, n), act);
  }
};

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// r_m of every branch into r[0..M) (lane 0 writes; caller syncs): 1 for dot, or when max|h_m| <= 1 or non-finite.
template <typename acc_t, typename Src>
__device__ __forceinline__ void row_scales(const Src& src, int64_t b, int M, int64_t N, int sim_code, int lane,
                                           acc_t* r) {
  for (int m = 0; m < M; ++m) {
    acc_t mx = 0;
    if (sim_code == saml::kSimCosine)
      for (int64_t n = lane; n < N; n += 32) mx = max(mx, abs(src.get(m, b, n)));
    mx = warp_max(mx);
    if (lane == 0) {
      acc_t inv = acc_t(1);
      if (mx > acc_t(1) && isfinite(mx)) {
        int e = 0;
        frexp(mx, &e);
        inv = ldexp(acc_t(1), -e);
      }
      r[m] = inv;
    }
  }
}

template <typename scalar_t, typename Src>
__global__ void mutual_fwd_rows(Src src, const int64_t* __restrict__ scen, int64_t B, int M, int64_t N,
                                double inv_t, int sim_code, scalar_t* __restrict__ out, int64_t sob, int64_t son,
                                float* __restrict__ attn, int64_t sab, int64_t sam) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw) + (threadIdx.x / 32) * (3 * M);
  const int lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= B) return;  // the whole warp leaves together; only warp-level sync below
  if (scen[b] < 0 || scen[b] >= M) {  // unchecked out-of-range scenario: a zero row (out and attn), h never read
    for (int64_t n = lane; n < N; n += 32) out[b * sob + n * son] = static_cast<scalar_t>(acc_t(0));
    for (int m = lane; m < M; m += 32) attn[b * sab + m * sam] = 0.0f;
    return;
  }
  const int s = static_cast<int>(scen[b]);
  acc_t* r = sm + 2 * M;
  row_scales<acc_t>(src, b, M, N, sim_code, lane, r);
  __syncwarp();
  const acc_t r_s = r[s];
  for (int m = 0; m < M; ++m) {
    acc_t dot = 0, nrm = 0;
    const acc_t r_m = r[m];
    for (int64_t n = lane; n < N; n += 32) {
      const acc_t hv = src.get(m, b, n) * r_m, ov = src.get(s, b, n) * r_s;
      dot += hv * ov;
      nrm += hv * hv;
    }
    dot = saml_cuda::warp_sum(dot);
    nrm = saml_cuda::warp_sum(nrm);
    if (lane == 0) { sm[m] = dot; sm[M + m] = nrm; }
  }
  __syncwarp();
  if (lane == 0) {
    const acc_t eps = acc_t(1e-8);
    const acc_t no = max(sqrt(sm[M + s]), eps * r_s);
    const acc_t rs = acc_t(1) / sqrt(static_cast<acc_t>(N));
    acc_t mx = -INFINITY;
    for (int m = 0; m < M; ++m) {
      const acc_t simv = sim_code == saml::kSimCosine ? sm[m] / (max(sqrt(sm[M + m]), eps * r[m]) * no) : sm[m] * rs;
      sm[m] = simv * static_cast<acc_t>(inv_t);
      mx = max(mx, sm[m]);
    }
    acc_t den = 0;
    for (int m = 0; m < M; ++m) { sm[m] = exp(sm[m] - mx); den += sm[m]; }
    for (int m = 0; m < M; ++m) { sm[m] /= den; attn[b * sab + m * sam] = static_cast<float>(sm[m]); }
  }
  __syncwarp();
  for (int64_t n = lane; n < N; n += 32) {
    acc_t acc = 0;
    for (int m = 0; m < M; ++m) acc += sm[m] * src.get(m, b, n);
    out[b * sob + n * son] = static_cast<scalar_t>(acc);
  }
}

// d own (times act'(z_own) for a LinearSource) -> d [B, N].
template <typename scalar_t, typename Src>
__global__ void mutual_bwd_rows(Src src, const scalar_t* __restrict__ g, int64_t sgb, int64_t sgn,
                                const int64_t* __restrict__ scen, const float* __restrict__ attn, int64_t sab,
                                int64_t sam, int64_t B, int M, int64_t N, double inv_t, int sim_code,
                                scalar_t* __restrict__ d, int64_t sdb, int64_t sdn) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw) + (threadIdx.x / 32) * (5 * M + 3);
  const int lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= B) return;
  if (scen[b] < 0 || scen[b] >= M) {  // as in the forward: no gradient
    for (int64_t n = lane; n < N; n += 32) d[b * sdb + n * sdn] = static_cast<scalar_t>(acc_t(0));
    return;
  }
  const int s = static_cast<int>(scen[b]);
  acc_t* r = sm + 4 * M + 2;
  row_scales<acc_t>(src, b, M, N, sim_code, lane, r);
  __syncwarp();
  const acc_t r_s = r[s];
  for (int m = 0; m < M; ++m) {
    acc_t dot = 0, nrm = 0, u = 0;
    const acc_t r_m = r[m];
    for (int64_t n = lane; n < N; n += 32) {
      const acc_t hraw = src.get(m, b, n);
      const acc_t hv = hraw * r_m, ov = src.get(s, b, n) * r_s;
      const acc_t gv = static_cast<acc_t>(g[b * sgb + n * sgn]);
      dot += hv * ov;
      nrm += hv * hv;
      u += gv * hraw;
    }
    dot = saml_cuda::warp_sum(dot);
    nrm = saml_cuda::warp_sum(nrm);
    u = saml_cuda::warp_sum(u);
    if (lane == 0) { sm[m] = dot; sm[M + m] = nrm; sm[2 * M + m] = u; }
  }
  __syncwarp();
  if (lane == 0) {
    const acc_t eps = acc_t(1e-8), it = static_cast<acc_t>(inv_t);
    // softmax weights recomputed from the dots/norms (M values; exact in float64) into sa[]; attn is accepted
    // for the contract but not read
    acc_t* sa = sm + 3 * M + 2;
    {
      const acc_t no = max(sqrt(sm[M + s]), eps * r_s), rs = acc_t(1) / sqrt(static_cast<acc_t>(N));
      acc_t mx = -INFINITY, den = 0;
      for (int m = 0; m < M; ++m) {
        sa[m] = (sim_code == saml::kSimCosine ? sm[m] / (max(sqrt(sm[M + m]), eps * r[m]) * no) : sm[m] * rs) * it;
        mx = max(mx, sa[m]);
      }
      for (int m = 0; m < M; ++m) { sa[m] = exp(sa[m] - mx); den += sa[m]; }
      for (int m = 0; m < M; ++m) sa[m] /= den;
    }
    acc_t ubar = 0;
    for (int m = 0; m < M; ++m) ubar += sa[m] * sm[2 * M + m];
    const acc_t a_s = sa[s];
    const acc_t c_s = a_s * (sm[2 * M + s] - ubar) * it;
    acc_t coef_o, q = acc_t(1);
    if (sim_code == saml::kSimCosine) {
      // scaled norms: the true n_m is nm / r_m, so coefficients carry r_s r_m or r_s^2, one factor at a time
      const acc_t o_len = sqrt(sm[M + s]);
      const acc_t no = max(o_len, eps * r_s);
      const acc_t sim_s = sm[s] / (no * no);
      acc_t csum = 0;
      for (int m = 0; m < M; ++m) {
        const acc_t c = sa[m] * (sm[2 * M + m] - ubar) * it;
        const acc_t nm = max(sqrt(sm[M + m]), eps * r[m]);
        csum += c * (sm[m] / (nm * no));
        // coef_h (c = O(|h| / min r): smaller scale first, larger last); the own row's goes to coef_o
        sm[m] = m == s ? acc_t(0) : ((c * min(r_s, r[m])) / (nm * no)) * max(r_s, r[m]);
      }
      // own row: r_s^2 (2 c_s / n_o^2 - I (csum + c_s sim_s) / (n_o |own|)) applied as coef_o (own q), q = r_s / n_o,
      // |own q| <= 1 (c_s / n_o^2 alone overflows at a zero own next to huge branches: inf * 0 = NaN)
      const acc_t tail = o_len > eps * r_s ? -(csum + c_s * sim_s) / o_len : acc_t(0);
      coef_o = ((acc_t(2) * c_s) / no + tail) * r_s;
      q = (acc_t(1) / no) * r_s;
    } else {
      const acc_t rs = acc_t(1) / sqrt(static_cast<acc_t>(N));
      for (int m = 0; m < M; ++m) {
        sm[m] = sa[m] * (sm[2 * M + m] - ubar) * it * rs;
      }
      coef_o = c_s * rs;
    }
    sm[3 * M] = a_s;
    sm[3 * M + 1] = coef_o;
    r[M] = q;  // slot 5M+2
  }
  __syncwarp();
  const acc_t a_s = sm[3 * M], coef_o = sm[3 * M + 1], q = r[M];
  for (int64_t n = lane; n < N; n += 32) {
    const acc_t gv = static_cast<acc_t>(g[b * sgb + n * sgn]);
    acc_t v = a_s * gv + coef_o * (src.get(s, b, n) * q);
    for (int m = 0; m < M; ++m) v += sm[m] * src.get(m, b, n);
    d[b * sdb + n * sdn] = static_cast<scalar_t>(v * src.dact(s, b, n));
  }
}

inline unsigned row_blocks(int64_t B) { return static_cast<unsigned>((B + kWarps - 1) / kWarps); }

template <typename acc_t>
size_t smem_bytes(int per_warp) { return size_t(kWarps) * per_warp * sizeof(acc_t); }

void check_h(const Tensor& h, const Tensor& scenario, double temperature, int64_t similarity, const char* op) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 3, op, ": h must be a CUDA tensor [M, B, N], got ", h.sizes());
  TORCH_CHECK(scenario.dim() == 1 && scenario.size(0) == h.size(1), op, ": scenario must be [B]");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(similarity == saml::kSimCosine || similarity == saml::kSimDot, op,
              ": similarity code must be 0 (cosine) or 1 (dot), got ", similarity);
  TORCH_CHECK(h.size(0) <= kMaxBranches, op, ": at most ", kMaxBranches, " branches (shared-memory scratch)");
}

std::tuple<Tensor, Tensor> mutual_forward(const Tensor& h, const Tensor& scenario, double temperature,
                                          int64_t similarity) {
  check_h(h, scenario, temperature, similarity, "mutual_forward");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t M = h.size(0), B = h.size(1), N = h.size(2);
  auto out = at::empty({B, N}, h.options());
  auto attn = at::empty({B, M}, h.options().dtype(at::kFloat));
  if (B == 0 || M == 0) return {out.zero_(), attn};  // M == 0: every row out of range, zeros
  auto s = scenario.to(at::kLong).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  SAML_DISPATCH_FLOATING(h.scalar_type(), "mutual_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    HSource<scalar_t> src{h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), h.stride(2)};
    mutual_fwd_rows<scalar_t><<<row_blocks(B), kWarps * 32, smem_bytes<acc_t>(3 * M), stream>>>(
        src, s.data_ptr<int64_t>(), B, int(M), N, 1.0 / temperature, int(similarity), out.data_ptr<scalar_t>(),
        out.stride(0), out.stride(1), attn.data_ptr<float>(), attn.stride(0), attn.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, attn};
}

Tensor mutual_backward(const Tensor& grad_out, const Tensor& h, const Tensor& scenario, const Tensor& attn,
                       double temperature, int64_t similarity) {
  check_h(h, scenario, temperature, similarity, "mutual_backward");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == h.size(1) && grad_out.size(1) == h.size(2),
              "mutual_backward: grad_out must be [B, N]");
  TORCH_CHECK(attn.scalar_type() == at::kFloat && attn.dim() == 2 && attn.size(0) == h.size(1) &&
                  attn.size(1) == h.size(0), "mutual_backward: attn must be float32 [B, M]");
  TORCH_CHECK(grad_out.scalar_type() == h.scalar_type(), "mutual_backward: grad_out dtype differs from h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t M = h.size(0), B = h.size(1), N = h.size(2);
  auto d = at::empty({B, N}, h.options());
  if (B == 0 || M == 0) return d.zero_();
  auto s = scenario.to(at::kLong).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  SAML_DISPATCH_FLOATING(h.scalar_type(), "mutual_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    HSource<scalar_t> src{h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), h.stride(2)};
    mutual_bwd_rows<scalar_t><<<row_blocks(B), kWarps * 32, smem_bytes<acc_t>(5 * M + 3), stream>>>(
        src, grad_out.data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), s.data_ptr<int64_t>(),
        attn.data_ptr<float>(), attn.stride(0), attn.stride(1), B, int(M), N, 1.0 / temperature, int(similarity),
        d.data_ptr<scalar_t>(), d.stride(0), d.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

// ---------------------------------------------------------------------------------------------- mutual_linear

namespace gemm = saml_cuda::gemm;

// Type of the scratch z: float32 for float16/bfloat16 (never rounded to 16 bits), else the input type.
template <typename scalar_t>
using zt_of = std::conditional_t<sizeof(scalar_t) == 2, float, scalar_t>;

struct LinearGemm {
  gemm::Engine engine;
  bool tiled;      // z from the tiled engine (else cuBLAS against the packed weights)
  Tensor wp, wap;  // packed [K, M*N], [Ka, M*N] (cuBLAS only)
  int64_t M, N, chunk;
};

LinearGemm prepare_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                          const c10::optional<Tensor>& aux, const c10::optional<Tensor>& aux_weight,
                          const Tensor& scenario, double temperature, int64_t similarity, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && weight.dim() == 3 && x.size(1) == weight.size(1), op,
              ": x [B, K] and weight [M, K, N] CUDA tensors expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight dtypes differ");
  TORCH_CHECK(scenario.dim() == 1 && scenario.size(0) == x.size(0), op, ": scenario must be [B]");
  TORCH_CHECK(aux.has_value() == aux_weight.has_value(), op, ": aux and aux_weight go together");
  if (aux.has_value())
    TORCH_CHECK(aux->dim() == 2 && aux->size(0) == x.size(0) && aux_weight->dim() == 3 &&
                    aux_weight->size(0) == weight.size(0) && aux_weight->size(1) == aux->size(1) &&
                    aux_weight->size(2) == weight.size(2) && aux->scalar_type() == x.scalar_type() &&
                    aux_weight->scalar_type() == x.scalar_type(),
                op, ": aux [B, Ka] / aux_weight [M, Ka, N] of x's dtype expected");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0");
  TORCH_CHECK(similarity == saml::kSimCosine || similarity == saml::kSimDot, op,
              ": similarity code must be 0 (cosine) or 1 (dot)");
  TORCH_CHECK(weight.size(0) <= kMaxBranches, op, ": at most ", kMaxBranches, " branches");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == weight.size(2) &&
                    bias->scalar_type() == weight.scalar_type(), op, ": bias must be [M, N] of weight's dtype");
  LinearGemm g;
  g.engine = gemm::engine_from_env();
  g.tiled = g.engine == gemm::Engine::kSimt || (g.engine == gemm::Engine::kAuto && gemm::is_half(x.scalar_type()));
  g.M = weight.size(0);
  g.N = weight.size(2);
  if (g.tiled) {
    gemm::check_grid(g.N, g.M, op);
  } else {
    auto pack = [](const Tensor& w) {
      return w.permute({1, 0, 2}).reshape({w.size(1), w.size(0) * w.size(2)}).contiguous();
    };
    g.wp = pack(weight);
    if (aux.has_value()) g.wap = pack(*aux_weight);
  }
  const int64_t z_size = gemm::is_half(x.scalar_type()) ? 4 : int64_t(x.element_size());  // see zt_of
  const int64_t row_bytes = std::max<int64_t>(1, g.M * g.N * z_size);
  g.chunk = std::max<int64_t>(256, kScratchBytes / row_bytes);
  return g;
}

// z [rows, M*N] (ZT = zt_of<scalar_t>), z[b, m*N + n] = x[b0 + b] W_m + aux[b0 + b] Wa_m: every branch's
// pre-activation without the bias.
template <typename scalar_t>
Tensor chunk_preact(const LinearGemm& g, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& aux,
                    const c10::optional<Tensor>& aux_weight, int64_t b0, int64_t rows) {
  using ZT = zt_of<scalar_t>;
  const auto zdtype = c10::CppTypeToScalarType<ZT>::value;
  if (!g.tiled) {
    auto z = at::mm(x.narrow(0, b0, rows), g.wp);
    if (aux.has_value()) z.addmm_(aux->narrow(0, b0, rows), g.wap);
    return z.to(zdtype).contiguous();
  }
  auto z = at::empty({rows, g.M * g.N}, x.options().dtype(zdtype));
  auto operand = [&](const Tensor& a, const Tensor& w) {
    return gemm::RowOperand<scalar_t>{a.data_ptr<scalar_t>() + b0 * a.stride(0), 0, a.stride(0), a.stride(1),
                                      w.data_ptr<scalar_t>(), w.stride(0), w.stride(1), w.stride(2), w.size(1)};
  };
  gemm::RowGemmArgs<scalar_t, ZT> p{};
  p.op[0] = operand(x, weight);
  p.nops = 1;
  if (aux.has_value()) p.op[p.nops++] = operand(*aux, *aux_weight);
  p.rows = rows;
  p.M = static_cast<int>(g.M);
  p.N = g.N;
  p.y = static_cast<ZT*>(z.data_ptr());
  p.som = g.N;
  p.sor = g.M * g.N;
  p.son = 1;
  // N == 0: an empty z, nothing launched (the launcher skips a grid with a zero dimension)
  gemm::launch_dense_row_gemm(p, gemm::use_tensor_cores(x.scalar_type(), g.engine), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z;
}

template <typename scalar_t>
LinearSource<scalar_t, zt_of<scalar_t>> linear_source(const Tensor& z, const c10::optional<Tensor>& bias,
                                                      const LinearGemm& g, int64_t activation) {
  return {z.data_ptr<zt_of<scalar_t>>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
          bias.has_value() ? bias->stride(0) : 0, bias.has_value() ? bias->stride(1) : 0, g.M * g.N, g.N,
          int(activation)};
}

std::tuple<Tensor, Tensor> mutual_linear_forward(const Tensor& x, const Tensor& weight,
                                                 const c10::optional<Tensor>& bias, const c10::optional<Tensor>& aux,
                                                 const c10::optional<Tensor>& aux_weight, const Tensor& scenario,
                                                 int64_t activation, double temperature, int64_t similarity) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto g = prepare_linear(x, weight, bias, aux, aux_weight, scenario, temperature, similarity,
                          "mutual_linear_forward");
  const int64_t B = x.size(0), M = g.M, N = g.N;
  auto out = at::empty({B, N}, x.options());
  auto attn = at::empty({B, M}, x.options().dtype(at::kFloat));
  if (B == 0 || M == 0) return {out.zero_(), attn};
  auto s = scenario.to(at::kLong).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t b0 = 0; b0 < B; b0 += g.chunk) {
    const int64_t rows = std::min(g.chunk, B - b0);
    SAML_DISPATCH_FLOATING(x.scalar_type(), "mutual_linear_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto z = chunk_preact<scalar_t>(g, x, weight, aux, aux_weight, b0, rows);
      auto src = linear_source<scalar_t>(z, bias, g, activation);
      mutual_fwd_rows<scalar_t><<<row_blocks(rows), kWarps * 32, smem_bytes<acc_t>(3 * M), stream>>>(
          src, s.data_ptr<int64_t>() + b0, rows, int(M), N, 1.0 / temperature, int(similarity),
          out.data_ptr<scalar_t>() + b0 * out.stride(0), out.stride(0), out.stride(1),
          attn.data_ptr<float>() + b0 * attn.stride(0), attn.stride(0), attn.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, attn};
}

Tensor mutual_linear_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                              const c10::optional<Tensor>& bias, const c10::optional<Tensor>& aux,
                              const c10::optional<Tensor>& aux_weight, const Tensor& scenario, const Tensor& attn,
                              int64_t activation, double temperature, int64_t similarity) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto g = prepare_linear(x, weight, bias, aux, aux_weight, scenario, temperature, similarity,
                          "mutual_linear_backward");
  const int64_t B = x.size(0), M = g.M, N = g.N;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == N &&
                  grad_out.scalar_type() == x.scalar_type(), "mutual_linear_backward: grad_out must be [B, N]");
  TORCH_CHECK(attn.scalar_type() == at::kFloat && attn.dim() == 2 && attn.size(0) == B && attn.size(1) == M,
              "mutual_linear_backward: attn must be float32 [B, M]");
  auto dz = at::empty({B, N}, x.options());
  if (B == 0 || M == 0) return dz.zero_();
  auto s = scenario.to(at::kLong).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t b0 = 0; b0 < B; b0 += g.chunk) {
    const int64_t rows = std::min(g.chunk, B - b0);
    SAML_DISPATCH_FLOATING(x.scalar_type(), "mutual_linear_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto z = chunk_preact<scalar_t>(g, x, weight, aux, aux_weight, b0, rows);
      auto src = linear_source<scalar_t>(z, bias, g, activation);
      mutual_bwd_rows<scalar_t><<<row_blocks(rows), kWarps * 32, smem_bytes<acc_t>(5 * M + 3), stream>>>(
          src, grad_out.data_ptr<scalar_t>() + b0 * grad_out.stride(0), grad_out.stride(0), grad_out.stride(1),
          s.data_ptr<int64_t>() + b0, attn.data_ptr<float>() + b0 * attn.stride(0), attn.stride(0),
          attn.stride(1), rows, int(M), N, 1.0 / temperature, int(similarity),
          dz.data_ptr<scalar_t>() + b0 * dz.stride(0), dz.stride(0), dz.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CUDA, m) {
  m.impl("mutual_forward", &mutual_forward);
  m.impl("mutual_backward", &mutual_backward);
  m.impl("mutual_linear_forward", &mutual_linear_forward);
  m.impl("mutual_linear_backward", &mutual_linear_backward);
}
