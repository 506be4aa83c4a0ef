// CPU kernel of sdft_kernels::distill_topk: divergence between a sparse teacher (top-k log-probs +
// indices, the rest of its mass as one tail bucket) and the student's distribution over the same
// k + 1 buckets. The bucket divergence and its gradient w.r.t. the bucket log-masses use the dense
// per-element math (common/distill_math.h); a bucket's gradient reaches its student logits in
// proportion to q_j / Q_bucket (so singleton buckets get it whole, the tail shares it).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

// The row loops select with ternaries; GCC only if-converts (and so vectorises) them without
// -ftrapping-math. FP exception flags are never read here, so drop it for the code below only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu/distill_common.h"
#include "cpu/distill_row.h"

namespace sdft::distill::cpu {
namespace {


// One row; returns 0 or a RowError code. The row is first converted (bf16/fp16) or copied into e, so the
// max and exp loops run on a float scratch row and vectorise; e then holds the exps in place.
template <bool HW_HALF, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE int topk_row(int64_t div, bool grad, const RowParams<acc_t>& P, const scalar_t* z,
                               const acc_t* lpk, const int64_t* idx, int64_t k, scalar_t* g, acc_t* e,
                               uint8_t* mark, acc_t* bl, acc_t& loss) {
  constexpr bool kConv = !std::is_same_v<scalar_t, acc_t>;
  const int64_t V = P.V;
  const acc_t it = P.inv_tau, inf = std::numeric_limits<acc_t>::infinity();
  const acc_t* zf = chunk_in<HW_HALF>(z, V, e);
  const acc_t ms = row_max(zf, V) * it;
  const acc_t zs = exp_row(zf, e, V, it, ms);
  if (!(zs >= acc_t(0.5))) return 1;  // the max element gives 1 up to one rounding (see dense_row)
  // log-probs are (x / T - ms) - log_zs, exact per element (dense_row gets the same precision with one
  // FMA and a per-row correction; here only the k listed entries take a log-prob)
  const acc_t log_zs = std::log(zs);
  int code = 0;
  double p_sum = 0;
  int64_t i = 0;
  for (; i < k; ++i) {
    const int64_t j = idx[i];
    if (j < 0 || j >= V) { code = 3; break; }
    if (mark[j]) { code = 4; break; }
    if (std::isnan(lpk[i]) || lpk[i] > acc_t(0.01)) { code = 5; break; }  // log-probs are <= 0
    mark[j] = 1;
    p_sum += std::exp(static_cast<double>(lpk[i]));
  }
  // The listed probabilities of one distribution sum to at most 1 (slack for rounded log-probs); above
  // it the tail is clamped to 0 and the loss is no divergence, nor its gradient the loss's derivative.
  if (code == 0 && p_sum > 1.01) code = 6;
  if (code != 0) {
    for (int64_t r = 0; r < i; ++r) mark[idx[r]] = 0;
    return code;
  }
  // Student mass outside the k indices, summed directly (no 1 - x cancellation), over W lanes: the plain
  // conditional sum stayed a scalar add chain (nearly half the kernel's time). e holds finite exps in
  // [0, 1] here (the row passed the check above), so e * (1 - mark) is exact.
  acc_t tl[W] = {};
  int64_t j = 0;
  for (; j + W <= V; j += W)
    for (int64_t l = 0; l < W; ++l) tl[l] += e[j + l] * static_cast<acc_t>(1 - mark[j + l]);
  acc_t tail_e = lanes_sum(tl);
  for (; j < V; ++j) tail_e += mark[j] ? acc_t(0) : e[j];
  const bool has_tail = k < V;
  // tail_e and the tail's e[j] are relative to the row's max, lq_tail = log(tail_e) + tail_shift - log_zs.
  // When the tail lies so far below the max that its exps underflow (~90 nats in float), they are redone
  // relative to the tail's own max (a rare scalar pass): the tail's log-mass stays finite, so a forward KL
  // against a teacher that puts mass there is large instead of inf, and tail entries keep their gradient.
  acc_t tail_shift = 0;
  if (has_tail && tail_e < std::sqrt(std::numeric_limits<acc_t>::min())) {
    acc_t mt = -inf;
    for (int64_t c = 0; c < V; ++c)
      if (!mark[c]) mt = std::max(mt, static_cast<acc_t>(z[c]) * it);
    if (mt > -inf) {
      tail_e = 0;
      for (int64_t c = 0; c < V; ++c)
        if (!mark[c]) tail_e += e[c] = std::exp(static_cast<acc_t>(z[c]) * it - mt);
      tail_shift = mt - ms;
    }
  }
  // Bucket log-probs: bl[0..k) = teacher (lp), bl[k+1..2k+1) = student (lq); tail at index k / 2k+1.
  acc_t* lp = bl;
  acc_t* lq = bl + (k + 1);
  for (int64_t b = 0; b < k; ++b) {
    lp[b] = lpk[b];
    lq[b] = (static_cast<acc_t>(z[idx[b]]) * it - ms) - log_zs;
  }
  const double p_tail = std::max(0.0, 1.0 - p_sum);
  lp[k] = p_tail > 0 ? static_cast<acc_t>(std::log(p_tail)) : -inf;
  lq[k] = tail_e > 0 ? std::log(tail_e) + tail_shift - log_zs : -inf;
  const int64_t nb = has_tail ? k + 1 : k;
  double L = 0, K = 0;  // k can be V: a float running sum over 10^5 buckets loses ~1e-5 of the loss
  for (int64_t b = 0; b < nb; ++b) {
    acc_t kt = 0, lm = 0;
    L += divergence_term<acc_t>(div, std::exp(lp[b]), std::exp(lq[b]), lp[b], lq[b], P.beta, P.log_beta,
                                P.log_1mbeta, kt, lm);
    K += kt;
  }
  loss = static_cast<acc_t>(L);
  if (grad) {
    const acc_t rs = static_cast<acc_t>(div == kJSD ? K : L);
    auto bucket_grad = [&](int64_t b) {
      const acc_t p = std::exp(lp[b]), q = std::exp(lq[b]);
      acc_t kt = 0, lm = 0;
      divergence_term<acc_t>(div, p, q, lp[b], lq[b], P.beta, P.log_beta, P.log_1mbeta, kt, lm);
      return divergence_grad<acc_t>(div, p, q, lp[b], lq[b], lm, P.beta, rs) * it;
    };
    // Tail: d/dz_j = G_tail * e_j / tail_e for the non-listed entries; then the listed ones.
    const acc_t gt = has_tail && tail_e > 0 ? bucket_grad(k) / tail_e : acc_t(0);
    if constexpr (kConv) {  // scale in place, then one vectorised conversion of the row
      for (int64_t j = 0; j < V; ++j) e[j] *= gt;
      from_acc<HW_HALF>(e, g, V);
    } else {
      for (int64_t j = 0; j < V; ++j) g[j] = gt * e[j];
    }
    for (int64_t b = 0; b < k; ++b) g[idx[b]] = static_cast<scalar_t>(bucket_grad(b));
  }
  for (int64_t b = 0; b < k; ++b) mark[idx[b]] = 0;
  return 0;
}

// One thread's rows [r0, r1), with its scratch rows.
template <typename scalar_t, typename acc_t>
struct TopkRows {
  const RowParams<acc_t>& P;
  const scalar_t* S;
  const acc_t* LP;
  const int64_t* I;
  const bool* valid;
  acc_t* L;
  scalar_t* G;
  int64_t k, div;
  bool grad;
  RowError& err;
};

template <bool HW_HALF, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void topk_rows_body(const TopkRows<scalar_t, acc_t>& a, int64_t r0, int64_t r1, acc_t* e,
                                      uint8_t* mark, acc_t* bl) {
  const int64_t V = a.P.V, k = a.k;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* g = a.grad ? a.G + r * V : nullptr;
    if (!a.valid[r]) {
      a.L[r] = 0;
      if (a.grad) std::fill(g, g + V, scalar_t(0));
      continue;
    }
    const int code = topk_row<HW_HALF>(a.div, a.grad, a.P, a.S + r * V, a.LP + r * k, a.I + r * k, k, g, e,
                                       mark, bl, a.L[r]);
    if (code != 0) a.err.set(r, code);
  }
}

template <typename scalar_t>
void run_topk(const at::Tensor& s, const at::Tensor& lpk, const at::Tensor& idx, const at::Tensor& valid,
              at::Tensor& loss, at::Tensor& grad, int64_t div, double beta, double temperature, bool compute_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), V = s.size(1), k = idx.size(1);
  const RowParams<acc_t> P = make_params<acc_t>(V, beta, temperature);
  RowError err;
  const TopkRows<scalar_t, acc_t> a{P, s.const_data_ptr<scalar_t>(), lpk.const_data_ptr<acc_t>(),
                                    idx.const_data_ptr<int64_t>(), valid.const_data_ptr<bool>(),
                                    loss.mutable_data_ptr<acc_t>(),
                                    compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, k, div,
                                    compute_grad, err};
  at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> e(V), bl(2 * (k + 1));
    std::vector<uint8_t> mark(V, 0);
    on_widest_isa([&](auto hw) SDFT_INLINE_ROWS {
      topk_rows_body<decltype(hw)::value>(a, r0, r1, e.data(), mark.data(), bl.data());
    });
  });
  err.raise("student_logits", "teacher_topk_logprobs");
}

}  // namespace

