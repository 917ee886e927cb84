// CPU forward of scenario_embedding_bag_8bit: the scenario-aware embedding bag on 8-bit row-wise tables
// (contract: csrc/registry.cpp, seb_forward_8bit; oracle: saml_kernels/reference/scenario_embedding_bag_8bit.py).
//
// A packed row is W = D + 8 bytes, [q_0 .. q_{D-1} | scale float32 | bias float32] (FBGEMM's fused 8-bit row-wise
// layout; the two floats unaligned when D % 4 != 0), read as v_d = scale * q_d + bias. Row ids as in
// scenario_embedding_bag.h: global row feature_rows[f] + id, scenario row scenario[b] * Rs + feature_scenario_rows[f]
// + local(id) (local = the id, or saml::seb_scenario_local's hash for a hashed feature).
//
// Why the shape of this code:
// - One parallel region over blocks of kSampleBlock samples (at::parallel_for over samples: every bag is computed by
//   one thread, by a path chosen from the bag alone, so the results are bitwise the same for any thread count).
//   Inside a block the features run one after the other, so one FBGEMM call reads one feature's slice of each table
//   (the id stream sequential, few TLB misses). Its [bags, D] result goes to a per-thread tile (L2-resident) and
//   from there into the [B, F, D] rows (F * D floats apart) by streaming stores: each output line is written once,
//   and a plain store would first read it from memory; with the tables cold in the cache (other tables in between)
//   this was 0.73 -> 0.95x two plain embedding_bag_byte_rowwise_offsets calls, one-hot, 2 threads. Rows that are not
//   16-byte aligned (D % 4 != 0) are written straight through FBGEMM's output stride instead.
// - Per (block, feature) one pass over the ids validates them and writes the scenario row ids into scratch; runs of
//   valid bags then go to FBGEMM's JIT 8-bit EmbeddingSpMDM (the kernel torch.ops.quantized's embedding_bag_byte
//   uses), the global call on the ids as given (the table pointer moved to the feature's first row), the scenario
//   call on the scratch rows. A bag holding an invalid id runs the portable gather below for both tables (invalid
//   ids read as zero vectors, the mean still divides by the bag's full length); a bag whose sample's scenario is
//   out of range gets FBGEMM's global row and a zero scenario row.
// - Pooling none: the block's ids are reordered position-major into scratch (invalid ids -> row 0), so each of the
//   bag_len positions is one FBGEMM call of one-id bags written through the output stride F * bag_len * D; the rows
//   of invalid ids (and of a bad scenario) are zeroed afterwards.
// - Builds without FBGEMM (SAML_BUILD_FBGEMM=0, a libtorch without it) run the portable gather everywhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#define SAML_SEB8_STREAM 1
#else
#define SAML_SEB8_STREAM 0
#endif

// setup.py defines SAML_CPU_WITH_FBGEMM when libtorch was built with FBGEMM (and SAML_BUILD_FBGEMM != 0).
#if defined(SAML_CPU_WITH_FBGEMM) && __has_include(<fbgemm/FbgemmEmbedding.h>)
#include <fbgemm/FbgemmEmbedding.h>
#define SAML_SEB8_USE_FBGEMM 1
#else
#define SAML_SEB8_USE_FBGEMM 0
#endif

#include "common/output_pool.h"
#include "common/scratch.h"
#include "scenario_embedding_bag.h"

