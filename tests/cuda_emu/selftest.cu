// Deliberately broken (and matching correct) kernels that prove what the CPU emulation of csrc/cuda catches
// (tests/test_cuda_emulation_checks.py). Written as CUDA and run through the same rewriter as csrc/cuda.
// Op: torch.ops.saml_C_emu.emu_selftest(case, x) -> out (float32, x's size unless said otherwise).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

namespace {

// one past the end of x (read) or of out (write): an out-of-bounds global access
__global__ void emu_selftest_oob(const float* x, float* out, int n, bool write_past) {
  const int t = threadIdx.x;
  if (t < n) out[t] = x[t] + 1.f;
  if (t == 0) {
    if (write_past) out[n] = 1.f;
    else out[0] += x[n];
  }
}

// thread t publishes x[t] in shared memory and reads its neighbour's slot: a race without the barrier
__global__ void emu_selftest_race(const float* x, float* out, bool barrier) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = x[t];
  if (barrier) __syncthreads();
  out[t] = s[(t + 1) % blockDim.x];
}

// CTA 0 fills shared memory, CTA 1 reads it without writing: stale state from another CTA on a GPU, NaN here
__global__ void emu_selftest_smem_leak(float* out) {
  __shared__ float s[32];
  const int t = threadIdx.x;
  if (blockIdx.x == 0) s[t] = float(t);
  __syncthreads();
  out[blockIdx.x * 32 + t] = s[t];
}

// half of the warp exits, the other half shuffles with a full mask: a lane named in the mask has exited
__global__ void emu_selftest_exited_lane(const float* x, float* out) {
  const int t = threadIdx.x;
  if (t >= 16) return;
  out[t] = __shfl_xor_sync(0xffffffffu, x[t], 1);
}

// sub-warp groups of 8 lanes: xor butterfly sum (width 8, group masks), down shuffle of lane + 1 (width 8), and a
// CTA barrier that exited threads must not block
__global__ void emu_selftest_shuffles(const float* x, float* out, int n) {
  const int t = threadIdx.x;
  if (t >= n) return;  // whole groups of 8 exit (n is a multiple of 8)
  const unsigned mask = 0xffu << ((t & 31) & ~7);
  float v = x[t];
  for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, 8);
  const float d = __shfl_down_sync(mask, x[t], 1, 8);
  __syncthreads();
  out[2 * t] = v;
  out[2 * t + 1] = d;
}

at::Tensor emu_selftest(const std::string& c, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "emu_selftest: x must be contiguous float32");
  const int n = static_cast<int>(x.numel());
  const float* px = x.data_ptr<float>();
  at::Tensor out;
  if (c == "oob_read" || c == "oob_write") {
    out = at::empty({n}, x.options());
    emu_selftest_oob<<<1, 32>>>(px, out.data_ptr<float>(), n, c == "oob_write");
  } else if (c == "race" || c == "race_fixed") {
    out = at::empty({n}, x.options());
    emu_selftest_race<<<1, n>>>(px, out.data_ptr<float>(), c == "race_fixed");
  } else if (c == "smem_leak") {
    out = at::empty({64}, x.options());
    emu_selftest_smem_leak<<<2, 32>>>(out.data_ptr<float>());
  } else if (c == "exited_lane") {
    out = at::empty({16}, x.options());
    emu_selftest_exited_lane<<<1, 32>>>(px, out.data_ptr<float>());
  } else if (c == "shuffles") {
    out = at::full({2 * n}, NAN, x.options());
    emu_selftest_shuffles<<<1, 64>>>(px, out.data_ptr<float>(), n);
  } else if (c == "bad_config") {
    out = at::empty({0}, x.options());
    emu_selftest_race<<<dim3(1, 0), 32>>>(px, out.data_ptr<float>(), true);
  } else {
    TORCH_CHECK(false, "emu_selftest: unknown case ", c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saml_C_emu, m) {
  m.def("emu_selftest(str case, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(saml_C, CUDA, m) {
  m.impl("emu_selftest", &emu_selftest);
}
