// CPU kernels of scenario_embedding_bag: fused forward gather, deterministic backward, fused optimizer.
//
// Contract: csrc/registry.cpp (seb_forward / seb_backward_rows / seb_backward_update_) and the Python oracle
// saml_kernels/reference/scenario_embedding_bag.py (forward_kernel / backward_rows_kernel).
// Bag (f, b) = indices[offsets[f*B+b] : offsets[f*B+b+1]], ids local to feature f.
//   global row   = feature_rows[f] + id                         (valid iff 0 <= id < rows of f)
//   scenario row = scenario[b] * Rs + feature_scenario_rows[f] + id   (aware features only)
//
// Why the shapes of these loops:
// - The forward gather is bound by memory latency (one random 128-byte row per id), not bandwidth. We walk the
//   bags feature-major (the order of `indices`, so the id stream is sequential), in blocks: global rows with a
//   software prefetch PF ids ahead, then the block's scenario rows (see forward_block). One-hot rows are copied
//   in groups so their independent loads overlap. Measured on the 2-core EPYC VM, 1 thread, B=4096, F=16:
//   no prefetch 14 ms -> 7.4 ms (two torch.index_select calls into preallocated outputs: 6.3 ms).
// - The backward is deterministic for any thread count: per feature, (row key, position) pairs are radix
//   sorted (stable, LSD) and every unique row is reduced by one thread in position order. No atomics.
// - Scratch for the backward lives in a grow-only thread-local buffer: fresh large allocations page-fault on
//   this class of VM and would dominate.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "saml_common.h"

