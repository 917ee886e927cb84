#pragma once
// Stub of the CUDA runtime for the CPU emulation (tests/cuda_emu): the execution model is emu_runtime.h.
#include "emu_runtime.h"
