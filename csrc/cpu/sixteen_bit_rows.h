// Row stores of 16-bit tables for the CPU fused embedding update and gradient rows
// (scenario_embedding_bag_backward.cpp): float16 rows 8 lanes at a time with F16C, and the stochastically rounded
// stores of float16 and bfloat16 rows (saml_common.h, sr_*) 8 lanes at a time with AVX2. Each is bitwise its scalar
// loop; SAML_F16C_ROWS is 0 where these cannot be compiled (then the callers keep their scalar loops).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "saml_common.h"

namespace saml {
namespace cpu {
namespace rows {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SAML_F16C_ROWS 1
// float16 rows 8 lanes at a time with F16C: c10::Half converts one element at a time in software (its conversion is
// fixed at the baseline ISA, and GCC 12 does not vectorise _Float16 conversions even in the AVX2 / AVX-512 clones),
// which left float16's fused step ~3x bfloat16's. These have their own target, so the callers (every ISA clone)
// use them only where the CPU has it (cpu_has_*, checked at run time). Multiply and add stay separate
// instructions, and the conversion back rounds to nearest even: bitwise the scalar loops' results
// (-ffp-contract=off).
__attribute__((target("avx,f16c"))) inline void half_add_scaled_row(float* __restrict acc,
                                                                    const c10::Half* __restrict g, float scale,
                                                                    int64_t D) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 gv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + d)));
    _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_mul_ps(gv, s)));
  }
  for (; d < D; ++d) acc[d] += float(g[d]) * scale;
}

// w[0, D) = fp16(float(w) - mult * g)
__attribute__((target("avx,f16c"))) inline void half_step_row(c10::Half* __restrict w, const float* __restrict g,
                                                              float mult, int64_t D) {
  const __m256 m = _mm256_set1_ps(mult);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m128i* p = reinterpret_cast<__m128i*>(w + d);
    const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(p));
    _mm_storeu_si128(p, _mm256_cvtps_ph(_mm256_sub_ps(wv, _mm256_mul_ps(m, _mm256_loadu_ps(g + d))),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; d < D; ++d) w[d] = c10::Half(float(w[d]) - mult * g[d]);
}

// |float(h)| of 8 float16 lanes
__attribute__((target("avx2,f16c"))) inline __m256 abs_ph(__m128i h, __m256 abs_mask) {
  return _mm256_and_ps(_mm256_cvtph_ps(h), abs_mask);
}
// 8 x 32-bit all-ones / zero masks -> 8 x 16-bit
__attribute__((target("avx2,f16c"))) inline __m128i pack_mask(__m256 mk) {
  const __m256i i = _mm256_castps_si256(mk);
  return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
}

