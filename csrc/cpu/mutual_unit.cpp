// CPU kernels of the mutual unit and of the fused mutual_linear (contract: csrc/registry.cpp,
// saml_kernels/ops/mutual_unit.py and mutual_linear.py).
//
// Per sample b with own index s = scenario[b] and rows h_m = h[m, b] (N values):
//   sim_m = <h_s, h_m> / (max(|h_s|, eps) max(|h_m|, eps))  (cosine)   or   <h_s, h_m> / sqrt(N)  (dot)
//   a = softmax(sim / T),  out = sum_m a_m h_m.
// Backward (other branches stop-gradient), g = dL/dout, u_m = <g, h_m>, e_m = a_m (u_m - sum_k a_k u_k):
//   dh_s = a_s g + (1/T) sum_m c_m e_m dsim_m/dh_s(first argument), with c_m = 1 + [m == s] because h_s is
//   both arguments of sim_s. Cosine: dsim_m/da = h_m / (n_s n_m) - [|h_s| > eps] sim_m h_s / n_s^2.
// Overflow: |h|^2 overflows float32 for |h| > ~1.8e19, so the cosine runs on rows scaled by an exact power of two
// r_m = 2^-e (max|h_m r_m| < 1 when max|h_m| > 1, else r_m = 1): sim_m = <h_s r_s, h_m r_m> / (max(|h_s r_s|, eps r_s)
// max(|h_m r_m|, eps r_m)), the same value with the same eps semantics; gradient coefficients apply one r factor at
// a time (r_s r_m underflows) after the O(|h|) factor.
// All arithmetic in float32 (float64 for float64 tensors). Rows are independent: ATen parallel_for over rows.
//
// mutual_linear_forward never writes h [M, B, N]: each thread takes blocks of R rows, computes their M branch
// outputs with GEMMs against the packed weights, one column tile of whole branches at a time, into a per-thread
// float32 scratch block (R * M * N floats), applies bias + activation per tile, mixes, and writes out [B, N].
// mutual_linear_backward recomputes the same blocks and returns dz_own = dL/dz[s_b, b]. R and the tiles: the
// "why this shape" header of the fused mutual_linear section below.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/scratch.h"
#include "saml_common.h"

namespace {

constexpr double kEps = 1e-8;
using saml::kActGelu;
using saml::kActLeakyRelu;
using saml::kActRelu;
using saml::kActSilu;
using saml::kSimCosine;

template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return s;
}

// <a ra, b rb> with ra, rb powers of two (exact scaling; no overflow of the products).
template <typename acc_t, typename a_t, typename b_t>
inline acc_t scaled_dot(const a_t* a, acc_t ra, const b_t* b, acc_t rb, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (static_cast<acc_t>(a[i]) * ra) * (static_cast<acc_t>(b[i]) * rb);
  return s;
}

// r = 2^-e with max|x| = f 2^e, f in [0.5, 1), when 1 < max|x| < inf; else 1 (non-finite rows stay NaN/inf).
template <typename acc_t, typename src_t>
inline acc_t inv_scale(const src_t* x, int64_t n) {
  acc_t mx = 0;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, std::abs(static_cast<acc_t>(x[i])));
  if (!(mx > acc_t(1)) || !std::isfinite(mx)) return acc_t(1);
  int e = 0;
  std::frexp(mx, &e);
  return std::ldexp(acc_t(1), -e);
}

// Activation of a whole float32 scratch block in place, and its backward, with ATen's vectorised CPU kernels
// (single-threaded inside the parallel region). A select, not a multiply, for relu's backward, so an infinite dh
// at a dead unit gives 0, as torch does.
void act_inplace(at::Tensor& z, int64_t act) {
  switch (act) {
    case kActRelu: z.relu_(); break;
    case kActLeakyRelu: at::leaky_relu_(z, saml::kLeakyReluSlope); break;
    case kActGelu: at::gelu_(z); break;
    case kActSilu: at::silu_(z); break;
    default: break;
  }
}

at::Tensor act_backward(const at::Tensor& dh, const at::Tensor& z, int64_t act) {
  switch (act) {
    case kActRelu: return at::threshold_backward(dh, z, 0);
    case kActLeakyRelu: return at::leaky_relu_backward(dh, z, saml::kLeakyReluSlope, false);
    case kActGelu: return at::gelu_backward(dh, z);
    case kActSilu: return at::silu_backward(dh, z);
    default: return dh;
  }
}