namespace {

using saml::kMean;
using saml::kNone;
using saml::kSum;

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

// Prefetch distance (in ids) of the global-table pass and of the scenario-table pass; 0 disables prefetch.
// Tunable by SAML_SEB_PREFETCH / SAML_SEB_PREFETCH_SCEN for measurements.
int64_t env_int(const char* name, int64_t dflt) {
  const char* e = std::getenv(name);
  return e ? std::max<int64_t>(0, std::atoll(e)) : dflt;
}
int64_t prefetch_distance(bool scen) {
  static const int64_t pf_g = env_int("SAML_SEB_PREFETCH", 16);
  static const int64_t pf_s = env_int("SAML_SEB_PREFETCH_SCEN", 0);
  return scen ? pf_s : pf_g;
}

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// ------------------------------------------------------------------------------------------------ output pool
// Outputs of these ops are large (B*F*D) and short-lived (freed before the next step). Fresh allocations of that
// size are mmapped and page-fault on every first touch: on this VM ~2 us per 4 KiB page, more than the gather
// itself. So outputs >= 1 MiB come from a small cache of 2 MiB-aligned blocks (advised as transparent huge pages)
// that the tensor's deleter returns to; at most kPoolCap bytes stay cached. Like PyTorch's CUDA caching allocator,
// but only for these ops' outputs. The storage is not resizable (it is an ordinary tensor otherwise).
constexpr size_t kPoolMin = size_t(1) << 20, kPoolAlign = size_t(2) << 20, kPoolCap = size_t(512) << 20;

struct OutPool {
  std::mutex mu;
  std::unordered_multimap<size_t, void*> free_blocks;
  size_t cached = 0;
};

OutPool& out_pool() {
  static OutPool* p = new OutPool();  // never destroyed: deleters may run at interpreter exit
  return *p;
}

void pool_release(void* ptr, size_t bytes) {
  OutPool& P = out_pool();
  {
    std::lock_guard<std::mutex> g(P.mu);
    if (P.cached + bytes <= kPoolCap) {
      P.free_blocks.emplace(bytes, ptr);
      P.cached += bytes;
      return;
    }
  }
  std::free(ptr);
}

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (nbytes < kPoolMin) return at::empty(sizes, opts);
  const size_t bytes = (nbytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  void* ptr = nullptr;
  {
    OutPool& P = out_pool();
    std::lock_guard<std::mutex> g(P.mu);
    auto it = P.free_blocks.find(bytes);
    if (it != P.free_blocks.end()) {
      ptr = it->second;
      P.free_blocks.erase(it);
      P.cached -= bytes;
    }
  }
  if (!ptr) {
    ptr = std::aligned_alloc(kPoolAlign, bytes);
    TORCH_CHECK(ptr, "seb: out of memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
    madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(ptr, sizes, [bytes](void* p) { pool_release(p, bytes); }, opts);
}

// Output row stores. float32 rows that are whole 64-byte lines use non-temporal stores: the output is written
// once and not read back here, and a plain store would first read each line from memory (write-allocate),
// stalling the store buffer behind the row gathers. Callers fence (stream_fence) before the data is used.
template <typename scalar_t, typename src_t>
inline void store_row(scalar_t* out, const src_t* in, int64_t D, bool stream) {
  for (int64_t d = 0; d < D; ++d) out[d] = scalar_t(in[d]);
}
template <>
inline void store_row<float, float>(float* out, const float* in, int64_t D, bool stream) {
  if (stream) {
    for (int64_t d = 0; d < D; d += 4) _mm_stream_ps(out + d, _mm_loadu_ps(in + d));
  } else {
    std::memcpy(out, in, sizeof(float) * D);
  }
}
inline void stream_fence() { _mm_sfence(); }
// Measured here: streaming stores did not pay (the output lines stay cached for the consumer); off by default.
bool streaming_enabled() {  // SAML_SEB_STREAM=1 turns them on (for measurements)
  static const bool on = [] {
    const char* e = std::getenv("SAML_SEB_STREAM");
    return e && e[0] == '1';
  }();
  return on;
}

// Prefetch for writing: a weight row (and its optimizer state) about to be updated in place.
inline void prefetch_rw(const void* p, int64_t bytes, const float* state) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1, 3);
  if (state) __builtin_prefetch(state, 1, 3);
}

// Per-feature layout, as int64 host arrays (F is small).
struct Layout {
  int64_t F = 0, B = 0, D = 0, M = 0, Rs = 0, Fs = 0;
  std::vector<int64_t> gbase, size, sbase, slot;  // slot[f] = -1 when not aware
  std::vector<int64_t> scen;                     // scenario id per sample (int64)
};

Layout make_layout(const at::Tensor& offsets, const at::Tensor& scenario, const at::Tensor& gw,
                   const at::Tensor& sw, const at::Tensor& fr_t, const at::Tensor& fsr_t,
                   const at::Tensor& slot_t) {
  Layout L;
  auto fr = fr_t.to(at::kLong).contiguous();
  auto fsr = fsr_t.to(at::kLong).contiguous();
  auto sl = slot_t.to(at::kLong).contiguous();
  TORCH_CHECK(fr.numel() >= 2, "seb: feature_rows needs F+1 >= 2 entries, got ", fr.numel());
  TORCH_CHECK(fsr.numel() == fr.numel(), "seb: feature_scenario_rows has ", fsr.numel(), " entries, expected ",
              fr.numel());
  L.F = fr.numel() - 1;
  TORCH_CHECK(sl.numel() >= L.F, "seb: aware_slot needs F = ", L.F, " entries, got ", sl.numel());
  TORCH_CHECK((offsets.numel() - 1) % L.F == 0, "seb: offsets must have F*B+1 entries, F = ", L.F, ", got ",
              offsets.numel());
  L.B = (offsets.numel() - 1) / L.F;
  TORCH_CHECK(scenario.numel() == L.B, "seb: scenario must have B = ", L.B, " entries, got ", scenario.numel());
  TORCH_CHECK(gw.dim() == 2 && sw.dim() == 3, "seb: global_weight must be [R, D] and scenario_weight [M, Rs, D]");
  L.D = gw.size(1);
  L.M = sw.size(0);
  L.Rs = sw.size(1);
  TORCH_CHECK(sw.size(2) == L.D, "seb: scenario_weight D = ", sw.size(2), " differs from global D = ", L.D);
  const int64_t* frp = fr.data_ptr<int64_t>();
  const int64_t* fsrp = fsr.data_ptr<int64_t>();
  const int64_t* slp = sl.data_ptr<int64_t>();
  L.gbase.resize(L.F); L.size.resize(L.F); L.sbase.resize(L.F); L.slot.resize(L.F);
  for (int64_t f = 0; f < L.F; ++f) {
    L.gbase[f] = frp[f];
    L.size[f] = frp[f + 1] - frp[f];
    TORCH_CHECK(L.size[f] >= 0 && frp[f] >= 0 && frp[f + 1] <= gw.size(0), "seb: bad feature_rows for feature ", f);
    const bool aware = fsrp[f + 1] > fsrp[f];
    L.sbase[f] = fsrp[f];
    L.slot[f] = aware ? slp[f] : -1;
    if (aware) {
      TORCH_CHECK(fsrp[f + 1] - fsrp[f] == L.size[f] && fsrp[f + 1] <= L.Rs,
                  "seb: bad feature_scenario_rows for feature ", f);
      L.Fs = std::max(L.Fs, slp[f] + 1);
    }
  }
  auto sc = scenario.to(at::kLong).contiguous();
  L.scen.assign(sc.data_ptr<int64_t>(), sc.data_ptr<int64_t>() + L.B);
  return L;
}

// Scenario row base (m * Rs + sbase) of feature f, sample b; -1 when not aware or scenario out of range
// (the Python op validates scenario ids; the guard only keeps a bad id from reading another table).
inline int64_t scen_row_base(const Layout& L, int64_t f, int64_t b) {
  if (L.slot[f] < 0) return -1;
  const int64_t m = L.scen[b];
  if (m < 0 || m >= L.M) return -1;
  return m * L.Rs + L.sbase[f];
}

// ------------------------------------------------------------------------------------------------ forward

// Block size (bags) of the forward: each block is gathered from the global table, then from the scenario tables.
// Two passes per block keep the prefetch policy per table (global rows: prefetched; scenario rows: their
// 4x larger footprint misses the TLB and dropped/stalled prefetches measured slower than none); per block both
// passes reuse the block's ids from L1.
int64_t forward_block() {
  static const int64_t blk = [] {
    const char* e = std::getenv("SAML_SEB_BLOCK");
    return e ? std::max<int64_t>(1, std::atoll(e)) : int64_t(512);
  }();
  return blk;
}

// One pass over bags [bag0, bag1) for one table: kScen = false gathers the global rows into gout, true the
// scenario rows of the sample's scenario into sout (aware features only). Returns the number of invalid ids seen.
template <bool kScen, typename scalar_t, typename index_t>
int64_t gather_bags(const Layout& L, const index_t* idx, const index_t* off, const scalar_t* table,
                    const scalar_t* psw, int64_t pooling, int64_t bag_len, scalar_t* out, int64_t bag0, int64_t bag1,
                    bool stream, typename AccType<scalar_t>::type* acc, const typename AccType<scalar_t>::type* zeros) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t F = L.F, B = L.B, D = L.D;
  const int64_t cols = kScen ? L.Fs : L.F;
  const int64_t PF = prefetch_distance(kScen);
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  const int64_t p_end = off[bag1];
  // Row base of bag (f, b) in `table`, or -1 when this pass has nothing to read for it.
  auto row_base = [&](int64_t f, int64_t b) -> int64_t { return kScen ? scen_row_base(L, f, b) : L.gbase[f]; };
  // Prefetch cursor: bag (qf, qb) holds position q = p + PF.
  int64_t qbag = bag0, qf = bag0 / B, qb = bag0 % B;
  auto issue = [&](int64_t q) {
    while (off[qbag + 1] <= q) {
      ++qbag;
      if (++qb == B) { qb = 0; ++qf; }
    }
    const int64_t id = int64_t(idx[q]);
    const int64_t rb = row_base(qf, qb);
    if (rb >= 0 && id >= 0 && id < L.size[qf]) prefetch_bytes(table + (rb + id) * D, row_bytes);
  };
  if (PF > 0)
    for (int64_t q = off[bag0]; q < std::min<int64_t>(off[bag0] + PF, p_end); ++q) issue(q);
  int64_t nbad = 0;
  constexpr int kGroup = 16;
  const scalar_t* qsrc[kGroup];
  scalar_t* qdst[kGroup];
  int nq = 0;
  auto flush = [&] {
    for (int i = 0; i < nq; ++i) {
      if (qsrc[i]) store_row(qdst[i], qsrc[i], D, stream);
      else store_row(qdst[i], zeros, D, stream);
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
          store_row(o, zeros, D, stream);
        } else if (psw) {
          const scalar_t* r = table + (rb + id) * D;
          const acc_t w = acc_t(psw[p]);
          for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(r[d]) * w;
          store_row(o, acc, D, stream);
        } else {
          store_row(o, table + (rb + id) * D, D, stream);
        }
      }
      continue;
    }
    scalar_t* o = out + (b * cols + col) * D;
    if (e - s == 1 && !psw) {  // one-hot bag (the common case): the row itself (mean of one = the row)
      if (PF > 0 && s + PF < p_end) issue(s + PF);
      const int64_t id = int64_t(idx[s]);
      const bool valid = id >= 0 && id < size;
      nbad += !valid;
      // Queued and copied in groups: the group's row loads are independent and issue back to back, which
      // keeps many misses in flight even where a software prefetch is dropped (e.g. on a TLB miss).
      qsrc[nq] = (valid && rb >= 0) ? table + (rb + id) * D : nullptr;
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
      const scalar_t* r = table + (rb + id) * D;
      const acc_t w = psw ? acc_t(psw[p]) : acc_t(1);
      for (int64_t d = 0; d < D; ++d) acc[d] += acc_t(r[d]) * w;
    }
    if (pooling == kMean) {
      const acc_t len = acc_t(std::max<int64_t>(e - s, 1));
      for (int64_t d = 0; d < D; ++d) acc[d] /= len;
    }
    store_row(o, acc, D, stream);
  }
  flush();
  return nbad;
}

