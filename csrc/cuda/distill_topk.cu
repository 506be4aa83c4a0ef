// CUDA kernel of sdft_kernels::distill_topk: one thread block per row. The k listed vocabulary entries
// are marked in a shared-memory bitmap (one bit per entry, so the student's tail mass is summed
// directly over the unmarked entries, without 1 - x cancellation); bucket terms and gradients use the
// shared per-element math (common/distill_math.h), exactly as the CPU kernel does. A bad row (NaN/+inf
// logits or log-probs, no finite student entry, an index out of range or repeated) gets a NaN loss,
// which the Python wrapper reports.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/distill_math.h"
#include "cpu/distill_common.h"
#include "cuda/distill_block.cuh"

namespace sdft::distill::cuda {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kMaxSmemBytes = 48 * 1024;  // static + dynamic limit without opting in to more
constexpr int64_t kRedLen = 2 * kBlock / 32 + 2;
constexpr int64_t kStaticSmemBytes = 2 * kRedLen * int64_t(sizeof(double));  // red + redd (upper bound)
constexpr int64_t kMaxBitmapBytes = kMaxSmemBytes - kStaticSmemBytes;

template <typename acc_t>
struct TopkParams {
  int64_t V, k;
  acc_t inv_tau, beta, log_beta, log_1mbeta;
  int64_t div;
};

template <typename acc_t>
__device__ inline acc_t bucket_term(const TopkParams<acc_t>& P, acc_t lp, acc_t lq, acc_t& kt, acc_t& lm) {
  return divergence_term<acc_t>(P.div, fast_exp(lp), fast_exp(lq), lp, lq, P.beta, P.log_beta, P.log_1mbeta,
                                kt, lm);
}

template <typename acc_t>
__device__ inline acc_t bucket_grad(const TopkParams<acc_t>& P, acc_t lp, acc_t lq, acc_t rs) {
  acc_t kt = 0, lm = 0;
  bucket_term(P, lp, lq, kt, lm);
  return divergence_grad<acc_t>(P.div, fast_exp(lp), fast_exp(lq), lp, lq, lm, P.beta, rs) * P.inv_tau;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) distill_topk_kernel(
    const scalar_t* __restrict__ S,     // N x V student logits
    const acc_t* __restrict__ LP,       // N x k teacher log-probs
    const int64_t* __restrict__ IDX,    // N x k teacher indices
    const bool* __restrict__ valid,     // N
    acc_t* __restrict__ loss,           // N
    scalar_t* __restrict__ G,           // N x V gradient or nullptr
    TopkParams<acc_t> P) {
  extern __shared__ unsigned int bitmap[];  // ceil(V / 32) words
  __shared__ acc_t red[kRedLen];
  __shared__ double redd[kRedLen];  // the teacher's listed mass is summed in float64, as on the CPU
  const int64_t row = blockIdx.x, V = P.V, k = P.k;
  const int tid = threadIdx.x;
  const scalar_t* z = S + row * V;
  const acc_t* lpk = LP + row * k;
  const int64_t* idx = IDX + row * k;
  scalar_t* g = G ? G + row * V : nullptr;
  const acc_t it = P.inv_tau, inf = std::numeric_limits<acc_t>::infinity();
  if (!valid[row]) {
    finish_row<kBlock>(g, V, loss + row, tid == 0, acc_t(0));
    return;
  }
  const int64_t words = (V + 31) / 32;
  for (int64_t w = tid; w < words; w += kBlock) bitmap[w] = 0u;
  // Student log-sum-exp; flag NaN / +inf.
  acc_t ms = -inf, zs = 0;
  int bad = 0;
  for (int64_t j = tid; j < V; j += kBlock) {
    const acc_t a = static_cast<acc_t>(z[j]) * it;
    bad |= (a != a) | (a == inf);
    lse_merge(ms, zs, a, acc_t(1));
  }
  block_lse<kBlock>(ms, zs, red);  // contains __syncthreads: the bitmap is cleared after this
  // Mark the listed entries; flag bad indices / log-probs; teacher mass of the listed entries.
  double psum = 0;
  for (int64_t i = tid; i < k; i += kBlock) {
    const int64_t j = idx[i];
    const acc_t lp = lpk[i];
    if (j < 0 || j >= V || lp != lp || lp > acc_t(0.01)) {
      bad = 1;
      continue;
    }
    const unsigned int bit = 1u << (j % 32);
    if (atomicOr(&bitmap[j / 32], bit) & bit) bad = 1;
    psum += ::exp(static_cast<double>(lp));
  }
  bad = __syncthreads_or(bad);
  psum = block_sum<kBlock>(psum, redd);
  if (bad || !(zs > 0) || psum > 1.01) {  // listed mass above 1: not one distribution (as on CPU)
    finish_row<kBlock>(g, V, loss + row, tid == 0, std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  const acc_t lzs = ::log(zs);  // log q_j = (z_j / T - ms) - lzs, as in the dense kernel
  // Student mass outside the listed entries as its own log-sum-exp (max mt, sum tail of exp(a - mt)):
  // summed relative to the row's max it underflows to 0 when the tail lies ~90 nats below it, and a
  // forward KL against a teacher that puts mass there would turn inf instead of large.
  acc_t mt = -inf, tail = 0;
  for (int64_t j = tid; j < V; j += kBlock)
    if (!(bitmap[j / 32] & (1u << (j % 32)))) lse_merge(mt, tail, static_cast<acc_t>(z[j]) * it, acc_t(1));
  block_lse<kBlock>(mt, tail, red);
  const bool has_tail = k < V;
  const double p_tail = psum < 1.0 ? 1.0 - psum : 0.0;
  const acc_t lp_tail = p_tail > 0 ? static_cast<acc_t>(::log(p_tail)) : -inf;
  const acc_t lq_tail = tail > 0 ? ((mt - ms) + ::log(tail)) - lzs : -inf;
  // Bucket terms.
  acc_t L = 0, K = 0;
  for (int64_t i = tid; i < k; i += kBlock) {
    acc_t kt = 0, lm = 0;
    L += bucket_term(P, lpk[i], (static_cast<acc_t>(z[idx[i]]) * it - ms) - lzs, kt, lm);
    K += kt;
  }
  if (has_tail && tid == 0) {
    acc_t kt = 0, lm = 0;
    L += bucket_term(P, lp_tail, lq_tail, kt, lm);
    K += kt;
  }
  L = block_sum<kBlock>(L, red);
  K = block_sum<kBlock>(K, red);
  if (tid == 0) loss[row] = L;
  if (!g) return;
  const acc_t rs = P.div == kJSD ? K : L;
  // Tail entries share the tail bucket's gradient in proportion to q_j / Q_tail; listed entries get theirs.
  const acc_t gt = has_tail && tail > 0 ? bucket_grad(P, lp_tail, lq_tail, rs) / tail : acc_t(0);
  // An empty tail (every unlisted logit -inf: mt = -inf) gets 0, not 0 * exp(-inf - -inf) = NaN.
  for (int64_t j = tid; j < V; j += kBlock)
    if (!(bitmap[j / 32] & (1u << (j % 32))))
      g[j] = tail > 0 ? static_cast<scalar_t>(gt * fast_exp(static_cast<acc_t>(z[j]) * it - mt)) : scalar_t(0);
  for (int64_t i = tid; i < k; i += kBlock)
    g[idx[i]] = static_cast<scalar_t>(bucket_grad(P, lpk[i], (static_cast<acc_t>(z[idx[i]]) * it - ms) - lzs, rs));
}

}  // namespace

// Same contract as distill_topk_cpu (csrc/cpu/distill_topk.cpp).
std::tuple<at::Tensor, at::Tensor> distill_topk_cuda(const at::Tensor& student_logits,
                                                     const at::Tensor& teacher_topk_logprobs,
                                                     const at::Tensor& teacher_topk_indices, const at::Tensor& valid,
                                                     int64_t divergence, double beta, double temperature,
                                                     bool compute_grad) {
  sdft::distill::cpu::check_topk_inputs(student_logits, teacher_topk_logprobs, teacher_topk_indices, valid,
                                        divergence, beta, temperature);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const int64_t smem = (V + 31) / 32 * 4;
  TORCH_CHECK(smem <= kMaxBitmapBytes, "student_logits: the CUDA top-k kernel supports V <= ",
              kMaxBitmapBytes / 4 * 32,
              ", got ", V);
  TORCH_CHECK(N < (int64_t(1) << 31), "student_logits: at most 2^31 - 1 rows, got ", N);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = student_logits.contiguous(), lp = teacher_topk_logprobs.contiguous();
  const at::Tensor idx = teacher_topk_indices.contiguous(), v = valid.contiguous();
  at::Tensor loss = at::empty({N}, s.options().dtype(sdft::distill::cpu::loss_dtype(s.scalar_type())));
  at::Tensor grad = at::empty({compute_grad ? N : 0, compute_grad ? V : 0}, s.options());
  if (N == 0) return {loss, grad};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_topk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto cp = sdft::distill::cpu::make_params<acc_t>(V, beta, temperature);
    TopkParams<acc_t> P{V, idx.size(1), cp.inv_tau, cp.beta, cp.log_beta, cp.log_1mbeta,
                        effective_divergence(divergence, beta)};
    distill_topk_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), kBlock, smem, stream>>>(
        s.const_data_ptr<scalar_t>(), lp.const_data_ptr<acc_t>(), idx.const_data_ptr<int64_t>(),
        v.const_data_ptr<bool>(), loss.mutable_data_ptr<acc_t>(),
        compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

}  // namespace sdft::distill::cuda

TORCH_LIBRARY_IMPL(sdft_kernels, CUDA, m) {
  m.impl("distill_topk", &sdft::distill::cuda::distill_topk_cuda);
}