// Per-row working arrays (M values each), allocated once per thread chunk.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> sim, norm, a, w, inv;  // norm: clamped scaled norm max(|h_m r_m|, eps r_m); inv: r_m
  explicit RowScratch(int64_t M) : sim(M), norm(M), a(M), w(M), inv(M, acc_t(1)) {}
};

// Similarities and softmax of one sample. rows[m] -> h[m, b]. Fills sc.sim, sc.a and, for cosine, sc.inv (r_m)
// and sc.norm (clamped scaled norms); returns the raw scaled own norm |h_s r_s| (0 for dot).
template <typename acc_t, typename src_t>
acc_t row_attention(const src_t* const* rows, int64_t M, int64_t N, int64_t s, double temperature, int64_t sim,
                    RowScratch<acc_t>& sc) {
  const src_t* own = rows[s];
  acc_t own_raw = 0;
  if (sim == kSimCosine) {
    for (int64_t m = 0; m < M; ++m) {
      const acc_t r = inv_scale<acc_t>(rows[m], N);
      const acc_t len = std::sqrt(scaled_dot<acc_t>(rows[m], r, rows[m], r, N));
      if (m == s) own_raw = len;
      sc.inv[m] = r;
      sc.norm[m] = std::max(len, acc_t(kEps) * r);
    }
  }
  const acc_t inv_sqrt_n = acc_t(1) / std::sqrt(acc_t(std::max<int64_t>(N, 1)));
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t m = 0; m < M; ++m) {
    sc.sim[m] = sim == kSimCosine
                    ? scaled_dot<acc_t>(own, sc.inv[s], rows[m], sc.inv[m], N) / (sc.norm[s] * sc.norm[m])
                    : dot<acc_t>(own, rows[m], N) * inv_sqrt_n;
    sc.a[m] = sc.sim[m] / acc_t(temperature);
    mx = std::max(mx, sc.a[m]);
  }
  acc_t tot = 0;
  for (int64_t m = 0; m < M; ++m) {
    sc.a[m] = std::exp(sc.a[m] - mx);
    tot += sc.a[m];
  }
  for (int64_t m = 0; m < M; ++m) sc.a[m] /= tot;
  return own_raw;
}

// out[n] = sum_m a_m rows[m][n]
template <typename acc_t, typename src_t, typename dst_t>
inline void row_mix(const src_t* const* rows, int64_t M, int64_t N, const acc_t* a, dst_t* out) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    acc_t v = 0;
    for (int64_t m = 0; m < M; ++m) v += a[m] * static_cast<acc_t>(rows[m][n]);
    out[n] = static_cast<dst_t>(v);
  }
}

// dh_own of one sample into dh (acc_t, N values). The attention is recomputed here in acc_t (cheap next to the
// dot products the backward needs anyway), so float64 gradients are exact to float64 precision even though the
// forward's attn output is float32.
template <typename acc_t, typename src_t, typename g_t>
void row_backward(const src_t* const* rows, const g_t* g, int64_t M, int64_t N, int64_t s, double temperature,
                  int64_t sim, RowScratch<acc_t>& sc, acc_t* dh) {
  const src_t* own = rows[s];
  const acc_t own_raw = row_attention<acc_t>(rows, M, N, s, temperature, sim, sc);
  const acc_t own_n = sc.norm[s], r_s = sc.inv[s];  // cosine: clamped scaled own norm and its scale
  const acc_t inv_t = acc_t(1) / acc_t(temperature);
  const acc_t inv_sqrt_n = acc_t(1) / std::sqrt(acc_t(std::max<int64_t>(N, 1)));
  acc_t ga = 0;
  for (int64_t m = 0; m < M; ++m) {
    sc.w[m] = dot<acc_t>(g, rows[m], N);  // u_m
    ga += sc.a[m] * sc.w[m];
  }
  acc_t coef_own = 0, e_s = 0;  // coef_own multiplies h_s q (cosine: own term and derivative of the own norm)
  for (int64_t m = 0; m < M; ++m) {
    const acc_t e = sc.a[m] * (sc.w[m] - ga) * (m == s ? acc_t(2) : acc_t(1)) * inv_t;
    if (sim == kSimCosine) {
      // = e / (|h_s|_eps |h_m|_eps); the own row's coefficient goes through coef_own (below)
      // e = O(|h| / min(r)): the smaller scale first, the larger last (neither step overflows nor underflows)
      sc.w[m] = m == s ? acc_t(0)
                       : ((e * std::min(r_s, sc.inv[m])) / (own_n * sc.norm[m])) * std::max(r_s, sc.inv[m]);
      coef_own -= e * sc.sim[m];
      if (m == s) e_s = e;
    } else {
      sc.w[m] = e * inv_sqrt_n;
    }
  }
  // Own row: true coefficient r_s^2 (e_s - [|h_s| > eps] sum_m e_m sim_m) / own_n^2, applied as coef_own (h_s q)
  // with q = r_s / own_n (|h_s q| <= 1): e_s / own_n^2 alone overflows at a zero own next to huge branches.
  acc_t q = 1;
  if (sim == kSimCosine) {
    coef_own = (((own_raw > acc_t(kEps) * r_s ? coef_own : acc_t(0)) + e_s) / own_n) * r_s;
    q = (acc_t(1) / own_n) * r_s;
  } else {
    coef_own = 0;
  }
  const acc_t a_s = sc.a[s];
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    acc_t v = a_s * static_cast<acc_t>(g[n]) + coef_own * (static_cast<acc_t>(own[n]) * q);
    for (int64_t m = 0; m < M; ++m) v += sc.w[m] * static_cast<acc_t>(rows[m][n]);
    dh[n] = v;
  }
}

