// Input checks shared by every op: each names the argument and what was expected, and runs before
// any work starts.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace sdft {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
              name, ": expected a float32, float16, bfloat16 or float64 tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-d tensor, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), nb, ": expected a tensor on ", a.device(), " like ", na,
              ", got one on ", b.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (the Python wrapper makes it so)");
}

}  // namespace sdft
