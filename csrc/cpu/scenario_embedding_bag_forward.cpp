// CPU forward of scenario_embedding_bag: the fused global + scenario gather (contract: scenario_embedding_bag.h).
//
// Why the shape of this code:
// - The gather is bound by memory latency and TLB misses (one random D-float row per id), not bandwidth. Bags are
//   walked feature-major (the order of `indices`, so the id stream is sequential), in blocks of bags per thread
//   (kBlock, kFbgemmBlock): the block's global rows, then its scenario rows, so both streams reuse the block's ids
//   from cache.
// - float32 / float16 / bfloat16 sum/mean pooling runs FBGEMM's JIT-generated EmbeddingSpMDM kernel (the one
//   F.embedding_bag uses: register accumulation across a bag, 16-bit rows summed in float32) when libtorch was built
//   with FBGEMM, generated with a deeper prefetch than F.embedding_bag's 16 ids (FbgemmGather::prefetch_ids). Our
//   fusion is around it: one pass over a block's ids validates them and produces the scenario row ids
//   (scenario[b] * Rs + base + id) in scratch, and both tables are gathered in one parallel region, writing
//   straight into the [B, F, D] / [B, Fs, D] outputs through FBGEMM's output stride. A hand-written gather of both
//   tables in one loop with a deep (~128-line) prefetch was measured at 0.5-0.7x of this at one thread, and
//   gathering into a feature-major tile then transposing it was slower in every case (docs/design.md, CPU build).
// - Everything else (float64, pooling none, bags with invalid ids, builds without FBGEMM: SAML_BUILD_FBGEMM=0
//   or a libtorch without it) runs the portable gather below. Which path computes a bag depends only on the bag itself,
//   never on how bags are split across threads, so results are bitwise identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

// setup.py defines SAML_CPU_WITH_FBGEMM when libtorch was built with FBGEMM (and SAML_BUILD_FBGEMM != 0).
#if defined(SAML_CPU_WITH_FBGEMM) && __has_include(<fbgemm/FbgemmEmbedding.h>)
#include <fbgemm/FbgemmEmbedding.h>
#define SAML_SEB_USE_FBGEMM 1
#else
#define SAML_SEB_USE_FBGEMM 0
#endif

#include "common/output_pool.h"
#include "common/scratch.h"
#include "scenario_embedding_bag.h"

namespace {

using saml::kMean;
using saml::kNone;
using saml::kSum;
using saml::cpu::seb::AccType;
using saml::cpu::seb::Layout;
using saml::cpu::seb::prefetch_read;
using saml::cpu::seb::scen_local;
using saml::cpu::seb::scen_row_base;

constexpr int64_t kBlock = 512;          // portable path: bags per block (its ids stay in L1 between the two tables)
// The FBGEMM path's blocks are longer: every call starts with no prefetch in flight (FBGEMM prefetches only inside
// a call), so fewer, longer calls keep the loads flowing, and the first kLeadIds rows of each call are prefetched
// by us ahead of it (faster than blocks of 512 with no lead on one-hot and Zipf bags, equal on uniform bags of 8:
// CHANGELOG.md; results in benchmarks/results/embedding_cpu2.md).
constexpr int64_t kFbgemmBlock = 4096;
constexpr int64_t kLeadIds = 32;
constexpr int64_t kPrefetchGlobal = 16;  // ids ahead; scenario rows are not prefetched (see gather_bags)
enum ScratchSlot { kSlotScenarioRows = 0 };

// acc[0, D) += w * row[0, D), vectorised through at::vec where the types allow it.
template <typename acc_t, typename scalar_t>
inline void axpy_row(acc_t* acc, const scalar_t* row, acc_t w, int64_t D) {
  int64_t d = 0;
  if constexpr (std::is_same<acc_t, scalar_t>::value) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec wv(w);
    for (; d + Vec::size() <= D; d += Vec::size())
      (Vec::loadu(acc + d) + Vec::loadu(row + d) * wv).store(acc + d);
  }
  for (; d < D; ++d) acc[d] += acc_t(row[d]) * w;
}

template <typename scalar_t, typename src_t>
inline void store_row(scalar_t* out, const src_t* in, int64_t D) {
  if constexpr (std::is_same<scalar_t, src_t>::value) {
    std::memcpy(out, in, sizeof(scalar_t) * D);
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = scalar_t(in[d]);
  }
}