namespace {

using saml::kMean;
using saml::kNone;
using saml::cpu::seb::Layout;
using saml::cpu::seb::prefetch_read;
using saml::cpu::seb::scen_local;
using saml::cpu::seb::scen_row_base;

constexpr int64_t kRowExtra = 8;  // float32 scale + float32 bias after the D codes
// Samples per block. Longer FBGEMM calls are faster (FBGEMM prefetches only inside a call, so each call starts cold):
// at B = 4096, one thread, one-hot bags, blocks of 512 / 1024 / 2048 / 4096 samples ran at 0.87 / 1.05 / 1.23 / 1.43x
// the speed of two plain embedding_bag_byte_rowwise_offsets calls. A block's scratch rows (8 bytes per id of one
// feature) stay within L2 for bags of up to ~32 ids.
constexpr int64_t kSampleBlock = 4096;
constexpr int64_t kLeadIds = 32;  // first rows of a scenario call, prefetched before its global call
enum ScratchSlot { kSlotScenarioRows = 0, kSlotBagOk, kSlotGlobalRows, kSlotWeights, kSlotIota, kSlotTile };

// Whether rows of D floats at out (row stride os) can be written with streaming stores: 16-byte aligned rows.
inline bool can_stream(const float* out, int64_t D, int64_t os) {
  return SAML_SEB8_STREAM && D % 4 == 0 && os % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

// out rows [n] at stride os (floats) = the tile's [n, D] rows, by non-temporal (streaming) stores: the output rows,
// written once and far apart, are not read into the cache first (no read-for-ownership miss per line). Only where
// can_stream; the caller fences (_mm_sfence) before the results are read.
inline void stream_rows(const float* tile, int64_t n, int64_t D, float* out, int64_t os) {
#if SAML_SEB8_STREAM
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; d += 4) _mm_stream_ps(out + i * os + d, _mm_loadu_ps(tile + i * D + d));
#else
  (void)tile, (void)n, (void)D, (void)out, (void)os;
#endif
}
enum BagFlags : uint8_t { kIdsOk = 1, kScenOk = 2, kBagOk = 3 };  // per bag: its ids valid, its scenario in range

// acc[0, D) += w * (scale * q + bias) of a packed row (scale, bias read unaligned).
SAML_INLINE void axpy_row8(float* acc, const uint8_t* row, float w, int64_t D) {
  float sb[2];
  std::memcpy(sb, row + D, sizeof(sb));
  for (int64_t d = 0; d < D; ++d) acc[d] += w * (sb[0] * float(row[d]) + sb[1]);
}

template <typename index_t>
struct Gather8 {
  const Layout& L;  // L.D = codes per row; rows are W = D + 8 bytes
  int64_t W;
  const index_t* idx;
  const index_t* off;
  const uint8_t* gq;   // [R, W]
  const uint8_t* sq;   // [M * Rs, W]
  const float* psw;    // [nnz] or null
  int64_t pooling, bag_len;
  float* gout;  // [B, F, D] ([B, F, bag_len, D] for none)
  float* sout;  // [B, Fs, D] ([B, Fs, bag_len, D])

  // Portable sum (mean: / length) of positions [s, e) of feature f into o[0, D): rows of the global table
  // (kScen = false) or of the scenario row base rb (kScen = true; rb < 0 reads nothing). Returns the invalid ids.
  template <bool kScen>
  int64_t bag(int64_t f, int64_t rb, int64_t s, int64_t e, bool mean, float* o) const {
    const int64_t D = L.D, size = L.size[f];
    std::fill(o, o + D, 0.f);
    int64_t nbad = 0;
    for (int64_t p = s; p < e; ++p) {
      const int64_t id = int64_t(idx[p]);
      if (id < 0 || id >= size) { ++nbad; continue; }
      if (rb < 0) continue;
      const int64_t row = kScen ? rb + scen_local(L, f, id) : rb + id;
      axpy_row8(o, (kScen ? sq : gq) + row * W, psw ? psw[p] : 1.f, D);
    }
    if (mean && e > s) {
      const float len = float(e - s);
      for (int64_t d = 0; d < D; ++d) o[d] /= len;
    }
    return nbad;
  }

  // Both tables for bag (f, b) with the portable gather (pooling sum / mean). Returns the invalid ids.
  int64_t portable_bag(int64_t f, int64_t b) const {
    const int64_t r = f * L.B + b, s = off[r], e = off[r + 1];
    const bool mean = pooling == kMean;
    const int64_t nbad = bag<false>(f, L.gbase[f], s, e, mean, gout + (b * L.F + f) * L.D);
    if (L.slot[f] >= 0) bag<true>(f, scen_row_base(L, f, b), s, e, mean, sout + (b * L.Fs + L.slot[f]) * L.D);
    return nbad;
  }

