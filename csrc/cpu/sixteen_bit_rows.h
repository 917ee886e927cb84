// Row stores of 16-bit tables for the CPU fused embedding update and gradient rows
// (scenario_embedding_bag_backward.cpp): float16 rows 8 lanes at a time with F16C, and the stochastically rounded
// stores of float16 and bfloat16 rows (saml_common.h, sr_*) 8 lanes at a time with AVX2. Each is bitwise its scalar
// loop; SAML_F16C_ROWS is 0 where these cannot be compiled (then the callers keep their scalar loops).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// The random bits (saml_common.h, sr_bits) of a row with key `key`, 8 columns at a time: columns [16 q, 16 q + 16)
// share the 8 mixes of pairs 8 q .. 8 q + 7 (one mix32x8); column 2 i + k takes pair i's low (k = 0) or high (k = 1)
// 16 bits. next(d) for d = 0, 8, 16, ... in order returns the 8 columns [d, d + 8), one 16-bit value a lane.
struct SrBits8 {
  __m256i hin, h;
  __attribute__((target("avx2"))) explicit SrBits8(uint32_t key)
      // key + golden * j (mod 2^32, as the scalar multiply); the products are constants, so the row's first mix
      // waits only for the key
      : hin(_mm256_add_epi32(_mm256_set1_epi32(int(key)),
                             _mm256_setr_epi32(int(0u * saml::kSrGolden), int(1u * saml::kSrGolden),
                                               int(2u * saml::kSrGolden), int(3u * saml::kSrGolden),
                                               int(4u * saml::kSrGolden), int(5u * saml::kSrGolden),
                                               int(6u * saml::kSrGolden), int(7u * saml::kSrGolden)))),
        h(_mm256_setzero_si256()) {}
  __attribute__((target("avx2"))) __m256i next(int64_t d) {
    if ((d & 8) == 0) {  // a new 16 columns: the next 8 pairs
      h = mix32x8(hin);
      hin = _mm256_add_epi32(hin, _mm256_set1_epi32(int(8u * saml::kSrGolden)));
    }
    const __m256i pairs = (d & 8) ? _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)
                                  : _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    const __m256i halves = _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(h, pairs),
                                             _mm256_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16));
    return _mm256_and_si256(halves, _mm256_set1_epi32(0xFFFF));
  }
};

// w[0, D) = fp16 of float(w) - mult * g rounded stochastically (saml_common.h, sr_fp16_bits) with the row key
// `key`, 8 lanes at a time, bitwise the scalar sr_fp16_bits. Where all 8 |x| lie in the float16 normal range
// [2^-14, 65504) (or are 0), the rule is done on the integer bits: there lo and hi are 2^13 float32 ulps apart, the
// exact float32 comparison |x| - |lo| > r 2^-16 (|hi| - |lo|) reads f 2^3 > r for f = the low 13 bits of x, i.e.
// f > r >> 3, i.e. a carry out of f + ((0xFFFF - r) >> 3) (= 0x1FFF - (r >> 3)); so the result is x's bits +
// ((r ^ 0xFFFF) >> 3) converted toward zero (a carry into the exponent is the next binade's first value, and below
// 65504 the sum cannot pass 65504). Zero stays +-0. Other lanes (float16 subnormals, overflow, NaN) take
// sr_fp16_bits' own float32 candidates and comparison for the whole 8-lane group.
__attribute__((target("avx2,f16c"))) inline void half_step_row_sr(c10::Half* __restrict w, const float* __restrict g,
                                                                  float mult, int64_t D, uint32_t key) {
  const __m256 m = _mm256_set1_ps(mult);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 two_m16 = _mm256_set1_ps(1.52587890625e-5f);
  const __m256i bias = _mm256_set1_epi32(int(0x80000000u - 0x38800000u));  // |x| bits - 2^-14's, as signed
  const __m256i span = _mm256_set1_epi32(int(0x80000000u + (0x477FE000u - 0x38800000u)));  // 65504's
  const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi32(-1), low16 = _mm256_set1_epi32(0xFFFF);
  const __m128i mag = _mm_set1_epi16(0x7FFF), inf = _mm_set1_epi16(0x7C00), one = _mm_set1_epi16(1);
  SrBits8 bits(key);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m128i* p = reinterpret_cast<__m128i*>(w + d);
    const __m256 x = _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)), _mm256_mul_ps(m, _mm256_loadu_ps(g + d)));
    const __m256i r = bits.next(d);
    const __m256i xb = _mm256_castps_si256(x);
    const __m256i ab = _mm256_and_si256(xb, _mm256_castps_si256(abs_mask));
    // normal: 0x38800000 <= ab < 0x477FE000 (unsigned range test as a signed compare after the bias)
    const __m256i normal = _mm256_cmpgt_epi32(span, _mm256_add_epi32(ab, bias));
    const __m256i fast = _mm256_or_si256(normal, _mm256_cmpeq_epi32(ab, zero));
    if (_mm256_testc_si256(fast, ones)) {
      const __m256i up = _mm256_add_epi32(xb, _mm256_srli_epi32(_mm256_xor_si256(r, low16), 3));
      _mm_storeu_si128(p, _mm256_cvtps_ph(_mm256_castsi256_ps(up), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
      continue;
    }
    const __m256 ax = _mm256_and_ps(x, abs_mask);
    __m128i lo = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i away = pack_mask(_mm256_cmp_ps(abs_ph(lo, abs_mask), ax, _CMP_GT_OQ));
    const __m128i finite = _mm_cmplt_epi16(_mm_and_si128(lo, mag), inf);
    lo = _mm_add_epi16(lo, _mm_and_si128(away, finite));  // -1 where round-to-nearest moved away from zero
    const __m128i hi = _mm_add_epi16(lo, one);
    const __m256 alo = abs_ph(lo, abs_mask), ahi = abs_ph(hi, abs_mask);
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(r), two_m16);
    const __m256 upm = _mm256_cmp_ps(_mm256_sub_ps(ax, alo), _mm256_mul_ps(u, _mm256_sub_ps(ahi, alo)), _CMP_GT_OQ);
    _mm_storeu_si128(p, _mm_blendv_epi8(lo, hi, pack_mask(upm)));
  }
  for (; d < D; ++d) w[d] = saml::sr_round<c10::Half>(float(w[d]) - mult * g[d], saml::sr_bits(key, d));
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
  SrBits8 bits(key);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m128i* p = reinterpret_cast<__m128i*>(w + d);
    const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
    const __m256i xb = _mm256_castps_si256(_mm256_sub_ps(wv, _mm256_mul_ps(m, _mm256_loadu_ps(g + d))));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(xb, mag), inf);  // both sides >= 0: signed is fine
    const __m256i up = _mm256_add_epi32(xb, bits.next(d));
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