// Portable gather of one table over bags [bag0, bag1): kScen = false gathers the global rows into gout, true the
// rows of the sample's scenario into sout (aware features only). Invalid ids contribute nothing (pooled) or a
// zero row (pooling none); returns how many it saw. Global rows are prefetched kPrefetchGlobal ids ahead; the
// scenario tables' M-times larger footprint misses the TLB, and dropped or stalled prefetches measured slower
// than none, so their loads rely on the grouped copies and the out-of-order window instead.
template <bool kScen, typename scalar_t, typename index_t>
int64_t gather_bags(const Layout& L, const index_t* idx, const index_t* off, const scalar_t* table,
                    const scalar_t* psw, int64_t pooling, int64_t bag_len, scalar_t* out, int64_t bag0, int64_t bag1,
                    typename AccType<scalar_t>::type* acc, const typename AccType<scalar_t>::type* zeros) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t B = L.B, D = L.D;
  const int64_t cols = kScen ? L.Fs : L.F;
  const int64_t PF = kScen ? 0 : kPrefetchGlobal;
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  const int64_t p_end = off[bag1];
  // Row base of bag (f, b) in `table`, or -1 when this pass has nothing to read for it.
  auto row_base = [&](int64_t f, int64_t b) -> int64_t { return kScen ? scen_row_base(L, f, b) : L.gbase[f]; };
  // A valid id's row within its feature's range: the id, or its hashed scenario row (scenario_embedding_bag.h).
  auto local = [&](int64_t f, int64_t id) -> int64_t {
    if constexpr (kScen) return scen_local(L, f, id);
    else return id;
  };
  // Prefetch cursor: bag (qf, qb) holds position q = p + PF.
  int64_t qbag = bag0, qf = bag0 / B, qb = bag0 % B;
  auto issue = [&](int64_t q) {
    while (off[qbag + 1] <= q) {
      ++qbag;
      if (++qb == B) { qb = 0; ++qf; }
    }
    const int64_t id = int64_t(idx[q]);
    const int64_t rb = row_base(qf, qb);
    if (rb >= 0 && id >= 0 && id < L.size[qf]) prefetch_read(table + (rb + local(qf, id)) * D, row_bytes);
  };
  if (PF > 0)
    for (int64_t q = off[bag0]; q < std::min<int64_t>(off[bag0] + PF, p_end); ++q) issue(q);
  int64_t nbad = 0;
  // One-hot rows are copied in groups: the group's row loads are independent and issue back to back, which keeps
  // many misses in flight even where a software prefetch is dropped (e.g. on a TLB miss).
  constexpr int kGroup = 16;
  const scalar_t* qsrc[kGroup];
  scalar_t* qdst[kGroup];
  int nq = 0;
  auto flush = [&] {
    for (int i = 0; i < nq; ++i) {
      if (qsrc[i]) store_row(qdst[i], qsrc[i], D);
      else store_row(qdst[i], zeros, D);
    }
    nq = 0;
  };
  int64_t f = bag0 / B, b = bag0 % B;
  for (int64_t bag = bag0; bag < bag1; ++bag, ++b) {
    if (b == B) { b = 0; ++f; }
    const int64_t s = off[bag], e = off[bag + 1];
    const int64_t size = L.size[f];
    const int64_t col = kScen ? L.slot[f] : f;
    if (kScen && col < 0) {  // not aware: nothing to write; keep the prefetch stream going
      if (PF > 0)
        for (int64_t p = s; p < e; ++p)
          if (p + PF < p_end) issue(p + PF);
      continue;
    }
    const int64_t rb = row_base(f, b);  // -1 only for a scenario id out of range (guard, reads zeros)
    if (pooling == kNone) {
      for (int64_t p = s, k = 0; p < e; ++p, ++k) {
        if (PF > 0 && p + PF < p_end) issue(p + PF);
        const int64_t id = int64_t(idx[p]);
        const bool valid = id >= 0 && id < size;
        nbad += !valid;
        scalar_t* o = out + ((b * cols + col) * bag_len + k) * D;
        if (!valid || rb < 0) {
          store_row(o, zeros, D);
        } else if (psw) {
          std::fill(acc, acc + D, acc_t(0));
          axpy_row(acc, table + (rb + local(f, id)) * D, acc_t(psw[p]), D);
          store_row(o, acc, D);
        } else {
          store_row(o, table + (rb + local(f, id)) * D, D);
        }
      }
      continue;
    }
    scalar_t* o = out + (b * cols + col) * D;
    if (e - s == 1 && !psw) {  // one-hot bag: the row itself (the mean of one row is the row)
      if (PF > 0 && s + PF < p_end) issue(s + PF);
      const int64_t id = int64_t(idx[s]);
      const bool valid = id >= 0 && id < size;
      nbad += !valid;
      qsrc[nq] = (valid && rb >= 0) ? table + (rb + local(f, id)) * D : nullptr;
      qdst[nq++] = o;
      if (nq == kGroup) flush();
      continue;
    }
    flush();
    std::fill(acc, acc + D, acc_t(0));
    for (int64_t p = s; p < e; ++p) {
      if (PF > 0 && p + PF < p_end) issue(p + PF);
      const int64_t id = int64_t(idx[p]);
      if (id < 0 || id >= size) { ++nbad; continue; }
      if (rb < 0) continue;
      axpy_row(acc, table + (rb + local(f, id)) * D, psw ? acc_t(psw[p]) : acc_t(1), D);
    }
    if (pooling == kMean) {
      const acc_t len = acc_t(std::max<int64_t>(e - s, 1));
      for (int64_t d = 0; d < D; ++d) acc[d] /= len;
    }
    store_row(o, acc, D);
  }
  flush();
  return nbad;
}

