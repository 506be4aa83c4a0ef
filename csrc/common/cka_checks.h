// Input checks of the kernel_hsic_stats op, shared by its CPU and CUDA kernels (csrc/cpu/cka_tiled.cpp,
// csrc/cuda/cka_tiled.cu): each names the argument and runs before any work starts.
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

}  // namespace sdft
