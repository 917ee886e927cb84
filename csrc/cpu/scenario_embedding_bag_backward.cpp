// CPU backward of scenario_embedding_bag: per-row gradients (seb_backward_rows) and the fused optimizer update
// (seb_backward_update_). Contract: scenario_embedding_bag.h.
//
// Why the shape of this code:
// - Deterministic for any thread count: per feature, (row key, position) pairs are radix sorted (stable, LSD;
//   common/sort.h) and every unique row is reduced by one thread in position order. No atomics.
// - The fused update is applied inside that reduction: when a unique row's gradient is complete, its weight row
//   (and optimizer state) is updated in place, so each touched row is read and written once and no gradient
//   rows are materialised.
// - Scratch lives in grow-only per-thread buffers (common/scratch.h).
// - The phases (sort, reduce/update, per-sample-weight gradient) are profiler scopes ("seb_backward::sort", ...)
//   so benchmarks can report where the time goes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/output_pool.h"
#include "common/scratch.h"
#include "common/sort.h"
#include "scenario_embedding_bag.h"
#include "sixteen_bit_rows.h"

namespace {

// Grain of the per-feature loops: F (all features on the calling thread) when the loop does under 2^16 units of
// work in all (a sort: about 16 per id; a walk: D per id), else 1. A parallel region's wake-up costs more than
// such a loop (at B = 64 in a SAML training step).
inline int64_t feature_grain(int64_t F, int64_t work) { return work < (int64_t(1) << 16) ? std::max<int64_t>(F, 1) : 1; }

using saml::kMean;
using saml::kNone;
using saml::kSum;
using saml::cpu::seb::AccType;
using saml::cpu::seb::Layout;
using saml::cpu::seb::check_common;
using saml::cpu::seb::make_layout;
using saml::cpu::seb::scen_local;
using saml::cpu::seb::scen_row_base;
using saml::cpu::pooled_empty;
using namespace saml::cpu::rows;  // NOLINT: the 16-bit row stores

// Sorted pairs ahead of the walk: upstream-gradient rows and the visitor's rows (weight row + state) in flight.
constexpr int64_t kPrefetchPairs = 64;
enum ScratchSlot { kSlotSortWords = 1 };

// Per-feature sorted (key, position) pairs of the valid ids; regions are [off[f*B], off[f*B] + n) of each array.
// A pair is (key << 32) | low. low is the sample b of the pair's bag when the reduction needs nothing else
// (by_sample: sum/mean pooling without per-sample weights), saving the walk a dependent load per pair; otherwise
// the position p - base within the feature, with sample[p] = b. Either way pairs arrive in position order, which
// within a feature is sample order, so the stable sort yields the same order and the same sums.
struct SortedPairs {
  int64_t nnz = 0;
  bool by_sample = false;
  uint64_t* kg = nullptr;  // global keys: id
  uint64_t* ks = nullptr;  // scenario keys: m * ssize + local(id) (the hashed row: colliding ids share a key)
  int32_t* sample = nullptr;  // only when !by_sample
  std::vector<int64_t> ng, ns, ug, us;  // counts; unique counts (us is [F * M])
};

struct BwdArgs {
  at::Tensor gg, gs, indices, offsets, gw, sw, psw;
  Layout L;
  int64_t pooling, bag_len;
};

// Sorts the valid ids of A into S (every feature in parallel), choosing S.by_sample from A's pooling and weights.
template <typename index_t>
void sort_pairs(const BwdArgs& A, SortedPairs& S) {
  RECORD_FUNCTION("seb_backward::sort", std::vector<c10::IValue>());
  const Layout& L = A.L;
  const index_t* idx = A.indices.data_ptr<index_t>();
  const index_t* off = A.offsets.data_ptr<index_t>();
  S.nnz = A.indices.numel();
  S.by_sample = A.pooling != kNone && !A.psw.defined();
  const int64_t F = L.F, B = L.B, M = L.M;
  const int64_t nnz = S.nnz;
  uint64_t* words = saml::cpu::scratch<uint64_t>(kSlotSortWords, 3 * nnz + (nnz + 1) / 2 + 1);
  S.kg = words;
  S.ks = words + nnz;
  uint64_t* tmp = words + 2 * nnz;
  S.sample = reinterpret_cast<int32_t*>(words + 3 * nnz);
  S.ng.assign(F, 0); S.ns.assign(F, 0); S.ug.assign(F, 0); S.us.assign(F * M, 0);
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK(int64_t(off[(f + 1) * B]) - int64_t(off[f * B]) < (int64_t(1) << 32),
                "seb backward: a feature holds >= 2^32 ids");
    if (L.slot[f] >= 0)
      TORCH_CHECK(M * L.ssize[f] < (int64_t(1) << 32), "seb backward: M * scenario rows of feature ", f, " >= 2^32");
  }
  at::parallel_for(0, F, feature_grain(F, nnz * 16), [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t base = off[f * B];
      const int64_t size = L.size[f], ssize = L.ssize[f];
      int64_t ng = 0, ns = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t sb = scen_row_base(L, f, b);
        const uint64_t mkey = sb >= 0 ? uint64_t(L.scen[b] * ssize) : 0;
        for (int64_t p = off[f * B + b]; p < off[f * B + b + 1]; ++p) {
          if (!S.by_sample) S.sample[p] = int32_t(b);
          const int64_t id = int64_t(idx[p]);
          if (id < 0 || id >= size) continue;
          const uint64_t lp = S.by_sample ? uint64_t(b) : uint64_t(p - base);
          S.kg[base + ng++] = (uint64_t(id) << 32) | lp;
          if (sb >= 0) S.ks[base + ns++] = ((mkey + uint64_t(scen_local(L, f, id))) << 32) | lp;
        }
      }
      saml::cpu::radix_sort_keys(S.kg + base, tmp + base, ng, saml::cpu::bits_for(size));
      saml::cpu::radix_sort_keys(S.ks + base, tmp + base, ns, saml::cpu::bits_for(M * ssize));
      int64_t ug = 0;
      for (int64_t i = 0; i < ng; ++i) ug += (i == 0 || (S.kg[base + i] >> 32) != (S.kg[base + i - 1] >> 32));
      for (int64_t i = 0; i < ns; ++i)
        if (i == 0 || (S.ks[base + i] >> 32) != (S.ks[base + i - 1] >> 32))
          ++S.us[f * M + int64_t(S.ks[base + i] >> 32) / std::max<int64_t>(ssize, 1)];
      S.ng[f] = ng; S.ns[f] = ns; S.ug[f] = ug;
    }
  });
}