template <typename scalar_t, typename index_t>
struct Gather {
  const Layout& L;
  const index_t* idx;
  const index_t* off;
  const scalar_t* gw;
  const scalar_t* sw;
  const scalar_t* psw;
  int64_t pooling, bag_len;
  scalar_t* gout;
  scalar_t* sout;

  // Both tables over bags [lo, hi) with the portable gather.
  int64_t portable(int64_t lo, int64_t hi, typename AccType<scalar_t>::type* acc,
                   const typename AccType<scalar_t>::type* zeros) const {
    int64_t nbad = gather_bags<false>(L, idx, off, gw, psw, pooling, bag_len, gout, lo, hi, acc, zeros);
    if (L.Fs > 0) gather_bags<true>(L, idx, off, sw, psw, pooling, bag_len, sout, lo, hi, acc, zeros);
    return nbad;
  }
};

#if SAML_SEB_USE_FBGEMM
// FBGEMM's element type for a table dtype: float, or the raw 16 bits of a Half / BFloat16 (is_bf16 tells which).
template <typename scalar_t>
using FbgemmElem = typename std::conditional<std::is_same<scalar_t, float>::value, float, uint16_t>::type;

// Whether this libtorch's FBGEMM generates the kernel for scalar_t: float always; Half / BFloat16 where the
// generator takes the is_bf16_out / is_bf16_in arguments (the libtorch of every torch we support; checked, not
// assumed, so an older header falls back to the portable gather instead of failing to build).
template <typename scalar_t, typename index_t, typename = void>
struct FbgemmSupports : std::false_type {};
template <typename index_t>
struct FbgemmSupports<float, index_t> : std::true_type {};
template <typename scalar_t, typename index_t>
struct FbgemmSupports<
    scalar_t, index_t,
    std::enable_if_t<!std::is_same<scalar_t, float>::value &&
                     (std::is_same<scalar_t, at::Half>::value || std::is_same<scalar_t, at::BFloat16>::value),
                     std::void_t<decltype(fbgemm::GenerateEmbeddingSpMDMWithStrides<uint16_t, index_t, index_t, uint16_t>(
                         int64_t(1), false, false, 16, false, true, int64_t(-1), int64_t(-1), true, false, false,
                         false))>>> : std::true_type {};

template <typename scalar_t, typename index_t>
struct FbgemmGather {
  using elem_t = FbgemmElem<scalar_t>;
  using GlobalKernel = typename fbgemm::EmbeddingSpMDMKernelSignature<elem_t, index_t, index_t, elem_t>::Type;
  using ScenarioKernel = typename fbgemm::EmbeddingSpMDMKernelSignature<elem_t, int64_t, index_t, elem_t>::Type;
  GlobalKernel global;
  ScenarioKernel scenario;
  const float* weights;  // per-sample weights as float (FBGEMM's weight type), or null
  int64_t lead;          // ids whose rows we prefetch ahead of a call (see feature_run)