// 8 lanes of fmix32 (saml_common.h, sr_mix32)
__attribute__((target("avx2"))) inline __m256i mix32x8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(int(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(int(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// The random bits (saml_common.h, sr_bits) of a row with key `key`, 16 columns at a time: the 8 mixes of pairs
// 8 q .. 8 q + 7 (one mix32x8), read as 16 uint16 lanes, are the 16-bit values of columns [16 q, 16 q + 16) in order
// (column 2 i + k takes pair i's low (k = 0) or high (k = 1) half). next() for q = 0, 1, 2, ... in order.
struct SrPairs16 {
  __m256i hin;
  // key + golden * j (mod 2^32, as the scalar multiply); the products are constants, so the row's first mix waits
  // only for the key
  __attribute__((target("avx2"))) explicit SrPairs16(uint32_t key, int64_t j0 = 0)
      : hin(_mm256_add_epi32(_mm256_set1_epi32(int(key + saml::kSrGolden * uint32_t(j0))),
                             _mm256_setr_epi32(int(0u * saml::kSrGolden), int(1u * saml::kSrGolden),
                                               int(2u * saml::kSrGolden), int(3u * saml::kSrGolden),
                                               int(4u * saml::kSrGolden), int(5u * saml::kSrGolden),
                                               int(6u * saml::kSrGolden), int(7u * saml::kSrGolden)))) {}
  __attribute__((target("avx2"))) __m256i next() {
    const __m256i h = mix32x8(hin);
    hin = _mm256_add_epi32(hin, _mm256_set1_epi32(int(8u * saml::kSrGolden)));
    return h;
  }
};
// columns [d, d + 8) of the 16 uint16 lanes v of columns [d & ~15, (d & ~15) + 16), one a 32-bit lane
__attribute__((target("avx2"))) inline __m256i half_lanes(__m256i v, int64_t d) {
  return _mm256_cvtepu16_epi32((d & 8) ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v));
}

// 8 lanes of sr_fp16_bits(x, r) by its own float32 candidates and comparison (any x)
__attribute__((target("avx2,f16c"))) inline __m128i fp16_sr_compare(__m256 x, __m256i r) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m128i mag = _mm_set1_epi16(0x7FFF), inf = _mm_set1_epi16(0x7C00), one = _mm_set1_epi16(1);
  const __m256 ax = _mm256_and_ps(x, abs_mask);
  __m128i lo = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i away = pack_mask(_mm256_cmp_ps(abs_ph(lo, abs_mask), ax, _CMP_GT_OQ));
  const __m128i finite = _mm_cmplt_epi16(_mm_and_si128(lo, mag), inf);
  lo = _mm_add_epi16(lo, _mm_and_si128(away, finite));  // -1 where round-to-nearest moved away from zero
  const __m128i hi = _mm_add_epi16(lo, one);
  const __m256 alo = abs_ph(lo, abs_mask), ahi = abs_ph(hi, abs_mask);
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(r), _mm256_set1_ps(1.52587890625e-5f));  // r 2^-16
  const __m256 upm = _mm256_cmp_ps(_mm256_sub_ps(ax, alo), _mm256_mul_ps(u, _mm256_sub_ps(ahi, alo)), _CMP_GT_OQ);
  return _mm_blendv_epi8(lo, hi, pack_mask(upm));
}

// w[0, D) = fp16 of float(w) - mult * g rounded stochastically (saml_common.h, sr_fp16_bits) with the row key
// `key`, 8 lanes at a time, bitwise the scalar sr_fp16_bits. Where |x| lies in the float16 normal range
// [2^-14, 65504) (or x is 0), the rule is done on the integer bits: there lo and hi are 2^13 float32 ulps apart,
// the exact float32 comparison |x| - |lo| > r 2^-16 (|hi| - |lo|) reads f 2^3 > r for f = the low 13 bits of x,
// i.e. f > r >> 3, i.e. a carry out of f + ((0xFFFF - r) >> 3) (= 0x1FFF - (r >> 3)); so the result is y = x's
// bits + ((r ^ 0xFFFF) >> 3) converted toward zero (a carry into the exponent is the next binade's first value,
// and below 65504 the sum cannot pass 65504). Every group is stored that way first, and checked after, on y alone
// (4 instructions on 8 x 16 bits, one branch per 64 columns): |y| in [0x0401, 0x7BFE] implies |x| in
// [2^-14, 65504) (x + t has |x + t| < 2^-14 + 2^-25 < float16 0x0401 when |x| < 2^-14, t < 2^13 ulps of |x|'s
// binade; |x + t| >= |x| >= 65504 gives 0x7BFF, inf or NaN toward zero; a NaN's bits + t stay NaN or wrap past
// the sign to a float32 subnormal, stored +-0). A chunk with another y (a zero, a
// float16 subnormal, 2^-14 itself, overflow, inf, NaN: rare) is checked again on x from the saved input, and a
// group with an x outside the normal range or 0 is stored again by sr_fp16_bits' own comparison.
__attribute__((target("avx2,f16c"))) inline void half_step_row_sr(c10::Half* __restrict w, const float* __restrict g,
                                                                  float mult, int64_t D, uint32_t key) {
  constexpr int64_t kChunk = 64;  // columns per check
  const __m256 m = _mm256_set1_ps(mult);
  const __m256i ones = _mm256_set1_epi32(-1);
  // |y| - 0x0401 as a signed 16-bit compare: inside [0x0401, 0x7BFE] iff (|y| + 0x8000 - 0x0401) <= -0x8000 + 0x77FD
  const __m128i mag16 = _mm_set1_epi16(0x7FFF), off16 = _mm_set1_epi16(int16_t(0x8000 - 0x0401)),
                lim16 = _mm_set1_epi16(int16_t(0x8000 + (0x7BFE - 0x0401)));
  const int64_t D8 = D & ~int64_t(7);
  __m128i saved[kChunk / 8];
  SrPairs16 pairs(key);
  __m256i t16 = ones;
  for (int64_t c0 = 0; c0 < D8; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, D8);
    __m128i bad = _mm_setzero_si128();
    for (int64_t d = c0; d < c1; d += 8) {
      __m128i* p = reinterpret_cast<__m128i*>(w + d);
      const __m128i wh = _mm_loadu_si128(p);
      saved[(d - c0) >> 3] = wh;
      const __m256 x = _mm256_sub_ps(_mm256_cvtph_ps(wh), _mm256_mul_ps(m, _mm256_loadu_ps(g + d)));
      if ((d & 8) == 0) t16 = _mm256_srli_epi16(_mm256_xor_si256(pairs.next(), ones), 3);  // (r ^ 0xFFFF) >> 3
      const __m256i up = _mm256_add_epi32(_mm256_castps_si256(x), half_lanes(t16, d));
      const __m128i y = _mm256_cvtps_ph(_mm256_castsi256_ps(up), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(p, y);
      bad = _mm_or_si128(bad, _mm_cmpgt_epi16(_mm_add_epi16(_mm_and_si128(y, mag16), off16), lim16));
    }
    if (_mm_testz_si128(bad, bad)) continue;
    // normal: 0x38800000 <= |x| bits < 0x477FE000 (unsigned range test as a signed compare after the bias)
    const __m256i abs_bits = _mm256_set1_epi32(0x7FFFFFFF), zero = _mm256_setzero_si256();
    const __m256i bias = _mm256_set1_epi32(int(0x80000000u - 0x38800000u));
    const __m256i span = _mm256_set1_epi32(int(0x80000000u + (0x477FE000u - 0x38800000u)));
    for (int64_t d = c0; d < c1; d += 8) {
      const __m256 x = _mm256_sub_ps(_mm256_cvtph_ps(saved[(d - c0) >> 3]), _mm256_mul_ps(m, _mm256_loadu_ps(g + d)));
      const __m256i ab = _mm256_and_si256(_mm256_castps_si256(x), abs_bits);
      const __m256i fast = _mm256_or_si256(_mm256_cmpgt_epi32(span, _mm256_add_epi32(ab, bias)),
                                           _mm256_cmpeq_epi32(ab, zero));
      if (_mm256_testc_si256(fast, ones)) continue;  // the stored y is right
      const __m256i r = half_lanes(SrPairs16(key, (d & ~int64_t(15)) >> 1).next(), d);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w + d), fp16_sr_compare(x, r));
    }
  }
  for (int64_t d = D8; d < D; ++d) w[d] = saml::sr_round<c10::Half>(float(w[d]) - mult * g[d], saml::sr_bits(key, d));
}