// out[0, D) = a[0, D) in the table's dtype (a summed gradient row written out)
template <typename scalar_t, typename acc_t>
SAML_INLINE void store_row(scalar_t* __restrict out, const acc_t* __restrict a, int64_t D) {
#if SAML_F16C_ROWS
  if constexpr (std::is_same<scalar_t, c10::Half>::value)
    if (cpu_has_f16c()) return half_store_row(out, a, D);
#endif
  for (int64_t d = 0; d < D; ++d) out[d] = scalar_t(a[d]);
}

// acc[0, D) += scale * g[0, D)
template <typename acc_t, typename scalar_t>
SAML_INLINE void add_scaled_row(acc_t* __restrict acc, const scalar_t* __restrict g, acc_t scale, int64_t D) {
#if SAML_F16C_ROWS
  if constexpr (std::is_same<scalar_t, c10::Half>::value)
    if (cpu_has_f16c()) return half_add_scaled_row(acc, g, scale, D);
#endif
  for (int64_t d = 0; d < D; ++d) acc[d] += acc_t(g[d]) * scale;
}

// A feature's sorted scenario keys (m * size + local id; size = the feature's scenario rows) mapped to rows of the [M * Rs] scenario table. Keys ascend, so
// the scenario m only grows: tracking its block start replaces a division per key.
struct ScenarioKeyRows {
  int64_t size, Rs, sbase;
  int64_t m = 0, lo = 0;  // key block [lo, lo + size) holds scenario m
  SAML_INLINE int64_t operator()(int64_t key) {
    while (key >= lo + size) { lo += size; ++m; }
    return m * Rs + sbase + (key - lo);
  }
};

