#pragma once
// WMMA emulation for the CPU emulation (tests/cuda_emu): every lane holds the whole 16x16 tile (same results, same
// pointer / ldm contract, not the real fragment layout). The real API's requirements are checked: 256-bit aligned
// pointers, ldm a multiple of 16 bytes; a violation is a fault (as the misaligned access on the GPU).
#include <cstdint>
#include <cstdio>
#include "emu_runtime.h"
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};
inline void emu_check(const void* p, unsigned ldm, unsigned elem, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    char b[160];
    std::snprintf(b, sizeof b, "WMMA contract violated in %s: pointer %p (needs 32-byte alignment), ldm %u", what, p,
                  ldm);
    emu::fault(b);
  }
}
template <typename F>
void fill_fragment(F& f, float x) {
  for (auto& r : f.v)
    for (auto& e : r) e = x;
}
template <typename U, typename T, typename L>
void load_matrix_sync(fragment<U, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  emu_check(p, ldm, sizeof(T), "load_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = static_cast<float>(p[i * ldm + j]);
}
template <typename A, typename B, typename C>
void mma_sync(C& d, const A& a, const B& b, const C& c) {
  C t;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      t.v[i][j] = s;
    }
  d = t;
}
template <typename F>
void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t) {
  emu_check(p, ldm, sizeof(float), "store_matrix_sync");
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile (the others hold the same values)
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.v[i][j];
}
}  // namespace wmma
}  // namespace nvcuda
