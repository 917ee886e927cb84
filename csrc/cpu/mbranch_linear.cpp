// CPU kernels of the M-branch linear layer's route "own" and of its grouped backward (contract in
// csrc/registry.cpp, saml_kernels/ops/mbranch_linear.py); route "all" is in mbranch_linear_all.cpp.
//
// Rows come in any scenario order. A stable counting sort groups them by scenario, and each scenario's rows are
// cut into tiles of at most kTileRows rows. Every row is read and written once, while its tile is in cache:
//   forward:  gather the tile's x rows (converted to the accumulation dtype) into the GEMM's input tile -> GEMM
//             with W_m (MKL, one thread per tile) -> bias + activation -> each row stored straight to its
//             unsorted position in y (and z). Tiles are handed out dynamically to the threads.
//   backward: per tile, one gather pass forms dz = dy * act'(z) and the tile's db partial sum -> gather the tile's
//             x rows and accumulate dW_m += X_tile^T dZ_tile -> dx tile = dZ_tile W_m^T -> each dx row stored
//             straight to its unsorted position. Work unit: a chunk of about kChunkTiles tiles of one scenario,
//             handed out dynamically. A scenario's first chunk sums its dW part in place, the others into partial
//             sums; the thread that completes a scenario's last chunk adds them (and the db parts) in order.
// No full-size buffer of sorted rows is written, and the backward runs one parallel region.
//
// Determinism: tiles and chunks depend only on the scenario counts, never on the thread count, and each tile's
// GEMMs, each chunk's sums and each scenario's final sums run on one thread in a fixed order, so results are
// bitwise identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "mbranch_linear_rows.h"

namespace {

using namespace saml::mbranch;
using saml::kActGelu;
using saml::kActLeakyRelu;
using saml::kActNone;
using saml::kActRelu;

// Rows per tile: a tile's input, output and gradient rows (K, N <= a few hundred) stay in L2 next to W_m, and the
// per-call cost of a GEMM (packing W_m) is small against 2 * kTileRows * K * N flops. 256 rows measured 1-2% faster
// than 128 (fewer GEMM calls and W_m packings; M=4, B=4096, K=N=256, one thread).
constexpr int64_t kTileRows = 256;

// Tile t covers sorted rows [r0, r0 + n) of scenario m. A scenario of n_m rows is cut into ceil(n_m / kTileRows)
// tiles of near-equal size (no short tail tile).
struct Tile {
  int64_t m, r0, n;
};

std::vector<Tile> make_tiles(const Groups& g) {
  std::vector<Tile> tiles;
  const int64_t M = static_cast<int64_t>(g.start.size()) - 1;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r0 = g.start[m], n = g.start[m + 1] - r0;
    const int64_t k = (n + kTileRows - 1) / kTileRows;
    for (int64_t t = 0; t < k; ++t) {
      const int64_t a = r0 + n * t / k, b = r0 + n * (t + 1) / k;
      tiles.push_back({m, a, b - a});
    }
  }
  return tiles;
}

// Runs fn(i) for i in [0, n), handed out one at a time to whichever thread is free: items differ in size, a thread
// may lose its core to another process for a while, and the result of an item never depends on the thread that
// runs it. Worker threads do not inherit the caller's autograd mode: without the guard, an out= GEMM on weights
// that require grad raises.
//
// A call of less than kInlineMacs multiply-adds in all runs its items on the calling thread: waking the pool's
// sleeping threads for a parallel region costs about as much as 1M multiply-adds on one core (in a SAML training
// step at B = 64 the [64, 16] x [16, 16] attention GEMM took 70 us in a region, 10 us inline).
constexpr int64_t kInlineMacs = int64_t(1) << 20;

template <typename Fn>
void for_each_dynamic(int64_t n, int64_t macs, const Fn& fn) {
  if (macs < kInlineMacs || n <= 1 || at::get_num_threads() <= 1) {
    at::NoGradGuard no_grad;
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t w0, int64_t w1) {
    at::NoGradGuard no_grad;
    for (int64_t k = w0; k < w1; ++k)
      for (int64_t i = next++; i < n; i = next++) fn(i);
  });
}