  FbgemmGather(const Layout& L, const float* weights, bool mean, int64_t nnz) : weights(weights) {
    const int prefetch = prefetch_ids(L, nnz);
    lead = std::min<int64_t>(kLeadIds, prefetch);
    constexpr bool bf16 = std::is_same<scalar_t, at::BFloat16>::value;
    global = fbgemm::GenerateEmbeddingSpMDMWithStrides<elem_t, index_t, index_t, elem_t>(
        L.D, weights != nullptr, mean, prefetch, /*is_weight_positional=*/false, /*use_offsets=*/true,
        /*output_stride=*/L.F * L.D, /*input_stride=*/-1, /*scale_bias_last=*/true, /*no_bag=*/false, bf16, bf16);
    if (L.Fs > 0)
      scenario = fbgemm::GenerateEmbeddingSpMDMWithStrides<elem_t, int64_t, index_t, elem_t>(
          L.D, weights != nullptr, mean, prefetch, false, true, /*output_stride=*/L.Fs * L.D, -1, true, false, bf16,
          bf16);
  }

  // How many ids ahead the generated kernel prefetches. F.embedding_bag uses 16; on tables far larger than the
  // caches (D = 32, 1 GB of fp32 rows) a deeper prefetch is faster: best at 96-128 ids on bags of 8 and 32-64 on
  // one-hot bags, where deeper is slower (CHANGELOG.md). Counted in cache lines in flight (256 for bags of 4 or
  // more ids on average, 128 below), so wider rows prefetch fewer ids.
  static int prefetch_ids(const Layout& L, int64_t nnz) {
    const int64_t mean_bag = nnz / std::max<int64_t>(L.F * L.B, 1);
    const int64_t lines = mean_bag >= 4 ? 256 : 128;
    const int64_t lines_per_row = std::max<int64_t>(1, (L.D * int64_t(sizeof(scalar_t)) + 63) / 64);
    return int(std::min<int64_t>(256, std::max<int64_t>(16, lines / lines_per_row)));
  }

  // Bags [s0, s1) of one feature f. One pass over their ids validates them and writes the scenario row ids into
  // srow; runs of valid bags then go to FBGEMM (global stream, then scenario stream), any bag holding an invalid
  // id or scenario to the portable gather. Returns the number of invalid ids.
  int64_t feature_run(const Gather<scalar_t, index_t>& G, int64_t f, int64_t s0, int64_t s1, int64_t* srow,
                      uint8_t* bag_ok, float* acc, const float* zeros) const {
    const Layout& L = G.L;
    const int64_t B = L.B, D = L.D, size = L.size[f], p0 = G.off[s0];
    const bool aware = L.slot[f] >= 0;
    bool all_ok = true;
    for (int64_t bag = s0; bag < s1; ++bag) {
      const int64_t b = bag - f * B;
      const int64_t sb = aware ? scen_row_base(L, f, b) : 0;
      bool ok = sb >= 0;
      for (int64_t p = G.off[bag]; p < G.off[bag + 1]; ++p) {
        const int64_t id = int64_t(G.idx[p]);
        ok &= (id >= 0) & (id < size);
        if (aware) srow[p - p0] = sb + ((id >= 0) & (id < size) ? scen_local(L, f, id) : id);
      }
      bag_ok[bag - s0] = ok;
      all_ok &= ok;
    }
    auto elems = [](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using E = typename std::conditional<std::is_const<T>::value, const elem_t, elem_t>::type;
      return reinterpret_cast<E*>(p);
    };
    int64_t nbad = 0;
    for (int64_t r0 = s0; r0 < s1;) {
      if (!bag_ok[r0 - s0]) {
        nbad += G.portable(r0, r0 + 1, acc, zeros);
        ++r0;
        continue;
      }
      int64_t r1 = r0 + 1;
      while (r1 < s1 && (all_ok || bag_ok[r1 - s0])) ++r1;
      const int64_t b0 = r0 - f * B, q0 = G.off[r0], n = G.off[r1] - q0;
      const float* w = weights ? weights + q0 : nullptr;
      if (aware)  // the scenario call's first rows, which FBGEMM does not prefetch, load during the global call
        for (int64_t q = q0; q < std::min(q0 + lead, q0 + n); ++q)
          prefetch_read(G.sw + srow[q - p0] * D, D * int64_t(sizeof(scalar_t)));
      bool done = global(r1 - r0, n, size, elems(G.gw + L.gbase[f] * D), G.idx + q0, G.off + r0, w,
                         elems(G.gout + (b0 * L.F + f) * D));
      if (r1 == s1 && s1 < L.F * B) {  // likewise the next block's first global rows, during the scenario call
        const int64_t fn = s1 / B, pn = G.off[s1], pe = std::min<int64_t>(pn + lead, G.off[L.F * B]);
        for (int64_t q = pn; q < pe; ++q) {
          const int64_t id = int64_t(G.idx[q]);  // not validated yet: only in-range rows are prefetched
          if (id >= 0 && id < L.size[fn])
            prefetch_read(G.gw + (L.gbase[fn] + id) * D, D * int64_t(sizeof(scalar_t)));
        }
      }
      if (aware)
        done &= scenario(r1 - r0, n, L.M * L.Rs, elems(G.sw), srow + (q0 - p0), G.off + r0, w,
                         elems(G.sout + (b0 * L.Fs + L.slot[f]) * D));
      TORCH_CHECK(done, "seb_forward: FBGEMM gather rejected validated ids (internal error)");
      r0 = r1;
    }
    return nbad;
  }
};
#endif