// Walks the unique rows of one feature's sorted pairs; for each, sums scale_p * grad_row(p) over its positions
// (in position order) into acc and calls visit(key, acc). The sorted order scatters the upstream-gradient reads
// and the visitor's rows (for the fused update: the weight rows it reads and writes back), so a prefetch cursor
// runs kPrefetchPairs pairs ahead of the walk: it prefetches every pair's gradient row and, at the first pair of
// each unique row, the visitor's weight row and state. The walk is a long chain of independent random
// accesses; keeping many of them in flight is what sets its speed. table (nullptr: none) and state (nullptr: none)
// are what the visitor updates; row_of maps the (ascending) keys to their rows.
template <typename scalar_t, typename index_t, typename Visit, typename RowOf>
SAML_INLINE void reduce_segments(const Layout& L, const index_t* off, const scalar_t* psw, int64_t pooling,
                                 int64_t lp_stride, const uint64_t* keys, int64_t n, int64_t base,
                                 const int32_t* sample, bool by_sample, int64_t f, const scalar_t* grad,
                                 int64_t grad_cols, int64_t col, typename AccType<scalar_t>::type* acc, Visit&& visit,
                                 const scalar_t* table, const float* state, RowOf&& row_of) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t D = L.D, B = L.B;
  auto sample_of = [&](int64_t i) -> int64_t {
    const int64_t low = int64_t(keys[i] & 0xffffffffu);
    return by_sample ? low : sample[base + low];
  };
  auto grad_row = [&](int64_t i) {
    const int64_t b = sample_of(i);
    const int64_t k = pooling == kNone ? base + int64_t(keys[i] & 0xffffffffu) - int64_t(off[f * B + b]) : 0;
    return grad + ((b * grad_cols + col) * lp_stride + k) * D;
  };
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  int64_t ahead = 0;  // pairs [0, ahead) have been prefetched
  auto prefetch_to = [&](int64_t end) {
    for (end = std::min(end, n); ahead < end; ++ahead) {
      saml::cpu::seb::prefetch_read(grad_row(ahead), row_bytes);
      if (table && (ahead == 0 || (keys[ahead] >> 32) != (keys[ahead - 1] >> 32))) {
        const int64_t row = row_of(int64_t(keys[ahead] >> 32));
        saml::cpu::seb::prefetch_read(table + row * D, row_bytes);
        if (state) __builtin_prefetch(state + row, 0, 3);
      }
    }
  };
  int64_t i = 0;
  while (i < n) {
    const uint64_t key = keys[i] >> 32;
    std::fill(acc, acc + D, acc_t(0));
    acc_t* a = acc;
    for (; i < n && (keys[i] >> 32) == key; ++i) {
      prefetch_to(i + kPrefetchPairs);
      const scalar_t* g = grad_row(i);
      acc_t scale = acc_t(1);
      if (pooling == kMean) {
        const int64_t bag = f * B + sample_of(i);
        scale = scale / acc_t(std::max<int64_t>(int64_t(off[bag + 1]) - int64_t(off[bag]), 1));
      }
      if (psw) scale = scale * acc_t(psw[base + int64_t(keys[i] & 0xffffffffu)]);  // psw implies !by_sample
      add_scaled_row(a, g, scale, D);
    }
    visit(int64_t(key), a);
  }
}

BwdArgs prepare_backward(const at::Tensor& grad_global, const at::Tensor& grad_scenario, const at::Tensor& indices,
                         const at::Tensor& offsets, const at::Tensor& scenario, const at::Tensor& gw,
                         const at::Tensor& sw, const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot,
                         const c10::optional<at::Tensor>& psw, int64_t pooling, int64_t bag_len) {
  check_common(indices, offsets, gw, sw, psw);
  BwdArgs A;
  A.indices = indices.contiguous();
  A.offsets = offsets.contiguous();
  A.L = make_layout(A.offsets, scenario, gw, sw, fr, fsr, slot);
  A.gg = grad_global.to(gw.scalar_type()).contiguous();
  A.gs = grad_scenario.to(gw.scalar_type()).contiguous();
  const int64_t per_bag = pooling == kNone ? bag_len : 1;
  TORCH_CHECK(A.gg.numel() == A.L.B * A.L.F * per_bag * A.L.D, "seb backward: grad_global has ", A.gg.numel(),
              " elements, expected B*F*", per_bag, "*D = ", A.L.B * A.L.F * per_bag * A.L.D);
  TORCH_CHECK(A.gs.numel() == A.L.B * A.L.Fs * per_bag * A.L.D, "seb backward: grad_scenario has ", A.gs.numel(),
              " elements, expected B*Fs*", per_bag, "*D");
  if (psw.has_value()) A.psw = psw->to(gw.scalar_type()).contiguous();
  A.pooling = pooling;
  A.bag_len = bag_len;
  return A;
}

