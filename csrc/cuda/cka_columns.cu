// CUDA kernels of the two passes over each layer's features x [n, d] (CPU twins in
// csrc/cpu/cka_columns.cpp):
//   cka_column_stats : float64 column sums and max |x| in one read
//   cka_shift        : u = x - shift written into `out`, with the float64 column sums of u as written
// Both use one grid shape: blocks of 32 columns x 8 row lanes over a slab of rows; each block writes one
// float64 partial per column (and one max), which a [slabs, d] sum then adds up: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "common/cka_checks.h"

namespace sdft {
namespace {

constexpr int kCols = 32, kLanes = 8;

struct Grid {
  int64_t slab;  // rows per block
  dim3 blocks;
};

// Slabs of >= 256 rows, at most 65535 of them (gridDim.y).
Grid grid_for(int64_t n, int64_t d) {
  const int64_t slab = std::max<int64_t>(256, (n + 65534) / 65535);
  return {slab, dim3(static_cast<unsigned>((d + kCols - 1) / kCols), static_cast<unsigned>((n + slab - 1) / slab))};
}

// Sums the block's kLanes row lanes per column; lane 0 of each column gets the total.
__device__ inline double lanes_sum(double v, double (*sh)[kCols]) {
  sh[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  double s = 0;
  if (threadIdx.y == 0)
    for (int l = 0; l < kLanes; ++l) s += sh[l][threadIdx.x];
  return s;
}

template <typename scalar_t>
__global__ void column_stats_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t d, int64_t ld, int64_t slab,
                                    double* __restrict__ partial, double* __restrict__ pmax) {
  using val_t = at::opmath_type<scalar_t>;  // float64 stays float64, the rest read as float32 (exact)
  __shared__ double sh[kLanes][kCols];
  __shared__ double shm[kLanes * kCols];
  const int64_t j = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  const int64_t r0 = blockIdx.y * slab, r1 = r0 + slab < n ? r0 + slab : n;
  double s = 0;
  val_t m = 0;
  if (j < d)
    for (int64_t i = r0 + threadIdx.y; i < r1; i += kLanes) {
      const val_t v = static_cast<val_t>(x[i * ld + j]);
      s += static_cast<double>(v);
      const val_t a = v < val_t(0) ? -v : v;
      m = a > m ? a : m;  // NaN is not caught here (as on CPU); it makes its column sum NaN
    }
  const double total = lanes_sum(s, sh);
  if (threadIdx.y == 0 && j < d) partial[blockIdx.y * d + j] = total;
  const int t = threadIdx.y * kCols + threadIdx.x;
  shm[t] = static_cast<double>(m);
  __syncthreads();
  for (int half = kLanes * kCols / 2; half > 0; half >>= 1) {
    if (t < half) shm[t] = shm[t + half] > shm[t] ? shm[t + half] : shm[t];
    __syncthreads();
  }
  if (t == 0) pmax[blockIdx.y * gridDim.x + blockIdx.x] = shm[0];
}

template <typename scalar_t, typename out_t>
__global__ void shift_kernel(const scalar_t* __restrict__ x, const out_t* __restrict__ shift, out_t* __restrict__ out,
                             int64_t n, int64_t d, int64_t ld, int64_t slab, double* __restrict__ partial) {
  // float64 features shifted into float32: subtract in float64, round once (as on CPU)
  using sub_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, out_t>;
  __shared__ double sh[kLanes][kCols];
  const int64_t j = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  const int64_t r0 = blockIdx.y * slab, r1 = r0 + slab < n ? r0 + slab : n;
  double s = 0;
  if (j < d) {
    const sub_t c = static_cast<sub_t>(shift[j]);
    for (int64_t i = r0 + threadIdx.y; i < r1; i += kLanes) {
      const out_t u = static_cast<out_t>(static_cast<sub_t>(x[i * ld + j]) - c);
      out[i * d + j] = u;
      s += static_cast<double>(u);
    }
  }
  const double total = lanes_sum(s, sh);
  if (threadIdx.y == 0 && j < d) partial[blockIdx.y * d + j] = total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cka_column_stats_cuda(const at::Tensor& x) {
  check_feature_rows(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  const auto f64 = x.options().dtype(at::kDouble);
  if (n == 0 || d == 0) return {at::zeros({d}, f64), at::zeros({}, f64)};
  const Grid g = grid_for(n, d);
  at::Tensor partial = at::empty({static_cast<int64_t>(g.blocks.y), d}, f64);
  at::Tensor pmax = at::empty({static_cast<int64_t>(g.blocks.y) * g.blocks.x}, f64);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cka_column_stats_cuda", [&] {
    column_stats_kernel<scalar_t><<<g.blocks, dim3(kCols, kLanes), 0, stream>>>(
        x.const_data_ptr<scalar_t>(), n, d, x.stride(0), g.slab, partial.mutable_data_ptr<double>(),
        pmax.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {partial.sum(0), pmax.amax()};
}

at::Tensor cka_shift_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& out) {
  check_shift_inputs(x, shift, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  const auto f64 = x.options().dtype(at::kDouble);
  if (n == 0 || d == 0) return at::zeros({d}, f64);
  const Grid g = grid_for(n, d);
  at::Tensor partial = at::empty({static_cast<int64_t>(g.blocks.y), d}, f64);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "cka_shift_cuda_out", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cka_shift_cuda", [&] {
      shift_kernel<scalar_t, out_t><<<g.blocks, dim3(kCols, kLanes), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), shift.const_data_ptr<out_t>(), out.mutable_data_ptr<out_t>(), n, d,
          x.stride(0), g.slab, partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return partial.sum(0);
}

}  // namespace sdft

TORCH_LIBRARY_IMPL(sdft_kernels, CUDA, m) {
  m.impl("cka_column_stats", &sdft::cka_column_stats_cuda);
  m.impl("cka_shift", &sdft::cka_shift_cuda);
}
