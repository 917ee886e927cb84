// Stable LSD radix sort of packed 64-bit words (key << 32 | position) by their key bits.
//
// Positions arrive ascending, so equal keys stay in position order: the result is the same total order as
// std::sort on the words, independent of how the caller splits work across threads. Used by the deterministic
// sparse backward (every unique row is reduced by one thread in position order, no atomics).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

namespace saml {
namespace cpu {

// Bits needed for keys in [0, n).
inline int bits_for(int64_t n) {
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < n) ++bits;
  return bits;
}

// Sorts a[0, n) by bits [32, 32 + key_bits) of each word; tmp holds n words of scratch.
inline void radix_sort_keys(uint64_t* a, uint64_t* tmp, int64_t n, int key_bits) {
  if (n < 2 || key_bits == 0) return;
  if (n < 256) {  // small: a comparison sort is cheaper than clearing the count table
    std::sort(a, a + n);
    return;
  }
  const int passes = (key_bits + 10) / 11;  // digits of at most 11 bits: the count table stays in L1
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
  if (src != a) std::memcpy(a, src, sizeof(uint64_t) * size_t(n));
}

}  // namespace cpu
}  // namespace saml