// What the visitors update, prefetched ahead of the walk (nullptr: nothing, e.g. a frozen table or no state).
template <typename scalar_t>
struct UpdateTargets {
  const scalar_t* global = nullptr;
  const scalar_t* scenario = nullptr;
  const float* global_state = nullptr;
  const float* scenario_state = nullptr;
};

// One feature's unique rows (global, then scenario; see backward_walk_sorted). One ISA clone per CPU level: the
// row sums and the visitors' row updates inlined here are the compute-bound part of the walk.
template <typename scalar_t, typename index_t, typename VG, typename VS>
SAML_CPU_MULTIVERSION void walk_feature(const BwdArgs& A, const SortedPairs& S, int64_t f,
                                        typename AccType<scalar_t>::type* acc, VG& visit_g, VS& visit_s,
                                        const UpdateTargets<scalar_t>& T) {
  const Layout& L = A.L;
  const index_t* off = A.offsets.data_ptr<index_t>();
  const scalar_t* psw = A.psw.defined() ? A.psw.data_ptr<scalar_t>() : nullptr;
  const int64_t lp = A.pooling == kNone ? A.bag_len : 1;
  const int64_t base = off[f * L.B];
  const int64_t gbase = L.gbase[f];
  int64_t u = 0;
  reduce_segments<scalar_t, index_t>(L, off, psw, A.pooling, lp, S.kg + base, S.ng[f], base, S.sample, S.by_sample, f,
                                     A.gg.data_ptr<scalar_t>(), L.F, f, acc,
                                     [&](int64_t key, const auto* a) { visit_g(f, u++, gbase + key, a); },
                                     T.global, T.global_state, [gbase](int64_t key) { return gbase + key; });
  if (L.slot[f] < 0) return;
  const int64_t size = std::max<int64_t>(L.ssize[f], 1);
  ScenarioKeyRows visit_rows{size, L.Rs, L.sbase[f]}, prefetch_rows{size, L.Rs, L.sbase[f]};
  int64_t m_prev = -1, um = 0;
  reduce_segments<scalar_t, index_t>(L, off, psw, A.pooling, lp, S.ks + base, S.ns[f], base, S.sample, S.by_sample, f,
                                     A.gs.data_ptr<scalar_t>(), L.Fs, L.slot[f], acc,
                                     [&](int64_t key, const auto* a) {
                                       const int64_t row = visit_rows(key);
                                       if (visit_rows.m != m_prev) { m_prev = visit_rows.m; um = 0; }
                                       visit_s(f, visit_rows.m, um++, row, a);
                                     },
                                     T.scenario, T.scenario_state, prefetch_rows);
}

// Given the sorted pairs, per feature (in parallel) calls visit_g(f, u, row, acc) for unique global rows and
// visit_s(f, m, u_in_m_block, row, acc) for unique scenario rows, with u counting within the feature's block;
// the rows of T are prefetched ahead of the visits.
template <typename scalar_t, typename index_t, typename VG, typename VS>
void backward_walk_sorted(const BwdArgs& A, const SortedPairs& S, VG&& visit_g, VS&& visit_s,
                          const UpdateTargets<scalar_t>& T = {}) {
  using acc_t = typename AccType<scalar_t>::type;
  at::parallel_for(0, A.L.F, feature_grain(A.L.F, S.nnz * A.L.D), [&](int64_t f0, int64_t f1) {
    std::vector<acc_t> acc(A.L.D);
    for (int64_t f = f0; f < f1; ++f) walk_feature<scalar_t, index_t>(A, S, f, acc.data(), visit_g, visit_s, T);
  });
}