template <typename scalar_t, typename index_t>
int64_t forward_impl(const Gather<scalar_t, index_t>& G) {
  using acc_t = typename AccType<scalar_t>::type;
  const Layout& L = G.L;
  const int64_t D = L.D, nbags = L.F * L.B;
  // Bags per task: at least 64; all of them on the calling thread when the gather reads under 2^16 elements
  // (ids x D, both tables): a parallel region's wake-up costs more than such a gather.
  const int64_t grain = int64_t(G.off[nbags]) * D * 2 < (int64_t(1) << 16) ? std::max<int64_t>(nbags, 64) : 64;
  std::atomic<int64_t> bad{0};
#if SAML_SEB_USE_FBGEMM
  if constexpr (FbgemmSupports<scalar_t, index_t>::value) {
    if (G.pooling != kNone) {
      at::Tensor wf;  // FBGEMM takes float per-sample weights
      if (G.psw && !std::is_same<scalar_t, float>::value)
        wf = at::from_blob(const_cast<scalar_t*>(G.psw), {int64_t(G.off[L.F * L.B])},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value)).to(at::kFloat);
      const float* weights = !G.psw ? nullptr : wf.defined() ? wf.data_ptr<float>()
                                                             : reinterpret_cast<const float*>(G.psw);
      const FbgemmGather<scalar_t, index_t> K(L, weights, G.pooling == kMean, int64_t(G.off[L.F * L.B]));
      at::parallel_for(0, nbags, grain, [&](int64_t bag0, int64_t bag1) {
        std::vector<acc_t> acc(D), zeros(D, acc_t(0));
        const int64_t blk = kFbgemmBlock;
        std::vector<uint8_t> bag_ok(blk);
        int64_t nbad = 0;
        for (int64_t lo = bag0; lo < bag1; lo += blk) {
          const int64_t hi = std::min(bag1, lo + blk);
          int64_t* srow = saml::cpu::scratch<int64_t>(kSlotScenarioRows, int64_t(G.off[hi]) - int64_t(G.off[lo]));
          for (int64_t s0 = lo; s0 < hi;) {  // split the block at feature boundaries
            const int64_t f = s0 / L.B, s1 = std::min(hi, (f + 1) * L.B);
            nbad += K.feature_run(G, f, s0, s1, srow + (int64_t(G.off[s0]) - int64_t(G.off[lo])),
                                  bag_ok.data(), acc.data(), zeros.data());
            s0 = s1;
          }
        }
        if (nbad) bad.fetch_add(nbad);
      });
      return bad.load();
    }
  }
