// CPU kernels for the streamed-moment CKA estimators:
//   cka_comoment_merge_ : Chan's parallel merge of one batch's co-moment into a float64 accumulator
//   cka_ucentre_        : fused in-place U-centring of a stack of b x b Gram matrices (minibatch CKA)
// The per-element math is in csrc/common/cka_math.h, shared with csrc/cuda/cka_moments.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cka_checks.h"
#include "common/cka_math.h"

namespace sdft {

// Rows 0..n-1 of a triangle, dealt out in pairs (i, n-1-i) of n+1 elements together, so that
// at::parallel_for's equal index ranges are equal work.
template <typename F>
void for_triangle_rows(int64_t n, const F& row) {
  at::parallel_for(0, (n + 1) / 2, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      row(p);
      if (n - 1 - p != p) row(n - 1 - p);
    }
  });
}

// acc: d_x x d_y float64 (updated in place); raw: d_x x d_y float32/float64 = sum_i u_i v_i^T of the
// batch's shifted features; r_x [d_x], r_y [d_y]: batch mean minus shift; d_x [d_x], d_y [d_y]: mean of
// the accumulated part minus the batch mean; n_b: batch tokens; w = n_a n_b / (n_a + n_b).
// upper: raw is a self-moment of which only the upper triangle was computed (half the GEMM flops); then
// only acc's upper triangle is merged and its lower one is left as it was (the caller mirrors it when it
// needs the whole matrix, once, not per batch: merging the lower triangle from raw's columns, or
// mirroring per merge, made an upper merge 2-3.5x slower than a full one at d=768).
void cka_comoment_merge_cpu(const at::Tensor& acc, const at::Tensor& raw, const at::Tensor& r_x,
                            const at::Tensor& r_y, double n_b, const at::Tensor& d_x, const at::Tensor& d_y,
                            double w, bool upper) {
  check_comoment_merge_inputs(acc, raw, r_x, r_y, d_x, d_y, upper);
  const int64_t dx = acc.size(0), dy = acc.size(1);
  double* a = acc.data_ptr<double>();
  const double *rx = r_x.data_ptr<double>(), *ry = r_y.data_ptr<double>();
  const double *ddx = d_x.data_ptr<double>(), *ddy = d_y.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "cka_comoment_merge_cpu", [&] {
    const scalar_t* b = raw.data_ptr<scalar_t>();
    auto merge_row = [&](int64_t i) {
      double* ai = a + i * dy;
      const scalar_t* bi = b + i * dy;
      for (int64_t j = upper ? i : 0; j < dy; ++j)
        ai[j] = cka::chan_comoment(ai[j], static_cast<double>(bi[j]), rx[i], ry[j], n_b, ddx[i], ddy[j], w);
    };
    if (upper)
      for_triangle_rows(dx, merge_row);
    else
      at::parallel_for(0, dx, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) merge_row(i);
      });
  });
}

// gram: L x b x b symmetric Gram matrices (float32 or float64, contiguous), U-centred in place; upper:
// only the upper triangles are valid (Grams computed from the upper block triangle of GEMMs). Row sums
// and totals accumulate in float64. In place is safe: the row sums only read; each upper element is
// then rewritten from itself, row by row; the lower triangle (when upper) is mirrored from the new upper
// one tile by tile, so no write strides across rows. In place, the caller's Gram buffer is reused, so no
// fresh L b^2 output is faulted in per batch (that took half the op's time under the benchmark's malloc
// settings: 217 vs 116 ms at L=24, b=1024).
void cka_ucentre_cpu(const at::Tensor& gram, bool upper) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2), "gram: expected [L, b, b], got ", gram.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
              "gram: expected float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(gram.is_contiguous(), "gram: expected a contiguous tensor (it is U-centred in place)");
  const int64_t nl = gram.size(0), b = gram.size(1);
  TORCH_CHECK(b > 3, "gram: U-centring needs a batch of more than 3 samples, got ", b);
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "cka_ucentre_cpu", [&] {
    scalar_t* gp = gram.data_ptr<scalar_t>();
    at::parallel_for(0, nl, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> r(b), rs(b);
      for (int64_t l = lo; l < hi; ++l) {
        scalar_t* k = gp + l * b * b;  // read, then overwritten with U(K)
        std::fill(r.begin(), r.end(), 0.0);
        for (int64_t i = 0; i < b; ++i) {  // row sums of K with its diagonal zeroed, rows read contiguously
          const scalar_t* ki = k + i * b;
          double s = 0.0;
          if (upper) {
            for (int64_t j = i + 1; j < b; ++j) {
              s += static_cast<double>(ki[j]);
              r[j] += static_cast<double>(ki[j]);  // the mirrored element K[j, i]
            }
          } else {
            for (int64_t j = 0; j < b; ++j) s += static_cast<double>(ki[j]);
            s -= static_cast<double>(ki[i]);
          }
          r[i] += s;
        }
        double total = 0.0;
        for (int64_t i = 0; i < b; ++i) total += r[i];
        const double n = static_cast<double>(b);
        // cka::ucentre (csrc/common/cka_math.h) with r / (n - 2) hoisted out of the row loop: k - r_i/(n-2) - r_j/(n-2) + total/((n-1)(n-2)).
        for (int64_t i = 0; i < b; ++i) rs[i] = r[i] / (n - 2.0);
        const double c = total / ((n - 1.0) * (n - 2.0));
        for (int64_t i = 0; i < b; ++i) {
          scalar_t* ki = k + i * b;
          const double ci = c - rs[i];
          for (int64_t j = upper ? i + 1 : 0; j < b; ++j)
            ki[j] = static_cast<scalar_t>(static_cast<double>(ki[j]) + ci - rs[j]);
          ki[i] = 0;  // the U-centred diagonal is zero
        }
        if (upper) {  // U-centring keeps the symmetry: lower = mirror of upper, in T x T tiles
          constexpr int64_t T = 32;
          for (int64_t i0 = 0; i0 < b; i0 += T)
            for (int64_t j0 = i0; j0 < b; j0 += T)
              for (int64_t i = i0; i < std::min(i0 + T, b); ++i)
                for (int64_t j = std::max(j0, i + 1); j < std::min(j0 + T, b); ++j) k[j * b + i] = k[i * b + j];
        }
      }
    });
  });
}

}  // namespace sdft

TORCH_LIBRARY_IMPL(sdft_kernels, CPU, m) {
  m.impl("cka_comoment_merge_", &sdft::cka_comoment_merge_cpu);
  m.impl("cka_ucentre_", &sdft::cka_ucentre_cpu);
}