void check_common(const at::Tensor& h, const at::Tensor& scenario) {
  TORCH_CHECK(h.dim() == 3, "mutual: h must be [M, B, N], got ", h.sizes());
  TORCH_CHECK(scenario.dim() == 1 && scenario.size(0) == h.size(1), "mutual: scenario must be [B]");
  TORCH_CHECK(h.size(0) >= 1, "mutual: h needs at least one branch");
}

// The own branch of row b, or -1 for a scenario outside [0, M): the public ops check the range unless
// check_scenario=False; unchecked, such a row is zero (out, attn, gradient; docs/design.md section 5).
template <typename idx_t>
inline int64_t own_index(const idx_t* sc, int64_t b, int64_t M) {
  const int64_t s = static_cast<int64_t>(sc[b]);
  return s >= 0 && s < M ? s : -1;
}

// Rows per task of the mutual unit's row loops (about 4 M N flops a row): a loop over fewer than 2^16 elements of h
// in all (B M N) runs on the calling thread, as waking the pool's sleeping threads costs more than it saves there;
// larger loops are split among the threads (tasks of at least 2^16 elements).
inline int64_t row_grain(int64_t M, int64_t N) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(M * N, 1));
}

std::tuple<at::Tensor, at::Tensor> mutual_forward(const at::Tensor& h_in, const at::Tensor& scenario_in,
                                                  double temperature, int64_t similarity) {
  check_common(h_in, scenario_in);
  // Any strides for the M and B dims (the all-route GEMM output is a [M, B, N] view of [B, M, N]); rows contiguous.
  const auto h = h_in.stride(2) == 1 ? h_in : h_in.contiguous();
  const int64_t sM = h.stride(0), sB = h.stride(1);
  const auto scenario = scenario_in.contiguous();
  const int64_t M = h.size(0), B = h.size(1), N = h.size(2);
  auto out = at::empty({B, N}, h.options());
  auto attn = at::empty({B, M}, h.options().dtype(at::kFloat));
  if (B == 0) return {out, attn};
  SAML_DISPATCH_FLOATING(h.scalar_type(), "mutual_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SAML_DISPATCH_INDEX(scenario.scalar_type(), "mutual_forward_idx", [&] {
      const scalar_t* hp = h.data_ptr<scalar_t>();
      const index_t* sp = scenario.data_ptr<index_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      float* ap = attn.data_ptr<float>();
      at::parallel_for(0, B, row_grain(M, N), [&](int64_t b0, int64_t b1) {
        RowScratch<acc_t> sc(M);
        std::vector<const scalar_t*> rows(M);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t s = own_index(sp, b, M);
          if (s < 0) {
            std::fill(op + b * N, op + (b + 1) * N, scalar_t(0));
            std::fill(ap + b * M, ap + (b + 1) * M, 0.0f);
            continue;
          }
          for (int64_t m = 0; m < M; ++m) rows[m] = hp + m * sM + b * sB;
          row_attention<acc_t>(rows.data(), M, N, s, temperature, similarity, sc);
          row_mix<acc_t>(rows.data(), M, N, sc.a.data(), op + b * N);
          for (int64_t m = 0; m < M; ++m) ap[b * M + m] = static_cast<float>(sc.a[m]);
        }
      });
    });
  });
  return {out, attn};
}

