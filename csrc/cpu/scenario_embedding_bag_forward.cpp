// CPU forward of scenario_embedding_bag: the fused global + scenario gather (contract: scenario_embedding_bag.h).
//
// Why the shape of this code:
// - The gather is bound by memory latency and TLB misses (one random row per id and table), not bandwidth: its
//   speed is how many row reads overlap. Each id's global and scenario rows are read in the same step, and a
//   prefetch cursor runs ~kLinesAhead cache lines ahead of the walk over both tables, so ~100 random reads are in
//   flight per core. This measured ~2x faster than FBGEMM's JIT EmbeddingSpMDM (what F.embedding_bag runs: one
//   table at a time, 16 rows ahead), which an earlier version of this file called per table.
// - Bags are walked feature-major (the order of `indices`, so the id stream is sequential); outputs are written
//   straight into [B, F, D] / [B, Fs, D].
// - Which code computes a bag depends only on the bag itself, never on how bags are split across threads, so
//   results are bitwise identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/multiversion.h"
#include "common/output_pool.h"
#include "scenario_embedding_bag.h"

namespace {

using saml::kMean;
using saml::kNone;
using saml::kSum;
using saml::cpu::seb::AccType;
using saml::cpu::seb::Layout;
using saml::cpu::seb::prefetch_read;
using saml::cpu::seb::scen_row_base;

// acc[0, D) += w * row[0, D) (plain loops: each ISA clone of Gather::bags vectorises them for its width).
template <typename acc_t, typename scalar_t>
SAML_INLINE void axpy_row(acc_t* __restrict acc, const scalar_t* __restrict row, acc_t w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += acc_t(row[d]) * w;
}

template <typename acc_t>
SAML_INLINE void divide_row(acc_t* acc, acc_t n, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] /= n;
}

template <typename scalar_t, typename src_t>
SAML_INLINE void store_row(scalar_t* __restrict out, const src_t* __restrict in, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = scalar_t(in[d]);
}

// Rows of both tables in flight ahead of the walk, counted in 64-byte lines (global + scenario). A random row
// read costs a full memory latency (plus a nested page walk on a VM); throughput is set by how many such reads
// overlap. Measured on the 2-core EPYC VM: two interleaved streams prefetched ~128 lines ahead gather 1M rows in
// ~2 ms, one stream 16 rows ahead (FBGEMM's EmbeddingSpMDM, i.e. F.embedding_bag) in ~4.8 ms.
constexpr int64_t kLinesAhead = 128;
inline int64_t EXP_lines() { static int64_t v = getenv("SAML_EXP_LINES") ? atol(getenv("SAML_EXP_LINES")) : kLinesAhead; return v; }  // EXPERIMENT

// Prefetch cursor: walks positions q >= the consumer's, tracking the bag (f, b) that holds q, and prefetches the
// global row and (aware features) the scenario row of every valid id. Never reads past bag1's ids.
template <typename scalar_t, typename index_t>
struct PrefetchCursor {
  const Layout& L;
  const index_t* idx;
  const index_t* off;
  const scalar_t* gw;
  const scalar_t* sw;
  int64_t row_bytes, end, bag, f, b, q;

  PrefetchCursor(const Layout& L_, const index_t* idx_, const index_t* off_, const scalar_t* gw_,
                 const scalar_t* sw_, int64_t bag0, int64_t bag1)
      : L(L_), idx(idx_), off(off_), gw(gw_), sw(sw_), row_bytes(L_.D * int64_t(sizeof(scalar_t))),
        end(off_[bag1]), bag(bag0), f(bag0 / L_.B), b(bag0 % L_.B), q(off_[bag0]) {}

  // Prefetches every position < min(target, end) not prefetched yet.
  SAML_INLINE void advance(int64_t target) {
    for (target = std::min(target, end); q < target; ++q) {
      while (int64_t(off[bag + 1]) <= q) {
        ++bag;
        if (++b == L.B) { b = 0; ++f; }
      }
      const int64_t id = int64_t(idx[q]);
      if (id < 0 || id >= L.size[f]) continue;
      prefetch_read(gw + (L.gbase[f] + id) * L.D, row_bytes);
      const int64_t sb = scen_row_base(L, f, b);
      if (sb >= 0) prefetch_read(sw + (sb + id) * L.D, row_bytes);
    }
  }
};

template <typename scalar_t, typename index_t>
struct Gather {
  using acc_t = typename AccType<scalar_t>::type;
  const Layout& L;
  const index_t* idx;
  const index_t* off;
  const scalar_t* gw;
  const scalar_t* sw;
  const scalar_t* psw;
  int64_t pooling, bag_len;
  scalar_t* gout;
  scalar_t* sout;

  // Ids ahead of the walk for kLinesAhead lines in flight (each id reads up to two rows).
  int64_t prefetch_distance() const {
    const int64_t lines = 2 * std::max<int64_t>(1, (L.D * int64_t(sizeof(scalar_t)) + 63) / 64);
    return std::max<int64_t>(2, EXP_lines() / lines);
  }

