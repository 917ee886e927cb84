// A small cache of large output blocks, 2 MiB aligned and advised as transparent huge pages.
//
// Why: outputs of the embedding ops are large (B*F*D) and short-lived (freed before the next step). A fresh
// allocation of that size is mmapped and page-faults on every first touch (on small VMs ~2 us per 4 KiB page,
// more than the gather itself). Outputs of at least kPoolMin bytes come from this cache; the tensor's deleter
// returns the block, and at most kPoolCap bytes stay cached (the rest is freed). Like PyTorch's CUDA caching
// allocator, but only for these outputs. The storage is an ordinary, non-resizable CPU tensor otherwise.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace saml {
namespace cpu {

constexpr size_t kPoolMin = size_t(1) << 20, kPoolAlign = size_t(2) << 20, kPoolCap = size_t(512) << 20;

struct OutputPool {
  std::mutex mu;
  std::unordered_multimap<size_t, void*> free_blocks;
  size_t cached = 0;
};

inline OutputPool& output_pool() {
  static OutputPool* p = new OutputPool();  // never destroyed: deleters may run at interpreter exit
  return *p;
}

inline void output_pool_release(void* ptr, size_t bytes) {
  OutputPool& P = output_pool();
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

// Like at::empty(sizes, opts) for a CPU tensor; large sizes come from the pool.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (nbytes < kPoolMin) return at::empty(sizes, opts);
  const size_t bytes = (nbytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  void* ptr = nullptr;
  {
    OutputPool& P = output_pool();
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
    TORCH_CHECK(ptr, "out of memory allocating ", bytes, " bytes");
#if defined(MADV_HUGEPAGE)
    madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(ptr, sizes, [bytes](void* p) { output_pool_release(p, bytes); }, opts);
}

}  // namespace cpu
}  // namespace saml
