// Block-level pieces of the CUDA distillation kernels (csrc/cuda/distill.cu, distill_cluster.cuh):
// reductions — a sum and an online log-sum-exp merge ((max, sum of exp(x - max)) pairs), warp shuffles
// first, then one value per warp via shared memory; every thread of the block gets the result; `red`
// needs 2 * BLOCK / 32 + 2 elements — and the three per-element passes over a row.
#pragma once
#include <limits>

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

// Pass 1 over the elements j = threadIdx.x, + BLOCK, ... < n of one row (z, t: its logits, in global or
// shared memory): the online log-sum-exps (max, sum of exp) of z / T and t / T, reduced over the block
// (every thread gets them). Returns whether any element is NaN or +inf.
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ inline bool lse_pass(const scalar_t* z, const scalar_t* t, int64_t n, acc_t it, acc_t& ms, acc_t& zs,
                                acc_t& mu, acc_t& zu, acc_t* red) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  ms = -inf, zs = 0, mu = -inf, zu = 0;
  int bad = 0;
  for (int64_t j = threadIdx.x; j < n; j += BLOCK) {
    const acc_t a = static_cast<acc_t>(z[j]) * it, b = static_cast<acc_t>(t[j]) * it;
    bad |= (a != a) | (b != b) | (a == inf) | (b == inf);
    lse_merge(ms, zs, a, acc_t(1));
    lse_merge(mu, zu, b, acc_t(1));
  }
  bad = __syncthreads_or(bad);
  block_lse<BLOCK>(ms, zs, red);
  block_lse<BLOCK>(mu, zu, red);
  return bad != 0;
}

// What the element passes of a row need once its log-sum-exps are known: 1/T, each side's max and
// log-sum (log-probs are (x / T - max) - log(sum): rounding max + log(sum) would shift every log-prob by
// an ulp of |max|; the CPU kernel keeps one FMA per element and corrects the row's loss instead, while in
// these memory-bound kernels the extra subtraction is free), and the gradient scale.
template <typename acc_t>
struct RowStats {
  acc_t it, ms, lzs, mu, lzu, gs;
};

// A row's RowStats from its log-sum-exps: gs = 1/T x the row weight W[row] (W null: weight 1).
template <typename acc_t>
__device__ inline RowStats<acc_t> row_stats(acc_t it, acc_t ms, acc_t zs, acc_t mu, acc_t zu, const acc_t* W,
                                            int64_t row) {
  return {it, ms, acc_t(::log(zs)), mu, acc_t(::log(zu)), W ? it * W[row] : it};
}

// Ends a row without its element passes: an ignored row (v = 0), or one with a NaN / +inf or no finite
// entry (v = NaN). Sets the gradient slice g[0, n) (g null: no gradient wanted) and, from the one thread
// that `writes` it, the row's loss to v.
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ inline void finish_row(scalar_t* g, int64_t n, acc_t* loss, bool writes, acc_t v) {
  if (g)
    for (int64_t j = threadIdx.x; j < n; j += BLOCK) g[j] = static_cast<scalar_t>(v);
  if (writes) *loss = v;
}

// Pass 2 over the elements j = threadIdx.x, + BLOCK, ... < n of one row (z, t: its logits, in global or
// shared memory; g: its gradient, which may alias z: element j is read before it is written): adds the
// loss terms to L (and KL(q||m) to K for JSD) and, for forward KL, writes the gradient.
template <int64_t DIV, bool GRAD, int BLOCK, typename scalar_t, typename acc_t, typename Params>
__device__ inline void loss_pass(const scalar_t* z, const scalar_t* t, scalar_t* g, int64_t n,
                                 const RowStats<acc_t>& R, const Params& P, acc_t& L, acc_t& K) {
  for (int64_t j = threadIdx.x; j < n; j += BLOCK) {
    const acc_t lq = (static_cast<acc_t>(z[j]) * R.it - R.ms) - R.lzs;
    const acc_t lp = (static_cast<acc_t>(t[j]) * R.it - R.mu) - R.lzu;
    const acc_t q = fast_exp(lq), p = fast_exp(lp);
    acc_t kt = 0, lm = 0;
    L += divergence_term<acc_t>(DIV, p, q, lp, lq, P.beta, P.log_beta, P.log_1mbeta, kt, lm);
    K += kt;
    if (GRAD && DIV == kForwardKL) g[j] = static_cast<scalar_t>((q - p) * R.gs);
  }
}

// Pass 3 (reverse KL, JSD): the gradient with the row scalar rs (L for reverse KL, K for JSD).
template <int64_t DIV, int BLOCK, typename scalar_t, typename acc_t, typename Params>
__device__ inline void grad_pass(const scalar_t* z, const scalar_t* t, scalar_t* g, int64_t n,
                                 const RowStats<acc_t>& R, const Params& P, acc_t rs) {
  for (int64_t j = threadIdx.x; j < n; j += BLOCK) {
    const acc_t lq = (static_cast<acc_t>(z[j]) * R.it - R.ms) - R.lzs;
    const acc_t lp = (static_cast<acc_t>(t[j]) * R.it - R.mu) - R.lzu;
    const acc_t q = fast_exp(lq), p = fast_exp(lp);
    acc_t kt = 0, lm = 0;
    if (DIV == kJSD) divergence_term<acc_t>(DIV, p, q, lp, lq, P.beta, P.log_beta, P.log_1mbeta, kt, lm);
    g[j] = static_cast<scalar_t>(divergence_grad<acc_t>(DIV, p, q, lp, lq, lm, P.beta, rs) * R.gs);
  }
}

}  // namespace sdft::distill::cuda