  // Samples [b0, b1) with the portable gather only. Returns the invalid ids.
  int64_t portable_block(int64_t b0, int64_t b1) const {
    int64_t nbad = 0;
    for (int64_t f = 0; f < L.F; ++f) {
      const bool aware = L.slot[f] >= 0;
      for (int64_t b = b0; b < b1; ++b) {
        if (pooling != kNone) {
          nbad += portable_bag(f, b);
          continue;
        }
        // pooling none: every position is its own one-id "sum" bag
        const int64_t s = off[f * L.B + b], rb = aware ? scen_row_base(L, f, b) : -1;
        for (int64_t k = 0; k < bag_len; ++k) {
          nbad += bag<false>(f, L.gbase[f], s + k, s + k + 1, false, gout + ((b * L.F + f) * bag_len + k) * L.D);
          if (aware)
            bag<true>(f, rb, s + k, s + k + 1, false, sout + ((b * L.Fs + L.slot[f]) * bag_len + k) * L.D);
        }
      }
    }
    return nbad;
  }
};

#if SAML_SEB8_USE_FBGEMM
template <typename index_t>
struct FbgemmGather8 {
  using Direct = typename fbgemm::EmbeddingSpMDMKernelSignature<uint8_t, index_t, index_t, float>::Type;
  using Rows = typename fbgemm::EmbeddingSpMDMKernelSignature<uint8_t, int64_t, index_t, float>::Type;
  using OneId = typename fbgemm::EmbeddingSpMDMKernelSignature<uint8_t, int64_t, int64_t, float>::Type;
  const Gather8<index_t>& G;
  Direct global;      // sum / mean: the caller's ids and offsets, output stride F * D
  Rows scenario;      // sum / mean: scratch scenario rows, the caller's offsets, output stride Fs * D
  OneId global_one;   // none: scratch rows, one-id bags, output stride F * bag_len * D
  OneId scenario_one; // none: output stride Fs * bag_len * D
  int64_t lead;
  bool tiled;  // sum / mean: FBGEMM writes a [bags, D] tile, streamed into the outputs (stream_rows)

  explicit FbgemmGather8(const Gather8<index_t>& G) : G(G) {
    const Layout& L = G.L;
    tiled = G.pooling != kNone && can_stream(G.gout, L.D, L.F * L.D) && can_stream(G.sout, L.D, L.Fs * L.D);
    const bool w = G.psw != nullptr, mean = G.pooling == kMean;
    const int prefetch = prefetch_ids(L, G.W, int64_t(G.off[L.F * L.B]));
    lead = std::min<int64_t>(kLeadIds, prefetch);
    if (G.pooling != kNone) {
      global = fbgemm::GenerateEmbeddingSpMDMWithStrides<uint8_t, index_t, index_t, float>(
          L.D, w, mean, prefetch, /*is_weight_positional=*/false, /*use_offsets=*/true,
          /*output_stride=*/tiled ? L.D : L.F * L.D,
          /*input_stride=*/-1, /*scale_bias_last=*/true);
      if (L.Fs > 0)
        scenario = fbgemm::GenerateEmbeddingSpMDMWithStrides<uint8_t, int64_t, index_t, float>(
            L.D, w, mean, prefetch, false, true, tiled ? L.D : L.Fs * L.D, -1, true);
    } else {
      global_one = fbgemm::GenerateEmbeddingSpMDMWithStrides<uint8_t, int64_t, int64_t, float>(
          L.D, w, false, prefetch, false, true, L.F * G.bag_len * L.D, -1, true);
      if (L.Fs > 0)
        scenario_one = fbgemm::GenerateEmbeddingSpMDMWithStrides<uint8_t, int64_t, int64_t, float>(
            L.D, w, false, prefetch, false, true, L.Fs * G.bag_len * L.D, -1, true);
    }
  }