template <typename scalar_t, typename index_t>
void forward_impl(const Layout& L, const index_t* idx, const index_t* off, const scalar_t* gw, const scalar_t* sw,
                  const scalar_t* psw, int64_t pooling, int64_t bag_len, bool check, scalar_t* gout,
                  scalar_t* sout, int64_t* bad_total) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t D = L.D, nbags = L.F * L.B, BLK = forward_block();
  // Streaming stores need 16-byte aligned rows of whole lines (D % 16 == 0 floats, 64-byte aligned outputs).
  const bool stream = streaming_enabled() && std::is_same<scalar_t, float>::value && D % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(gout) % 64 == 0 && reinterpret_cast<uintptr_t>(sout) % 64 == 0;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, nbags, 64, [&](int64_t bag0, int64_t bag1) {
    std::vector<acc_t> acc(D), zeros(D, acc_t(0));
    int64_t nbad = 0;
    for (int64_t lo = bag0; lo < bag1; lo += BLK) {
      const int64_t hi = std::min(bag1, lo + BLK);
      nbad += gather_bags<false>(L, idx, off, gw, psw, pooling, bag_len, gout, lo, hi, stream, acc.data(),
                                 zeros.data());
      if (L.Fs > 0)
        gather_bags<true>(L, idx, off, sw, psw, pooling, bag_len, sout, lo, hi, stream, acc.data(), zeros.data());
    }
    if (stream) stream_fence();
    if (check && nbad) bad.fetch_add(nbad);
  });
  *bad_total = check ? bad.load() : 0;
}