  // Bags [bag0, bag1), both tables in one pass: each id's global and scenario rows are read together, so the two
  // random streams overlap. Invalid ids contribute nothing (pooled) or a zero row (pooling none); a scenario id
  // out of range (only reachable with checks off) reads nothing. Returns the number of invalid ids.
  SAML_CPU_MULTIVERSION int64_t bags(int64_t bag0, int64_t bag1, acc_t* acc_g, acc_t* acc_s) const {
    const int64_t B = L.B, D = L.D, Fs = L.Fs, F = L.F;
    const int64_t PF = prefetch_distance();
    PrefetchCursor<scalar_t, index_t> cursor(L, idx, off, gw, sw, bag0, bag1);
    int64_t nbad = 0;
    int64_t f = bag0 / B, b = bag0 % B;
    for (int64_t bag = bag0; bag < bag1; ++bag, ++b) {
      if (b == B) { b = 0; ++f; }
      const int64_t s = off[bag], e = off[bag + 1];
      const int64_t size = L.size[f];
      const scalar_t* grow = gw + L.gbase[f] * D;
      const int64_t col = L.slot[f];
      const int64_t sb = scen_row_base(L, f, b);  // -1: not aware, or a scenario id out of range
      const scalar_t* srow = sb >= 0 ? sw + sb * D : nullptr;
      if (pooling == kNone) {
        for (int64_t p = s, k = 0; p < e; ++p, ++k) {
          cursor.advance(p + PF);
          const int64_t id = int64_t(idx[p]);
          const bool valid = id >= 0 && id < size;
          nbad += !valid;
          const acc_t w = psw ? acc_t(psw[p]) : acc_t(1);
          emit_row(gout + ((b * F + f) * bag_len + k) * D, valid ? grow + id * D : nullptr, w, acc_g);
          if (col >= 0)
            emit_row(sout + ((b * Fs + col) * bag_len + k) * D, valid && srow ? srow + id * D : nullptr, w, acc_s);
        }
        continue;
      }
      scalar_t* og = gout + (b * F + f) * D;
      scalar_t* os = col >= 0 ? sout + (b * Fs + col) * D : nullptr;
      if (e - s == 1 && !psw) {  // one-hot bag: the row itself (the mean of one row is the row)
        cursor.advance(s + PF);
        const int64_t id = int64_t(idx[s]);
        const bool valid = id >= 0 && id < size;
        nbad += !valid;
        emit_row(og, valid ? grow + id * D : nullptr, acc_t(1), acc_g);
        if (os) emit_row(os, valid && srow ? srow + id * D : nullptr, acc_t(1), acc_s);
        continue;
      }
      std::fill(acc_g, acc_g + D, acc_t(0));
      if (os) std::fill(acc_s, acc_s + D, acc_t(0));
      for (int64_t p = s; p < e; ++p) {
        cursor.advance(p + PF);
        const int64_t id = int64_t(idx[p]);
        if (id < 0 || id >= size) { ++nbad; continue; }
        const acc_t w = psw ? acc_t(psw[p]) : acc_t(1);
        axpy_row(acc_g, grow + id * D, w, D);
        if (os && srow) axpy_row(acc_s, srow + id * D, w, D);
      }
      if (pooling == kMean) {
        const acc_t len = acc_t(std::max<int64_t>(e - s, 1));
        divide_row(acc_g, len, D);
        if (os) divide_row(acc_s, len, D);
      }
      store_row(og, acc_g, D);
      if (os) store_row(os, acc_s, D);
    }
    return nbad;
  }

  // out = w * row (row == nullptr: zeros); a plain copy when no scaling or conversion is needed.
  SAML_INLINE void emit_row(scalar_t* out, const scalar_t* row, acc_t w, acc_t* acc) const {
    const int64_t D = L.D;
    if (!row) {
      std::fill(out, out + D, scalar_t(0));
    } else if (w == acc_t(1)) {
      for (int64_t d = 0; d < D; ++d) out[d] = row[d];
    } else {
      std::fill(acc, acc + D, acc_t(0));
      axpy_row(acc, row, w, D);
      store_row(out, acc, D);
    }
  }
};

template <typename scalar_t, typename index_t>
int64_t forward_impl(const Gather<scalar_t, index_t>& G) {
  using acc_t = typename AccType<scalar_t>::type;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, G.L.F * G.L.B, 64, [&](int64_t bag0, int64_t bag1) {
    std::vector<acc_t> acc(2 * G.L.D);
    const int64_t nbad = G.bags(bag0, bag1, acc.data(), acc.data() + G.L.D);
    if (nbad) bad.fetch_add(nbad);
  });
  return bad.load();
}

// The offsets and scenario ids a gather can trust: offsets run from 0 to nnz without decreasing (every bag
// exactly bag_len long for pooling none), scenario ids lie in [0, M). One sequential pass over F*B + 1 offsets
// and B ids: cheaper than the separate tensor reductions the Python op would otherwise run before the kernel.
template <typename index_t>
bool inputs_valid(const at::Tensor& offsets, const Layout& L, int64_t nnz, int64_t pooling, int64_t bag_len) {
  const index_t* off = offsets.data_ptr<index_t>();
  const int64_t n = offsets.numel();
  if (int64_t(off[0]) != 0 || int64_t(off[n - 1]) != nnz) return false;
  bool ok = true;
  if (pooling == kNone) {
    for (int64_t i = 1; i < n; ++i) ok &= int64_t(off[i]) - int64_t(off[i - 1]) == bag_len;
  } else {
    for (int64_t i = 1; i < n; ++i) ok &= off[i] >= off[i - 1];
  }
  for (const int64_t m : L.scen) ok &= (m >= 0) & (m < L.M);
  return ok;
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
  if (check) {
    bool valid = true;
    SAML_DISPATCH_INDEX(offsets.scalar_type(), "seb_forward_cpu_check", [&] {
      valid = inputs_valid<index_t>(offsets, L, indices.numel(), pooling, bag_len);
    });
    if (!valid) {
      bad.fill_(-1);
      return {gout, sout, bad};
    }
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

TORCH_LIBRARY_IMPL(saml_C, CPU, m) { m.impl("seb_forward", &seb_forward_cpu); }