  // How many ids ahead the generated kernel prefetches: the float forward's rule (scenario_embedding_bag_forward.cpp,
  // FbgemmGather::prefetch_ids: 128 cache lines in flight for bags of < 4 ids on average, 256 otherwise), counted in
  // lines of a W-byte row.
  static int prefetch_ids(const Layout& L, int64_t W, int64_t nnz) {
    const int64_t mean_bag = nnz / std::max<int64_t>(L.F * L.B, 1);
    const int64_t lines = mean_bag >= 4 ? 256 : 128;
    const int64_t lines_per_row = std::max<int64_t>(1, (W + 63) / 64);
    return int(std::min<int64_t>(256, std::max<int64_t>(16, lines / lines_per_row)));
  }

  void prefetch_rows(const uint8_t* table, const int64_t* rows, int64_t n) const {
    for (int64_t q = 0; q < std::min(lead, n); ++q) prefetch_read(table + rows[q] * G.W, G.W);
  }

  // Pooling sum / mean, samples [b0, b1) of feature f. Returns the invalid ids.
  int64_t pooled(int64_t f, int64_t b0, int64_t b1) const {
    const Layout& L = G.L;
    const int64_t B = L.B, D = L.D, size = L.size[f], r0 = f * B + b0, r1 = f * B + b1;
    const int64_t p0 = G.off[r0], n = int64_t(G.off[r1]) - p0;
    const bool aware = L.slot[f] >= 0;
    int64_t* srow = aware ? saml::cpu::scratch<int64_t>(kSlotScenarioRows, n) : nullptr;
    uint8_t* bag_ok = saml::cpu::scratch<uint8_t>(kSlotBagOk, b1 - b0);
    bool all_ok = true;
    // The row pass: validity of every bag, scenario rows of the aware features.
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t sb = aware ? scen_row_base(L, f, b) : 0;
      bool ok = true;
      for (int64_t p = G.off[f * B + b]; p < G.off[f * B + b + 1]; ++p) {
        const int64_t id = int64_t(G.idx[p]);
        const bool valid = (id >= 0) & (id < size);
        ok &= valid;
        if (aware) srow[p - p0] = valid ? sb + scen_local(L, f, id) : 0;
      }
      bag_ok[b - b0] = uint8_t((ok ? kIdsOk : 0) | (sb >= 0 ? kScenOk : 0));
      all_ok &= ok & (sb >= 0);
    }
    int64_t nbad = 0;
    const float* w = G.psw;
    float* tile = tiled ? saml::cpu::scratch<float>(kSlotTile, (b1 - b0) * D) : nullptr;
    auto global_call = [&](int64_t c0, int64_t c1) {
      const int64_t q0 = G.off[f * B + c0], m = int64_t(G.off[f * B + c1]) - q0;
      float* o = G.gout + (c0 * L.F + f) * D;
      const bool done = global(c1 - c0, m, size, G.gq + L.gbase[f] * G.W, G.idx + q0, G.off + f * B + c0,
                               w ? w + q0 : nullptr, tiled ? tile : o);
      if (tiled) stream_rows(tile, c1 - c0, D, o, L.F * D);
      return done;
    };
    for (int64_t c0 = b0; c0 < b1;) {
      if (bag_ok[c0 - b0] != kBagOk) {
        if (bag_ok[c0 - b0] & kIdsOk) {  // valid ids, scenario out of range: FBGEMM's global row (the bits do not
          bool done = global_call(c0, c0 + 1);  // depend on the scenario id), a zero scenario row
          TORCH_CHECK(done, "seb_forward_8bit: FBGEMM rejected validated ids (internal error)");
          std::fill_n(G.sout + (c0 * L.Fs + L.slot[f]) * D, D, 0.f);
        } else {
          nbad += G.portable_bag(f, c0);
        }
        ++c0;
        continue;
      }
      int64_t c1 = c0 + 1;
      while (c1 < b1 && (all_ok || bag_ok[c1 - b0] == kBagOk)) ++c1;
      const int64_t q0 = G.off[f * B + c0], m = int64_t(G.off[f * B + c1]) - q0;
      if (aware) prefetch_rows(G.sq, srow + (q0 - p0), m);  // FBGEMM prefetches only inside a call
      bool done = global_call(c0, c1);
      if (aware) {
        float* o = G.sout + (c0 * L.Fs + L.slot[f]) * D;
        done &= scenario(c1 - c0, m, L.M * L.Rs, G.sq, srow + (q0 - p0), G.off + f * B + c0, w ? w + q0 : nullptr,
                         tiled ? tile : o);
        if (tiled) stream_rows(tile, c1 - c0, D, o, L.Fs * D);
      }
      TORCH_CHECK(done, "seb_forward_8bit: FBGEMM rejected validated ids (internal error)");
      c0 = c1;
    }
    return nbad;
  }

