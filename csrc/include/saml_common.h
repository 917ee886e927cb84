// Shared helpers for the saml_kernels C++/CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <c10/util/Exception.h>

// Floating types the ops accept: float32, float16, bfloat16 (accumulation is always float32).
#define SAML_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Index types: int32 and int64, chosen at runtime from the indices tensor.
#define SAML_DISPATCH_INDEX(TYPE, NAME, ...) AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)

#if defined(__CUDACC__)
#define SAML_HOST_DEVICE __host__ __device__
#else
#define SAML_HOST_DEVICE
#endif

namespace saml {
// Pooling modes, shared with Python (saml_kernels/ops/scenario_embedding_bag.py: POOLING).
enum Pooling : int64_t { kSum = 0, kMean = 1, kNone = 2 };

// The fused embedding optimizer (seb_backward_update_) reads its hyper-parameters from a float64 [kNumHparams] tensor on
// the weights' device at run time, not from arguments: a scheduler can change the learning rate between CUDA-graph
// replays, and a step can be skipped on the device (non-finite gradient, bad input) without a host sync.
// Layout shared with Python (saml_kernels/ops/embedding_optimizer.py: HPARAMS). kStochasticRounding != 0 rounds a 16-bit
// table's updated rows stochastically (below: sr_*), with the hash words kSeed (an integer < 2^32) and kStep (the
// module's count of fused updates, an integer < 2^53; the caller advances it).
enum FusedHparam : int {
  kLr = 0, kEps = 1, kWeightDecay = 2, kApply = 3, kStochasticRounding = 4, kSeed = 5, kStep = 6, kNumHparams = 7
};
// Fused optimizers: 1 = SGD, 2 = row-wise Adagrad. With g the row's summed gradient and wd the weight decay
// (L2, as FBGEMM's weight_decay_mode=L2):  g' = g + wd * w;  SGD: w -= lr * g';  row-wise Adagrad:
// state += mean_d(g'^2);  w -= lr * g' / (sqrt(state) + eps).
enum FusedOptimizer : int64_t { kFusedSgd = 1, kFusedRowwiseAdagrad = 2 };

// Activation codes of the branch GEMMs, shared with Python (saml_kernels/_codes.py: ACTIVATIONS).
// leaky_relu has slope kLeakyReluSlope; gelu is the exact (erf) form.
enum Activation : int64_t { kActNone = 0, kActRelu = 1, kActLeakyRelu = 2, kActGelu = 3, kActSilu = 4 };
constexpr double kLeakyReluSlope = 0.01;
// Similarity of the mutual unit, shared with Python (saml_kernels/_codes.py: SIMILARITIES).
enum Similarity : int64_t { kSimCosine = 0, kSimDot = 1 };

// One row's fused update (the math above), written once for the CPU and CUDA kernels. g is the row's summed
// gradient already including weight decay (g' above); mean_sq = mean_d(g'^2) (row-wise Adagrad only). Returns the
// factor f of the step w -= f * g' and advances the row's Adagrad state, which is kept in its own type state_t
// (float32 for the fused optimizer, whatever the accumulation type): the sum is rounded to state_t first.
template <typename acc_t, typename state_t>
SAML_HOST_DEVICE inline acc_t fused_step_scale(int64_t optimizer, acc_t lr, acc_t eps, acc_t mean_sq, state_t* state) {
  if (optimizer == kFusedRowwiseAdagrad) {
    *state += state_t(mean_sq);
#if defined(__CUDA_ARCH__)
    return lr / (sqrt(acc_t(*state)) + eps);
#else
    return lr / (std::sqrt(acc_t(*state)) + eps);
#endif
  }
  return lr;
}

// ---- Stochastic rounding of 16-bit tables in the fused update (docs/design.md, "Stochastic rounding") ----
// The same integer hash in every backend (this header: CPU and CUDA; saml_kernels/ops/stochastic_rounding.py: the
// Python reference and the eager update), so the stored bits depend only on (float32 value, seed, step, table, row,
// column). All arithmetic is on uint32 words, mod 2^32.
constexpr uint32_t kSrGolden = 0x9E3779B9u;

// murmur3's 32-bit finaliser (a bijection with full avalanche)
SAML_HOST_DEVICE inline uint32_t sr_mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x85EBCA6Bu; x ^= x >> 13; x *= 0xC2B2AE35u; x ^= x >> 16;
  return x;
}
// Key of one (seed, step, table, row): table 0 = global (row in [0, R)), 1 = scenario (row = m * Rs + r). Split in
// two so that a kernel hashes the (seed, step, table) part once per table, and a row costs one mix: the high word
// of the row enters linearly (rows below 2^32 all get distinct keys, mix being a bijection).
SAML_HOST_DEVICE inline uint32_t sr_table_key(uint32_t seed, uint64_t step, uint32_t table) {
  return sr_mix32(sr_mix32(seed ^ (kSrGolden * (table + 1u))) ^ uint32_t(step));
}
SAML_HOST_DEVICE inline uint32_t sr_row_key(uint32_t table_key, uint64_t row) {
  return sr_mix32(table_key ^ uint32_t(row) ^ (kSrGolden * uint32_t(row >> 32)));
}
SAML_HOST_DEVICE inline uint32_t sr_row_key(uint32_t seed, uint64_t step, uint32_t table, uint64_t row) {
  return sr_row_key(sr_table_key(seed, step, table), row);
}
// The 16 random bits of column d of a row with key k: one mix per pair of columns (d = 2j, 2j + 1), its low half
// for the even column and its high half for the odd one (stochastic rounding needs 16 bits an element, and the
// mix is most of the store's cost).
SAML_HOST_DEVICE inline uint32_t sr_pair_bits(uint32_t k, int64_t j) { return sr_mix32(k + kSrGolden * uint32_t(j)); }
SAML_HOST_DEVICE inline uint32_t sr_bits(uint32_t k, int64_t d) {
  return (sr_pair_bits(k, d >> 1) >> (16 * (d & 1))) & 0xFFFFu;
}
// (seed, step) of a fused update from its hparams (float64 integers: seed < 2^32, step < 2^53).
SAML_HOST_DEVICE inline uint32_t sr_seed(const double* hp) { return uint32_t(hp[kSeed]); }
SAML_HOST_DEVICE inline uint64_t sr_step(const double* hp) { return uint64_t(hp[kStep]); }

