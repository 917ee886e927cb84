// CUDA execution model on the CPU, for running csrc/cuda from its real source (tests/cuda_emu/README.md).
//
// A launch runs its CTAs one after another in a shuffled order; the threads of a CTA are real std::threads
// (one per CUDA thread, reused from CTA to CTA), so barriers, warp shuffles and races are real:
//   __syncthreads     a CTA barrier; a thread that exits drops out of it (the GPU counts exited threads)
//   __syncwarp(mask)  a barrier of the lanes named in mask; a named lane that has exited, or a calling lane
//   __shfl_*_sync     that is not named, is a fault (undefined behaviour on the GPU); width gives sub-warp groups
//   __shared__        per-CTA storage, fresh for every CTA and filled with 0xFF bytes (NaN for every float type),
//                     each static declaration its own heap block, dynamic smem exactly the launch's bytes (so an
//                     ASan build sees overflows); static total <= 48 KiB
//   launch            grid / block / smem checked as the driver does (cudaErrorInvalidConfiguration), reported by
//                     the next C10_CUDA_KERNEL_LAUNCH_CHECK like a real launch error
// A fault inside a kernel (bad mask, __trap, WMMA contract) prints "CUDA EMULATION FAULT" with the kernel, block
// and thread and aborts the process, as a device-side fault loses the CUDA context: tests that expect one run it
// in a subprocess.
#pragma once

#include <math.h>  // the float overloads of sqrt/exp/... in the global namespace, as CUDA's math API

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
using uint3 = dim3;
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// CUDA's max / min accept mixed arithmetic types.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }

namespace emu {

[[noreturn]] void fault(const std::string& what);

// One warp's rendezvous points: a barrier per mask (disjoint sub-warp groups sync independently), a value slot
// per lane for shuffles, and the lanes that have exited.
struct Warp {
  std::mutex mu;
  std::condition_variable cv;
  unsigned exited = 0;
  struct Group { int arrived = 0; uint64_t gen = 0; };
  std::map<unsigned, Group> groups;
  uint64_t slot[32] = {};
};

struct Cta {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::mutex smem_mu;
  std::vector<std::pair<void*, size_t>> static_blocks;  // in declaration order
  size_t static_bytes = 0;
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
  ~Cta() {
    for (auto& b : static_blocks) std::free(b.first);
    std::free(dyn);
  }
};

struct ThreadState {
  Cta* cta = nullptr;
  const char* kernel = "";
  unsigned linear = 0;  // linear thread index in the CTA
  size_t next_static = 0;
};
inline thread_local ThreadState ts;

inline unsigned lane_id() { return ts.linear & 31u; }
inline Warp& warp() { return *ts.cta->warps[ts.linear / 32]; }
inline std::string where() {
  char b[200];
  std::snprintf(b, sizeof b, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", ts.kernel, blockIdx.x, blockIdx.y,
                blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  return b;
}

// Lanes that exist in this thread's warp (a partial last warp has fewer than 32).
inline unsigned warp_lanes() {
  const unsigned n = blockDim.x * blockDim.y * blockDim.z, first = ts.linear & ~31u;
  const unsigned k = n - first >= 32 ? 32 : n - first;
  return k == 32 ? 0xffffffffu : ((1u << k) - 1u);
}

// Barrier of the lanes in mask (the caller must be one of them; all must be alive).
inline void warp_sync(unsigned mask, const char* what) {
  const unsigned lane = lane_id();
  char b[160];
  if (!((mask >> lane) & 1u)) {
    std::snprintf(b, sizeof b, "%s with mask 0x%08x that does not name the calling lane %u", what, mask, lane);
    fault(b);
  }
  if (mask & ~warp_lanes()) {
    std::snprintf(b, sizeof b, "%s with mask 0x%08x naming lanes that do not exist (0x%08x)", what, mask,
                  mask & ~warp_lanes());
    fault(b);
  }
  Warp& w = warp();
  std::unique_lock<std::mutex> lk(w.mu);
  auto dead = [&] {
    if (mask & w.exited) {
      std::snprintf(b, sizeof b, "%s with mask 0x%08x names lanes that have exited (0x%08x)", what, mask,
                    mask & w.exited);
      lk.unlock();
      fault(b);
    }
  };
  dead();
  Warp::Group& g = w.groups[mask];
  const uint64_t gen = g.gen;
  if (++g.arrived == __builtin_popcount(mask)) {
    g.arrived = 0;
    ++g.gen;
    w.cv.notify_all();
    return;
  }
  const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (g.gen == gen) {
    dead();
    if (w.cv.wait_until(lk, limit) == std::cv_status::timeout && g.gen == gen) {
      std::snprintf(b, sizeof b, "%s with mask 0x%08x: the named lanes never all arrived (divergent masks?)", what,
                    mask);
      lk.unlock();
      fault(b);
    }
  }
}

inline void thread_exit() {
  Warp& w = warp();
  {
    std::lock_guard<std::mutex> lk(w.mu);
    w.exited |= 1u << lane_id();
  }
  w.cv.notify_all();
  ts.cta->bar->arrive_and_drop();
}

// PTX shfl: the source lane j of mode (up/down/bfly/idx) with b and width; out of the segment -> own value.
enum class Shfl { kUp, kDown, kXor, kIdx };
template <typename T>
T shfl(unsigned mask, T v, int b, int width, Shfl mode, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1))) fault(std::string(what) + ": width must be a power of 2 <= 32");
  const unsigned lane = lane_id(), segmask = (32u - unsigned(width)) & 31u;
  const unsigned maxl = (lane & segmask) | (31u & ~segmask), minl = lane & segmask;
  unsigned j = lane;
  bool ok = true;
  switch (mode) {
    case Shfl::kUp: j = lane - unsigned(b); ok = int(lane) - b >= int(minl); break;
    case Shfl::kDown: j = lane + unsigned(b); ok = j <= maxl; break;
    case Shfl::kXor: j = lane ^ unsigned(b & 31); ok = j <= maxl; break;
    case Shfl::kIdx: j = minl | (unsigned(b) & 31u & ~segmask); ok = j <= maxl; break;
  }
  if (!ok) j = lane;
  Warp& w = warp();
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  warp_sync(mask, what);  // also checks that every named lane is alive
  {
    std::lock_guard<std::mutex> lk(w.mu);
    w.slot[lane] = raw;
  }
  warp_sync(mask, what);
  if (!((mask >> j) & 1u)) {
    char b2[160];
    std::snprintf(b2, sizeof b2, "%s: lane %u reads lane %u, which is not in the mask 0x%08x", what, lane, j, mask);
    fault(b2);
  }
  {
    std::lock_guard<std::mutex> lk(w.mu);
    raw = w.slot[j];
  }
  warp_sync(mask, what);  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &raw, sizeof(T));
  return out;
}

