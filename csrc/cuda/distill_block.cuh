// Block-wide reductions for the distillation kernels: a sum and an online log-sum-exp merge
// ((max, sum of exp(x - max)) pairs), warp shuffles first, then one value per warp via shared memory.
// Every thread of the block gets the result. `red` needs 2 * BLOCK / 32 + 2 elements.
#pragma once
#include "common/distill_math.h"

namespace sdft::distill::cuda {

template <int BLOCK, typename T>
__device__ inline T block_sum(T v, T* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T r = 0;
  for (int w = 0; w < BLOCK / 32; ++w) r += red[w];
  return r;
}

template <int BLOCK, typename T>
__device__ inline void block_lse(T& m, T& s, T* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    red[2 * warp] = m;
    red[2 * warp + 1] = s;
  }
  __syncthreads();
  T rm = red[0], rs = red[1];
  for (int w = 1; w < BLOCK / 32; ++w) lse_merge(rm, rs, red[2 * w], red[2 * w + 1]);
  m = rm;
  s = rs;
}

}  // namespace sdft::distill::cuda
