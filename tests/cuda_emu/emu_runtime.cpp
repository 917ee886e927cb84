// The emulator's global state and its introspection ops (torch.ops.saml_C_emu.emu_*); see emu_runtime.h.
#include <torch/library.h>

#include "emu_runtime.h"

namespace emu {

Registry& registry() {
  static Registry r;
  return r;
}

void fault(const std::string& what) {
  std::fprintf(stderr, "CUDA EMULATION FAULT: %s (%s)\n", what.c_str(), where().c_str());
  std::fflush(stderr);
  std::abort();
}

// The driver's checks of a launch configuration (cudaErrorInvalidConfiguration).
bool config_error(const char* name, const Config& c, std::string& why) {
  const dim3 g = c.grid, b = c.block;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  const char* bad = nullptr;
  if (g.x == 0 || g.y == 0 || g.z == 0) bad = "a grid dimension is 0";
  else if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) bad = "grid past (2^31-1, 65535, 65535)";
  else if (b.x == 0 || b.y == 0 || b.z == 0) bad = "a block dimension is 0";
  else if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024) bad = "block past 1024 threads / (1024, 1024, 64)";
  else if (c.smem > 48 * 1024) bad = "dynamic shared memory over 48 KiB without cudaFuncSetAttribute";
  if (!bad) return false;
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "CUDA error: invalid configuration argument (cudaErrorInvalidConfiguration): kernel %s launched with "
                "grid (%u,%u,%u), block (%u,%u,%u), %zu bytes of dynamic shared memory: %s",
                name, g.x, g.y, g.z, b.x, b.y, b.z, c.smem, bad);
  why = buf;
  return true;
}

std::vector<dim3> cta_order(dim3 grid) {
  std::vector<dim3> v;
  v.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) v.emplace_back(x, y, z);
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  std::mt19937_64 rng(r.seed++);
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

// C10_CUDA_KERNEL_LAUNCH_CHECK: the error of the last launch, cleared once read (as cudaGetLastError).
void check_last_error(const char* file, int line) {
  Registry& r = registry();
  std::string text;
  {
    std::lock_guard<std::mutex> lk(r.mu);
    if (r.last_error == cudaSuccess) return;
    text = r.last_error_text;
    r.last_error = cudaSuccess;
    r.last_error_text.clear();
  }
  TORCH_CHECK(false, text, " (at ", file, ":", line, ")");
}

}  // namespace emu

namespace {

std::vector<std::string> emu_launched() {
  auto& r = emu::registry();
  std::lock_guard<std::mutex> lk(r.mu);
  return {r.launched.begin(), r.launched.end()};
}

std::vector<std::string> emu_log(bool enable) {
  auto& r = emu::registry();
  std::lock_guard<std::mutex> lk(r.mu);
  std::vector<std::string> out;
  out.swap(r.log);
  r.logging = enable;
  return out;
}

void emu_seed(int64_t seed) {
  auto& r = emu::registry();
  std::lock_guard<std::mutex> lk(r.mu);
  r.seed = static_cast<uint64_t>(seed);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saml_C_emu, m) {
  m.def("emu_launched() -> str[]", &emu_launched);  // names of every kernel launched in this process
  m.def("emu_log(bool enable) -> str[]", &emu_log);  // the launches logged so far (then logging on/off)
  m.def("emu_seed(int seed) -> ()", &emu_seed);      // seed of the shuffled CTA order
}