#endif
  at::parallel_for(0, nbags, grain, [&](int64_t bag0, int64_t bag1) {
    std::vector<acc_t> acc(D), zeros(D, acc_t(0));
    int64_t nbad = 0;
    for (int64_t lo = bag0; lo < bag1; lo += kBlock)
      nbad += G.portable(lo, std::min(bag1, lo + kBlock), acc.data(), zeros.data());
    if (nbad) bad.fetch_add(nbad);
  });
  return bad.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seb_forward_cpu(
    const at::Tensor& indices_, const at::Tensor& offsets_, const at::Tensor& scenario, const at::Tensor& gw_,
    const at::Tensor& sw_, const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot,
    const c10::optional<at::Tensor>& psw_, int64_t pooling, int64_t bag_len, bool check, int64_t num_aware) {
  saml::cpu::seb::check_common(indices_, offsets_, gw_, sw_, psw_);
  auto indices = indices_.contiguous();
  auto offsets = offsets_.contiguous();
  auto gw = gw_.contiguous();
  auto sw = sw_.contiguous();
  const Layout L = saml::cpu::seb::make_layout(offsets, scenario, gw, sw, fr, fsr, slot);
  TORCH_CHECK(num_aware < 0 || num_aware == L.Fs, "seb_forward: num_aware = ", num_aware, " but aware_slot gives ",
              L.Fs, " aware features");
  at::Tensor psw;
  if (psw_.has_value()) psw = psw_->to(gw.scalar_type()).contiguous();
  if (pooling == kNone && L.F * L.B > 0)
    TORCH_CHECK(indices.numel() == L.F * L.B * bag_len, "seb: pooling none needs nnz = F*B*bag_len");
  using saml::cpu::pooled_empty;
  at::Tensor gout, sout;
  if (pooling == kNone) {
    gout = pooled_empty({L.B, L.F, bag_len, L.D}, gw.options());
    sout = pooled_empty({L.B, L.Fs, bag_len, L.D}, gw.options());
  } else {
    gout = pooled_empty({L.B, L.F, L.D}, gw.options());
    sout = pooled_empty({L.B, L.Fs, L.D}, gw.options());
  }
  auto bad = at::zeros({1}, indices.options().dtype(at::kLong));
  if (check && !saml::cpu::seb::offsets_valid(offsets, L, indices.numel(), pooling, bag_len)) {
    bad.fill_(-1);
    return {gout, sout, bad};
  }
  if (L.F * L.B == 0) return {gout, sout, bad};
  SAML_DISPATCH_FLOATING(gw.scalar_type(), "seb_forward_cpu", [&] {
    using scalar_t_ = scalar_t;
    SAML_DISPATCH_INDEX(indices.scalar_type(), "seb_forward_cpu_idx", [&] {
      const Gather<scalar_t_, index_t> G{L, indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(),
                                         gw.data_ptr<scalar_t_>(), sw.data_ptr<scalar_t_>(),
                                         psw.defined() ? psw.data_ptr<scalar_t_>() : nullptr, pooling, bag_len,
                                         gout.data_ptr<scalar_t_>(), sout.data_ptr<scalar_t_>()};
      const int64_t nbad = forward_impl(G);
      if (check) bad.fill_(nbad);
    });
  });
  return {gout, sout, bad};
}

}  // namespace

// saml::seb_scenario_local of every id (the hashed-row map the kernels use; registry.cpp).
at::Tensor seb_scenario_local_cpu(const at::Tensor& ids, int64_t rows, int64_t scenario_rows) {
  TORCH_CHECK(ids.device().is_cpu(), "seb_scenario_local (cpu): ids must be on the CPU");
  TORCH_CHECK(scenario_rows >= 1 && scenario_rows <= rows &&
                  (scenario_rows == rows || scenario_rows < (int64_t(1) << 32)),
              "seb_scenario_local: need 1 <= scenario_rows <= rows (and < 2^32 when smaller), got ", scenario_rows,
              " and ", rows);
  auto in = ids.contiguous();
  auto out = at::empty({in.numel()}, in.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  SAML_DISPATCH_INDEX(in.scalar_type(), "seb_scenario_local_cpu", [&] {
    const index_t* p = in.data_ptr<index_t>();
    for (int64_t i = 0; i < in.numel(); ++i) o[i] = saml::seb_scenario_local(int64_t(p[i]), rows, scenario_rows);
  });
  return out.view(in.sizes());
}

TORCH_LIBRARY_IMPL(saml_C, CPU, m) {
  m.impl("seb_forward", &seb_forward_cpu);
  m.impl("seb_scenario_local", &seb_scenario_local_cpu);
}
