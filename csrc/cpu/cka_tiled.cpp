// CPU kernel for long-sequence kernel HSIC/CKA without an n x n Gram (flash-attention style tiling).
//
// For token tiles I <= J it forms the tiles K_IJ (kernel of x) and L_IJ (kernel of y) on the fly, with a
// GEMM on the tile for the dot products, and reduces them at once into the sufficient statistics of
// every HSIC estimator:
//   sums[0] = sum_{i != j} K_ij L_ij, sums[1] = sum_{i != j} K_ij^2, sums[2] = sum_{i != j} L_ij^2
//   rows[0] = row sums of K without its diagonal, rows[1] likewise for L; diag[0] = diag K, diag[1] = diag L.
// The diagonal is kept apart so that off-diagonal values far below it (an RBF kernel of small bandwidth,
// K ~ I) are not lost in sums that it dominates; all sums are float64 from the element up. An RBF Gram
// whose values lie near 1 (large bandwidth) can be formed as K - 1 with expm1 instead (minus_one): HSIC
// is unchanged by a constant added to a kernel, and K - 1 keeps the digits that 1 - eps rounds away.
// The Grams are symmetric, so only tiles with J >= I are formed; an off-diagonal tile counts twice and
// adds its column sums to tile J's rows. Memory: O(n) per thread for row sums plus two tiles per thread.
// Work is split over the flat list of tile pairs with at::parallel_for (per-thread accumulators, summed
// once at the end, so no atomics and no false sharing).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/cka_checks.h"
#include "common/cka_math.h"
#include "common/cka_tiles.h"

namespace sdft {
namespace {

// Reduces one pair of tiles (scratch: a diagonal tile's diagonal is moved out into dk / dl and zeroed).
template <typename scalar_t>
void reduce_tile(scalar_t* k, scalar_t* l, int64_t ti, int64_t tj, bool offdiag, double* sums, double* rk_i,
                 double* rl_i, double* rk_j, double* rl_j, double* dk, double* dl) {
  if (!offdiag)
    for (int64_t a = 0; a < ti; ++a) {
      dk[a] = k[a * tj + a];
      dl[a] = l[a * tj + a];
      k[a * tj + a] = l[a * tj + a] = scalar_t(0);
    }
  std::vector<double> ck(tj, 0.0), cl(tj, 0.0);
  double skl = 0.0, skk = 0.0, sll = 0.0;
  for (int64_t a = 0; a < ti; ++a) {
    const scalar_t* ka = k + a * tj;
    const scalar_t* la = l + a * tj;
    // float64 from the element up: float32 row partials of kernel values near 1 lost the small
    // differences that HSIC is made of (9% off at a bandwidth 16x the median distance).
    double pkl = 0, pkk = 0, pll = 0, prk = 0, prl = 0;
#pragma omp simd reduction(+ : pkl, pkk, pll, prk, prl)
    for (int64_t b = 0; b < tj; ++b) {
      const double kv = ka[b], lv = la[b];
      pkl += kv * lv;
      pkk += kv * kv;
      pll += lv * lv;
      prk += kv;
      prl += lv;
    }
    skl += pkl;
    skk += pkk;
    sll += pll;
    rk_i[a] += prk;
    rl_i[a] += prl;
    if (offdiag)
      for (int64_t b = 0; b < tj; ++b) {
        ck[b] += ka[b];
        cl[b] += la[b];
      }
  }
  const double f = offdiag ? 2.0 : 1.0;  // the mirrored tile J, I has the same sums
  sums[0] += f * skl;
  sums[1] += f * skk;
  sums[2] += f * sll;
  if (offdiag)
    for (int64_t b = 0; b < tj; ++b) {
      rk_j[b] += ck[b];
      rl_j[b] += cl[b];
    }
}

}  // namespace

// x: n x d, y: n x e (float32 or float64, same dtype, rows = tokens); shift_x [d], shift_y [e]: subtracted
// from every row tile by tile (the column means: HSIC is unchanged, and float32 dot products and
// distances of activations with large means stay well conditioned, without a centred copy of x and y);
// kernel: 0 = linear, 1 = RBF with gamma_x = 1 / (2 sigma_x^2), gamma_y likewise; minus_one_x / _y: the
// RBF Gram of x / y as K - 1; tile: tokens per tile. Returns (sums [3], rows [2, n], diag [2, n]), all
// float64, sums and rows without the diagonal.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_hsic_stats_cpu(const at::Tensor& x, const at::Tensor& y,
                                                                     int64_t kernel, double gamma_x,
                                                                     double gamma_y, int64_t tile,
                                                                     const std::optional<at::Tensor>& shift_x,
                                                                     const std::optional<at::Tensor>& shift_y,
                                                                     bool minus_one_x, bool minus_one_y) {
  check_kernel_hsic_inputs(x, y, kernel, gamma_x, gamma_y, tile, shift_x, shift_y);
  const int64_t n = x.size(0);
  const TiledInputs in(x, y, kernel, shift_x, shift_y);
  const at::Tensor &xc = in.x, &yc = in.y, &sx = in.sx, &sy = in.sy, &nx = in.nx, &ny = in.ny;
  const int64_t nt = (n + tile - 1) / tile;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(nt * (nt + 1) / 2);
  for (int64_t i = 0; i < nt; ++i)
    for (int64_t j = i; j < nt; ++j) pairs.emplace_back(i, j);

  const int64_t nthreads = at::get_num_threads();
  auto opts = x.options().dtype(at::kDouble);
  auto rows_t = at::zeros({nthreads, 2, n}, opts);
  auto sums_t = at::zeros({nthreads, 3}, opts);
  auto diag = at::zeros({2, n}, opts);
  double* rows_p = rows_t.data_ptr<double>();
  double* sums_p = sums_t.data_ptr<double>();
  double* diag_p = diag.data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "kernel_hsic_stats_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t lo, int64_t hi) {
      const int64_t tid = at::get_thread_num();
      double* rk = rows_p + tid * 2 * n;
      double* rl = rk + n;
      double* sums = sums_p + tid * 3;
      const int64_t t = std::min(tile, n);
      TileScratch scx(xc, sx, t), scy(yc, sy, t);
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t i0 = pairs[p].first * tile, j0 = pairs[p].second * tile;
        const int64_t ti = std::min(tile, n - i0), tj = std::min(tile, n - j0);
        auto kt = kernel_tile(xc, sx, nx, i0, ti, j0, tj, kernel, gamma_x, minus_one_x, scx);
        auto lt = kernel_tile(yc, sy, ny, i0, ti, j0, tj, kernel, gamma_y, minus_one_y, scy);
        reduce_tile<scalar_t>(kt.data_ptr<scalar_t>(), lt.data_ptr<scalar_t>(), ti, tj, i0 != j0, sums, rk + i0,
                              rl + i0, rk + j0, rl + j0, diag_p + i0, diag_p + n + i0);
      }
    });
  });
  return {sums_t.sum(0), rows_t.sum(0), diag};
}

}  // namespace sdft

TORCH_LIBRARY_IMPL(sdft_kernels, CPU, m) { m.impl("kernel_hsic_stats", &sdft::kernel_hsic_stats_cpu); }
