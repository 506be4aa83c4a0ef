// CUDA kernels for the streamed-moment CKA estimators (CPU twins in csrc/cpu/cka_moments.cpp):
//   cka_comoment_merge_ : Chan's merge of a batch co-moment into the float64 accumulator (element-wise)
//   cka_ucentre_        : in-place U-centring of a stack of b x b Grams (row sums -> totals -> element-wise)
// The per-element math comes from csrc/common/cka_math.h, which the CPU tests cover.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cka_checks.h"
#include "common/cka_math.h"

namespace sdft {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void comoment_merge_kernel(double* __restrict__ acc, const scalar_t* __restrict__ raw,
                                      const double* __restrict__ rx, const double* __restrict__ ry, double n_b,
                                      const double* __restrict__ dx, const double* __restrict__ dy, double w,
                                      int64_t rows, int64_t cols, bool upper) {
  const int64_t total = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, j = e - i * cols;
    if (upper && j < i) continue;  // a self-moment's lower triangle is left as it was (as on CPU)
    acc[e] = cka::chan_comoment(acc[e], static_cast<double>(raw[e]), rx[i], ry[j], n_b, dx[i], dy[j], w);
  }
}

__device__ inline double block_sum(double v, double* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int k = 0; k < (blockDim.x + 31) / 32; ++k) s += shared[k];
  __syncthreads();
  return s;  // valid in thread 0
}

// One block per (layer, row): r[l, i] = sum_j K[l, i, j] - K[l, i, i] (row sum of K with zeroed diagonal).
// upper: only the upper triangle is valid; K[i, j] for j < i is read as K[j, i].
template <typename scalar_t>
__device__ inline double gram_at(const scalar_t* __restrict__ k, int64_t i, int64_t j, int64_t b, bool upper) {
  return static_cast<double>((upper && j < i) ? k[j * b + i] : k[i * b + j]);
}

template <typename scalar_t>
__global__ void ucentre_rows_kernel(const scalar_t* __restrict__ g, double* __restrict__ r, int64_t b,
                                    bool upper) {
  __shared__ double shared[kThreads / 32];
  const int64_t row = blockIdx.x;  // = l * b + i
  const int64_t l = row / b, i = row - l * b;
  const scalar_t* k = g + l * b * b;
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < b; j += blockDim.x)
    if (j != i) s += gram_at(k, i, j, b, upper);
  s = block_sum(s, shared);
  if (threadIdx.x == 0) r[row] = s;
}

// One block per layer: total[l] = sum_i r[l, i].
__global__ void ucentre_total_kernel(const double* __restrict__ r, double* __restrict__ total, int64_t b) {
  __shared__ double shared[kThreads / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) s += r[blockIdx.x * b + i];
  s = block_sum(s, shared);
  if (threadIdx.x == 0) total[blockIdx.x] = s;
}

template <typename scalar_t>
__global__ void ucentre_apply_kernel(const scalar_t* __restrict__ g, const double* __restrict__ r,
                                     const double* __restrict__ total, scalar_t* __restrict__ out, int64_t nl,
                                     int64_t b, bool upper) {
  const int64_t count = nl * b * b;
  const double n = static_cast<double>(b);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = e / (b * b), ij = e - l * b * b, i = ij / b, j = ij - i * b;
    out[e] = static_cast<scalar_t>(cka::ucentre(gram_at(g + l * b * b, i, j, b, upper), r[l * b + i],
                                                r[l * b + j], total[l], n, i == j));
  }
}

int grid_for(int64_t count) {
  return static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 65535));
}

}  // namespace

void cka_comoment_merge_cuda(const at::Tensor& acc, const at::Tensor& raw, const at::Tensor& r_x,
                             const at::Tensor& r_y, double n_b, const at::Tensor& d_x, const at::Tensor& d_y,
                             double w, bool upper) {
  check_comoment_merge_inputs(acc, raw, r_x, r_y, d_x, d_y, upper);
  const int64_t rows = acc.size(0), cols = acc.size(1);
  if (acc.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(acc.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "cka_comoment_merge_cuda", [&] {
    comoment_merge_kernel<scalar_t><<<grid_for(acc.numel()), kThreads, 0, stream>>>(
        acc.data_ptr<double>(), raw.data_ptr<scalar_t>(), r_x.data_ptr<double>(), r_y.data_ptr<double>(), n_b,
        d_x.data_ptr<double>(), d_y.data_ptr<double>(), w, rows, cols, upper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cka_ucentre_cuda(const at::Tensor& gram, bool upper) {
  // gram: L x b x b symmetric (float32/float64, contiguous; upper: only upper triangles valid), U-centred in
  // place. The apply kernel reads mirrored elements that other threads rewrite, so it writes a temporary
  // (from the caching allocator: no page faults on CUDA) that is copied back.
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2), "gram: expected [L, b, b], got ", gram.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
              "gram: expected float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(gram.is_contiguous(), "gram: expected a contiguous tensor (it is U-centred in place)");
  const int64_t nl = gram.size(0), b = gram.size(1);
  TORCH_CHECK(b > 3, "gram: U-centring needs a batch of more than 3 samples, got ", b);
  const c10::cuda::CUDAGuard guard(gram.device());
  const auto& g = gram;
  auto out = at::empty_like(g);
  auto r = at::empty({nl, b}, g.options().dtype(at::kDouble));
  auto total = at::empty({nl}, g.options().dtype(at::kDouble));
  if (nl == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cka_ucentre_cuda", [&] {
    ucentre_rows_kernel<scalar_t><<<nl * b, kThreads, 0, stream>>>(g.data_ptr<scalar_t>(), r.data_ptr<double>(), b, upper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ucentre_total_kernel<<<nl, kThreads, 0, stream>>>(r.data_ptr<double>(), total.data_ptr<double>(), b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ucentre_apply_kernel<scalar_t><<<grid_for(nl * b * b), kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), r.data_ptr<double>(), total.data_ptr<double>(), out.data_ptr<scalar_t>(), nl, b, upper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  gram.copy_(out);
}

}  // namespace sdft

TORCH_LIBRARY_IMPL(sdft_kernels, CUDA, m) {
  m.impl("cka_comoment_merge_", &sdft::cka_comoment_merge_cuda);
  m.impl("cka_ucentre_", &sdft::cka_ucentre_cuda);
}
