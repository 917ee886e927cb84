#pragma once
// Stub for the CPU emulation: the device is an sm_90 (tensor-core paths on) unless SAML_EMU_SM_MAJOR says otherwise;
// the stream is the null stream (launches run synchronously).
#include <ATen/ATen.h>
#include <cstdlib>
#include "emu_runtime.h"
namespace at {
namespace cuda {
struct EmuDeviceProps { int major = 9, minor = 0, multiProcessorCount = 132, maxThreadsPerBlock = 1024; };
inline EmuDeviceProps* getCurrentDeviceProperties() {
  static EmuDeviceProps p = [] {
    EmuDeviceProps q;
    if (const char* e = std::getenv("SAML_EMU_SM_MAJOR")) q.major = std::atoi(e);
    return q;
  }();
  return &p;
}
struct EmuStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream(int64_t = -1) { return {}; }
}  // namespace cuda
}  // namespace at