// w[0, D) = bf16(float(w) - mult * g) rounded stochastically (saml_common.h, sr_bf16_bits) with the row key `key`,
// 8 lanes at a time, bitwise the scalar sr_bf16_bits: the float32 bits plus the 16 random bits, shifted down (the
// magnitude cannot carry into the sign: it stays <= inf + 0xFFFF); NaN lanes store round-to-nearest's quiet NaN
// 0x7FC0 (c10::BFloat16). bfloat16 needs no F16C: its float32 value is its bits << 16.
__attribute__((target("avx2"))) inline void bf16_step_row_sr(c10::BFloat16* __restrict w, const float* __restrict g,
                                                            float mult, int64_t D, uint32_t key) {
  const __m256 m = _mm256_set1_ps(mult);
  const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i inf = _mm256_set1_epi32(0x7F800000), qnan = _mm256_set1_epi32(0x7FC00000);
  SrPairs16 pairs(key);
  __m256i h = _mm256_setzero_si256();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m128i* p = reinterpret_cast<__m128i*>(w + d);
    if ((d & 8) == 0) h = pairs.next();
    const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
    const __m256i xb = _mm256_castps_si256(_mm256_sub_ps(wv, _mm256_mul_ps(m, _mm256_loadu_ps(g + d))));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(xb, mag), inf);  // both sides >= 0: signed is fine
    const __m256i up = _mm256_add_epi32(xb, half_lanes(h, d));
    const __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(up, qnan, nan), 16);
    _mm_storeu_si128(p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  for (; d < D; ++d) w[d] = saml::sr_round<c10::BFloat16>(float(w[d]) - mult * g[d], saml::sr_bits(key, d));
}

inline bool cpu_has_avx2_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}
inline bool cpu_has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
  }();
  return yes;
}

// out[0, D) = fp16(a)
__attribute__((target("avx,f16c"))) inline void half_store_row(c10::Half* __restrict out, const float* __restrict a,
                                                        int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d),
                     _mm256_cvtps_ph(_mm256_loadu_ps(a + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; d < D; ++d) out[d] = c10::Half(a[d]);
}

inline bool cpu_has_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}
#else
#define SAML_F16C_ROWS 0
#endif

}  // namespace rows
}  // namespace cpu
}  // namespace saml
