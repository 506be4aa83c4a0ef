// Helpers shared by the CPU distillation kernels (dense and top-k): input checks, parameters,
// compile-time dispatch of (divergence, grad), run-time ISA choice, and row error reporting.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "common/checks.h"
#include "common/distill_math.h"
#include "cpu/isa.h"
#include "cpu/distill_row.h"
#include "cpu/huge_pages.h"

namespace sdft::distill::cpu {

using sdft::cpu::on_widest_isa;

// Rows per parallel task: a few rows when V is small so that a task has >= ~32k elements of work.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

inline at::ScalarType loss_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename acc_t>
RowParams<acc_t> make_params(int64_t V, double beta, double temperature) {
  RowParams<acc_t> P;
  P.V = V;
  P.inv_tau = static_cast<acc_t>(1.0 / temperature);
  P.grad_scale = P.inv_tau;
  P.beta = static_cast<acc_t>(beta);
  // Only used by JSD with 0 < beta < 1 (the ends are mapped to KL by effective_divergence).
  P.log_beta = static_cast<acc_t>(beta > 0 ? std::log(beta) : 0.0);
  P.log_1mbeta = static_cast<acc_t>(beta < 1 ? std::log1p(-beta) : 0.0);
  return P;
}

inline void check_options(int64_t divergence, double beta, double temperature) {
  TORCH_CHECK(divergence >= kForwardKL && divergence <= kJSD,
              "divergence: expected 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", divergence);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "beta: expected a value in [0, 1], got ", beta);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature),
              "temperature: expected a finite value > 0, got ", temperature);
}

inline void check_valid(const at::Tensor& valid, const at::Tensor& s) {
  TORCH_CHECK(valid.scalar_type() == at::kBool, "valid: expected a bool tensor, got ", valid.scalar_type());
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == s.size(0), "valid: expected shape [", s.size(0),
              "] (one flag per row of student_logits), got ", valid.sizes());
  check_same_device(s, "student_logits", valid, "valid");
}

inline void check_dense_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& valid,
                               const std::optional<at::Tensor>& row_weight, int64_t divergence, double beta,
                               double temperature) {
  check_float(s, "student_logits");
  check_dim(s, 2, "student_logits");
  check_same_device(s, "student_logits", t, "teacher_logits");
  TORCH_CHECK(t.scalar_type() == s.scalar_type(), "teacher_logits: expected dtype ", s.scalar_type(),
              " like student_logits, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == s.sizes(), "teacher_logits: expected shape ", s.sizes(),
              " like student_logits, got ", t.sizes());
  TORCH_CHECK(s.size(1) >= 1, "student_logits: expected a vocabulary of at least 1 entry, got shape ",
              s.sizes());
  check_valid(valid, s);
  if (row_weight.has_value()) {
    const auto want = loss_dtype(s.scalar_type());
    TORCH_CHECK(row_weight->scalar_type() == want && row_weight->dim() == 1 && row_weight->size(0) == s.size(0),
                "row_weight: expected a ", want, " tensor of shape [", s.size(0), "], got ", row_weight->scalar_type(),
                " ", row_weight->sizes());
    check_same_device(s, "student_logits", *row_weight, "row_weight");
  }
  check_options(divergence, beta, temperature);
}

inline void check_topk_inputs(const at::Tensor& s, const at::Tensor& lp, const at::Tensor& idx,
                              const at::Tensor& valid, int64_t divergence, double beta, double temperature) {
  check_float(s, "student_logits");
  check_dim(s, 2, "student_logits");
  TORCH_CHECK(s.size(1) >= 1, "student_logits: expected a vocabulary of at least 1 entry, got shape ",
              s.sizes());
  const auto want = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lp.scalar_type() == want, "teacher_topk_logprobs: expected dtype ", want, " for ",
              s.scalar_type(), " student_logits, got ", lp.scalar_type());
  check_dim(lp, 2, "teacher_topk_logprobs");
  TORCH_CHECK(lp.size(0) == s.size(0) && lp.size(1) >= 1 && lp.size(1) <= s.size(1),
              "teacher_topk_logprobs: expected shape [", s.size(0), ", k] with 1 <= k <= ", s.size(1), ", got ",
              lp.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "teacher_topk_indices: expected int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.sizes() == lp.sizes(), "teacher_topk_indices: expected shape ", lp.sizes(),
              " like teacher_topk_logprobs, got ", idx.sizes());
  check_same_device(s, "student_logits", lp, "teacher_topk_logprobs");
  check_same_device(s, "student_logits", idx, "teacher_topk_indices");
  check_valid(valid, s);
  check_options(divergence, beta, temperature);
}

// First failing row and why, set from any thread; raised after the parallel loop.
struct RowError {
  std::atomic<int64_t> row{-1};
  std::atomic<int> code{0};
  void set(int64_t r, int c) {
    int64_t expected = -1;
    if (row.compare_exchange_strong(expected, r)) code.store(c);
  }
  // code 1: student row, 2: teacher row (NaN, +inf, or no finite entry); 3: index out of range;
  // 4: duplicate index; 5: NaN or positive teacher log-prob; 6: listed teacher probabilities sum above 1.
  void raise(const char* student_name, const char* teacher_name) const {
    const int64_t r = row.load();
    if (r < 0) return;
    switch (code.load()) {
      case 1:
        TORCH_CHECK(false, student_name, ": row ", r, " contains NaN or +inf, or has no finite entry");
      case 2:
        TORCH_CHECK(false, teacher_name, ": row ", r, " contains NaN or +inf, or has no finite entry");
      case 3:
        TORCH_CHECK(false, "teacher_topk_indices: row ", r, " has an index outside [0, V)");
      case 4:
        TORCH_CHECK(false, "teacher_topk_indices: row ", r, " repeats an index");
      case 6:
        TORCH_CHECK(false, "teacher_topk_logprobs: row ", r, " has probabilities summing to more than 1 "
                    "(expected the log-probabilities of one distribution)");
      default:
        TORCH_CHECK(false, "teacher_topk_logprobs: row ", r, " contains NaN or a log-probability above 0");
    }
  }
};

// Calls f(integral_constant<int64_t, DIV>, integral_constant<bool, GRAD>) with the runtime values.
template <typename F>
void dispatch_div_grad(int64_t div, bool grad, F&& f) {
  using std::integral_constant;
  auto with_grad = [&](auto D) {
    if (grad)
      f(D, integral_constant<bool, true>{});
    else
      f(D, integral_constant<bool, false>{});
  };
  if (div == kForwardKL)
    with_grad(integral_constant<int64_t, kForwardKL>{});
  else if (div == kReverseKL)
    with_grad(integral_constant<int64_t, kReverseKL>{});
  else
    with_grad(integral_constant<int64_t, kJSD>{});
}

}  // namespace sdft::distill::cpu