  // Pooling none, samples [b0, b1) of feature f: ids reordered position-major (k, b) into scratch, one FBGEMM call
  // per position, then the rows of invalid ids / a bad scenario zeroed. Returns the invalid ids.
  int64_t one_id(int64_t f, int64_t b0, int64_t b1) const {
    const Layout& L = G.L;
    const int64_t B = L.B, D = L.D, Lb = G.bag_len, nb = b1 - b0, size = L.size[f];
    const bool aware = L.slot[f] >= 0;
    int64_t* grow = saml::cpu::scratch<int64_t>(kSlotGlobalRows, nb * Lb);
    int64_t* srow = aware ? saml::cpu::scratch<int64_t>(kSlotScenarioRows, nb * Lb) : nullptr;
    float* w = G.psw ? saml::cpu::scratch<float>(kSlotWeights, nb * Lb) : nullptr;
    int64_t* iota = saml::cpu::scratch<int64_t>(kSlotIota, nb + 1);
    for (int64_t j = 0; j <= nb; ++j) iota[j] = j;
    int64_t nbad = 0;
    bool fix = false;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = G.off[f * B + b], sb = aware ? scen_row_base(L, f, b) : 0;
      fix |= sb < 0;
      for (int64_t k = 0; k < Lb; ++k) {
        const int64_t id = int64_t(G.idx[s + k]), j = k * nb + (b - b0);
        const bool valid = (id >= 0) & (id < size);
        nbad += !valid;
        grow[j] = valid ? id : 0;
        if (aware) srow[j] = valid && sb >= 0 ? sb + scen_local(L, f, id) : 0;
        if (w) w[j] = G.psw[s + k];
      }
    }
    for (int64_t k = 0; k < Lb; ++k) {
      if (aware) prefetch_rows(G.sq, srow + k * nb, nb);
      bool done = global_one(nb, nb, size, G.gq + L.gbase[f] * G.W, grow + k * nb, iota, w ? w + k * nb : nullptr,
                             G.gout + ((b0 * L.F + f) * Lb + k) * D);
      if (aware)
        done &= scenario_one(nb, nb, L.M * L.Rs, G.sq, srow + k * nb, iota, w ? w + k * nb : nullptr,
                             G.sout + ((b0 * L.Fs + L.slot[f]) * Lb + k) * D);
      TORCH_CHECK(done, "seb_forward_8bit: FBGEMM rejected validated ids (internal error)");
    }
    if (nbad || fix) {  // zero vectors for invalid ids, and scenario rows of a bad scenario
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = G.off[f * B + b];
        const bool bad_scen = aware && scen_row_base(L, f, b) < 0;
        for (int64_t k = 0; k < Lb; ++k) {
          const int64_t id = int64_t(G.idx[s + k]);
          const bool valid = (id >= 0) & (id < size);
          if (!valid) std::fill_n(G.gout + ((b * L.F + f) * Lb + k) * D, D, 0.f);
          if (aware && (!valid || bad_scen)) std::fill_n(G.sout + ((b * L.Fs + L.slot[f]) * Lb + k) * D, D, 0.f);
        }
      }
    }
    return nbad;
  }
};
#endif

