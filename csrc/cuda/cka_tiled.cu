// CUDA kernel for long-sequence kernel HSIC statistics without an n x n Gram (CPU twin:
// csrc/cpu/cka_tiled.cpp, same outputs). One thread block per token-tile pair (I, J), J >= I, of
// kTile x kTile tokens: the dot products of both tiles (x for K, y for L) are accumulated from
// kChunk-wide feature slices staged in shared memory (4 x 4 outputs per thread), turned into kernel values
// (linear or RBF, cka_math.h), and reduced at once into sum K*L, K*K, L*L (float64), row/column sums
// (shared-memory float64 atomics, then one global atomic per row), all without the diagonal, which is
// written apart (see the CPU twin for why).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/cka_checks.h"
#include "common/cka_math.h"

namespace sdft {
namespace {

constexpr int kTile = 64;   // tokens per tile side
constexpr int kChunk = 16;  // features staged per shared-memory step
constexpr int kThreads = 256;  // 16 x 16 threads, each 4 x 4 outputs

// acc[a][b] += x_i . x_j for the thread's 4 x 4 (i, j) outputs over all `d` features, accumulated in
// scalar_t like the CPU twin's GEMM (float64 inputs keep float64 dot products).
template <typename scalar_t>
__device__ void tile_dots(const scalar_t* __restrict__ x, int64_t n, int64_t d, int64_t i0, int64_t j0,
                          scalar_t (*si)[kTile + 1], scalar_t (*sj)[kTile + 1], scalar_t acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = scalar_t(0);
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    // Stage x[i0 : i0 + 64, k0 : k0 + 16] and the j tile, transposed (feature-major) in shared memory.
    for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
      const int r = e / kChunk, c = e % kChunk;
      const int64_t gi = i0 + r, gj = j0 + r, gk = k0 + c;
      si[c][r] = (gi < n && gk < d) ? x[gi * d + gk] : scalar_t(0);
      sj[c][r] = (gj < n && gk < d) ? x[gj * d + gk] : scalar_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      scalar_t vi[4], vj[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        vi[a] = si[c][ty * 4 + a];
        vj[a] = sj[c][tx * 4 + a];
      }
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = vi[a] * vj[b] + acc[a][b];  // contracted to an FMA
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    kernel_hsic_tile_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                            const scalar_t* __restrict__ nx, const scalar_t* __restrict__ ny, int64_t n,
                            int64_t d, int64_t e, int kernel, scalar_t neg_gx, scalar_t neg_gy,
                            bool m1x, bool m1y, double* __restrict__ sums,
                            double* __restrict__ rows, double* __restrict__ diag) {
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (tj < ti) return;  // symmetric Grams: the mirrored tile is counted twice below
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const bool offdiag = ti != tj;
  __shared__ scalar_t si[kChunk][kTile + 1], sj[kChunk][kTile + 1];
  __shared__ double row_k[kTile], row_l[kTile], col_k[kTile], col_l[kTile], red[3][kThreads / 32];
  for (int t = threadIdx.x; t < kTile; t += kThreads) row_k[t] = row_l[t] = col_k[t] = col_l[t] = 0.0;
  __syncthreads();  // the zeroed row/col sums before any atomicAdd (tile_dots has no barrier when d = e = 0)
  scalar_t kv[4][4], lv[4][4];
  tile_dots(x, n, d, i0, j0, si, sj, kv);
  tile_dots(y, n, e, i0, j0, si, sj, lv);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  double skl = 0.0, skk = 0.0, sll = 0.0;
  // Fully unrolled: kv / lv are then indexed by constants and stay in registers (with run-time loops
  // ptxas put both arrays in local memory, a 128-byte stack frame per thread for float).
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t gi = i0 + ty * 4 + a;
    double rk = 0.0, rl = 0.0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t gj = j0 + tx * 4 + b;
      if (gi >= n || gj >= n) continue;
      scalar_t k = kv[a][b], l = lv[a][b];
      if (kernel == 1) {  // RBF (K - 1 when m1x / m1y); the true diagonal is exactly exp(0) = 1
        k = gi == gj ? scalar_t(m1x ? 0 : 1) : cka::rbf_from_dot<scalar_t>(k, nx[gi], nx[gj], neg_gx, m1x);
        l = gi == gj ? scalar_t(m1y ? 0 : 1) : cka::rbf_from_dot<scalar_t>(l, ny[gi], ny[gj], neg_gy, m1y);
      }
      if (gi == gj) {  // only in diagonal tiles: written apart, left out of every sum
        diag[gi] = k;
        diag[n + gi] = l;
        continue;
      }
      skl += static_cast<double>(k) * l;
      skk += static_cast<double>(k) * k;
      sll += static_cast<double>(l) * l;
      rk += k;
      rl += l;
      if (offdiag) {
        atomicAdd(&col_k[tx * 4 + b], static_cast<double>(k));
        atomicAdd(&col_l[tx * 4 + b], static_cast<double>(l));
      }
    }
    atomicAdd(&row_k[ty * 4 + a], rk);
    atomicAdd(&row_l[ty * 4 + a], rl);
  }
  // Block reduction of the three Frobenius sums (warp shuffles, then one warp), one atomic each.
  double v[3] = {skl, skk, sll};
  for (int q = 0; q < 3; ++q) {
    for (int off = 16; off > 0; off >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], off);
    if ((threadIdx.x & 31) == 0) red[q][threadIdx.x >> 5] = v[q];
  }
  __syncthreads();
  const double f = offdiag ? 2.0 : 1.0;
  if (threadIdx.x < 3) {
    double s = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) s += red[threadIdx.x][w];
    atomicAdd(&sums[threadIdx.x], f * s);
  }
  for (int t = threadIdx.x; t < kTile; t += kThreads) {
    if (i0 + t < n) {
      atomicAdd(&rows[i0 + t], row_k[t]);
      atomicAdd(&rows[n + i0 + t], row_l[t]);
    }
    if (offdiag && j0 + t < n) {
      atomicAdd(&rows[j0 + t], col_k[t]);
      atomicAdd(&rows[n + j0 + t], col_l[t]);
    }
  }
}

}  // namespace

