// CUDA backward of scenario_embedding_bag: per-row gradients, dense gradients and the fused optimizer update.
// Contract, row mapping and thread layout: scenario_embedding_bag.cuh.
//
// Backward: keys kernel (2 entries per id: global row, R + scenario row, or a sentinel) -> at::sort(stable)
// -> the sync-free `schedule` (counts on the device, grids sized by host-known capacities) -> segment kernel,
// level 1: every piece (<= kPiece entries) of a hot row summed into an acc_t partial; level 2: one group per
// unique row sums, in sorted (= id) order, its entries read straight from the incoming gradient (bag row x
// per-sample weight x mean scale, via the entry's source index) or, for a hot row, its pieces' partials; then it
// writes the row / the dense gradient or applies the fused SGD / row-wise Adagrad step. Deterministic: fixed
// orders, no float atomics. No host read on the training paths (dense gradients, fused update: CUDA-graph
// capturable); seb_backward_rows, whose outputs have data-dependent shapes, reads two counts.
//
// Scratch contract (per call, n2 = 2 nnz, acc_t = float32, float64 for double tables):
//   float: part [P, D] acc_t, P = 2 * floor((n2 - 1) / kPiece) (0 for n2 = 0), kPiece = 32, plus the
//          entries' scales [nnz] acc_t: (P * D + nnz) * sizeof(acc_t) bytes, about nnz * (D / 8 + 1) *
//          sizeof(acc_t): 320.0 + 20 MB at nnz = 5M, D = 128 (was [2 nnz, D]: 5.12 GB + 20 MB), whatever the
//          share of aware features or of sentinels (tests/test_cuda_emulation_seb_backward.py measures it);
//   int64: keys, src and the sort's output (values, perm) 4 x n2 words, scale nnz acc_t, and the schedule's
//          [n2 + 1] / [P] index vectors (transient).
#include "scenario_embedding_bag.cuh"

namespace {

using namespace saml::seb;

// Two entries per id p: entry p (global: key = row) and entry nnz + p (scenario: key = R + m*Rs + r), each with
// the row of the incoming gradient it reads (src) and the id's scale (w_p, / length for mean). Invalid and
// non-aware entries keep the sentinel key (the caller pre-fills keys). grad_psw_p = <dOut_g, G[row]> +
// <dOut_s, S[row]> (x 1/len for mean), reduced over the group.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) seb_bwd_keys_kernel(
    const index_t* __restrict__ idx, const index_t* __restrict__ off, const int64_t* __restrict__ scen,
    const int64_t* __restrict__ fr, const int64_t* __restrict__ fsr, const int64_t* __restrict__ slot,
    const scalar_t* __restrict__ psw, const scalar_t* __restrict__ gw, const scalar_t* __restrict__ sw,
    const scalar_t* __restrict__ gg, const scalar_t* __restrict__ gs, int64_t* __restrict__ key,
    int64_t* __restrict__ src, typename Acc<scalar_t>::type* __restrict__ scale, scalar_t* __restrict__ gpsw,
    int64_t B, int64_t F, int64_t Fs, int64_t D, int64_t Rs, int64_t M, int64_t L, int64_t R, int64_t nnz,
    int64_t nbags, int pooling, bool need_psw, int G) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x & (G - 1);
  const int64_t bag = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (bag >= nbags) return;
  const unsigned mask = group_mask(G);
  const int64_t f = bag / B, b = bag - f * B;
  const int64_t start = int64_t(off[bag]);
  const int64_t len = int64_t(off[bag + 1]) - start;
  const int64_t fbase = fr[f], fsize = fr[f + 1] - fbase;
  const int64_t sl = slot[f];
  const int64_t sc = scen[b];
  const bool aware = sl >= 0 && fsr[f + 1] > fsr[f] && sc >= 0 && sc < M;
  const int64_t srow0 = sc * Rs + fsr[f], ssize = fsr[f + 1] - fsr[f];  // ssize < fsize: hashed scenario rows
  const acc_t inv = pooling == kMean ? acc_t(1) / acc_t(len > 1 ? len : 1) : acc_t(1);
  for (int64_t j = 0; j < len; ++j) {  // every lane of the group runs the same trip count (group shuffles)
    const int64_t p = start + j;
    const int64_t id = int64_t(idx[p]);
    // Pooling "none" reads gradient row j of the bag, so j must stay below L (L = every bag's length).
    const bool ok = id >= 0 && id < fsize && (pooling != kNone || j < L);
    const bool sok = ok && aware;
    // the hashed row (saml_common.h) when ssize < fsize: colliding ids share a key, so one segment sums them
    const int64_t grow = fbase + id, srow = srow0 + (sok ? saml::seb_scenario_local(id, fsize, ssize) : 0);
    const int64_t gsrc = pooling == kNone ? (b * F + f) * L + j : b * F + f;
    const int64_t ssrc = pooling == kNone ? (b * Fs + sl) * L + j : b * Fs + sl;
    if (lane == 0) {
      if (ok) key[p] = grow;
      if (sok) key[nnz + p] = R + srow;
      src[p] = gsrc;
      src[nnz + p] = ssrc;
      scale[p] = (psw ? acc_t(psw[p]) : acc_t(1)) * inv;
    }
    if (need_psw) {
      acc_t dot = 0;
      if (ok) {
        for (int64_t d0 = int64_t(lane) * VEC; d0 < D; d0 += int64_t(G) * VEC) {
          const auto a = load_vec<scalar_t, VEC>(gw + grow * D + d0);
          const auto o = load_vec<scalar_t, VEC>(gg + gsrc * D + d0);
#pragma unroll
          for (int k = 0; k < VEC; ++k) dot += acc_t(a.v[k]) * acc_t(o.v[k]);
          if (sok) {
            const auto c = load_vec<scalar_t, VEC>(sw + srow * D + d0);
            const auto q = load_vec<scalar_t, VEC>(gs + ssrc * D + d0);
#pragma unroll
            for (int k = 0; k < VEC; ++k) dot += acc_t(c.v[k]) * acc_t(q.v[k]);
          }
        }
      }
      dot = group_sum(dot, G, mask);
      if (lane == 0) gpsw[p] = scalar_t(dot * inv);
    }
  }
}

