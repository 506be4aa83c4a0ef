// Emulated build (tests/cuda_emu): a failed runtime call is a c10::Error; launch errors are raised by
// the launch itself (tests/cuda_emu/emu.cpp), so the launch check has nothing left to do.
#pragma once
#include <c10/util/Exception.h>

#include "../../../emu.h"

#define C10_CUDA_CHECK(expr)                                                                        \
  do {                                                                                              \
    const cudaError_t emu_err = (expr);                                                             \
    TORCH_CHECK(emu_err == cudaSuccess, "emulated CUDA call failed: ", #expr, " -> ", int(emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
