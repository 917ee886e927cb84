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
}  // namespace saml
