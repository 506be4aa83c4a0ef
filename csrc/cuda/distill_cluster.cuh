// Hopper (sm_90+) variant of distill_dense_kernel (csrc/cuda/distill.cu): a row is split across a
// cluster of kCluster thread blocks, each of which keeps its slice of the student and teacher logits in
// shared memory, so the row is read from HBM once. The one-block kernel reads it two times (forward
// KL) or three (reverse KL, JSD), which caps forward KL at 3/5 of copy bandwidth (read s and t twice,
// write g once, against the floor's once each). The blocks exchange their partial log-sum-exps and
// loss sums through distributed shared memory, always merged in rank order, so every block of a row
// computes the same row statistics. Same per-element math (csrc/common/distill_math.h) and contract:
// invalid rows get loss 0 and gradient 0; a row with NaN or +inf (or no finite entry) gets NaN.
#pragma once
#include <cooperative_groups.h>
#include <cooperative_groups/memcpy_async.h>

#include <limits>

#include "common/distill_math.h"
#include "cuda/distill_block.cuh"

namespace sdft::distill::cuda {

constexpr int kCluster = 8;  // the portable maximum cluster size

// Elements per cluster block: a multiple of 8 (16-byte aligned slices for 2-byte types).
inline __host__ __device__ int64_t cluster_slice(int64_t V) { return ((V + kCluster - 1) / kCluster + 7) / 8 * 8; }

// S and G carry no __restrict__: distill_dense_inplace_ passes G == S. Each block has copied its slice
// of S into shared memory (and waited for the copy) before any of its gradient writes, and no block
// touches another's slice.
template <int64_t DIV, bool GRAD, typename scalar_t, typename acc_t, typename Params, int BLOCK>
__global__ void __launch_bounds__(BLOCK) distill_dense_cluster_kernel(
    const scalar_t* S, const scalar_t* __restrict__ T, const bool* __restrict__ valid,
    const acc_t* __restrict__ W, acc_t* __restrict__ loss, scalar_t* G, Params P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char slice_mem[];
  __shared__ acc_t red[2 * BLOCK / 32 + 2];
  __shared__ acc_t part[5];  // exchanged: (ms, zs, mu, zu, bad), then (L, K)
  const int64_t V = P.V, slice = cluster_slice(V);
  scalar_t* zsh = reinterpret_cast<scalar_t*>(slice_mem);
  scalar_t* tsh = zsh + slice;
  const int tid = threadIdx.x;
  const unsigned rank = cluster.block_rank();
  const int64_t row = blockIdx.x / kCluster;
  const int64_t lo = rank * slice, n = lo < V ? (V - lo < slice ? V - lo : slice) : 0;
  const scalar_t* z = S + row * V + lo;
  const scalar_t* t = T + row * V + lo;
  scalar_t* g = GRAD ? G + row * V + lo : nullptr;
  const acc_t it = P.inv_tau, inf = std::numeric_limits<acc_t>::infinity();
  // valid[row], and below the exchanged statistics, are the same for every block of the cluster, so
  // every early return is taken by the whole cluster (no block waits at a cluster.sync alone).
  if (!valid[row]) {
    finish_row<BLOCK>(g, n, loss + row, rank == 0 && tid == 0, acc_t(0));
    return;
  }
  // Pass 1: the slice into shared memory by asynchronous copies (cp.async: many bytes in flight per
  // thread, which a load-and-store loop at one or two blocks per SM would not have), then its online
  // log-sum-exps; flag NaN / +inf.
  const cg::thread_block block = cg::this_thread_block();
  if (n > 0) {
    // as void*: the copy width is then chosen from the run-time alignment (16-byte pieces where the
    // row allows), not from alignof(scalar_t) (4-byte pieces for float)
    cg::memcpy_async(block, static_cast<void*>(zsh), static_cast<const void*>(z), sizeof(scalar_t) * n);
    cg::memcpy_async(block, static_cast<void*>(tsh), static_cast<const void*>(t), sizeof(scalar_t) * n);
  }
  cg::wait(block);
  acc_t ms, zs, mu, zu;
  int bad = lse_pass<BLOCK>(zsh, tsh, n, it, ms, zs, mu, zu, red);
  if (tid == 0) {
    part[0] = ms;
    part[1] = zs;
    part[2] = mu;
    part[3] = zu;
    part[4] = acc_t(bad ? 1 : 0);
  }
  cluster.sync();  // parts (and this block's slice) written
  ms = -inf, zs = 0, mu = -inf, zu = 0, bad = 0;
  for (unsigned r = 0; r < kCluster; ++r) {
    const acc_t* q = cluster.map_shared_rank(part, r);
    lse_merge(ms, zs, q[0], q[1]);
    lse_merge(mu, zu, q[2], q[3]);
    bad |= q[4] != acc_t(0);
  }
  cluster.sync();  // every block has read every part: they may be rewritten
  if (bad || !(zs > 0) || !(zu > 0)) {
    finish_row<BLOCK>(g, n, loss + row, rank == 0 && tid == 0, std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  const RowStats<acc_t> R = row_stats(it, ms, zs, mu, zu, W, row);
  // Pass 2, from shared memory: loss terms (+ forward-KL gradient).
  acc_t L = 0, K = 0;
  loss_pass<DIV, GRAD, BLOCK>(zsh, tsh, g, n, R, P, L, K);
  L = block_sum<BLOCK>(L, red);
  if (DIV == kJSD) K = block_sum<BLOCK>(K, red);
  if (tid == 0) {
    part[0] = L;
    part[1] = K;
  }
  cluster.sync();
  L = 0, K = 0;
  for (unsigned r = 0; r < kCluster; ++r) {
    const acc_t* q = cluster.map_shared_rank(part, r);
    L += q[0];
    K += q[1];
  }
  cluster.sync();  // reads done before any block exits (its shared memory goes with it)
  if (rank == 0 && tid == 0) loss[row] = L;
  if (!GRAD || DIV == kForwardKL) return;
  // Pass 3, from shared memory: the gradient with the row scalar (L for reverse KL, K = KL(q||m) for JSD).
  grad_pass<DIV, BLOCK>(zsh, tsh, g, n, R, P, DIV == kJSD ? K : L);
#endif
}

}  // namespace sdft::distill::cuda
