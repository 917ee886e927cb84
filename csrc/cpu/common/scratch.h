// Grow-only, per-thread scratch memory for the CPU kernels.
//
// Why: the CPU allocator does not cache, and a fresh large allocation is mmapped and page-faults on every first
// touch (on small VMs ~2 us per 4 KiB page, more than the kernels' own work). Each thread keeps one buffer per
// slot that only grows; a kernel asks for its slot at the size it needs and may use it until it asks for the same
// slot again on the same thread. Different slots never alias, so a kernel that needs several live buffers takes
// several slots. Autograd runs CPU backward on the calling thread, so per-thread buffers are never shared.
//
// Not for anything returned to the caller (outputs are ordinary tensors, or come from output_pool.h).
// Any CPU source may use it: pick slot ids from an enum local to that file; slots are per thread and per process,
// so two files using the same slot id only ever share the memory sequentially on one thread, never concurrently.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace saml {
namespace cpu {

constexpr int kScratchSlots = 8;

// At least `bytes` bytes, 64-byte aligned, owned by this thread's slot `slot` (contents undefined).
inline void* scratch_bytes(int slot, size_t bytes) {
  struct Buffer {
    std::unique_ptr<void, void (*)(void*)> ptr{nullptr, std::free};
    size_t cap = 0;
  };
  thread_local std::array<Buffer, kScratchSlots> buffers;
  TORCH_CHECK(slot >= 0 && slot < kScratchSlots, "scratch: slot ", slot, " out of range");
  Buffer& b = buffers[slot];
  if (b.cap < bytes) {
    const size_t cap = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, cap);
    TORCH_CHECK(p, "scratch: out of memory allocating ", cap, " bytes");
    b.ptr.reset(p);
    b.cap = cap;
  }
  return b.ptr.get();
}

// n elements of T from slot `slot`.
template <typename T>
T* scratch(int slot, int64_t n) {
  return static_cast<T*>(scratch_bytes(slot, sizeof(T) * size_t(n > 0 ? n : 1)));
}

// The same memory as a (non-owning) contiguous tensor, for ATen calls that write into `out=` buffers.
inline at::Tensor scratch_tensor(int slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  void* p = scratch_bytes(slot, size_t(numel > 0 ? numel : 1) * c10::elementSize(dtype));
  return at::from_blob(p, sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

}  // namespace cpu
}  // namespace saml
