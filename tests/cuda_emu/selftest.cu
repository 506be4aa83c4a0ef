// Kernels with one deliberate bug each (and one without), compiled only into the emulated build:
// tests/test_cuda_emulated.py checks that the emulator reports every one of them, so a green run of the
// real kernels under it means something. torch.ops.sdft_emu_selftest.run(case) -> float32 [64].
#include <ATen/ops/empty.h>
#include <ATen/ops/isnan.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cooperative_groups/memcpy_async.h>
#include <torch/library.h>

#include <string>

namespace {

constexpr int kN = 64;

__global__ void correct(float* out) {
  __shared__ float sh[kN];
  sh[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  float s = 0;
  for (int i = 0; i < kN; ++i) s += sh[i];
  out[threadIdx.x] = s;
}

__global__ void missing_barrier(float* out) {  // reads a neighbour that may already have been updated
  __shared__ float sh[kN];
  sh[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  const float next = sh[(threadIdx.x + 1) % kN];
  sh[threadIdx.x] = next + 1;  // a barrier between the read above and this write is missing
  __syncthreads();
  out[threadIdx.x] = sh[threadIdx.x];
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 0;
}

__global__ void exit_before_barrier(float* out) {
  out[threadIdx.x] = 0;
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void shared_overflow(float* out) {
  __shared__ float sh[kN];
  sh[threadIdx.x + 1] = 1.0f;  // thread 63 writes one element past the end
  out[threadIdx.x] = 0;
}

__global__ void read_before_copy_wait(const float* src, float* out) {
  extern __shared__ float dyn[];
  namespace cg = cooperative_groups;
  const cg::thread_block block = cg::this_thread_block();
  cg::memcpy_async(block, static_cast<void*>(dyn), static_cast<const void*>(src), sizeof(float) * kN);
  out[threadIdx.x] = dyn[threadIdx.x];  // before cg::wait: the copy has not landed
  cg::wait(block);
}

__global__ void map_exited_rank(float* out) {
  namespace cg = cooperative_groups;
  __shared__ float part[1];
  cg::cluster_group cluster = cg::this_cluster();
  out[threadIdx.x] = 0;
  if (cluster.block_rank() == 1) return;  // leaves its shared memory while rank 0 still reads it
  part[0] = 1;
  __syncthreads();
  out[threadIdx.x] = *cluster.map_shared_rank(part, 1);
}

__global__ void big_dynamic_smem(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 0;
  out[threadIdx.x] = dyn[threadIdx.x];
}

__global__ void global_overflow(float* out) { out[threadIdx.x + 1] = 0; }  // thread 63 writes out[64]

__global__ void global_underflow(float* out) { out[static_cast<int>(threadIdx.x) - 1] = 0; }  // out[-1]

at::Tensor run(const std::string& bug) {
  at::Tensor out = at::empty({kN}, at::kFloat), src = at::empty({kN}, at::kFloat).fill_(1.0);
  float* o = out.mutable_data_ptr<float>();
  if (bug == "correct") {
    correct<<<1, kN>>>(o);
  } else if (bug == "missing_barrier") {
    missing_barrier<<<1, kN>>>(o);
  } else if (bug == "divergent_barrier") {
    divergent_barrier<<<1, kN>>>(o);
  } else if (bug == "exit_before_barrier") {
    exit_before_barrier<<<1, kN>>>(o);
  } else if (bug == "shared_overflow") {
    shared_overflow<<<1, kN>>>(o);
  } else if (bug == "read_before_copy_wait") {
    read_before_copy_wait<<<1, kN, sizeof(float) * kN>>>(src.const_data_ptr<float>(), o);
  } else if (bug == "map_exited_rank") {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(2);
    cfg.blockDim = dim3(kN);
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, map_exited_rank, o));
  } else if (bug == "global_overflow") {
    global_overflow<<<1, kN>>>(o);
  } else if (bug == "global_underflow") {
    global_underflow<<<1, kN>>>(o);
  } else if (bug == "big_dynamic_smem") {
    big_dynamic_smem<<<1, kN, 64 * 1024>>>(o);
  } else {
    TORCH_CHECK(false, "bug: unknown case ", bug);
  }
  TORCH_CHECK(!at::isnan(out).any().item<bool>(), "the kernel read poisoned (NaN) shared memory");
  return out;
}

}  // namespace

TORCH_LIBRARY(sdft_emu_selftest, m) { m.def("run(str bug) -> Tensor", &run); }
