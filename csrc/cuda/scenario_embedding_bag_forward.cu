// CUDA forward of scenario_embedding_bag: the fused gather of the global and scenario tables.
// Contract, row mapping and thread layout: scenario_embedding_bag.cuh.
#include "scenario_embedding_bag.cuh"

namespace {

using namespace saml::seb;

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) seb_fwd_kernel(
    const index_t* __restrict__ idx, const index_t* __restrict__ off, const int64_t* __restrict__ scen,
    const scalar_t* __restrict__ gw, const scalar_t* __restrict__ sw, const int64_t* __restrict__ fr,
    const int64_t* __restrict__ fsr, const int64_t* __restrict__ slot, const scalar_t* __restrict__ psw,
    scalar_t* __restrict__ gout, scalar_t* __restrict__ sout, unsigned long long* __restrict__ bad, int64_t B,
    int64_t F, int64_t Fs, int64_t D, int64_t Rs, int64_t M, int64_t L, int64_t nbags, int pooling, bool check,
    int G) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x & (G - 1);
  const int64_t bag = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (bag >= nbags) return;
  const int64_t f = bag / B, b = bag - f * B;
  const int64_t start = int64_t(off[bag]);
  const int64_t len = int64_t(off[bag + 1]) - start;
  const int64_t fbase = fr[f], fsize = fr[f + 1] - fbase;
  const int64_t sl = slot[f];
  const int64_t sc = scen[b];
  // A bad scenario id (only possible unchecked) never reads another scenario's table: it reads zeros.
  const bool aware = sl >= 0 && fsr[f + 1] > fsr[f] && sc >= 0 && sc < M;
  const int64_t srow0 = sc * Rs + fsr[f], ssize = fsr[f + 1] - fsr[f];  // ssize < fsize: hashed scenario rows
  const int64_t n = pooling == kNone ? L : len;
  int64_t nbad = 0;
  for (int64_t d0 = int64_t(lane) * VEC; d0 < D; d0 += int64_t(G) * VEC) {
    const bool count = check && d0 == 0;  // one lane per bag counts the invalid ids
    acc_t ag[VEC], as[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) ag[k] = as[k] = acc_t(0);
    for (int64_t j0 = 0; j0 < n; j0 += kUnroll) {
      Vec<scalar_t, VEC> vg[kUnroll], vs[kUnroll];
      acc_t w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u;
        const bool in = j < n && j < len;
        const int64_t id = in ? int64_t(idx[start + j]) : 0;
        const bool ok = in && id >= 0 && id < fsize;
        if (count && in && !ok) ++nbad;
        w[u] = ok ? (psw ? acc_t(psw[start + j]) : acc_t(1)) : acc_t(0);
        vg[u] = ok ? load_vec<scalar_t, VEC>(gw + (fbase + id) * D + d0) : zero_vec<scalar_t, VEC>();
        vs[u] = (ok && aware) ? load_vec<scalar_t, VEC>(sw + (srow0 + saml::seb_scenario_local(id, fsize, ssize)) * D + d0) : zero_vec<scalar_t, VEC>();
      }
      if (pooling == kNone) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t j = j0 + u;
          if (j >= n) break;
          acc_t tg[VEC], ts[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            tg[k] = acc_t(vg[u].v[k]);
            ts[k] = acc_t(vs[u].v[k]);
          }
          store_vec<scalar_t, acc_t, VEC>(gout + ((b * F + f) * L + j) * D + d0, tg, w[u]);
          if (sl >= 0) store_vec<scalar_t, acc_t, VEC>(sout + ((b * Fs + sl) * L + j) * D + d0, ts, w[u]);
        }
      } else {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            ag[k] += w[u] * acc_t(vg[u].v[k]);
            as[k] += w[u] * acc_t(vs[u].v[k]);
          }
        }
      }
    }
    if (pooling != kNone) {
      const acc_t mult = pooling == kMean ? acc_t(1) / acc_t(len > 1 ? len : 1) : acc_t(1);
      store_vec<scalar_t, acc_t, VEC>(gout + (b * F + f) * D + d0, ag, mult);
      if (sl >= 0) store_vec<scalar_t, acc_t, VEC>(sout + (b * Fs + sl) * D + d0, as, mult);
    }
  }
  if (nbad) atomicAdd(bad, static_cast<unsigned long long>(nbad));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seb_forward_cuda(
    const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& scenario, const at::Tensor& gw_in,
    const at::Tensor& sw_in, const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot,
    const c10::optional<at::Tensor>& psw, int64_t pooling, int64_t bag_len, bool check, int64_t num_aware) {
  const c10::cuda::CUDAGuard guard(indices.device());
  Args a = prepare(indices, offsets, scenario, gw_in, sw_in, fr, fsr, slot, psw, "seb_forward");
  TORCH_CHECK(pooling >= 0 && pooling <= 2, "seb_forward: pooling must be 0, 1 or 2, got ", pooling);
  // Fs (number of aware features) sizes the output: given by the caller (the op knows the layout), else one
  // small device->host read.
  const int64_t Fs = num_aware >= 0 ? num_aware : (a.slot.numel() ? a.slot.max().item<int64_t>() + 1 : 0);
  const int64_t L = pooling == kNone ? bag_len : 0;
  auto gout = pooling == kNone ? at::empty({a.B, a.F, L, a.D}, a.gw.options())
                               : at::empty({a.B, a.F, a.D}, a.gw.options());
  auto sout = pooling == kNone ? at::empty({a.B, Fs, L, a.D}, a.sw.options())
                               : at::empty({a.B, Fs, a.D}, a.sw.options());
  auto bad = at::zeros({1}, indices.options().dtype(at::kLong));
  if (a.nbags == 0 || a.D == 0 || gout.numel() == 0) return {gout.zero_(), sout.zero_(), bad};
  auto stream = at::cuda::getCurrentCUDAStream();
  SAML_DISPATCH_FLOATING(a.gw.scalar_type(), "seb_forward_cuda", [&] {
    using sc_t = scalar_t;
    SAML_DISPATCH_INDEX(a.indices.scalar_type(), "seb_forward_cuda_idx", [&] {
      with_vec<sc_t>(a.D, {a.gw, a.sw, gout, sout}, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const int G = group_size(a.D, VEC);
        seb_fwd_kernel<sc_t, index_t, VEC><<<blocks_for(a.nbags, G), kThreads, 0, stream>>>(
            a.indices.data_ptr<index_t>(), a.offsets.data_ptr<index_t>(), a.scenario.data_ptr<int64_t>(),
            a.gw.data_ptr<sc_t>(), a.sw.data_ptr<sc_t>(), a.fr.data_ptr<int64_t>(), a.fsr.data_ptr<int64_t>(),
            a.slot.data_ptr<int64_t>(), a.psw.defined() ? a.psw.data_ptr<sc_t>() : nullptr, gout.data_ptr<sc_t>(),
            sout.data_ptr<sc_t>(), reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()), a.B, a.F, Fs,
            a.D, a.Rs, a.M, L, a.nbags, int(pooling), check, G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {gout, sout, bad};
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CUDA, m) {
  m.impl("seb_forward", &seb_forward_cuda);
}