template <typename scalar_t, typename index_t>
void psw_grad_impl(const BwdArgs& A, scalar_t* out) {
  using acc_t = typename AccType<scalar_t>::type;
  const Layout& L = A.L;
  const index_t* idx = A.indices.data_ptr<index_t>();
  const index_t* off = A.offsets.data_ptr<index_t>();
  const scalar_t* gw = A.gw.data_ptr<scalar_t>();
  const scalar_t* sw = A.sw.data_ptr<scalar_t>();
  const scalar_t* gg = A.gg.data_ptr<scalar_t>();
  const scalar_t* gs = A.gs.data_ptr<scalar_t>();
  const int64_t D = L.D, lp = A.pooling == kNone ? A.bag_len : 1;
  at::parallel_for(0, L.F * L.B, 256, [&](int64_t bag0, int64_t bag1) {
    for (int64_t bag = bag0; bag < bag1; ++bag) {
      const int64_t f = bag / L.B, b = bag % L.B;
      const int64_t sb = scen_row_base(L, f, b);
      for (int64_t p = off[bag]; p < off[bag + 1]; ++p) {
        const int64_t id = int64_t(idx[p]);
        const int64_t k = A.pooling == kNone ? p - int64_t(off[bag]) : 0;
        acc_t dot = 0;
        if (id >= 0 && id < L.size[f]) {
          const scalar_t* g = gg + ((b * L.F + f) * lp + k) * D;
          const scalar_t* w = gw + (L.gbase[f] + id) * D;
          for (int64_t d = 0; d < D; ++d) dot += acc_t(g[d]) * acc_t(w[d]);
          if (sb >= 0) {
            const scalar_t* g2 = gs + ((b * L.Fs + L.slot[f]) * lp + k) * D;
            const scalar_t* w2 = sw + (sb + scen_local(L, f, id)) * D;
            acc_t dot2 = 0;
            for (int64_t d = 0; d < D; ++d) dot2 += acc_t(g2[d]) * acc_t(w2[d]);
            dot += dot2;
          }
        }
        out[p] = scalar_t(dot);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> seb_backward_rows_cpu(
    const at::Tensor& grad_global, const at::Tensor& grad_scenario, const at::Tensor& indices,
    const at::Tensor& offsets, const at::Tensor& scenario, const at::Tensor& gw_, const at::Tensor& sw_,
    const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot, const c10::optional<at::Tensor>& psw,
    int64_t pooling, int64_t bag_len, bool need_psw_grad) {
  auto gw = gw_.contiguous();
  auto sw = sw_.contiguous();
  BwdArgs A = prepare_backward(grad_global, grad_scenario, indices, offsets, scenario, gw, sw, fr, fsr, slot, psw,
                               pooling, bag_len);
  A.gw = gw;
  A.sw = sw;
  const Layout& L = A.L;
  const auto lopt = A.indices.options().dtype(at::kLong);
  at::Tensor gpsw = at::empty({0}, gw.options().dtype(psw.has_value() ? psw->scalar_type() : gw.scalar_type()));
  if (L.F * L.B == 0 || A.indices.numel() == 0) {
    if (need_psw_grad && psw.has_value()) gpsw = at::zeros({A.indices.numel()}, gpsw.options());
    return {at::empty({0}, lopt), at::empty({0, L.D}, gw.options()), at::empty({0}, lopt),
            at::empty({0, L.D}, gw.options()), gpsw};
  }
  at::Tensor grows, gvals, srows, svals;
  SAML_DISPATCH_FLOATING(gw.scalar_type(), "seb_backward_rows_cpu", [&] {
    using scalar_t_ = scalar_t;
    using acc_t = typename AccType<scalar_t_>::type;
    SAML_DISPATCH_INDEX(A.indices.scalar_type(), "seb_backward_rows_cpu_idx", [&] {
      SortedPairs S;
      std::vector<int64_t> gstart, sstart;  // output offsets: per feature; per (m, f) in m-major order
      sort_pairs<index_t>(A, S);  // output sizes are known after the sort (unique counts), before the reduction
      int64_t U = 0, Us = 0;
      gstart.resize(L.F);
      for (int64_t f = 0; f < L.F; ++f) { gstart[f] = U; U += S.ug[f]; }
      sstart.assign(L.F * L.M, 0);
      for (int64_t m = 0; m < L.M; ++m)
        for (int64_t f = 0; f < L.F; ++f) { sstart[f * L.M + m] = Us; Us += S.us[f * L.M + m]; }
      grows = at::empty({U}, lopt);
      gvals = pooled_empty({U, L.D}, gw.options());
      srows = at::empty({Us}, lopt);
      svals = pooled_empty({Us, L.D}, gw.options());
      int64_t* gr = grows.data_ptr<int64_t>();
      int64_t* sr = srows.data_ptr<int64_t>();
      scalar_t_* gv = gvals.data_ptr<scalar_t_>();
      scalar_t_* sv = svals.data_ptr<scalar_t_>();
      const int64_t D = L.D;
      RECORD_FUNCTION("seb_backward::reduce", std::vector<c10::IValue>());
      backward_walk_sorted<scalar_t_, index_t>(
          A, S,
          [&](int64_t f, int64_t u, int64_t row, const acc_t* a) {
            const int64_t o = gstart[f] + u;
            gr[o] = row;
            store_row(gv + o * D, a, D);
          },
          [&](int64_t f, int64_t m, int64_t u, int64_t row, const acc_t* a) {
            const int64_t o = sstart[f * L.M + m] + u;
            sr[o] = row;
            store_row(sv + o * D, a, D);
          });
      if (need_psw_grad && psw.has_value()) {
        gpsw = at::empty({A.indices.numel()}, gw.options());
        RECORD_FUNCTION("seb_backward::psw_grad", std::vector<c10::IValue>());
        psw_grad_impl<scalar_t_, index_t>(A, gpsw.data_ptr<scalar_t_>());
        gpsw = gpsw.to(psw->scalar_type());
      }
    });
  });
  return {grows, gvals, srows, svals, gpsw};
}

// One touched row's fused step (saml_common.h, FusedOptimizer): g' = g + wd * w; state (row-wise Adagrad, else
// nullptr) and w updated in place. A 16-bit row is stored with stochastic rounding when sr (key: the row's
// sr_row_key), else rounded to nearest. Inlined into the walk's ISA clones.
template <typename scalar_t, typename acc_t>
SAML_INLINE void apply_row_update(scalar_t* __restrict w, float* state, const acc_t* g, int64_t D, acc_t lr, acc_t eps,
                                  acc_t wd, bool sr, uint32_t key) {
  if (wd != acc_t(0)) {  // g' built once in a per-thread row buffer, so the loops below stay plain
    thread_local std::vector<acc_t> decayed;
    decayed.resize(D);
    for (int64_t d = 0; d < D; ++d) decayed[d] = g[d] + wd * acc_t(w[d]);
    g = decayed.data();
  }
  acc_t mult = lr;
  if (state) {
    acc_t sq = 0;
    for (int64_t d = 0; d < D; ++d) sq += g[d] * g[d];
    mult = saml::fused_step_scale<acc_t, float>(saml::kFusedRowwiseAdagrad, lr, eps, sq / acc_t(D), state);
  }
  if constexpr (saml::sr_applies<scalar_t>()) {
    if (sr) {
#if SAML_F16C_ROWS
      if constexpr (std::is_same<scalar_t, c10::Half>::value)
        if (cpu_has_avx2_f16c()) return half_step_row_sr(w, g, mult, D, key);
      if constexpr (std::is_same<scalar_t, c10::BFloat16>::value)
        if (cpu_has_avx2()) return bf16_step_row_sr(w, g, mult, D, key);
#endif
      for (int64_t d = 0; d < D; ++d) w[d] = saml::sr_round<scalar_t>(acc_t(w[d]) - mult * g[d], saml::sr_bits(key, d));
      return;
    }
  }
#if SAML_F16C_ROWS
  if constexpr (std::is_same<scalar_t, c10::Half>::value)
    if (cpu_has_f16c()) return half_step_row(w, g, mult, D);
#endif
  for (int64_t d = 0; d < D; ++d) w[d] = scalar_t(acc_t(w[d]) - mult * g[d]);
}

// Fused optimizer (csrc/registry.cpp: seb_backward_update_; the math in saml_common.h, FusedOptimizer): every unique
// touched row gets g = its summed gradient, g' = g + wd * w, and the update is applied in place. Frozen tables
// (update_* false) and skipped steps (hparams[kApply] == 0) leave weights and states untouched.
void seb_backward_update_cpu(const at::Tensor& grad_global, const at::Tensor& grad_scenario,
                             const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& scenario,
                             const at::Tensor& gw, const at::Tensor& sw, const at::Tensor& fr, const at::Tensor& fsr,
                             const at::Tensor& slot, const c10::optional<at::Tensor>& psw, int64_t pooling,
                             int64_t bag_len, const c10::optional<at::Tensor>& gstate,
                             const c10::optional<at::Tensor>& sstate, int64_t optimizer, const at::Tensor& hparams,
                             bool update_global, bool update_scenario) {
  TORCH_CHECK(optimizer == saml::kFusedSgd || optimizer == saml::kFusedRowwiseAdagrad,
              "seb_backward_update_: optimizer must be 1 (SGD) or 2 (row-wise Adagrad), got ", optimizer);
  TORCH_CHECK(gw.is_contiguous() && sw.is_contiguous(), "seb_backward_update_: weights must be contiguous (updated "
              "in place)");
  TORCH_CHECK(hparams.scalar_type() == at::kDouble && hparams.numel() == saml::kNumHparams &&
                  hparams.is_contiguous() && hparams.device() == gw.device(),
              "seb_backward_update_: hparams must be a contiguous float64 [", int(saml::kNumHparams),
              "] tensor on the weights' device");
  BwdArgs A = prepare_backward(grad_global, grad_scenario, indices, offsets, scenario, gw, sw, fr, fsr, slot, psw,
                               pooling, bag_len);
  const Layout& L = A.L;
  float* gst = nullptr;
  float* sst = nullptr;
  if (optimizer == saml::kFusedRowwiseAdagrad) {
    TORCH_CHECK(gstate.has_value() && sstate.has_value(), "seb_backward_update_: row-wise Adagrad needs both states");
    TORCH_CHECK(gstate->scalar_type() == at::kFloat && gstate->is_contiguous() && gstate->numel() == gw.size(0),
                "seb_backward_update_: global_state must be contiguous float32 [R = ", gw.size(0), "]");
    TORCH_CHECK(sstate->scalar_type() == at::kFloat && sstate->is_contiguous() && sstate->numel() == L.M * L.Rs,
                "seb_backward_update_: scenario_state must be contiguous float32 [M * Rs = ", L.M * L.Rs, "]");
    gst = gstate->data_ptr<float>();
    sst = sstate->data_ptr<float>();
  }
  const double* hp = hparams.data_ptr<double>();
  if (hp[saml::kApply] == 0.0 || !(update_global || update_scenario)) return;
  if (L.F * L.B == 0 || A.indices.numel() == 0) return;
  SAML_DISPATCH_FLOATING(gw.scalar_type(), "seb_backward_update_cpu", [&] {
    using scalar_t_ = scalar_t;
    using acc_t = typename AccType<scalar_t_>::type;
    SAML_DISPATCH_INDEX(A.indices.scalar_type(), "seb_backward_update_cpu_idx", [&] {
      SortedPairs S;
      sort_pairs<index_t>(A, S);
      const int64_t D = L.D;
      const acc_t alr = acc_t(hp[saml::kLr]), aeps = acc_t(hp[saml::kEps]), wd = acc_t(hp[saml::kWeightDecay]);
      scalar_t_* gwp = gw.data_ptr<scalar_t_>();
      scalar_t_* swp = sw.data_ptr<scalar_t_>();
      // stochastic rounding of 16-bit rows: the key's (seed, step, table) part hashed once here, the row per row
      const bool sr = saml::sr_applies<scalar_t_>() && hp[saml::kStochasticRounding] != 0.0;
      const uint32_t tkey[2] = {saml::sr_table_key(saml::sr_seed(hp), saml::sr_step(hp), 0u),
                                saml::sr_table_key(saml::sr_seed(hp), saml::sr_step(hp), 1u)};
      auto key = [&](uint32_t table, int64_t row) { return sr ? saml::sr_row_key(tkey[table], uint64_t(row)) : 0u; };
      RECORD_FUNCTION("seb_backward::reduce_update", std::vector<c10::IValue>());
      backward_walk_sorted<scalar_t_, index_t>(
          A, S,
          [&](int64_t, int64_t, int64_t row, const acc_t* a) {
            if (update_global)
              apply_row_update(gwp + row * D, gst ? gst + row : nullptr, a, D, alr, aeps, wd, sr, key(0, row));
          },
          [&](int64_t, int64_t, int64_t, int64_t row, const acc_t* a) {
            if (update_scenario)
              apply_row_update(swp + row * D, sst ? sst + row : nullptr, a, D, alr, aeps, wd, sr, key(1, row));
          },
          UpdateTargets<scalar_t_>{update_global ? gwp : nullptr, update_scenario ? swp : nullptr,
                                   update_global ? gst : nullptr, update_scenario ? sst : nullptr});
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) {
  m.impl("seb_backward_rows", &seb_backward_rows_cpu);
  m.impl("seb_backward_update_", &seb_backward_update_cpu);
}