void check_common(const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& gw, const at::Tensor& sw,
                  const c10::optional<at::Tensor>& psw) {
  TORCH_CHECK(indices.device().is_cpu(), "seb (cpu): tensors must be on the CPU");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(), "seb: indices (", indices.scalar_type(),
              ") and offsets (", offsets.scalar_type(), ") must share a dtype");
  TORCH_CHECK(indices.dim() == 1 && offsets.dim() == 1 && offsets.numel() >= 1, "seb: indices/offsets must be 1-D");
  TORCH_CHECK(gw.scalar_type() == sw.scalar_type(), "seb: global/scenario weight dtypes differ");
  if (psw.has_value())
    TORCH_CHECK(psw->numel() == indices.numel(), "seb: per_sample_weights needs ", indices.numel(), " entries");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seb_forward_cpu(
    const at::Tensor& indices_, const at::Tensor& offsets_, const at::Tensor& scenario, const at::Tensor& gw_,
    const at::Tensor& sw_, const at::Tensor& fr, const at::Tensor& fsr, const at::Tensor& slot,
    const c10::optional<at::Tensor>& psw_, int64_t pooling, int64_t bag_len, bool check, int64_t num_aware) {
  check_common(indices_, offsets_, gw_, sw_, psw_);
  auto indices = indices_.contiguous();
  auto offsets = offsets_.contiguous();
  auto gw = gw_.contiguous();
  auto sw = sw_.contiguous();
  const Layout L = make_layout(offsets, scenario, gw, sw, fr, fsr, slot);
  TORCH_CHECK(num_aware < 0 || num_aware == L.Fs, "seb_forward: num_aware = ", num_aware, " but aware_slot gives ",
              L.Fs, " aware features");
  at::Tensor psw;
  if (psw_.has_value()) psw = psw_->to(gw.scalar_type()).contiguous();
  if (pooling == kNone && L.F * L.B > 0)
    TORCH_CHECK(indices.numel() == L.F * L.B * bag_len, "seb: pooling none needs nnz = F*B*bag_len");
  at::Tensor gout, sout;
  if (pooling == kNone) {
    gout = pooled_empty({L.B, L.F, bag_len, L.D}, gw.options());
    sout = pooled_empty({L.B, L.Fs, bag_len, L.D}, gw.options());
  } else {
    gout = pooled_empty({L.B, L.F, L.D}, gw.options());
    sout = pooled_empty({L.B, L.Fs, L.D}, gw.options());
  }
  auto bad = at::zeros({1}, indices.options().dtype(at::kLong));
  if (L.F * L.B == 0) return {gout, sout, bad};
  SAML_DISPATCH_FLOATING(gw.scalar_type(), "seb_forward_cpu", [&] {
    using scalar_t_ = scalar_t;
    SAML_DISPATCH_INDEX(indices.scalar_type(), "seb_forward_cpu_idx", [&] {
      forward_impl<scalar_t_, index_t>(L, indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(),
                                       gw.data_ptr<scalar_t_>(), sw.data_ptr<scalar_t_>(),
                                       psw.defined() ? psw.data_ptr<scalar_t_>() : nullptr, pooling, bag_len, check,
                                       gout.data_ptr<scalar_t_>(), sout.data_ptr<scalar_t_>(),
                                       bad.data_ptr<int64_t>());
    });
  });
  return {gout, sout, bad};
}