// The backward's unit of work: tiles [t0, t1) of one scenario, about kChunkTiles of them. A chunk accumulates its
// own weight-gradient sum over its tiles in order: a scenario's first chunk straight into the gradient, every
// other chunk into a partial sum (part) that is added afterwards in chunk order, so no full-size buffer of sorted
// rows is written. Larger scenarios get longer chunks: at most kMaxChunks per scenario, and partial sums of at most
// kMaxPartBytes in all (a scenario's share of them follows its share of the tiles), whatever B and M are. Chunks,
// like tiles, depend only on the scenario counts and the shapes, never on the thread count.
constexpr int64_t kChunkTiles = 2;
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kMaxPartBytes = int64_t(64) << 20;

struct Chunk {
  int64_t m, t0, t1;
  int64_t part;  // -1: the scenario's first chunk; else its partial-sum slot
};

struct Chunks {
  std::vector<Chunk> list;
  int64_t parts = 0;  // partial-sum slots in use
};

// part_bytes: the bytes of one chunk's partial sums (weight and aux weight).
Chunks make_chunks(const std::vector<Tile>& tiles, int64_t part_bytes) {
  Chunks c;
  const int64_t T = static_cast<int64_t>(tiles.size());
  const int64_t max_parts = kMaxPartBytes / std::max<int64_t>(part_bytes, 1);
  for (int64_t a = 0; a < T;) {
    int64_t e = a;
    while (e < T && tiles[e].m == tiles[a].m) ++e;  // tiles [a, e) are one scenario's
    const int64_t k = std::min({(e - a + kChunkTiles - 1) / kChunkTiles, kMaxChunks, 1 + max_parts * (e - a) / T});
    for (int64_t j = 0; j < k; ++j)
      c.list.push_back({tiles[a].m, a + (e - a) * j / k, a + (e - a) * (j + 1) / k, j == 0 ? -1 : c.parts++});
    a = e;
  }
  return c;
}


// ------------------------------------------------------------------------------------------------ grouped forward

