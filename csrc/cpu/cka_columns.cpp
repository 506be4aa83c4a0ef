// CPU kernels of the two passes the streamed CKA estimators make over each layer's features x [n, d]:
//   cka_column_stats : float64 column sums and max |x| in one read (the shift, the NaN/Inf check and the
//                      overflow bound of the co-moment products)
//   cka_shift        : u = x - shift written into `out` (float32/float64), with the float64 column sums of
//                      u as written (its residual mean r) in the same pass
// These were four torch passes (column mean, aminmax, subtraction, mean of u), ~11% of LinearCKA's time at
// L=12, d=768, n=8192 on the 2-core CPU. bf16/fp16 features are read as they are: no float32 copy first.
// CUDA twins: csrc/cuda/cka_columns.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cka_checks.h"
#include "cpu/isa.h"

namespace sdft {
namespace {

// Rows split into one range per thread (at least 256 rows each); the ranges' column partials are added
// in range order afterwards, so results do not depend on scheduling.
int64_t row_parts(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 256));
}

template <typename F>
void for_row_parts(int64_t n, int64_t parts, const F& part) {
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) part(p, n * p / parts, n * (p + 1) / parts);
  });
}

// Adds the parts' column partials (parts x d, row-major) into their first row.
void add_parts(std::vector<double>& partial, int64_t parts, int64_t d) {
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t j = 0; j < d; ++j) partial[j] += partial[p * d + j];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cka_column_stats_cpu(const at::Tensor& x) {
  check_feature_rows(x, "x");
  const int64_t n = x.size(0), d = x.size(1), ld = x.stride(0), parts = row_parts(n);
  at::Tensor sums = at::zeros({d}, x.options().dtype(at::kDouble));
  at::Tensor amax = at::zeros({}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cka_column_stats_cpu", [&] {
    using val_t = at::opmath_type<scalar_t>;  // float64 stays float64, the rest read as float32 (exact)
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<double> sum(parts * d, 0.0);
    std::vector<val_t> mx(parts * d, val_t(0));  // column-wise, so the inner loop carries no reduction
    for_row_parts(n, parts, [&](int64_t p, int64_t r0, int64_t r1) {
      cpu::on_widest_isa([&](auto) SDFT_INLINE_ROWS {
        double* __restrict s = sum.data() + p * d;
        val_t* __restrict m = mx.data() + p * d;
        for (int64_t i = r0; i < r1; ++i) {
          const scalar_t* __restrict xi = xp + i * ld;
          for (int64_t j = 0; j < d; ++j) {
            const val_t v = static_cast<val_t>(xi[j]);
            s[j] += static_cast<double>(v);
            m[j] = std::max(m[j], std::abs(v));  // NaN is not caught here; it makes its column sum NaN
          }
        }
      });
    });
    add_parts(sum, parts, d);
    std::copy(sum.begin(), sum.begin() + d, sums.mutable_data_ptr<double>());
    val_t best = 0;
    for (const val_t v : mx) best = std::max(best, v);
    *amax.mutable_data_ptr<double>() = static_cast<double>(best);
  });
  return {sums, amax};
}

at::Tensor cka_shift_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& out) {
  check_shift_inputs(x, shift, out);
  const int64_t n = x.size(0), d = x.size(1), ld = x.stride(0), parts = row_parts(n);
  at::Tensor sums = at::empty({d}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "cka_shift_cpu_out", [&] {
    using out_t = scalar_t;
    const out_t* sh = shift.const_data_ptr<out_t>();
    out_t* up = out.mutable_data_ptr<out_t>();
    std::vector<double> sum(parts * d, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cka_shift_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      // float64 features shifted into float32: subtract in float64, round once
      using sub_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, out_t>;
      for_row_parts(n, parts, [&](int64_t p, int64_t r0, int64_t r1) {
        cpu::on_widest_isa([&](auto) SDFT_INLINE_ROWS {
          double* __restrict s = sum.data() + p * d;
          for (int64_t i = r0; i < r1; ++i) {
            const scalar_t* __restrict xi = xp + i * ld;
            out_t* __restrict ui = up + i * d;
            for (int64_t j = 0; j < d; ++j) {
              const out_t u = static_cast<out_t>(static_cast<sub_t>(xi[j]) - static_cast<sub_t>(sh[j]));
              ui[j] = u;
              s[j] += static_cast<double>(u);
            }
          }
        });
      });
    });
    add_parts(sum, parts, d);
    std::copy(sum.begin(), sum.begin() + d, sums.mutable_data_ptr<double>());
  });
  return sums;
}

}  // namespace sdft

TORCH_LIBRARY_IMPL(sdft_kernels, CPU, m) {
  m.impl("cka_column_stats", &sdft::cka_column_stats_cpu);
  m.impl("cka_shift", &sdft::cka_shift_cpu);
}