// ------------------------------------------------------------------------------------------------ backward

// Grow-only scratch of the calling thread (autograd runs CPU backward on the caller's thread).
uint64_t* scratch_words(int64_t n) {
  thread_local std::unique_ptr<uint64_t[]> buf;
  thread_local int64_t cap = 0;
  if (cap < n) {
    buf.reset(new uint64_t[n]);
    cap = n;
  }
  return buf.get();
}

inline int bits_for(int64_t n) { return n <= 1 ? 0 : 64 - __builtin_clzll(uint64_t(n - 1)); }

// Stable LSD radix sort of packed (key << 32 | position) words by the key bits (positions arrive ascending,
// so equal keys stay in position order: the result is the same total order as std::sort on the words).
void radix_sort_keys(uint64_t* a, uint64_t* tmp, int64_t n, int key_bits) {
  if (n < 2 || key_bits == 0) return;
  if (n < 256) {
    std::sort(a, a + n);
    return;
  }
  const int passes = (key_bits + 10) / 11;
  const int width = (key_bits + passes - 1) / passes;
  const uint64_t mask = (uint64_t(1) << width) - 1;
  uint32_t count[2048];
  uint64_t* src = a;
  uint64_t* dst = tmp;
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = 32 + pass * width;
    std::memset(count, 0, sizeof(uint32_t) * (size_t(1) << width));
    for (int64_t i = 0; i < n; ++i) ++count[(src[i] >> shift) & mask];
    uint32_t sum = 0;
    for (size_t d = 0; d < (size_t(1) << width); ++d) {
      const uint32_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) dst[count[(src[i] >> shift) & mask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != a) std::memcpy(a, src, sizeof(uint64_t) * n);
}

// Per-feature sorted (key, position) pairs of the valid ids; regions are [off[f*B], off[f*B] + n) of each array.
struct SortedPairs {
  int64_t nnz = 0;
  uint64_t* kg = nullptr;  // global keys: id
  uint64_t* ks = nullptr;  // scenario keys: m * size + id
  int32_t* sample = nullptr;
  std::vector<int64_t> ng, ns, ug, us;  // counts; unique counts (us is [F * M])
};

template <typename index_t>
void sort_pairs(const Layout& L, const index_t* idx, const index_t* off, SortedPairs& S) {
  const int64_t F = L.F, B = L.B, M = L.M;
  const int64_t nnz = S.nnz;
  uint64_t* words = scratch_words(3 * nnz + (nnz + 1) / 2 + 1);
  S.kg = words;
  S.ks = words + nnz;
  uint64_t* tmp = words + 2 * nnz;
  S.sample = reinterpret_cast<int32_t*>(words + 3 * nnz);
  S.ng.assign(F, 0); S.ns.assign(F, 0); S.ug.assign(F, 0); S.us.assign(F * M, 0);
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK(int64_t(off[(f + 1) * B]) - int64_t(off[f * B]) < (int64_t(1) << 32),
                "seb backward: a feature holds >= 2^32 ids");
    if (L.slot[f] >= 0)
      TORCH_CHECK(M * L.size[f] < (int64_t(1) << 32), "seb backward: M * rows of feature ", f, " >= 2^32");
  }
  at::parallel_for(0, F, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t base = off[f * B];
      const int64_t size = L.size[f];
      int64_t ng = 0, ns = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t sb = scen_row_base(L, f, b);
        const uint64_t mkey = sb >= 0 ? uint64_t(L.scen[b] * size) : 0;
        for (int64_t p = off[f * B + b]; p < off[f * B + b + 1]; ++p) {
          S.sample[p] = int32_t(b);
          const int64_t id = int64_t(idx[p]);
          if (id < 0 || id >= size) continue;
          const uint64_t lp = uint64_t(p - base);
          S.kg[base + ng++] = (uint64_t(id) << 32) | lp;
          if (sb >= 0) S.ks[base + ns++] = ((mkey + uint64_t(id)) << 32) | lp;
        }
      }
      radix_sort_keys(S.kg + base, tmp + base, ng, bits_for(size));
      radix_sort_keys(S.ks + base, tmp + base, ns, bits_for(M * size));
      int64_t ug = 0;
      for (int64_t i = 0; i < ng; ++i) ug += (i == 0 || (S.kg[base + i] >> 32) != (S.kg[base + i - 1] >> 32));
      for (int64_t i = 0; i < ns; ++i)
        if (i == 0 || (S.ks[base + i] >> 32) != (S.ks[base + i - 1] >> 32))
          ++S.us[f * M + int64_t(S.ks[base + i] >> 32) / std::max<int64_t>(size, 1)];
      S.ng[f] = ng; S.ns[f] = ns; S.ug[f] = ug;
    }
  });
}