std::tuple<Tensor, Tensor> grouped_forward(const Tensor& x_, const Tensor& weight_, const OptTensor& bias_,
                                           const OptTensor& aux_, const OptTensor& aux_weight_,
                                           const Tensor& scenario_, int64_t act) {
  check_common("mbl_grouped_forward", x_, weight_, bias_, aux_, aux_weight_, act);
  TORCH_CHECK(x_.dim() == 2, "mbl_grouped_forward: x must be [B, K], got ", x_.sizes());
  const Tensor x = x_.contiguous(), scenario = scenario_.contiguous();
  const int64_t B = x.size(0), M = weight_.size(0), K = weight_.size(1), N = weight_.size(2);
  TORCH_CHECK(scenario.numel() == B, "mbl_grouped_forward: scenario has ", scenario.numel(), " entries, x has ", B);
  Tensor y = at::empty({B, N}, x.options());
  Tensor z = needs_z(act) ? at::empty({B, N}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || N == 0) return {y, z};

  const Groups g = group_rows(scenario, M);
  const std::vector<Tile> tiles = make_tiles(g);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const Tensor w = to_acc(weight_);
  const Tensor bias = bias_.has_value() ? to_acc(*bias_) : Tensor();
  const Tensor aux = aux_.has_value() ? aux_->contiguous() : Tensor();
  const Tensor wa = aux_.has_value() ? to_acc(*aux_weight_) : Tensor();
  const int64_t Ka = aux.defined() ? aux.size(1) : 0;
  const int64_t* perm = g.perm.data_ptr<int64_t>();
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_grouped_forward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = aux.defined() ? aux.data_ptr<scalar_t>() : nullptr;
    const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* zp = needs_z(act) ? z.data_ptr<scalar_t>() : nullptr;
    const acc_t* wp = w.data_ptr<acc_t>();
    const acc_t* wap = wa.defined() ? wa.data_ptr<acc_t>() : nullptr;
    for_each_dynamic(static_cast<int64_t>(tiles.size()), B * (K + Ka) * N, [&](int64_t ti) {
      const Tile& t = tiles[ti];
      Tensor in = scratch(kTileIn, t.n, K, acc), out = scratch(kTileOut, t.n, N, acc);
      acc_t* ip = in.data_ptr<acc_t>();
      acc_t* op = out.data_ptr<acc_t>();
      const int64_t* rows = perm + t.r0;
      for (int64_t i = 0; i < t.n; ++i) {
        if (i + kPrefetchRows < t.n) prefetch_row(xp + rows[i + kPrefetchRows] * K, K);
        load_row(xp + rows[i] * K, ip + i * K, K);
      }
      gemm_rm<acc_t>(false, false, t.n, N, K, acc_t(0), ip, K, wp + t.m * K * N, N, op, N);
      if (ap != nullptr) {
        Tensor ain = scratch(kTileAux, t.n, Ka, acc);
        acc_t* aip = ain.data_ptr<acc_t>();
        for (int64_t i = 0; i < t.n; ++i) {
          if (i + kPrefetchRows < t.n) prefetch_row(ap + rows[i + kPrefetchRows] * Ka, Ka);
          load_row(ap + rows[i] * Ka, aip + i * Ka, Ka);
        }
        gemm_rm<acc_t>(false, false, t.n, N, Ka, acc_t(1), aip, Ka, wap + t.m * Ka * N, N, op, N);
      }
      const acc_t* b = bp == nullptr ? nullptr : bp + t.m * N;
      if (!needs_z(act)) {
        for (int64_t i = 0; i < t.n; ++i) {
          if (i + kPrefetchRows < t.n) prefetch_row(yp + rows[i + kPrefetchRows] * N, N, /*write=*/true);
          store_row<scalar_t, acc_t>(op + i * N, b, yp + rows[i] * N, N, act);
        }
        return;
      }
      // gelu / silu: store z, then y = act(z) of the stored (rounded) z, as the backward will see it.
      for (int64_t i = 0; i < t.n; ++i) {
        scalar_t* zr = zp + perm[t.r0 + i] * N;
        store_row<scalar_t, acc_t>(op + i * N, b, zr, N, kActNone);
        if constexpr (!std::is_same_v<scalar_t, acc_t>) load_row(zr, op + i * N, N);
        else if (b != nullptr) std::memcpy(op + i * N, zr, N * sizeof(acc_t));
      }
      if (act == kActGelu) at::gelu_(out); else at::silu_(out);
      for (int64_t i = 0; i < t.n; ++i)
        store_row<scalar_t, acc_t>(op + i * N, nullptr, yp + perm[t.r0 + i] * N, N, kActNone);
    });
  });
  zero_outside_rows(g, y);
  zero_outside_rows(g, z);
  return {y, z};
}