enum SegMode : int { kWrite = 0, kSgd = 1, kAdagrad = 2, kWriteRow = 3 };

// acc[c][k] += s * g[d], d = base + (c * G + lane) * VEC + k: one gradient row's share of this lane.
template <typename T, typename A, int VEC>
__device__ __forceinline__ void add_row(A (&acc)[kChunks][VEC], const T* g, A s, int64_t base, int64_t D, int G,
                                        int lane) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t d = base + (int64_t(c) * G + lane) * VEC;
    if (d < D) {
      const auto v = load_vec<T, VEC>(g + d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[c][k] += s * A(v.v[k]);
    }
  }
}

// One group per item u (a piece of a hot row at level 1, a unique row at level 2): g = the ordered sum of
//   - its entries k in [start[u], end[u]): entry e = perm[k] reads gg row src[e] (e < nnz) or gs row src[e]
//     (e >= nnz), times scale[e mod nnz]: straight from the incoming gradient, no per-entry row is stored;
//   - or, when the row is split (pstart != nullptr and pstart[u] < pstart[u + 1]), its pieces' partial sums
//     part[pstart[u] .. pstart[u + 1]) (acc_t rows written by level 1), in piece (= entry) order.
// kWrite stores g into out[u] (out_t: the weight dtype, or acc_t for level-1 partials); kWriteRow stores it
// into the row's place of a dense gradient (gw / sw then point at dG / dS, zero-initialised); kSgd / kAdagrad
// update the weight row in place (uniq[u] < R: global row, else scenario row uniq[u] - R). Columns are done
// kChunks * G * VEC at a time; Adagrad with a wider D walks the segment twice (sum of squares first), so no
// gradient row is ever stored. Each segment is owned by one group: no two threads write one row.
// The optimizer modes read hp = [lr, eps, weight_decay, apply, stochastic_rounding, seed, step] (saml_common.h,
// FusedHparam) from device memory (16-bit rows stored with stochastic rounding when it says so, store_vec_update):
// apply == 0 skips the update, upd_g / upd_s false leave a frozen table (and its state) untouched, and with
// weight decay the row's gradient is g' = g + wd * w. U is a capacity when count != nullptr: the groups past the
// device-side *count exit (the sync-free schedule sizes the grid without reading the data).
template <typename in_t, typename out_t, int VEC, int MODE>
__global__ void __launch_bounds__(kThreads) seb_segment_kernel(
    const int64_t* __restrict__ start, const int64_t* __restrict__ end, const int64_t* __restrict__ pstart,
    const int64_t* __restrict__ uniq, const int64_t* __restrict__ perm, const int64_t* __restrict__ src,
    const typename Acc<in_t>::type* __restrict__ scale, const in_t* __restrict__ gg, const in_t* __restrict__ gs,
    const typename Acc<in_t>::type* __restrict__ part, out_t* __restrict__ out, out_t* __restrict__ gw,
    out_t* __restrict__ sw, float* __restrict__ gst, float* __restrict__ sst, int64_t U,
    const int64_t* __restrict__ count, int64_t D, int64_t nnz, int64_t R, const double* __restrict__ hp,
    bool upd_g, bool upd_s, int G) {
  using acc_t = typename Acc<in_t>::type;
  const int lane = threadIdx.x & (G - 1);
  const int64_t u = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (u >= U || (count != nullptr && u >= *count)) return;
  if constexpr (MODE == kSgd || MODE == kAdagrad) {
    if (hp[saml::kApply] == 0.0) return;
    if (uniq[u] >= R ? !upd_s : !upd_g) return;
  }
  const unsigned mask = group_mask(G);
  const int64_t e0 = start[u], e1 = end[u];
  const int64_t p0 = pstart ? pstart[u] : 0, p1 = pstart ? pstart[u + 1] : 0;
  const int64_t span = int64_t(kChunks) * G * VEC;
  acc_t acc[kChunks][VEC];
  auto walk = [&](int64_t base) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[c][k] = acc_t(0);
    if (p1 > p0) {
#pragma unroll 2
      for (int64_t p = p0; p < p1; ++p) add_row<acc_t, acc_t, VEC>(acc, part + p * D, acc_t(1), base, D, G, lane);
    } else {
#pragma unroll 2
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t ent = perm[e];
        const bool is_s = ent >= nnz;
        add_row<in_t, acc_t, VEC>(acc, (is_s ? gs : gg) + src[ent] * D, scale[is_s ? ent - nnz : ent], base, D,
                                  G, lane);
      }
    }
  };
  if constexpr (MODE == kWrite || MODE == kWriteRow) {
    out_t* o = out + u * D;
    if constexpr (MODE == kWriteRow) o = uniq[u] >= R ? sw + (uniq[u] - R) * D : gw + uniq[u] * D;
    for (int64_t base = 0; base < D; base += span) {
      walk(base);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t d = base + (int64_t(c) * G + lane) * VEC;
        if (d < D) store_vec<out_t, acc_t, VEC>(o + d, acc[c], acc_t(1));
      }
    }
  } else {
    const int64_t k0 = uniq[u];
    const bool is_s = k0 >= R;
    const int64_t row = is_s ? k0 - R : k0;
    out_t* w = (is_s ? sw : gw) + row * D;
    const acc_t lr = acc_t(hp[saml::kLr]), eps = acc_t(hp[saml::kEps]), wd = acc_t(hp[saml::kWeightDecay]);
    const bool sr = hp[saml::kStochasticRounding] != 0.0;  // 16-bit tables only (store_vec_update)
    const uint32_t key = sr ? saml::sr_row_key(saml::sr_seed(hp), saml::sr_step(hp), is_s ? 1u : 0u, row) : 0u;
    acc_t mult = lr;
    // Adagrad with D <= span keeps acc from its sum-of-squares pass, weight decay already folded in.
    const bool folded = MODE == kAdagrad && D <= span;
    if constexpr (MODE == kAdagrad) {
      acc_t sq = 0;
      for (int64_t base = 0; base < D; base += span) {
        walk(base);
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int64_t d = base + (int64_t(c) * G + lane) * VEC;
          if (wd != acc_t(0) && d < D) {
            const auto cur = load_vec<out_t, VEC>(w + d);
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[c][k] += wd * acc_t(cur.v[k]);
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) sq += acc[c][k] * acc[c][k];
        }
      }
      sq = group_sum(sq, G, mask);
      float* st = (is_s ? sst : gst) + row;
      float snew = *st;  // every lane reads before lane 0 writes (below)
      mult = saml::fused_step_scale(saml::kFusedRowwiseAdagrad, lr, eps, sq / acc_t(D), &snew);
      __syncwarp(mask);
      if (lane == 0) *st = snew;
    }
    for (int64_t base = 0; base < D; base += span) {
      if (!folded) walk(base);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t d = base + (int64_t(c) * G + lane) * VEC;
        if (d < D) {
          const auto cur = load_vec<out_t, VEC>(w + d);
          acc_t nw[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t g = folded ? acc[c][k] : acc[c][k] + wd * acc_t(cur.v[k]);
            nw[k] = acc_t(cur.v[k]) - mult * g;
          }
          store_vec_update<out_t, acc_t, VEC>(w + d, nw, sr, key, d);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ host side

// The sorted entries of a backward pass.
struct Sorted {
  at::Tensor perm, src, scale, gpsw, gg, gs;
  at::Tensor keys;  // the sorted keys [2 nnz] (sentinels last)
};

// The keys kernel and the stable sort: entries (perm, src, scale) and sorted keys, no host read.
Sorted sort_keys(const Args& a, const at::Tensor& grad_global, const at::Tensor& grad_scenario, int64_t pooling,
                 int64_t bag_len, bool need_psw) {
  Sorted s;
  const auto acc_dtype = a.gw.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  s.gg = grad_global.to(a.gw.scalar_type()).contiguous();
  s.gs = grad_scenario.to(a.sw.scalar_type()).contiguous();
  // Fs from the incoming gradient's shape: no host read.
  const int64_t Fs = s.gs.dim() >= 2 ? s.gs.size(1) : 0;
  const int64_t L = pooling == kNone ? bag_len : 0;
  s.gpsw = at::empty({need_psw ? a.nnz : 0}, a.gw.options());
  auto keys = at::full({2 * a.nnz}, kSentinel, a.indices.options().dtype(at::kLong));
  s.src = at::empty({2 * a.nnz}, keys.options());
  s.scale = at::empty({a.nnz}, a.gw.options().dtype(acc_dtype));
  if (a.nnz == 0 || a.nbags == 0) {
    s.perm = s.keys = at::empty({0}, keys.options());
    return s;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  SAML_DISPATCH_FLOATING(a.gw.scalar_type(), "seb_bwd_keys_cuda", [&] {
    using sc_t = scalar_t;
    using acc_t = typename Acc<sc_t>::type;
    SAML_DISPATCH_INDEX(a.indices.scalar_type(), "seb_bwd_keys_cuda_idx", [&] {
      with_vec<sc_t>(a.D, {a.gw, a.sw, s.gg, s.gs}, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const int G = need_psw ? group_size(a.D, VEC) : 1;
        seb_bwd_keys_kernel<sc_t, index_t, VEC><<<blocks_for(a.nbags, G), kThreads, 0, stream>>>(
            a.indices.data_ptr<index_t>(), a.offsets.data_ptr<index_t>(), a.scenario.data_ptr<int64_t>(),
            a.fr.data_ptr<int64_t>(), a.fsr.data_ptr<int64_t>(), a.slot.data_ptr<int64_t>(),
            a.psw.defined() ? a.psw.data_ptr<sc_t>() : nullptr, a.gw.data_ptr<sc_t>(), a.sw.data_ptr<sc_t>(),
            s.gg.data_ptr<sc_t>(), s.gs.data_ptr<sc_t>(), keys.data_ptr<int64_t>(), s.src.data_ptr<int64_t>(),
            s.scale.data_ptr<acc_t>(), need_psw ? s.gpsw.data_ptr<sc_t>() : nullptr, a.B, a.F, Fs, a.D, a.Rs, a.M,
            L, a.R, a.nnz, a.nbags, int(pooling), need_psw, G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  // Stable: entries of one row keep their id order, so every row's sum has a fixed order (bitwise repeatable).
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  s.perm = std::get<1>(sorted);
  s.keys = std::get<0>(sorted);
  return s;
}

// ---- the sync-free schedule (every backward path: rows, dense gradients, fused update)
//
// Over the n2 = 2 nnz sorted keys (sentinels last), with capacities the host knows and counts kept on the device:
//   segment u = the entries of one unique row (u < nseg); run = at most kPiece consecutive entries of one row
//   (a segment is cut at the sorted positions that are multiples of kPiece); a segment of more than one run (a
//   hot row: more than kPiece entries) is "split", and its runs are its pieces p < npiece.
// Level 1 sums every piece into part[p] (acc_t); level 2 gives every segment the ordered sum of its entries
// (unsplit: read from the incoming gradient) or of its pieces' partials (split), and applies the mode. Both
// orders are fixed (bitwise repeatable); no float atomics; the grids are sized by capacities, and groups past the
// device-side counts exit. Run on the CPU by tests/test_cuda_emulation_seb.py and
// tests/test_cuda_emulation_seb_backward.py (tests/cuda_emu).
//
// The float scratch is part: [P, D] acc_t with P = piece_capacity(2 nnz) (and sort_keys' scale, [nnz] acc_t). A split segment has c >= 1 cuts
// (multiples of kPiece strictly inside it) and c + 1 <= 2c pieces; cuts sit at distinct positions in
// [1, n2), so npiece <= 2 * floor((n2 - 1) / kPiece).
constexpr int64_t kPiece = 32;  // longest run of entries one group sums from the incoming gradient

inline int64_t piece_capacity(int64_t n2) { return n2 > 0 ? 2 * ((n2 - 1) / kPiece) : 0; }

struct Schedule {
  at::Tensor uniq;         // [n2] key of segment u
  at::Tensor seg_start;    // [n2 + 1] segment u = sorted entries [seg_start[u], seg_start[u + 1])
  at::Tensor seg_piece;    // [n2 + 1] segment u's partials: part[seg_piece[u], seg_piece[u + 1]); none: unsplit
  at::Tensor piece_start;  // [P] piece p = sorted entries [piece_start[p], piece_end[p])
  at::Tensor piece_end;    // [P]
  at::Tensor nseg, npiece;  // [1] int64, on the device
};

// Exclusive prefix count of `head` with the total appended ([n2 + 1]), and the entry where each counted item
// starts ([n2 + 1]: start of item i for i < count, start[count] = nvalid; later slots hold in-range filler).
std::pair<at::Tensor, at::Tensor> heads_to_starts(const at::Tensor& head, const at::Tensor& nvalid) {
  const int64_t n2 = head.numel();
  const auto opts = nvalid.options();
  auto excl = at::zeros({n2 + 1}, opts);
  excl.narrow(0, 1, n2).copy_(at::cumsum(head, 0));
  auto start = at::full({n2 + 1}, n2, opts);
  // non-heads are scattered to the spare slot n2; then slot count gets the end of the last item
  start.scatter_(0, at::where(head, excl.narrow(0, 0, n2), at::full({}, n2, opts)), at::arange(n2, opts));
  start.scatter_(0, excl.narrow(0, n2, 1), nvalid);
  return {excl, start};
}

Schedule schedule(const at::Tensor& keys) {
  const int64_t n2 = keys.numel();
  const int64_t P = piece_capacity(n2);
  const auto opts = keys.options();
  const auto valid = keys.ne(kSentinel);
  auto differs = at::ones({n2}, valid.options());
  if (n2 > 1) differs.narrow(0, 1, n2 - 1).copy_(keys.narrow(0, 1, n2 - 1).ne(keys.narrow(0, 0, n2 - 1)));
  const auto seg_head = valid & differs;
  const auto run_head = valid & (differs | at::arange(n2, opts).remainder(kPiece).eq(0));
  const auto nvalid = valid.sum().reshape({1}).to(at::kLong);
  Schedule c;
  at::Tensor seg_excl, run_excl, run_start;
  std::tie(seg_excl, c.seg_start) = heads_to_starts(seg_head, nvalid);
  std::tie(run_excl, run_start) = heads_to_starts(run_head, nvalid);
  c.nseg = seg_excl.narrow(0, n2, 1);
  c.uniq = keys.gather(0, c.seg_start.narrow(0, 0, n2).clamp_max(n2 - 1));
  // segment u = runs [seg_run[u], seg_run[u + 1]) (empty for u >= nseg); split when it has more than one
  const auto seg_run = run_excl.gather(0, c.seg_start);
  auto npieces = seg_run.narrow(0, 1, n2) - seg_run.narrow(0, 0, n2);  // in place below: one [n2] temporary
  npieces.mul_(npieces.gt(1));
  c.seg_piece = at::zeros({n2 + 1}, opts);
  auto tail = c.seg_piece.narrow(0, 1, n2);
  at::cumsum_out(tail, npieces, 0);
  c.npiece = c.seg_piece.narrow(0, n2, 1);
  // piece p belongs to the split segment u with seg_piece[u] <= p < seg_piece[u + 1] (the last u with
  // seg_piece[u] <= p: unsplit segments are empty ranges) and is its run seg_run[u] + p - seg_piece[u].
  // Slots p >= npiece get clamped in-range filler (their groups exit).
  const auto p = at::arange(P, opts);
  const auto owner = (at::searchsorted(c.seg_piece, p, /*out_int32=*/false, /*right=*/true) - 1).clamp(0, n2 - 1);
  const auto run = (seg_run.gather(0, owner) + p - c.seg_piece.gather(0, owner)).clamp(0, n2 - 1);
  c.piece_start = run_start.gather(0, run);
  c.piece_end = run_start.gather(0, run + 1);
  return c;
}

// One segment-kernel launch over the U = start.numel() items [start[u], end[u]) (capacity, with the real count
// on the device in count). pstart / part: the items' partials (level 2), or undefined (level 1).
template <typename in_t, typename out_t, int MODE>
void launch_segment_kernel(const Args& a, const Sorted& s, const at::Tensor& start, const at::Tensor& end,
                           const at::Tensor& pstart, const at::Tensor& part, const at::Tensor& uniq,
                           const at::Tensor& count, const at::Tensor& out, const at::Tensor& gstate,
                           const at::Tensor& sstate, const at::Tensor& hparams, bool upd_g, bool upd_s,
                           const at::Tensor& wg = at::Tensor(), const at::Tensor& ws = at::Tensor()) {
  using acc_t = typename Acc<in_t>::type;
  const int64_t U = start.numel();
  if (U == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  // VEC = 16 bytes of out_t: 16-byte weight accesses; level 2 then reads float32 partials 32 bytes at a time,
  // level 1 reads half/bf16 gradients 8 bytes at a time.
  with_vec<out_t>(a.D, {s.gg, s.gs, part, out, a.gw, a.sw}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int G = group_size(a.D, VEC);
    seb_segment_kernel<in_t, out_t, VEC, MODE><<<blocks_for(U, G), kThreads, 0, stream>>>(
        start.data_ptr<int64_t>(), end.data_ptr<int64_t>(), pstart.defined() ? pstart.data_ptr<int64_t>() : nullptr,
        uniq.data_ptr<int64_t>(), s.perm.data_ptr<int64_t>(), s.src.data_ptr<int64_t>(), s.scale.data_ptr<acc_t>(),
        s.gg.data_ptr<in_t>(), s.gs.data_ptr<in_t>(), part.defined() ? part.data_ptr<acc_t>() : nullptr,
        out.defined() ? out.data_ptr<out_t>() : nullptr,
        MODE == kWrite ? nullptr : (wg.defined() ? wg : a.gw).data_ptr<out_t>(),
        MODE == kWrite ? nullptr : (ws.defined() ? ws : a.sw).data_ptr<out_t>(),
        gstate.defined() ? gstate.data_ptr<float>() : nullptr,
        sstate.defined() ? sstate.data_ptr<float>() : nullptr, U, count.data_ptr<int64_t>(), a.D, a.nnz, a.R,
        hparams.defined() ? hparams.data_ptr<double>() : nullptr, upd_g, upd_s, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Both levels for MODE: kWrite into out[u] (segment order), kWriteRow into wg / ws, or kSgd / kAdagrad on the
// tables. Level 1 runs only when a piece can exist (P > 0); its partials are the backward's only float scratch.
template <int MODE>
void launch_two_level(const Args& a, const Sorted& s, const Schedule& c, const at::Tensor& out,
                      const at::Tensor& gstate, const at::Tensor& sstate, const at::Tensor& hparams, bool upd_g,
                      bool upd_s, const at::Tensor& wg = at::Tensor(), const at::Tensor& ws = at::Tensor()) {
  const int64_t n2 = s.keys.numel();
  if (n2 == 0 || a.D == 0) return;
  SAML_DISPATCH_FLOATING(a.gw.scalar_type(), "seb_two_level_cuda", [&] {
    using sc_t = scalar_t;
    using acc_t = typename Acc<sc_t>::type;
    const int64_t P = c.piece_start.numel();
    auto part = at::empty({P, a.D}, a.gw.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    launch_segment_kernel<sc_t, acc_t, kWrite>(a, s, c.piece_start, c.piece_end, at::Tensor(), at::Tensor(), c.uniq,
                                               c.npiece, part, at::Tensor(), at::Tensor(), at::Tensor(), true, true);
    launch_segment_kernel<sc_t, sc_t, MODE>(a, s, c.seg_start.narrow(0, 0, n2), c.seg_start.narrow(0, 1, n2),
                                            c.seg_piece, part, c.uniq, c.nseg, out, gstate, sstate, hparams, upd_g,
                                            upd_s, wg, ws);
  });
}

// Dense gradients without a host read: (dG [R, D], dS [M, Rs, D], grad_psw [nnz] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> seb_backward_dense_cuda(
    const at::Tensor& grad_global, const at::Tensor& grad_scenario, const at::Tensor& indices,
    const at::Tensor& offsets, const at::Tensor& scenario, const at::Tensor& gw, const at::Tensor& sw,
    const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot, const c10::optional<at::Tensor>& psw,
    int64_t pooling, int64_t bag_len, bool need_psw_grad) {
  const c10::cuda::CUDAGuard guard(indices.device());
  Args a = prepare(indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, "seb_backward_dense");
  const bool need_psw = need_psw_grad && a.psw.defined();
  Sorted s = sort_keys(a, grad_global, grad_scenario, pooling, bag_len, need_psw);
  auto dg = at::zeros_like(a.gw);
  auto ds = at::zeros_like(a.sw);
  if (s.keys.numel()) {
    launch_two_level<kWriteRow>(a, s, schedule(s.keys), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                true, true, dg, ds);
  }
  at::Tensor gpsw = need_psw ? s.gpsw.to(psw->scalar_type()) : at::empty({0}, a.gw.options());
  return {dg, ds, gpsw};
}

// The deduplicated rows: the same schedule and kernels as the training paths (so the same bits), plus one host
// read of [#global rows, #rows] for the outputs' data-dependent shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> seb_backward_rows_cuda(
    const at::Tensor& grad_global, const at::Tensor& grad_scenario, const at::Tensor& indices,
    const at::Tensor& offsets, const at::Tensor& scenario, const at::Tensor& gw, const at::Tensor& sw,
    const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot, const c10::optional<at::Tensor>& psw,
    int64_t pooling, int64_t bag_len, bool need_psw_grad) {
  const c10::cuda::CUDAGuard guard(indices.device());
  Args a = prepare(indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, "seb_backward_rows");
  const bool need_psw = need_psw_grad && a.psw.defined();
  Sorted s = sort_keys(a, grad_global, grad_scenario, pooling, bag_len, need_psw);
  at::Tensor gpsw = need_psw ? s.gpsw.to(psw->scalar_type()) : at::empty({0}, a.gw.options());
  const int64_t n2 = s.keys.numel();
  int64_t ng = 0, nall = 0;
  Schedule c;
  if (n2) {
    c = schedule(s.keys);
    const auto is_row = at::arange(n2, s.keys.options()).lt(c.nseg);
    const auto host = at::cat({(is_row & c.uniq.lt(a.R)).sum().reshape({1}), c.nseg}).cpu();
    ng = host.data_ptr<int64_t>()[0];
    nall = host.data_ptr<int64_t>()[1];
  }
  if (nall == 0) {
    auto e = at::empty({0}, indices.options().dtype(at::kLong));
    return {e, a.gw.new_empty({0, a.D}), e.clone(), a.sw.new_empty({0, a.D}), gpsw};
  }
  auto vals = at::empty({nall, a.D}, a.gw.options());
  launch_two_level<kWrite>(a, s, c, vals, at::Tensor(), at::Tensor(), at::Tensor(), true, true);
  return {c.uniq.narrow(0, 0, ng), vals.narrow(0, 0, ng), c.uniq.narrow(0, ng, nall - ng) - a.R,
          vals.narrow(0, ng, nall - ng), gpsw};
}

void seb_backward_update_cuda(const at::Tensor& grad_global, const at::Tensor& grad_scenario,
                              const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& scenario,
                              const at::Tensor& gw, const at::Tensor& sw, const at::Tensor& fr,
                              const at::Tensor& fsr, const at::Tensor& slot, const c10::optional<at::Tensor>& psw,
                              int64_t pooling, int64_t bag_len, const c10::optional<at::Tensor>& gstate,
                              const c10::optional<at::Tensor>& sstate, int64_t optimizer,
                              const at::Tensor& hparams, bool update_global, bool update_scenario) {
  TORCH_CHECK(optimizer == saml::kFusedSgd || optimizer == saml::kFusedRowwiseAdagrad,
              "seb_backward_update_: optimizer must be 1 (SGD) or 2 (row-wise Adagrad), got ", optimizer);
  TORCH_CHECK(hparams.scalar_type() == at::kDouble && hparams.numel() == saml::kNumHparams &&
                  hparams.is_contiguous() && hparams.device() == gw.device(),
              "seb_backward_update_: hparams must be a contiguous float64 [7] tensor on the weights' device");
  TORCH_CHECK(gw.is_contiguous() && sw.is_contiguous(), "seb_backward_update_: weights must be contiguous (updated "
              "in place)");
  const c10::cuda::CUDAGuard guard(indices.device());
  Args a = prepare(indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, "seb_backward_update_");
  at::Tensor gst, sst;
  if (optimizer == saml::kFusedRowwiseAdagrad) {
    TORCH_CHECK(gstate.has_value() && sstate.has_value(), "seb_backward_update_: row-wise Adagrad needs both states");
    TORCH_CHECK(gstate->scalar_type() == at::kFloat && gstate->is_contiguous() && gstate->numel() == a.R &&
                    gstate->device() == gw.device(),
                "seb_backward_update_: global_state must be contiguous float32 [R = ", a.R, "] on the weight's device");
    TORCH_CHECK(sstate->scalar_type() == at::kFloat && sstate->is_contiguous() && sstate->numel() == a.M * a.Rs &&
                    sstate->device() == gw.device(),
                "seb_backward_update_: scenario_state must be contiguous float32 [M * Rs = ", a.M * a.Rs,
                "] on the weight's device");
    gst = *gstate;
    sst = *sstate;
  }
  if (!(update_global || update_scenario)) return;
  Sorted s = sort_keys(a, grad_global, grad_scenario, pooling, bag_len, false);
  if (s.keys.numel() == 0) return;
  const Schedule c = schedule(s.keys);  // sync-free: the step can be captured in a CUDA graph
  if (optimizer == saml::kFusedSgd) launch_two_level<kSgd>(a, s, c, at::Tensor(), gst, sst, hparams, update_global,
                                                           update_scenario);
  else launch_two_level<kAdagrad>(a, s, c, at::Tensor(), gst, sst, hparams, update_global, update_scenario);
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CUDA, m) {
  m.impl("seb_backward_rows", &seb_backward_rows_cuda);
  m.impl("seb_backward_update_", &seb_backward_update_cuda);
  m.impl("seb_backward_dense", &seb_backward_dense_cuda);
}
