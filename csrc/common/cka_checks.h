// Input checks of the CKA ops, shared by their CPU and CUDA kernels (csrc/cpu/cka_*.cpp, csrc/cuda/cka_*.cu):
// each names the argument and runs before any work starts.
#pragma once
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace sdft {

inline void check_shift(const std::optional<at::Tensor>& s, const at::Tensor& x, const char* name) {
  if (!s.has_value()) return;
  TORCH_CHECK(s->dim() == 1 && s->size(0) == x.size(1) && s->scalar_type() == x.scalar_type(), name,
              ": expected a ", x.scalar_type(), " vector of length ", x.size(1), ", got ", s->scalar_type(), " ",
              s->sizes());
  check_same_device(x, "x", *s, name);
}

inline void check_f64_vec(const at::Tensor& v, int64_t len, const char* name) {
  TORCH_CHECK(v.scalar_type() == at::kDouble && v.dim() == 1 && v.size(0) == len && v.is_contiguous(), name,
              ": expected a contiguous float64 vector of length ", len, ", got ", v.scalar_type(), " ",
              v.sizes());
}

// cka_comoment_merge_: acc [dx, dy] float64 (in place), raw [dx, dy] float32/float64, r_x, d_x [dx],
// r_y, d_y [dy] float64, all on acc's device.
inline void check_comoment_merge_inputs(const at::Tensor& acc, const at::Tensor& raw, const at::Tensor& r_x,
                                        const at::Tensor& r_y, const at::Tensor& d_x, const at::Tensor& d_y,
                                        bool upper) {
  TORCH_CHECK(acc.scalar_type() == at::kDouble && acc.dim() == 2 && acc.is_contiguous(),
              "acc: expected a contiguous 2-d float64 tensor, got ", acc.scalar_type(), " ", acc.sizes());
  const int64_t dx = acc.size(0), dy = acc.size(1);
  TORCH_CHECK(raw.dim() == 2 && raw.size(0) == dx && raw.size(1) == dy && raw.is_contiguous(),
              "raw: expected a contiguous [", dx, ", ", dy, "] tensor, got ", raw.sizes());
  TORCH_CHECK(raw.scalar_type() == at::kFloat || raw.scalar_type() == at::kDouble,
              "raw: expected float32 or float64, got ", raw.scalar_type());
  TORCH_CHECK(!upper || dx == dy, "upper: a mirrored self-moment must be square, got ", raw.sizes());
  check_f64_vec(r_x, dx, "r_x");
  check_f64_vec(r_y, dy, "r_y");
  check_f64_vec(d_x, dx, "d_x");
  check_f64_vec(d_y, dy, "d_y");
  for (const at::Tensor* t : {&raw, &r_x, &r_y, &d_x, &d_y}) check_same_device(acc, "acc", *t, "raw/r/d");
}

inline void check_kernel_hsic_inputs(const at::Tensor& x, const at::Tensor& y, int64_t kernel, double gamma_x,
                                     double gamma_y, int64_t tile, const std::optional<at::Tensor>& shift_x,
                                     const std::optional<at::Tensor>& shift_y) {
  check_dim(x, 2, "x");
  check_dim(y, 2, "y");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "y: expected the dtype of x (", x.scalar_type(), "), got ",
              y.scalar_type());
  check_same_device(x, "x", y, "y");
  TORCH_CHECK(y.size(0) == x.size(0), "y: expected ", x.size(0), " rows (tokens) like x, got ", y.size(0));
  TORCH_CHECK(kernel == 0 || kernel == 1, "kernel: expected 0 (linear) or 1 (rbf), got ", kernel);
  TORCH_CHECK(tile >= 1, "tile: expected a positive tile size, got ", tile);
  TORCH_CHECK(kernel == 0 || (gamma_x > 0 && gamma_y > 0), "gamma: expected positive RBF gammas, got ",
              gamma_x, ", ", gamma_y);
  TORCH_CHECK(x.size(0) >= 1, "x: expected at least one token");
  check_shift(shift_x, x, "shift_x");
  check_shift(shift_y, y, "shift_y");
}

// cka_column_stats / cka_shift: features x [n, d] (float32/float64/bf16/fp16), rows of unit column stride.
inline void check_feature_rows(const at::Tensor& x, const char* name) {
  check_dim(x, 2, name);
  check_float(x, name);
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, ": expected rows of unit column stride, got strides ",
              x.strides());
}

// cka_shift: out [n, d] contiguous float32/float64 (written), shift [d] contiguous in out's dtype.
inline void check_shift_inputs(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& out) {
  check_feature_rows(x, "x");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "out: expected float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == x.size(1) && out.is_contiguous(),
              "out: expected a contiguous tensor of x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == x.size(1) && shift.scalar_type() == out.scalar_type() &&
              shift.is_contiguous(), "shift: expected a contiguous ", out.scalar_type(), " vector of length ",
              x.size(1), ", got ", shift.scalar_type(), " ", shift.sizes());
  check_same_device(x, "x", out, "out");
  check_same_device(x, "x", shift, "shift");
}

}  // namespace sdft