at::Tensor mutual_backward(const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& scenario_in,
                           const at::Tensor& attn_in, double temperature, int64_t similarity) {
  check_common(h_in, scenario_in);
  // Any strides for the M and B dims (the all-route GEMM output is a [M, B, N] view of [B, M, N]); rows contiguous.
  const auto h = h_in.stride(2) == 1 ? h_in : h_in.contiguous();
  const int64_t sM = h.stride(0), sB = h.stride(1);
  const auto scenario = scenario_in.contiguous();
  const auto grad = grad_in.to(h.scalar_type()).contiguous();
  const auto attn = attn_in.to(at::kFloat).contiguous();
  const int64_t M = h.size(0), B = h.size(1), N = h.size(2);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, N}), "mutual_backward: grad_out must be [B, N]");
  TORCH_CHECK(attn.sizes() == at::IntArrayRef({B, M}), "mutual_backward: attn must be [B, M]");
  auto dh = at::empty({B, N}, h.options());
  if (B == 0) return dh;
  SAML_DISPATCH_FLOATING(h.scalar_type(), "mutual_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SAML_DISPATCH_INDEX(scenario.scalar_type(), "mutual_backward_idx", [&] {
      const scalar_t* hp = h.data_ptr<scalar_t>();
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      const index_t* sp = scenario.data_ptr<index_t>();
      scalar_t* dp = dh.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(M, N), [&](int64_t b0, int64_t b1) {
        RowScratch<acc_t> sc(M);
        std::vector<const scalar_t*> rows(M);
        std::vector<acc_t> buf(N);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t s = own_index(sp, b, M);
          if (s < 0) {
            std::fill(dp + b * N, dp + (b + 1) * N, scalar_t(0));
            continue;
          }
          for (int64_t m = 0; m < M; ++m) rows[m] = hp + m * sM + b * sB;
          row_backward<acc_t>(rows.data(), gp + b * N, M, N, s, temperature, similarity, sc, buf.data());
          for (int64_t n = 0; n < N; ++n) dp[b * N + n] = static_cast<scalar_t>(buf[n]);
        }
      });
    });
  });
  return dh;
}

// ---------------------------------------------------------------------------------- fused mutual_linear
//
// Why this shape (the blocking of mutual_linear_forward / _backward). A block is R rows of x [R, K] and aux
// [R, Ka] (Kt = K + Ka) against the packed weights of all M branches, into the float32 scratch block
// z [R, M*N]; the row loop (attention, mix, its backward) then needs all M branch rows of a sample at once.
// Per block: 2 R Kt M N GEMM flops; every packed weight element is read once (and copied once into MKL's own
// panel) and serves R rows; every z element is written once by the GEMM and read once by the row loop.
//   - R = kBlockRows (128) for every M: the [R, Kt] x [Kt, C] GEMM runs at its plateau rate from about 128 rows
//     on and at about half of it at 16 (one core, Kt = 162, MKL), so the weights' reuse must not shrink as M N
//     grows. Small batches take R = B / kMinBlocks (a multiple of 16, at least 16) so that kMinBlocks workers
//     still get a block each.
//   - The GEMM runs per column tile of t whole branches (C = t N columns): the weight tile [Kt, C], MKL's packed
//     copy of it and the output tile [R, C] stay in L2 while all R rows use them: (Kt + R) C elem <=
//     kTileBytes = 1 MiB (half of a 2 MiB L2, the other half for MKL's copy; tiles of near-equal branch counts).
//     Each tile is packed contiguously (no rows 2^k bytes apart), and its activation, and in the backward the
//     copy of the own branch's pre-activation, run while the tile is still in L2.
//   - z itself (R M N elements: 8 MiB at M = 64, N = 256) outgrows L2 from M N ~ 4096 on; it then costs one
//     streaming write and one read per element next to 2 Kt flops. Sizing the block to keep z in L2 instead
//     would mean 16 rows at M N = 16384, and all packed weights re-read every 16 rows.
// Deterministic: R, the tiles and every GEMM's shape depend only on B, M, K, Ka, N and the dtype, never on the
// thread count; each block runs on one thread (MKL single-threaded inside the parallel region).
constexpr int64_t kBlockRows = 128;
constexpr int64_t kMinRows = 16;
constexpr int64_t kMinBlocks = 4;
constexpr int64_t kTileBytes = int64_t(1) << 20;