// Walks the unique rows of one feature's sorted pairs; for each, sums scale_p * grad_row(p) over its positions
// (in position order) into acc and calls visit(key, acc). The sorted order scatters the upstream-gradient reads
// (and, for the fused update, the weight rows), so both are prefetched PFB pairs ahead (pre(key) prefetches
// the visitor's row).
template <typename scalar_t, typename index_t, typename Visit, typename Pre>
void reduce_segments(const Layout& L, const index_t* off, const scalar_t* psw, int64_t pooling, int64_t lp_stride,
                     const uint64_t* keys, int64_t n, int64_t base, const int32_t* sample, int64_t f,
                     const scalar_t* grad, int64_t grad_cols, int64_t col,
                     std::vector<typename AccType<scalar_t>::type>& acc, Visit&& visit, Pre&& pre) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t D = L.D, B = L.B;
  static const int64_t PFB = env_int("SAML_SEB_PREFETCH_BWD", 8);
  auto grad_row = [&](int64_t i) {
    const int64_t p = base + int64_t(keys[i] & 0xffffffffu);
    const int64_t b = sample[p];
    const int64_t k = pooling == kNone ? p - int64_t(off[f * B + b]) : 0;
    return grad + ((b * grad_cols + col) * lp_stride + k) * D;
  };
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  int64_t i = 0;
  while (i < n) {
    const uint64_t key = keys[i] >> 32;
    std::fill(acc.begin(), acc.end(), acc_t(0));
    acc_t* a = acc.data();
    if (PFB > 0 && i + PFB < n) pre(int64_t(keys[i + PFB] >> 32));
    for (; i < n && (keys[i] >> 32) == key; ++i) {
      if (PFB > 0 && i + PFB < n) prefetch_bytes(grad_row(i + PFB), row_bytes);
      const int64_t p = base + int64_t(keys[i] & 0xffffffffu);
      const int64_t bag = f * B + sample[p];
      const scalar_t* g = grad_row(i);
      acc_t scale = acc_t(1);
      if (pooling == kMean) scale = scale / acc_t(std::max<int64_t>(int64_t(off[bag + 1]) - int64_t(off[bag]), 1));
      if (psw) scale = scale * acc_t(psw[p]);
      for (int64_t d = 0; d < D; ++d) a[d] += acc_t(g[d]) * scale;
    }
    visit(int64_t(key), a);
  }
}