// student_logits: N x V; teacher_topk_logprobs: N x k (float32, float64 for float64 logits);
// teacher_topk_indices: N x k (int64); valid: N (bool). Returns (loss: N, grad: N x V or 0 x 0).
std::tuple<at::Tensor, at::Tensor> distill_topk_cpu(const at::Tensor& student_logits,
                                                    const at::Tensor& teacher_topk_logprobs,
                                                    const at::Tensor& teacher_topk_indices, const at::Tensor& valid,
                                                    int64_t divergence, double beta, double temperature,
                                                    bool compute_grad) {
  check_topk_inputs(student_logits, teacher_topk_logprobs, teacher_topk_indices, valid, divergence, beta,
                    temperature);
  const at::Tensor s = student_logits.contiguous(), lp = teacher_topk_logprobs.contiguous();
  const at::Tensor idx = teacher_topk_indices.contiguous(), v = valid.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  at::Tensor loss = at::empty({N}, s.options().dtype(loss_dtype(s.scalar_type())));
  at::Tensor grad = at::empty({compute_grad ? N : 0, compute_grad ? V : 0}, s.options());
  advise_huge_pages(grad);
  const int64_t div = effective_divergence(divergence, beta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_topk_cpu", [&] {
    run_topk<scalar_t>(s, lp, idx, v, loss, grad, div, beta, temperature, compute_grad);
  });
  return {loss, grad};
}

}  // namespace sdft::distill::cpu

TORCH_LIBRARY_IMPL(sdft_kernels, CPU, m) {
  m.impl("distill_topk", &sdft::distill::cpu::distill_topk_cpu);
}