SAML_HOST_DEVICE inline uint32_t sr_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

// bfloat16 bits of x rounded stochastically with the 16 random bits r (sr_bits): r added to x's magnitude bits, then
// truncated (FBGEMM's scheme): the result is the upper neighbour with probability (x's low 16 bits) / 2^16,
// exactly unbiased. NaN keeps round-to-nearest (c10's quiet NaN 0x7FC0).
SAML_HOST_DEVICE inline uint16_t sr_bf16_bits(float x, uint32_t r) {
  const uint32_t u = sr_float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return c10::BFloat16(x).x;
  return uint16_t((u + r) >> 16);  // the magnitude cannot carry into the sign: it stays <= inf + 0xFFFF
}

SAML_HOST_DEVICE inline float sr_abs(float x) { return x < 0.0f ? -x : x; }

// float16 bits of x rounded stochastically with the 16 random bits r (sr_bits): lo = x rounded toward zero onto the
// float16 grid (round-to-nearest, stepped back one ulp when that moved away from zero), hi = the next float16 away
// from zero, and hi is taken when |x| - |lo| > u * (|hi| - |lo|) with u = r / 2^16 (every operation exact in
// float32): exactly unbiased where x has at most 16 bits below the float16 grid (every float16 normal: 13), else
// up to 2^-16 ulp. Beyond the largest finite float16 as round-to-nearest (inf from 65520 up; 65504 below).
SAML_HOST_DEVICE inline uint16_t sr_fp16_bits(float x, uint32_t r) {
  uint16_t lo = c10::Half(x).x;
  const float lo_f = float(c10::Half(lo, c10::Half::from_bits()));
  const float ax = sr_abs(x);
  if (sr_abs(lo_f) > ax && (lo & 0x7FFFu) < 0x7C00u) --lo;  // |lo| > |x| >= 0: the magnitude is > 0
  const float alo = sr_abs(float(c10::Half(lo, c10::Half::from_bits())));
  const float ahi = sr_abs(float(c10::Half(uint16_t(lo + 1u), c10::Half::from_bits())));
  const float u = float(r) * 1.52587890625e-5f;  // 2^-16
  return (ax - alo > u * (ahi - alo)) ? uint16_t(lo + 1u) : lo;
}

// x stored into a 16-bit table with the 16 stochastic bits r.
template <typename T>
SAML_HOST_DEVICE inline T sr_round(float x, uint32_t r);
template <>
SAML_HOST_DEVICE inline c10::BFloat16 sr_round<c10::BFloat16>(float x, uint32_t r) {
  return c10::BFloat16(sr_bf16_bits(x, r), c10::BFloat16::from_bits());
}
template <>
SAML_HOST_DEVICE inline c10::Half sr_round<c10::Half>(float x, uint32_t r) {
  return c10::Half(sr_fp16_bits(x, r), c10::Half::from_bits());
}
// True for the table types the fused update rounds stochastically.
template <typename T>
SAML_HOST_DEVICE constexpr bool sr_applies() {
  return std::is_same<T, c10::BFloat16>::value || std::is_same<T, c10::Half>::value;
}

// ---- Hashed scenario tables (docs/design.md, "Hashed scenario tables") ----
// A scenario-aware feature f may give its scenario tables Rs_f rows, 1 <= Rs_f <= Rg_f (its ids); its global table
// keeps one row per id. An id's scenario row is feature_scenario_rows[f] + local, with
//     local = id                                  when Rs_f == Rg_f (no hashing: bitwise the unhashed layout)
//     local = seb_id_hash(id) mod Rs_f            when Rs_f <  Rg_f (then Rs_f < 2^32)
//     seb_id_hash(id) = mix(mix(lo32(id)) ^ hi32(id))     (uint32 words, mix = sr_mix32, murmur3's fmix32)
// for a valid id (0 <= id < Rg_f, so id is taken as a non-negative int64 whatever the index type). Twins with the
// same bits: saml_kernels/ops/scenario_hash.py (torch) and saml_kernels/triton/scenario_embedding_bag.py (Triton).
SAML_HOST_DEVICE inline uint32_t seb_id_hash(uint64_t id) {
  return sr_mix32(sr_mix32(uint32_t(id)) ^ uint32_t(id >> 32));
}
// The scenario-local row of a valid id of a feature with rows_g ids and rows_s scenario rows (see above).
SAML_HOST_DEVICE inline int64_t seb_scenario_local(int64_t id, int64_t rows_g, int64_t rows_s) {
  return rows_s == rows_g ? id : int64_t(seb_id_hash(uint64_t(id)) % uint32_t(rows_s));
}
}  // namespace saml
