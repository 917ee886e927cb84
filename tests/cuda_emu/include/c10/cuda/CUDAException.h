#pragma once
// Stub for the CPU emulation: a launch's configuration error is reported here, as by the real macro.
#include <c10/util/Exception.h>
#include "emu_runtime.h"
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::emu::check_last_error(__FILE__, __LINE__)
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA call failed: " #expr)
