// Shared pieces of the CPU kernels of scenario_embedding_bag (forward: scenario_embedding_bag_forward.cpp,
// backward and fused update: scenario_embedding_bag_backward.cpp).
//
// Contract: csrc/registry.cpp (seb_forward / seb_backward_rows / seb_backward_update_) and the Python oracle
// saml_kernels/reference/scenario_embedding_bag.py (forward_kernel / backward_rows_kernel).
// Bag (f, b) = indices[offsets[f*B+b] : offsets[f*B+b+1]], ids local to feature f.
//   global row   = feature_rows[f] + id                               (valid iff 0 <= id < rows of f)
//   scenario row = scenario[b] * Rs + feature_scenario_rows[f] + local(id)   (aware features only; local(id) = id,
//                  or seb_id_hash(id) mod Rs_f for a hashed feature with Rs_f < Rg_f scenario rows: saml_common.h)
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/multiversion.h"
#include "saml_common.h"

namespace saml {
namespace cpu {
namespace seb {

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

SAML_INLINE void prefetch_read(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// Per-feature layout, as int64 host arrays (F is small).
struct Layout {
  int64_t F = 0, B = 0, D = 0, M = 0, Rs = 0, Fs = 0;
  std::vector<int64_t> gbase, size, sbase, slot;  // slot[f] = -1 when not aware
  std::vector<int64_t> ssize;                    // scenario rows of an aware feature (<= size; < size: hashed)
  std::vector<int64_t> scen;                     // scenario id per sample (int64)
};

inline Layout make_layout(const at::Tensor& offsets, const at::Tensor& scenario, const at::Tensor& gw,
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
  L.gbase.resize(L.F); L.size.resize(L.F); L.sbase.resize(L.F); L.slot.resize(L.F); L.ssize.assign(L.F, 0);
  for (int64_t f = 0; f < L.F; ++f) {
    L.gbase[f] = frp[f];
    L.size[f] = frp[f + 1] - frp[f];
    TORCH_CHECK(L.size[f] >= 0 && frp[f] >= 0 && frp[f + 1] <= gw.size(0), "seb: bad feature_rows for feature ", f);
    const bool aware = fsrp[f + 1] > fsrp[f];
    L.sbase[f] = fsrp[f];
    L.slot[f] = aware ? slp[f] : -1;
    if (aware) {
      L.ssize[f] = fsrp[f + 1] - fsrp[f];
      TORCH_CHECK(L.ssize[f] <= L.size[f] && (L.ssize[f] == L.size[f] || L.ssize[f] < (int64_t(1) << 32)) &&
                      fsrp[f + 1] <= L.Rs,
                  "seb: bad feature_scenario_rows for feature ", f);
      L.Fs = std::max(L.Fs, slp[f] + 1);
    }
  }
  auto sc = scenario.to(at::kLong).contiguous();
  L.scen.assign(sc.data_ptr<int64_t>(), sc.data_ptr<int64_t>() + L.B);
  return L;
}

// Scenario row base (m * Rs + sbase) of feature f, sample b; -1 when not aware or scenario out of range
// (the op validates scenario ids before any gather; the guard only keeps a bad id, with checks off, from reading
// another table).
SAML_INLINE int64_t scen_row_base(const Layout& L, int64_t f, int64_t b) {
  if (L.slot[f] < 0) return -1;
  const int64_t m = L.scen[b];
  if (m < 0 || m >= L.M) return -1;
  return m * L.Rs + L.sbase[f];
}

// The scenario-local row of a valid id of aware feature f (the id itself, or its hash mod Rs_f when hashed).
SAML_INLINE int64_t scen_local(const Layout& L, int64_t f, int64_t id) {
  return saml::seb_scenario_local(id, L.size[f], L.ssize[f]);
}

// The offsets and scenario ids a gather can trust: offsets run from 0 to nnz without decreasing (every bag
// exactly bag_len long for pooling none), scenario ids lie in [0, M). One sequential pass over F*B + 1 offsets
// and B ids: cheaper than the separate tensor reductions the Python op would otherwise run before the kernel.
template <typename index_t>
inline bool inputs_valid(const at::Tensor& offsets, const Layout& L, int64_t nnz, int64_t pooling, int64_t bag_len) {
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

// inputs_valid on offsets of either index dtype (the kernels' check site when the op asks for checks).
inline bool offsets_valid(const at::Tensor& offsets, const Layout& L, int64_t nnz, int64_t pooling, int64_t bag_len) {
  bool valid = true;
  SAML_DISPATCH_INDEX(offsets.scalar_type(), "seb_offsets_valid",
                      [&] { valid = inputs_valid<index_t>(offsets, L, nnz, pooling, bag_len); });
  return valid;
}

inline void check_common(const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& gw,
                         const at::Tensor& sw, const c10::optional<at::Tensor>& psw) {
  TORCH_CHECK(indices.device().is_cpu(), "seb (cpu): tensors must be on the CPU");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(), "seb: indices (", indices.scalar_type(),
              ") and offsets (", offsets.scalar_type(), ") must share a dtype");
  TORCH_CHECK(indices.dim() == 1 && offsets.dim() == 1 && offsets.numel() >= 1, "seb: indices/offsets must be 1-D");
  TORCH_CHECK(gw.scalar_type() == sw.scalar_type(), "seb: global/scenario weight dtypes differ");
  if (psw.has_value())
    TORCH_CHECK(psw->numel() == indices.numel(), "seb: per_sample_weights needs ", indices.numel(), " entries");
}

}  // namespace seb
}  // namespace cpu
}  // namespace saml