struct Blocking {
  int64_t rows;                 // R
  std::vector<int64_t> branch;  // column tile i holds branches [branch[i], branch[i + 1])
};

Blocking blocking(int64_t B, int64_t M, int64_t Kt, int64_t N, int64_t elem) {
  Blocking bl;
  const int64_t split = ((B + kMinBlocks - 1) / kMinBlocks + kMinRows - 1) / kMinRows * kMinRows;
  bl.rows = std::clamp<int64_t>(split, kMinRows, kBlockRows);
  const int64_t per_branch = std::max<int64_t>((Kt + bl.rows) * N * elem, 1);
  const int64_t t = std::clamp<int64_t>(kTileBytes / per_branch, 1, std::max<int64_t>(M, 1));
  const int64_t tiles = (M + t - 1) / t;
  for (int64_t i = 0; i <= tiles; ++i) bl.branch.push_back(M * i / tiles);
  return bl;
}

// Per-thread scratch slots (common/scratch.h) of the fused mutual_linear: each worker's block buffers.
enum Slot : int { kBlockZ = 0, kBlockX = 1, kBlockAux = 2, kBlockGrad = 3, kBlockOwnZ = 4 };

// Weights in the accumulation dtype, one contiguous [K, C_i] (and [Ka, C_i]) matrix per column tile i:
// w[i][k, (m - m_i) N + n] = W[m, k, n] for the tile's branches m_i <= m < m_{i+1}.
struct Packed {
  std::vector<at::Tensor> w, wa;  // per tile; wa empty without aux
  at::Tensor b;                   // [M*N] or undefined
};

Packed pack(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& aux,
            const c10::optional<at::Tensor>& aux_weight, at::ScalarType acc, const Blocking& bl) {
  const int64_t M = weight.size(0), N = weight.size(2);
  const bool has_aux = aux.has_value() && aux->defined();
  TORCH_CHECK(!has_aux || (aux_weight.has_value() && aux_weight->defined()), "mutual_linear: aux needs aux_weight");
  auto tile = [&](const at::Tensor& w, int64_t m0, int64_t m1) {
    return w.narrow(0, m0, m1 - m0).to(acc).permute({1, 0, 2}).reshape({w.size(1), (m1 - m0) * w.size(2)}).contiguous();
  };
  Packed p;
  for (size_t i = 0; i + 1 < bl.branch.size(); ++i) {
    p.w.push_back(tile(weight, bl.branch[i], bl.branch[i + 1]));
    if (has_aux) p.wa.push_back(tile(*aux_weight, bl.branch[i], bl.branch[i + 1]));
  }
  if (bias.has_value() && bias->defined()) p.b = bias->to(acc).reshape({M * N}).contiguous();
  return p;
}

// z[r, m*N + n] = x[r0 + r] W_m + aux[r0 + r] Wa_m + bias_m for the rows of one block, tile by tile; after each
// tile's GEMMs, tile_fn(m0, m1, z_tile) with z_tile the [rows, (m1 - m0) N] view of branches [m0, m1).
template <typename TileFn>
void block_gemm(const at::Tensor& x, const c10::optional<at::Tensor>& aux, const Packed& p, const Blocking& bl,
                int64_t N, int64_t r0, int64_t rows, at::Tensor& scratch, at::Tensor& xbuf, at::Tensor& abuf,
                TileFn&& tile_fn) {
  auto z = scratch.narrow(0, 0, rows);
  auto xb = x.narrow(0, r0, rows);
  if (xb.scalar_type() != z.scalar_type()) xb = xbuf.narrow(0, 0, rows).copy_(xb);
  at::Tensor ab;
  if (!p.wa.empty()) {
    ab = aux->narrow(0, r0, rows);
    if (ab.scalar_type() != z.scalar_type()) ab = abuf.narrow(0, 0, rows).copy_(ab);
  }
  for (size_t i = 0; i < p.w.size(); ++i) {
    const int64_t m0 = bl.branch[i], m1 = bl.branch[i + 1];
    auto zt = z.narrow(1, m0 * N, (m1 - m0) * N);  // row stride M*N: MKL writes it in place (ldc)
    if (p.b.defined()) {
      at::addmm_out(zt, p.b.narrow(0, m0 * N, (m1 - m0) * N), xb, p.w[i]);
    } else {
      at::mm_out(zt, xb, p.w[i]);
    }
    if (!p.wa.empty()) zt.addmm_(ab, p.wa[i]);
    tile_fn(m0, m1, zt);
  }
}