// __shared__ storage (the rewriter turns every declaration into one of these calls). Every thread of the CTA
// executes the same declarations in the same order, so the k-th call of each thread names the same block.
template <typename T, size_t Align>
T* static_shared() {
  constexpr size_t align = Align > alignof(T) ? Align : alignof(T);
  Cta& c = *ts.cta;
  const size_t k = ts.next_static++;
  std::lock_guard<std::mutex> lk(c.smem_mu);
  if (c.static_blocks.size() <= k) {
    c.static_bytes += sizeof(T);
    if (c.static_bytes > 48 * 1024) fault("static __shared__ memory over 48 KiB");
    void* p = std::aligned_alloc(align, (sizeof(T) + align - 1) / align * align);
    std::memset(p, 0xFF, sizeof(T));
    c.static_blocks.emplace_back(p, sizeof(T));
  } else if (c.static_blocks[k].second != sizeof(T)) {
    fault("threads of one CTA declared different __shared__ variables (a declaration skipped by some threads)");
  }
  return static_cast<T*>(c.static_blocks[k].first);
}

template <typename T>
T* dynamic_shared() { return reinterpret_cast<T*>(ts.cta->dyn); }

// ---------------------------------------------------------------------------------------------- launches

struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
inline dim3 to_dim3(dim3 d) { return d; }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
inline dim3 to_dim3(I v) { return dim3(static_cast<unsigned>(v)); }  // the implicit conversion nvcc applies
template <typename G, typename B>
Config config(G g, B b, size_t smem = 0, cudaStream_t s = nullptr) { return {to_dim3(g), to_dim3(b), smem, s}; }

