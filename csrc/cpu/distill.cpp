// CPU kernel of sdft_kernels::distill_dense: per-row fused distillation divergence and its gradient
// with respect to the student logits, in one call (see csrc/common/distill_math.h for the formulas
// and csrc/cpu/distill_row.h for the passes over a row). Rows run in parallel (at::parallel_for); the
// row loops are compiled for AVX-512, AVX2+FMA (x86 only) and the baseline ISA, and picked at run time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "common/checks.h"
// The row loops select with ternaries; GCC only if-converts (and so vectorises) them without
// -ftrapping-math. FP exception flags are never read here, so drop it for the code below only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu/distill_common.h"
#include "cpu/distill_row.h"

namespace sdft::distill::cpu {
namespace {

template <int64_t DIV, bool GRAD, bool HW_HALF, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void dense_rows_body(const RowParams<acc_t>& P, const scalar_t* S, const scalar_t* T,
                                       const bool* valid, const acc_t* W, acc_t* loss, scalar_t* G,
                                       int64_t r0, int64_t r1, const RowScratch<acc_t>& R, RowError& err) {
  const int64_t V = P.V;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* g = GRAD ? G + r * V : nullptr;
    if (!valid[r]) {  // ignored token: zero loss, zero gradient, inputs not even read
      loss[r] = 0;
      if constexpr (GRAD) std::fill(g, g + V, scalar_t(0));
      continue;
    }
    RowParams<acc_t> Pr = P;
    if (W != nullptr) Pr.grad_scale = P.inv_tau * W[r];
    const int code = dense_row<DIV, GRAD, HW_HALF>(Pr, S + r * V, T + r * V, g, R, loss[r]);
    if (code != 0) err.set(r, code);
  }
}

template <int64_t DIV, bool GRAD, typename scalar_t>
void run_dense(const at::Tensor& s, const at::Tensor& t, const at::Tensor& valid, const at::Tensor* w, at::Tensor& loss,
               at::Tensor& grad, double beta, double temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), V = s.size(1);
  const RowParams<acc_t> P = make_params<acc_t>(V, beta, temperature);
  const scalar_t* S = s.const_data_ptr<scalar_t>();
  const scalar_t* T = t.const_data_ptr<scalar_t>();
  const bool* vd = valid.const_data_ptr<bool>();
  const acc_t* W = w ? w->const_data_ptr<acc_t>() : nullptr;
  acc_t* L = loss.mutable_data_ptr<acc_t>();
  scalar_t* G = GRAD ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  RowError err;
  at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
    // Per-thread scratch: the row's exps (student, teacher) and the running max of each chunk.
    const int64_t nc = (V + CH - 1) / CH;
    std::vector<acc_t> buf(2 * V + 2 * nc);
    const RowScratch<acc_t> R{buf.data(), buf.data() + V, buf.data() + 2 * V, buf.data() + 2 * V + nc};
    on_widest_isa([&](auto hw) SDFT_INLINE_ROWS {
      dense_rows_body<DIV, GRAD, decltype(hw)::value>(P, S, T, vd, W, L, G, r0, r1, R, err);
    });
  });
  err.raise("student_logits", "teacher_logits");
}

// run_dense for the runtime dtype, divergence and gradient flag. w: row weights or an undefined tensor.
void dense_dispatch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& v, const at::Tensor& w,
                    at::Tensor& loss, at::Tensor& grad, int64_t div, bool compute_grad, double beta,
                    double temperature) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_dense_cpu", [&] {
    dispatch_div_grad(div, compute_grad, [&](auto DIVC, auto GRADC) {
      run_dense<decltype(DIVC)::value, decltype(GRADC)::value, scalar_t>(s, t, v, w.defined() ? &w : nullptr,
                                                                         loss, grad, beta, temperature);
    });
  });
}

}  // namespace

// student_logits, teacher_logits: N x V; valid: N (bool); row_weight: N (loss dtype) or None, multiplies
// each row's gradient (the reduction's weight, so that backward can often skip its pass).
// Returns (loss: N in float32, float64 for
// float64 inputs; grad: N x V in the logits' dtype, d loss[r] / d student_logits[r], or an empty
// tensor when compute_grad is false).
std::tuple<at::Tensor, at::Tensor> distill_dense_cpu(const at::Tensor& student_logits,
                                                     const at::Tensor& teacher_logits, const at::Tensor& valid,
                                                     const std::optional<at::Tensor>& row_weight, int64_t divergence, double beta, double temperature,
                                                     bool compute_grad) {
  check_dense_inputs(student_logits, teacher_logits, valid, row_weight, divergence, beta, temperature);
  const at::Tensor w = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous(), v = valid.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  at::Tensor loss = at::empty({N}, s.options().dtype(loss_dtype(s.scalar_type())));
  at::Tensor grad = at::empty({compute_grad ? N : 0, compute_grad ? V : 0}, s.options());
  advise_huge_pages(grad);
  dense_dispatch(s, t, v, w, loss, grad, effective_divergence(divergence, beta), compute_grad, beta, temperature);
  return {loss, grad};
}

// distill_dense with the gradient written over student_logits (which must be contiguous). Safe in place:
// every pass reads a chunk of the student row before it writes that chunk's gradient, and no pass reads
// the student row after writing it. On a bad row the error is raised with some rows already overwritten.
at::Tensor distill_dense_inplace_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                     const at::Tensor& valid, const std::optional<at::Tensor>& row_weight,
                                     int64_t divergence, double beta, double temperature) {
  check_dense_inputs(student_logits, teacher_logits, valid, row_weight, divergence, beta, temperature);
  TORCH_CHECK(student_logits.is_contiguous(), "student_logits: expected a contiguous tensor (the gradient is "
              "written over it)");
  const at::Tensor w = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  const at::Tensor t = teacher_logits.contiguous(), v = valid.contiguous();
  at::Tensor s = student_logits;
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(loss_dtype(s.scalar_type())));
  dense_dispatch(s, t, v, w, loss, s, effective_divergence(divergence, beta), true, beta, temperature);
  return loss;
}

}  // namespace sdft::distill::cpu

TORCH_LIBRARY_IMPL(sdft_kernels, CPU, m) {
  m.impl("distill_dense", &sdft::distill::cpu::distill_dense_cpu);
  m.impl("distill_dense_inplace_", &sdft::distill::cpu::distill_dense_inplace_cpu);
}
