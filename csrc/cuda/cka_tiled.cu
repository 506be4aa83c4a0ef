// CUDA implementation of kernel_hsic_stats (long-sequence kernel HSIC without an n x n Gram; CPU twin:
// csrc/cpu/cka_tiled.cpp, same outputs). The same tiling as the CPU kernel: for token tiles I <= J the
// kernel tiles K_IJ and L_IJ are formed with a cuBLAS GEMM for the dot products (common/cka_tiles.h)
// and reduced at once into sum K*L, K*K, L*L (float64 dot products of the tiles widened to float64),
// row sums (and, off the diagonal, column sums into tile J's rows) and the diagonals, all without the
// diagonal, which is kept apart (see the CPU twin for why). Tiles are large on a GPU (the Python
// wrapper's CUDA default is 4096 tokens, so a GEMM fills the device; memory O(n + tile^2)). It replaces
// a hand-written kernel of 64 x 64 tiles with SIMT dot products (never run on a GPU either), which could
// not have come near the cuBLAS GEMM rate that the issue's floor is measured at.
#include <ATen/core/Tensor.h>
#include <ATen/ops/diagonal.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/cka_checks.h"
#include "common/cka_tiles.h"

namespace sdft {
namespace {

// Adds one pair of kernel tiles (a diagonal tile's diagonal is moved out into diag and zeroed) into sums
// [3], rows [2, n] and diag [2, n] (float64, on the device: no host sync per tile).
void reduce_tile(at::Tensor& k, at::Tensor& l, int64_t i0, int64_t j0, at::Tensor& sums, at::Tensor& rows,
                 at::Tensor& diag) {
  const int64_t ti = k.size(0), tj = k.size(1);
  const bool offdiag = i0 != j0;
  if (!offdiag) {
    diag.select(0, 0).narrow(0, i0, ti).copy_(k.diagonal());
    diag.select(0, 1).narrow(0, i0, ti).copy_(l.diagonal());
    k.diagonal().zero_();
    l.diagonal().zero_();
  }
  // float64 products from the element up, as on CPU: near-1 RBF values make HSIC of small differences
  const at::Tensor kd = k.to(at::kDouble).view({-1}), ld = l.to(at::kDouble).view({-1});
  const double f = offdiag ? 2.0 : 1.0;  // the mirrored tile J, I has the same sums
  sums.select(0, 0).add_(at::dot(kd, ld), f);
  sums.select(0, 1).add_(at::dot(kd, kd), f);
  sums.select(0, 2).add_(at::dot(ld, ld), f);
  rows.select(0, 0).narrow(0, i0, ti).add_(at::sum(k, {1}, false, at::kDouble));
  rows.select(0, 1).narrow(0, i0, ti).add_(at::sum(l, {1}, false, at::kDouble));
  if (offdiag) {
    rows.select(0, 0).narrow(0, j0, tj).add_(at::sum(k, {0}, false, at::kDouble));
    rows.select(0, 1).narrow(0, j0, tj).add_(at::sum(l, {0}, false, at::kDouble));
  }
}

}  // namespace

// Same contract as kernel_hsic_stats_cpu: x [n, d], y [n, e] (float32 or float64, same dtype); shifts
// subtracted tile by tile; kernel 0 linear, 1 RBF with gamma = 1/(2 sigma^2) (K - 1 when minus_one_x /
// _y); tile tokens per tile. Returns (sums [3], rows [2, n], diag [2, n]), float64, sums and rows without
// the diagonal.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_hsic_stats_cuda(const at::Tensor& x, const at::Tensor& y,
                                                                      int64_t kernel, double gamma_x,
                                                                      double gamma_y, int64_t tile,
                                                                      const std::optional<at::Tensor>& shift_x,
                                                                      const std::optional<at::Tensor>& shift_y,
                                                                      bool minus_one_x, bool minus_one_y) {
  check_kernel_hsic_inputs(x, y, kernel, gamma_x, gamma_y, tile, shift_x, shift_y);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  const TiledInputs in(x, y, kernel, shift_x, shift_y);
  const at::Tensor &xc = in.x, &yc = in.y, &sx = in.sx, &sy = in.sy, &nx = in.nx, &ny = in.ny;
  auto opts = x.options().dtype(at::kDouble);
  auto sums = at::zeros({3}, opts), rows = at::zeros({2, n}, opts), diag = at::zeros({2, n}, opts);
  const int64_t t = std::min(tile, n);
  TileScratch scx(xc, sx, t), scy(yc, sy, t);
  for (int64_t i0 = 0; i0 < n; i0 += tile)
    for (int64_t j0 = i0; j0 < n; j0 += tile) {
      const int64_t ti = std::min(tile, n - i0), tj = std::min(tile, n - j0);
      auto kt = kernel_tile(xc, sx, nx, i0, ti, j0, tj, kernel, gamma_x, minus_one_x, scx);
      auto lt = kernel_tile(yc, sy, ny, i0, ti, j0, tj, kernel, gamma_y, minus_one_y, scy);
      reduce_tile(kt, lt, i0, j0, sums, rows, diag);
    }
  return {sums, rows, diag};
}

}  // namespace sdft

TORCH_LIBRARY_IMPL(sdft_kernels, CUDA, m) { m.impl("kernel_hsic_stats", &sdft::kernel_hsic_stats_cuda); }
