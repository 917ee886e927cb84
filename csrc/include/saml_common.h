// Shared helpers for the saml_kernels C++/CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
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

// The fused embedding optimizer (seb_backward_update_) reads its hyper-parameters from a float64 [4] tensor on
// the weights' device at run time, not from arguments: a scheduler can change the learning rate between CUDA-graph
// replays, and a step can be skipped on the device (non-finite gradient, bad input) without a host sync.
// Layout shared with Python (saml_kernels/ops/embedding_optimizer.py: HPARAMS).
enum FusedHparam : int { kLr = 0, kEps = 1, kWeightDecay = 2, kApply = 3, kNumHparams = 4 };
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
}  // namespace saml