// Runs the blocks of R rows in parallel: per block, block_gemm (tile_fn after each tile), then
// block_fn(r0, rows, scratch) with the block's z in scratch[0 .. rows).
template <typename TileFn, typename BlockFn>
void for_blocks(const at::Tensor& x, const c10::optional<at::Tensor>& aux, const Packed& p, const Blocking& bl,
                int64_t B, int64_t M, int64_t N, at::ScalarType acc, TileFn&& tile_fn, BlockFn&& block_fn) {
  const int64_t blk = bl.rows, MN = M * N;
  const int64_t nblocks = (B + blk - 1) / blk;
  at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
    // Worker threads do not inherit the caller's autograd exclusion: without this, addmm_out on parameters
    // that require grad raises "functions with out=... arguments don't support automatic differentiation".
    at::NoGradGuard no_grad;
    auto scratch = saml::cpu::scratch_tensor(kBlockZ, {blk, MN}, acc);
    auto xbuf = x.scalar_type() != acc ? saml::cpu::scratch_tensor(kBlockX, {blk, x.size(1)}, acc) : at::Tensor();
    auto abuf = (aux.has_value() && aux->defined() && aux->scalar_type() != acc)
                    ? saml::cpu::scratch_tensor(kBlockAux, {blk, aux->size(1)}, acc) : at::Tensor();
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * blk, rows = std::min(blk, B - r0);
      block_gemm(x, aux, p, bl, N, r0, rows, scratch, xbuf, abuf,
                 [&](int64_t m0, int64_t m1, at::Tensor& zt) { tile_fn(r0, rows, m0, m1, zt); });
      block_fn(r0, rows, scratch);
    }
  });
}

Blocking linear_blocking(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& aux,
                         at::ScalarType acc) {
  const int64_t Kt = x.size(1) + (aux.has_value() && aux->defined() ? aux->size(1) : 0);
  return blocking(x.size(0), weight.size(0), Kt, weight.size(2), acc == at::kDouble ? 8 : 4);
}

void check_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scenario) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && x.size(1) == weight.size(1),
              "mutual_linear: x [B, K] and weight [M, K, N] expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(scenario.dim() == 1 && scenario.size(0) == x.size(0), "mutual_linear: scenario must be [B]");
}

std::tuple<at::Tensor, at::Tensor> mutual_linear_forward(const at::Tensor& x_in, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         const c10::optional<at::Tensor>& aux_in,
                                                         const c10::optional<at::Tensor>& aux_weight,
                                                         const at::Tensor& scenario_in, int64_t activation,
                                                         double temperature, int64_t similarity) {
  check_linear(x_in, weight, scenario_in);
  const auto x = x_in.contiguous();
  const auto scenario = scenario_in.contiguous();
  c10::optional<at::Tensor> aux;
  if (aux_in.has_value() && aux_in->defined()) aux = aux_in->contiguous();
  const int64_t B = x.size(0), M = weight.size(0), N = weight.size(2);
  auto out = at::empty({B, N}, x.options());
  auto attn = at::empty({B, M}, x.options().dtype(at::kFloat));
  if (B == 0) return {out, attn};
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Blocking bl = linear_blocking(x, weight, aux, acc);
  const Packed p = pack(weight, bias, aux, aux_weight, acc, bl);
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mutual_linear_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SAML_DISPATCH_INDEX(scenario.scalar_type(), "mutual_linear_forward_idx", [&] {
      const index_t* sp = scenario.data_ptr<index_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      float* ap = attn.data_ptr<float>();
      auto tile_act = [&](int64_t, int64_t, int64_t, int64_t, at::Tensor& zt) { act_inplace(zt, activation); };
      for_blocks(x, aux, p, bl, B, M, N, acc, tile_act, [&](int64_t r0, int64_t rows, at::Tensor& scratch) {
        RowScratch<acc_t> sc(M);
        std::vector<const acc_t*> rp(M);
        const acc_t* z = scratch.data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = r0 + r, s = own_index(sp, b, M);
          if (s < 0) {
            std::fill(op + b * N, op + (b + 1) * N, scalar_t(0));
            std::fill(ap + b * M, ap + (b + 1) * M, 0.0f);
            continue;
          }
          for (int64_t m = 0; m < M; ++m) rp[m] = z + (r * M + m) * N;
          row_attention<acc_t>(rp.data(), M, N, s, temperature, similarity, sc);
          row_mix<acc_t>(rp.data(), M, N, sc.a.data(), op + b * N);
          for (int64_t m = 0; m < M; ++m) ap[b * M + m] = static_cast<float>(sc.a[m]);
        }
      });
    });
  });
  return {out, attn};
}