// x: n x d, y: n x e (float32 or float64, same dtype, column-centred by the wrapper); kernel 0 linear,
// 1 RBF with gamma = 1/(2 sigma^2) (K - 1 when minus_one_x / _y); `tile` is the CPU tile and is ignored
// here (fixed kTile). Returns (sums [3], rows [2, n], diag [2, n]), float64, like kernel_hsic_stats_cpu.
// shift_x / shift_y: subtracted from the rows first (here as one shifted copy; the CPU kernel does it
// tile by tile).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_hsic_stats_cuda(const at::Tensor& x, const at::Tensor& y,
                                                                      int64_t kernel, double gamma_x,
                                                                      double gamma_y, int64_t tile,
                                                                      const std::optional<at::Tensor>& shift_x,
                                                                      const std::optional<at::Tensor>& shift_y,
                                                                      bool minus_one_x, bool minus_one_y) {
  check_kernel_hsic_inputs(x, y, kernel, gamma_x, gamma_y, tile, shift_x, shift_y);
  const int64_t n = x.size(0);
  const int64_t nt = (n + kTile - 1) / kTile;
  TORCH_CHECK(nt <= 65535, "x: at most ", 65535 * kTile, " tokens on CUDA, got ", n);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = (shift_x.has_value() ? at::sub(x, *shift_x) : x).contiguous();
  auto yc = (shift_y.has_value() ? at::sub(y, *shift_y) : y).contiguous();
  auto opts = x.options().dtype(at::kDouble);
  auto sums = at::zeros({3}, opts), rows = at::zeros({2, n}, opts), diag = at::zeros({2, n}, opts);
  auto nx = at::sum(at::mul(xc, xc), {1}).contiguous();  // in x's dtype, like the CPU twin's norms
  auto ny = at::sum(at::mul(yc, yc), {1}).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(nt), static_cast<unsigned>(nt));
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "kernel_hsic_stats_cuda", [&] {
    kernel_hsic_tile_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), nx.data_ptr<scalar_t>(), ny.data_ptr<scalar_t>(), n,
        xc.size(1), yc.size(1), static_cast<int>(kernel), static_cast<scalar_t>(-gamma_x),
        static_cast<scalar_t>(-gamma_y), minus_one_x, minus_one_y, sums.data_ptr<double>(), rows.data_ptr<double>(),
        diag.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, rows, diag};
}

}  // namespace sdft

TORCH_LIBRARY_IMPL(sdft_kernels, CUDA, m) { m.impl("kernel_hsic_stats", &sdft::kernel_hsic_stats_cuda); }