struct BwdArgs {
  at::Tensor gg, gs, indices, offsets, gw, sw, psw;
  Layout L;
  int64_t pooling, bag_len;
};

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

// Given the sorted pairs, per feature (in parallel) calls visit_g(f, u, row, acc) for unique global rows and
// visit_s(f, m, u_in_m_block, row, acc) for unique scenario rows, with u counting within the feature's block.
template <typename scalar_t, typename index_t, typename VG, typename VS, typename PG, typename PS>
void backward_walk_sorted(const BwdArgs& A, const SortedPairs& S, VG&& visit_g, VS&& visit_s, PG&& pre_g,
                          PS&& pre_s) {
  using acc_t = typename AccType<scalar_t>::type;
  const Layout& L = A.L;
  const index_t* off = A.offsets.data_ptr<index_t>();
  const scalar_t* psw = A.psw.defined() ? A.psw.data_ptr<scalar_t>() : nullptr;
  const int64_t lp = A.pooling == kNone ? A.bag_len : 1;
  const scalar_t* gg = A.gg.data_ptr<scalar_t>();
  const scalar_t* gs = A.gs.data_ptr<scalar_t>();
  at::parallel_for(0, L.F, 1, [&](int64_t f0, int64_t f1) {
    std::vector<acc_t> acc(L.D);
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t base = off[f * L.B];
      const int64_t size = std::max<int64_t>(L.size[f], 1);
      int64_t u = 0;
      reduce_segments<scalar_t, index_t>(L, off, psw, A.pooling, lp, S.kg + base, S.ng[f], base, S.sample, f, gg,
                                         L.F, f, acc, [&](int64_t key, const acc_t* a) {
                                           visit_g(f, u++, L.gbase[f] + key, a);
                                         },
                                         [&](int64_t key) { pre_g(L.gbase[f] + key); });
      if (L.slot[f] < 0) continue;
      int64_t m_prev = -1, um = 0;
      reduce_segments<scalar_t, index_t>(L, off, psw, A.pooling, lp, S.ks + base, S.ns[f], base, S.sample, f, gs,
                                         L.Fs, L.slot[f], acc, [&](int64_t key, const acc_t* a) {
                                           const int64_t m = key / size;
                                           if (m != m_prev) { m_prev = m; um = 0; }
                                           visit_s(f, m, um++, m * L.Rs + L.sbase[f] + key % size, a);
                                         },
                                         [&](int64_t key) { pre_s((key / size) * L.Rs + L.sbase[f] + key % size); });
    }
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
            const scalar_t* w2 = sw + (sb + id) * D;
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
      // Output sizes are known after the sort (unique counts), before the reduction.
      S.nnz = A.indices.numel();
      sort_pairs<index_t>(L, A.indices.data_ptr<index_t>(), A.offsets.data_ptr<index_t>(), S);
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
      backward_walk_sorted<scalar_t_, index_t>(
          A, S,
          [&](int64_t f, int64_t u, int64_t row, const acc_t* a) {
            const int64_t o = gstart[f] + u;
            gr[o] = row;
            for (int64_t d = 0; d < D; ++d) gv[o * D + d] = scalar_t_(a[d]);
          },
          [&](int64_t f, int64_t m, int64_t u, int64_t row, const acc_t* a) {
            const int64_t o = sstart[f * L.M + m] + u;
            sr[o] = row;
            for (int64_t d = 0; d < D; ++d) sv[o * D + d] = scalar_t_(a[d]);
          },
          [](int64_t) {}, [](int64_t) {});
      if (need_psw_grad && psw.has_value()) {
        gpsw = at::empty({A.indices.numel()}, gw.options());
        psw_grad_impl<scalar_t_, index_t>(A, gpsw.data_ptr<scalar_t_>());
        gpsw = gpsw.to(psw->scalar_type());
      }
    });
  });
  return {grows, gvals, srows, svals, gpsw};
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
              "seb_backward_update_: hparams must be a contiguous float64 [4] tensor on the weights' device");
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
      S.nnz = A.indices.numel();
      sort_pairs<index_t>(L, A.indices.data_ptr<index_t>(), A.offsets.data_ptr<index_t>(), S);
      const int64_t D = L.D;
      const acc_t alr = acc_t(hp[saml::kLr]), aeps = acc_t(hp[saml::kEps]), wd = acc_t(hp[saml::kWeightDecay]);
      auto apply = [&](scalar_t_* w, float* state, const acc_t* g) {
        // g' = g + wd * w, built once in a per-thread row buffer (the plain loops below stay vectorisable)
        if (wd != acc_t(0)) {
          thread_local std::vector<acc_t> gdecay;
          gdecay.resize(D);
          for (int64_t d = 0; d < D; ++d) gdecay[d] = g[d] + wd * acc_t(w[d]);
          g = gdecay.data();
        }
        acc_t mult = alr;
        if (state) {
          acc_t sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += g[d] * g[d];
          const float s = *state + float(sq / acc_t(D));
          *state = s;
          mult = alr / (std::sqrt(acc_t(s)) + aeps);
        }
        for (int64_t d = 0; d < D; ++d) w[d] = scalar_t_(acc_t(w[d]) - mult * g[d]);
      };
      scalar_t_* gwp = gw.data_ptr<scalar_t_>();
      scalar_t_* swp = sw.data_ptr<scalar_t_>();
      backward_walk_sorted<scalar_t_, index_t>(
          A, S,
          [&](int64_t, int64_t, int64_t row, const acc_t* a) {
            if (update_global) apply(gwp + row * D, gst ? gst + row : nullptr, a);
          },
          [&](int64_t, int64_t, int64_t, int64_t row, const acc_t* a) {
            if (update_scenario) apply(swp + row * D, sst ? sst + row : nullptr, a);
          },
          [&](int64_t row) {
            if (update_global) prefetch_rw(gwp + row * D, D * int64_t(sizeof(scalar_t_)), gst ? gst + row : nullptr);
          },
          [&](int64_t row) {
            if (update_scenario) prefetch_rw(swp + row * D, D * int64_t(sizeof(scalar_t_)), sst ? sst + row : nullptr);
          });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(saml_C, CPU, m) {
  m.impl("seb_forward", &seb_forward_cpu);
  m.impl("seb_backward_rows", &seb_backward_rows_cpu);
  m.impl("seb_backward_update_", &seb_backward_update_cpu);
}
