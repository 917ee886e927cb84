// Shared helpers for the saml_kernels C++/CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

// Floating types the ops accept: float32, float16, bfloat16 (accumulation is always float32).
#define SAML_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Index types: int32 and int64, chosen at runtime from the indices tensor.
#define SAML_DISPATCH_INDEX(TYPE, NAME, ...) AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)

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
}  // namespace saml