at::Tensor mutual_linear_backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& aux_in,
                                  const c10::optional<at::Tensor>& aux_weight, const at::Tensor& scenario_in,
                                  const at::Tensor& attn_in, int64_t activation, double temperature,
                                  int64_t similarity) {
  check_linear(x_in, weight, scenario_in);
  const auto x = x_in.contiguous();
  const auto scenario = scenario_in.contiguous();
  const auto grad = grad_in.to(x.scalar_type()).contiguous();
  const auto attn = attn_in.to(at::kFloat).contiguous();
  c10::optional<at::Tensor> aux;
  if (aux_in.has_value() && aux_in->defined()) aux = aux_in->contiguous();
  const int64_t B = x.size(0), M = weight.size(0), N = weight.size(2);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, N}), "mutual_linear_backward: grad_out must be [B, N]");
  TORCH_CHECK(attn.sizes() == at::IntArrayRef({B, M}), "mutual_linear_backward: attn must be [B, M]");
  auto dz = at::empty({B, N}, x.options());
  if (B == 0) return dz;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Blocking bl = linear_blocking(x, weight, aux, acc);
  const Packed p = pack(weight, bias, aux, aux_weight, acc, bl);
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mutual_linear_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SAML_DISPATCH_INDEX(scenario.scalar_type(), "mutual_linear_backward_idx", [&] {
      const index_t* sp = scenario.data_ptr<index_t>();
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      // Per tile, while it is in L2: the own pre-activations of the block's rows whose own branch is in the tile
      // (act' needs them; zeros for a row of an out-of-range scenario, whose dh is zero: own_index), then
      // h = act(z) in place.
      auto tile_own = [&](int64_t r0, int64_t rows, int64_t m0, int64_t m1, at::Tensor& zt) {
        acc_t* zown = saml::cpu::scratch<acc_t>(kBlockOwnZ, bl.rows * N);
        const acc_t* zp = zt.data_ptr<acc_t>();
        const int64_t ld = zt.stride(0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t s = own_index(sp, r0 + r, M);
          if (s >= m0 && s < m1) {
            std::copy_n(zp + r * ld + (s - m0) * N, N, zown + r * N);
          } else if (s < 0 && m0 == 0) {
            std::fill_n(zown + r * N, N, acc_t(0));
          }
        }
        act_inplace(zt, activation);
      };
      for_blocks(x, aux, p, bl, B, M, N, acc, tile_own, [&](int64_t r0, int64_t rows, at::Tensor& scratch) {
        RowScratch<acc_t> sc(M);
        std::vector<const acc_t*> rp(M);
        auto zown = at::from_blob(saml::cpu::scratch<acc_t>(kBlockOwnZ, bl.rows * N), {rows, N},
                                  at::TensorOptions().dtype(acc));
        auto dh = saml::cpu::scratch_tensor(kBlockGrad, {rows, N}, acc);
        const acc_t* z = scratch.data_ptr<acc_t>();
        acc_t* dhp = dh.data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = r0 + r, s = own_index(sp, b, M);
          if (s < 0) {
            std::fill(dhp + r * N, dhp + (r + 1) * N, acc_t(0));
            continue;
          }
          for (int64_t m = 0; m < M; ++m) rp[m] = z + (r * M + m) * N;
          row_backward<acc_t>(rp.data(), gp + b * N, M, N, s, temperature, similarity, sc, dhp + r * N);
        }
        dz.narrow(0, r0, rows).copy_(act_backward(dh, zown, activation));
      });
    });
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) {
  m.impl("mutual_forward", &mutual_forward);
  m.impl("mutual_backward", &mutual_backward);
  m.impl("mutual_linear_forward", &mutual_linear_forward);
  m.impl("mutual_linear_backward", &mutual_linear_backward);
}