template <typename index_t>
int64_t forward_impl(const Gather8<index_t>& G) {
  const Layout& L = G.L;
  std::atomic<int64_t> bad{0};
#if SAML_SEB8_USE_FBGEMM
  const FbgemmGather8<index_t> K(G);
  at::parallel_for(0, L.B, 64, [&](int64_t lo, int64_t hi) {
    int64_t nbad = 0;
    for (int64_t b0 = lo; b0 < hi; b0 += kSampleBlock) {
      const int64_t b1 = std::min(hi, b0 + kSampleBlock);
      for (int64_t f = 0; f < L.F; ++f) nbad += G.pooling == kNone ? K.one_id(f, b0, b1) : K.pooled(f, b0, b1);
    }
#if SAML_SEB8_STREAM
    _mm_sfence();  // the streaming stores are visible before the region ends
#endif
    if (nbad) bad.fetch_add(nbad);
  });
#else
  at::parallel_for(0, L.B, 64, [&](int64_t lo, int64_t hi) {
    int64_t nbad = 0;
    for (int64_t b0 = lo; b0 < hi; b0 += kSampleBlock) nbad += G.portable_block(b0, std::min(hi, b0 + kSampleBlock));
    if (nbad) bad.fetch_add(nbad);
  });
#endif
  return bad.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seb_forward_8bit_cpu(
    const at::Tensor& indices_, const at::Tensor& offsets_, const at::Tensor& scenario, const at::Tensor& gq_,
    const at::Tensor& sq_, const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot,
    const c10::optional<at::Tensor>& psw_, int64_t pooling, int64_t bag_len, bool check, int64_t num_aware) {
  saml::cpu::seb::check_common(indices_, offsets_, gq_, sq_, psw_);
  TORCH_CHECK(gq_.scalar_type() == at::kByte, "seb_forward_8bit: packed tables must be uint8, got ",
              gq_.scalar_type());
  TORCH_CHECK(gq_.dim() == 2 && gq_.size(1) > kRowExtra, "seb_forward_8bit: global_packed must be [R, D + 8] with "
              "D >= 1, got ", gq_.sizes());
  TORCH_CHECK(pooling >= saml::kSum && pooling <= kNone, "seb_forward_8bit: unknown pooling code ", pooling);
  auto indices = indices_.contiguous();
  auto offsets = offsets_.contiguous();
  auto gq = gq_.contiguous();
  auto sq = sq_.contiguous();
  Layout L = saml::cpu::seb::make_layout(offsets, scenario, gq, sq, fr, fsr, slot);  // checks shapes in bytes
  const int64_t W = L.D;
  L.D = W - kRowExtra;
  TORCH_CHECK(num_aware < 0 || num_aware == L.Fs, "seb_forward_8bit: num_aware = ", num_aware,
              " but aware_slot gives ", L.Fs, " aware features");
  at::Tensor psw;
  if (psw_.has_value()) psw = psw_->to(at::kFloat).contiguous();
  if (pooling == kNone && L.F * L.B > 0)
    TORCH_CHECK(indices.numel() == L.F * L.B * bag_len, "seb_forward_8bit: pooling none needs nnz = F*B*bag_len");
  const auto opts = gq.options().dtype(at::kFloat);
  using saml::cpu::pooled_empty;
  at::Tensor gout, sout;
  if (pooling == kNone) {
    gout = pooled_empty({L.B, L.F, bag_len, L.D}, opts);
    sout = pooled_empty({L.B, L.Fs, bag_len, L.D}, opts);
  } else {
    gout = pooled_empty({L.B, L.F, L.D}, opts);
    sout = pooled_empty({L.B, L.Fs, L.D}, opts);
  }
  auto bad = at::zeros({1}, indices.options().dtype(at::kLong));
  if (check && !saml::cpu::seb::offsets_valid(offsets, L, indices.numel(), pooling, bag_len)) {
    bad.fill_(-1);
    return {gout, sout, bad};
  }
  if (gout.numel() == 0 && sout.numel() == 0) return {gout, sout, bad};
  SAML_DISPATCH_INDEX(indices.scalar_type(), "seb_forward_8bit_cpu", [&] {
    const Gather8<index_t> G{L, W, indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), gq.data_ptr<uint8_t>(),
                             sq.data_ptr<uint8_t>(), psw.defined() ? psw.data_ptr<float>() : nullptr, pooling,
                             bag_len, gout.data_ptr<float>(), sout.data_ptr<float>()};
    const int64_t nbad = forward_impl(G);
    if (check) bad.fill_(nbad);
  });
  return {gout, sout, bad};
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) { m.impl("seb_forward_8bit", &seb_forward_8bit_cpu); }
