// Emulated build (tests/cuda_emu): one null stream; kernels run synchronously at launch.
#pragma once
#include <c10/core/Device.h>

#include "../../../emu.h"

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