// Global state of the emulator (defined in emu_runtime.cpp).
struct Registry {
  std::mutex mu;
  std::set<std::string> launched;   // kernel names (without template arguments)
  std::vector<std::string> log;     // "name<targs> grid block smem" of every launch, when logging
  bool logging = false;
  uint64_t seed = 0x5eed;
  cudaError_t last_error = cudaSuccess;
  std::string last_error_text;
};
Registry& registry();

bool config_error(const char* name, const Config& c, std::string& why);
std::vector<dim3> cta_order(dim3 grid);
void check_last_error(const char* file, int line);  // C10_CUDA_KERNEL_LAUNCH_CHECK

template <typename K, typename... A>
void launch(const char* name, const char* full, const Config& cfg, K kernel, A&&... args) {
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lk(r.mu);
    r.launched.insert(name);
    if (r.logging) {
      char b[160];
      std::snprintf(b, sizeof b, " grid (%u,%u,%u) block (%u,%u,%u) smem %zu", cfg.grid.x, cfg.grid.y, cfg.grid.z,
                    cfg.block.x, cfg.block.y, cfg.block.z, cfg.smem);
      r.log.push_back(std::string(full) + b);
    }
  }
  std::string why;
  if (config_error(full, cfg, why)) {
    std::lock_guard<std::mutex> lk(r.mu);
    r.last_error = cudaErrorInvalidConfiguration;
    r.last_error_text = why;
    return;
  }
  // Arguments are evaluated and converted once, at the launch (CUDA copies them to the parameter space).
  const std::tuple<std::decay_t<A>...> params(std::forward<A>(args)...);
  const unsigned n = cfg.block.x * cfg.block.y * cfg.block.z;
  const std::vector<dim3> order = cta_order(cfg.grid);
  std::barrier<> start(n + 1), end(n + 1);
  Cta* current = nullptr;
  size_t next = 0;
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (unsigned t = 0; t < n; ++t)
    pool.emplace_back([&, t] {
      for (;;) {
        start.arrive_and_wait();
        if (next > order.size()) return;
        ts = ThreadState{current, full, t, 0};
        threadIdx = dim3(t % cfg.block.x, (t / cfg.block.x) % cfg.block.y, t / (cfg.block.x * cfg.block.y));
        blockIdx = order[next - 1];
        blockDim = cfg.block;
        gridDim = cfg.grid;
        try {
          std::apply(kernel, params);
        } catch (const std::exception& e) {
          fault(std::string("exception escaped the kernel: ") + e.what());
        }
        thread_exit();
        end.arrive_and_wait();
      }
    });
  for (const dim3& c : order) {
    (void)c;
    auto cta = std::make_unique<Cta>();
    cta->bar = std::make_unique<std::barrier<>>(n);
    for (unsigned w = 0; w < (n + 31) / 32; ++w) cta->warps.push_back(std::make_unique<Warp>());
    cta->dyn_bytes = cfg.smem;
    cta->dyn = static_cast<unsigned char*>(std::malloc(cfg.smem ? cfg.smem : 1));
    std::memset(cta->dyn, 0xFF, cfg.smem);
    current = cta.get();
    ++next;
    start.arrive_and_wait();
    end.arrive_and_wait();
  }
  next = order.size() + 1;
  start.arrive_and_wait();
  for (auto& t : pool) t.join();
}

}  // namespace emu

// ------------------------------------------------------------------------------------------- device API

inline void __syncthreads() { emu::ts.cta->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_sync(mask, "__syncwarp"); }
[[noreturn]] inline void __trap() { emu::fault("__trap()"); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu::shfl(mask, v, src, width, emu::Shfl::kIdx, "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::shfl(mask, v, lane_mask, width, emu::Shfl::kXor, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::shfl(mask, v, int(delta), width, emu::Shfl::kDown, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::shfl(mask, v, int(delta), width, emu::Shfl::kUp, "__shfl_up_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  unsigned bits = 0;
  for (int src = 0; src < 32; ++src)
    if ((mask >> src) & 1u) bits |= unsigned(__shfl_sync(mask, pred ? 1 : 0, src)) << src;
  return bits;
}

// Atomics: real read-modify-writes on the shared address space.
template <typename T>
T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T>
T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T>
T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T>
T atomicCAS(T* p, T cmp, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v);
  return cmp;
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T cur = a.load();
  while (cur < v && !a.compare_exchange_weak(cur, v)) {}
  return cur;
}
template <typename T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {}
  return cur;
}