// ------------------------------------------------------------------------------------------------ grouped backward

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const char* op, const Tensor& dy_, const Tensor& saved_, const Tensor& x_, const Tensor& weight,
    const OptTensor& aux_, const OptTensor& aux_weight, const Tensor& scenario_, int64_t act, bool need_dx,
    bool need_dw, bool need_db, bool need_daux, bool need_dwa) {
  check_common(op, x_, weight, std::nullopt, aux_, aux_weight, act);
  TORCH_CHECK(act == kActNone || act == kActRelu || act == kActLeakyRelu, op,
              ": fused activation backward supports codes 0-2, got ", act);
  const int64_t M = weight.size(0), K = weight.size(1), N = weight.size(2);
  const int64_t B = x_.size(-2);
  TORCH_CHECK(x_.dim() == 2 || (x_.dim() == 3 && x_.size(0) == M), op, ": x must be [B, K] or [M, B, K], got ",
              x_.sizes());
  TORCH_CHECK((dy_.dim() == 2 && dy_.size(0) == B && dy_.size(1) == N) ||
                  (dy_.dim() == 3 && dy_.size(0) == M && dy_.size(1) == B && dy_.size(2) == N),
              op, ": dy must be [B, N] or [M, B, N] with B = ", B, ", N = ", N, ", got ", dy_.sizes());
  if (act != kActNone) {
    // saved [M, B, N] with a [B, N] dy: y of every branch (the all route's output), row b read at (s_b, b)
    const bool branch_rows = dy_.dim() == 2 && saved_.dim() == 3 && saved_.size(0) == M && saved_.size(1) == B &&
                             saved_.size(2) == N;
    TORCH_CHECK((saved_.sizes() == dy_.sizes() || branch_rows) && saved_.scalar_type() == dy_.scalar_type(), op,
                ": saved must be shaped like dy (or [M, B, N] for a [B, N] dy) for relu/leaky_relu, got ",
                saved_.sizes(), " with dy ", dy_.sizes());
  }
  TORCH_CHECK(scenario_.numel() == B, op, ": scenario has ", scenario_.numel(), " entries, x has ", B);
  const bool has_aux = aux_.has_value();
  need_daux = need_daux && has_aux;
  need_dwa = need_dwa && has_aux;
  const int64_t Ka = has_aux ? aux_->size(1) : 0;
  const auto opts = x_.options();
  const at::ScalarType acc = acc_type(x_.scalar_type());
  // Distinct empty tensors: outputs of an op must not alias each other.
  auto empty = [&] { return at::empty({0}, opts); };
  Tensor dx = empty(), dw = empty(), db = empty(), daux = empty(), dwa = empty();
  if (B == 0) {
    if (need_dx) dx = at::empty(x_.sizes(), opts);
    if (need_dw) dw = at::zeros({M, K, N}, opts);
    if (need_db) db = at::zeros({M, N}, opts);
    if (need_daux) daux = at::empty({0, Ka}, opts);
    if (need_dwa) dwa = at::zeros({M, Ka, N}, opts);
    return {dx, dw, db, daux, dwa};
  }
  const Tensor scenario = scenario_.contiguous();
  const Tensor dy = unit_stride_rows(dy_), saved = act == kActNone ? Tensor() : unit_stride_rows(saved_);
  const Tensor x = unit_stride_rows(x_), aux = has_aux ? unit_stride_rows(*aux_) : Tensor();
  const Groups g = group_rows(scenario, M);
  const std::vector<Tile> tiles = make_tiles(g);
  const int64_t T = static_cast<int64_t>(tiles.size());
  const int64_t* perm = g.perm.data_ptr<int64_t>();

  const int64_t acc_bytes = static_cast<int64_t>(c10::elementSize(acc));
  const Chunks chunk_plan = make_chunks(tiles, ((need_dw ? K : 0) + (need_dwa ? Ka : 0)) * N * acc_bytes);
  const std::vector<Chunk>& chunks = chunk_plan.list;
  const int64_t C = static_cast<int64_t>(chunks.size()), P = chunk_plan.parts;
  const Tensor db_tiles = need_db ? at::empty({T, N}, opts.dtype(acc)) : Tensor();
  const Tensor db_acc = need_db ? at::zeros({M, N}, opts.dtype(acc)) : Tensor();
  std::vector<int64_t> chunks_left_init(M, 0);
  for (const Chunk& c : chunks) ++chunks_left_init[c.m];
  std::vector<std::atomic<int64_t>> chunks_left(M);
  for (int64_t m = 0; m < M; ++m) chunks_left[m].store(chunks_left_init[m], std::memory_order_relaxed);
  const Tensor w = need_dx ? to_acc(weight) : Tensor();
  const Tensor wa = need_daux ? to_acc(*aux_weight) : Tensor();
  if (need_dx) dx = x.dim() == 3 ? at::zeros(x.sizes(), opts) : at::empty(x.sizes(), opts);
  if (need_daux) daux = at::empty(aux.sizes(), opts);
  // Weight gradients in the accumulation dtype: each scenario's first chunk writes its sum in place, the other
  // chunks write partial sums (scratch), added in chunk order by the thread that completes the scenario.
  const Tensor dw_acc = need_dw ? at::empty({M, K, N}, opts.dtype(acc)) : Tensor();
  const Tensor dwa_acc = need_dwa ? at::empty({M, Ka, N}, opts.dtype(acc)) : Tensor();
  const Tensor dw_parts = need_dw ? scratch(kWeightParts, P * K, N, acc).view({P, K, N}) : Tensor();
  const Tensor dwa_parts = need_dwa ? scratch(kAuxWeightParts, P * Ka, N, acc).view({P, Ka, N}) : Tensor();
  auto param_dst = [&](const Tensor& full, const Tensor& parts, const Chunk& c) {
    return c.part < 0 ? full[c.m] : parts[c.part];
  };
  SAML_DISPATCH_FLOATING(x.scalar_type(), "mbl_grouped_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const RowSrc<scalar_t> dyr(dy), xr(x);
    const RowSrc<scalar_t> vr = saved.defined() ? RowSrc<scalar_t>(saved) : RowSrc<scalar_t>();
    const RowSrc<scalar_t> ar = has_aux ? RowSrc<scalar_t>(aux) : RowSrc<scalar_t>();
    // dx row b of scenario m: dx[b] (x [B, K]) or dx[m, b] (x [M, B, K]).
    const int64_t dx_sm = x.dim() == 3 ? B * K : 0;
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* daxp = need_daux ? daux.data_ptr<scalar_t>() : nullptr;
    acc_t* dbp = need_db ? db_tiles.data_ptr<acc_t>() : nullptr;
    // Scenario m's weight gradient = its first chunk's sum + the other chunks' partial sums in chunk order; its bias
    // gradient = its tiles' partial sums in tile order. Fixed orders: the result does not depend on the thread.
    auto finish_scenario = [&](int64_t m) {
      auto add_parts = [&](const Tensor& full, const Tensor& parts, int64_t F) {
        acc_t* o = full.data_ptr<acc_t>() + m * F * N;
        for (const Chunk& c : chunks) {
          if (c.m != m || c.part < 0) continue;
          const acc_t* p = parts.data_ptr<acc_t>() + c.part * F * N;
          for (int64_t j = 0; j < F * N; ++j) o[j] += p[j];
        }
      };
      if (need_dw) add_parts(dw_acc, dw_parts, K);
      if (need_dwa) add_parts(dwa_acc, dwa_parts, Ka);
      if (need_db) {
        acc_t* o = db_acc.data_ptr<acc_t>() + m * N;
        for (int64_t t = 0; t < T; ++t)
          if (tiles[t].m == m)
            for (int64_t j = 0; j < N; ++j) o[j] += dbp[t * N + j];
      }
    };
    const int64_t macs = B * N * ((need_dw ? K : 0) + (need_dx ? K : 0) + (need_dwa ? Ka : 0) + (need_daux ? Ka : 0));
    for_each_dynamic(C, macs, [&](int64_t ci) {
      const Chunk& c = chunks[ci];
      for (int64_t ti = c.t0; ti < c.t1; ++ti) {
        const Tile& t = tiles[ti];
        const bool first = ti == c.t0;
        const int64_t* rows = perm + t.r0;
        Tensor dz = scratch(kTileGrad, t.n, N, acc);
        acc_t* dzp = dz.data_ptr<acc_t>();
        // dz rows, and the tile's bias-gradient partial sum (rows added in order) while each row is in L1.
        acc_t* dbt = need_db ? dbp + ti * N : nullptr;
        if (need_db) std::fill(dbt, dbt + N, acc_t(0));
        for (int64_t i = 0; i < t.n; ++i) {
          if (i + kPrefetchRows < t.n) {
            prefetch_row(dyr.row(t.m, rows[i + kPrefetchRows]), N);
            if (act != kActNone) prefetch_row(vr.row(t.m, rows[i + kPrefetchRows]), N);
          }
          acc_t* d = dzp + i * N;
          grad_row<scalar_t, acc_t>(dyr.row(t.m, rows[i]), act == kActNone ? nullptr : vr.row(t.m, rows[i]), d, N,
                                    act);
          if (need_db)
            for (int64_t j = 0; j < N; ++j) dbt[j] += d[j];
        }
        // Weight gradients: dW += X_tile^T dZ_tile, accumulated over the chunk's tiles in order.
        auto param_grad = [&](const RowSrc<scalar_t>& src, int64_t F, Tensor dst) {
          Tensor in = scratch(kTileIn, t.n, F, acc);
          acc_t* ip = in.data_ptr<acc_t>();
          for (int64_t i = 0; i < t.n; ++i) {
            if (i + kPrefetchRows < t.n) prefetch_row(src.row(t.m, rows[i + kPrefetchRows]), F);
            load_row(src.row(t.m, rows[i]), ip + i * F, F);
          }
          gemm_rm<acc_t>(true, false, F, N, t.n, first ? acc_t(0) : acc_t(1), ip, F, dzp, N, dst.data_ptr<acc_t>(), N);
        };
        if (need_dw) param_grad(xr, K, param_dst(dw_acc, dw_parts, c));
        if (need_dwa) param_grad(ar, Ka, param_dst(dwa_acc, dwa_parts, c));
        // Input gradients: dz W_m^T into the tile buffer, each row stored to its unsorted position.
        auto input_grad = [&](const Tensor& wt, int64_t F, scalar_t* dst, int64_t dst_sm) {
          Tensor out = scratch(kTileOut, t.n, F, acc);
          gemm_rm<acc_t>(false, true, t.n, F, N, acc_t(0), dzp, N, wt.data_ptr<acc_t>() + t.m * F * N, N,
                         out.data_ptr<acc_t>(), F);
          const acc_t* op = out.data_ptr<acc_t>();
          scalar_t* base = dst + t.m * dst_sm;
          for (int64_t i = 0; i < t.n; ++i) {
            if (i + kPrefetchRows < t.n) prefetch_row(base + rows[i + kPrefetchRows] * F, F, /*write=*/true);
            store_row<scalar_t, acc_t>(op + i * F, nullptr, base + rows[i] * F, F, kActNone);
          }
        };
        if (need_dx) input_grad(w, K, dxp, dx_sm);
        if (need_daux) input_grad(wa, Ka, daxp, 0);
      }
      // The thread that completes a scenario's last chunk finishes its sums inside this parallel region (no
      // extra pass or parallel region after it).
      if (chunks_left[c.m].fetch_sub(1, std::memory_order_acq_rel) == 1) finish_scenario(c.m);
    });
  });
  // Scenarios without rows: zero weight gradients (their bias gradients are zero-initialised).
  for (int64_t m = 0; m < M; ++m) {
    if (chunks_left_init[m] > 0) continue;
    if (need_dw) dw_acc[m].zero_();
    if (need_dwa) dwa_acc[m].zero_();
  }
  if (need_dw) dw = dw_acc.to(x.scalar_type());
  if (need_dwa) dwa = dwa_acc.to(x.scalar_type());
  if (need_db) db = db_acc.to(x.scalar_type());
  if (need_dx && x.dim() == 2) zero_outside_rows(g, dx);  // [M, B, K]: zero-initialised
  if (need_daux) zero_outside_rows(g, daux);
  return {dx, dw, db, daux, dwa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_backward(
    const Tensor& dz, const Tensor& x, const Tensor& weight, const OptTensor& aux, const OptTensor& aux_weight,
    const Tensor& scenario, bool need_dx, bool need_dw, bool need_db, bool need_daux, bool need_dwa) {
  TORCH_CHECK(x.dim() == 2, "mbl_grouped_backward: x must be [B, K], got ", x.sizes());
  TORCH_CHECK(dz.dim() == 2, "mbl_grouped_backward: dz must be [B, N], got ", dz.sizes());
  return backward_impl("mbl_grouped_backward", dz, Tensor(), x, weight, aux, aux_weight, scenario, kActNone, need_dx,
                       need_dw, need_db, need_daux, need_dwa);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_backward_act(
    const Tensor& dy, const Tensor& saved, const Tensor& x, const Tensor& weight, const OptTensor& aux,
    const OptTensor& aux_weight, const Tensor& scenario, int64_t act, bool need_dx, bool need_dw, bool need_db,
    bool need_daux, bool need_dwa) {
  return backward_impl("mbl_grouped_backward_act", dy, saved, x, weight, aux, aux_weight, scenario, act, need_dx,
                       need_dw, need_db, need_daux, need_dwa);
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) {
  m.impl("mbl_grouped_forward", &grouped_forward);
  m.impl("mbl_grouped_backward", &grouped_backward);
  m.impl("mbl_grouped_backward_act", &grouped_backward_act);
}
