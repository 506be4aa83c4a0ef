// CUDA kernels of sdft_kernels::distill_dense. On sm_90+ rows of V >= 4096 go to the cluster kernel
// (csrc/cuda/distill_cluster.cuh: a row split over 8 blocks that keep it in shared memory, read once);
// otherwise one thread block per row (token). Pass 1 streams the
// row once for both online log-sum-exps (student and teacher together, merged across the block with
// lse_merge); pass 2 accumulates the divergence in float32 (float64 for float64 inputs) and, for
// forward KL, writes the gradient; pass 3 (reverse KL / JSD) writes the gradient, which needs the
// row total. The per-element math is csrc/common/distill_math.h, shared with (and tested through) the
// CPU kernel. A row containing NaN or +inf (or no finite entry) gets a NaN loss, which the Python
// wrapper reports.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "cpu/distill_common.h"
#include "common/distill_math.h"
#include "cuda/distill_block.cuh"
#include "cuda/distill_cluster.cuh"

namespace sdft::distill::cuda {
namespace {

constexpr int kBlock = 512;

template <typename acc_t>
struct Params {
  int64_t V;
  acc_t inv_tau, beta, log_beta, log_1mbeta;
};

// S and G carry no __restrict__: distill_dense_inplace_ passes G == S. That is safe because every
// element j is only ever touched by thread j % kBlock of its row's block, which reads z[j] in each pass
// before (never after) writing g[j].
template <int64_t DIV, bool GRAD, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) distill_dense_kernel(
    const scalar_t* S,               // N x V student logits
    const scalar_t* __restrict__ T,  // N x V teacher logits
    const bool* __restrict__ valid,  // N
    const acc_t* __restrict__ W,     // N row weights of the gradient, or nullptr
    acc_t* __restrict__ loss,        // N
    scalar_t* G,                     // N x V gradient (unused unless GRAD); may be S
    Params<acc_t> P) {
  __shared__ acc_t red[2 * kBlock / 32 + 2];
  const int64_t row = blockIdx.x, V = P.V;
  const int tid = threadIdx.x;
  const scalar_t* z = S + row * V;
  const scalar_t* t = T + row * V;
  scalar_t* g = GRAD ? G + row * V : nullptr;
  const acc_t it = P.inv_tau;
  if (!valid[row]) {
    finish_row<kBlock>(g, V, loss + row, tid == 0, acc_t(0));
    return;
  }
  // Pass 1: online log-sum-exp of s and u; flag NaN / +inf.
  acc_t ms, zs, mu, zu;
  const bool bad = lse_pass<kBlock>(z, t, V, it, ms, zs, mu, zu, red);
  if (bad || !(zs > 0) || !(zu > 0)) {  // zs = 0: no finite student entry (all -inf)
    finish_row<kBlock>(g, V, loss + row, tid == 0, std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  const RowStats<acc_t> R = row_stats(it, ms, zs, mu, zu, W, row);
  // Pass 2: loss terms (+ forward-KL gradient).
  acc_t L = 0, K = 0;
  loss_pass<DIV, GRAD, kBlock>(z, t, g, V, R, P, L, K);
  L = block_sum<kBlock>(L, red);
  if (DIV == kJSD) K = block_sum<kBlock>(K, red);
  if (tid == 0) loss[row] = L;
  if (!GRAD || DIV == kForwardKL) return;
  // Pass 3: gradient with the row scalar (L for reverse KL, K = KL(q||m) for JSD).
  grad_pass<DIV, kBlock>(z, t, g, V, R, P, DIV == kJSD ? K : L);
}

// Rows at least this long take the cluster kernel where it applies (shorter ones are latency-bound:
// one block reads them fast enough, and 8 blocks of a few elements each would mostly idle).
constexpr int64_t kClusterMinV = 4096;

// Launches distill_dense_cluster_kernel and returns true where it applies: an sm_90+ device, 2-byte or
// float32 logits, V >= kClusterMinV, both slices fitting the opt-in shared memory, a cluster that can be
// resident, and SDFT_CUDA_NO_CLUSTER unset (it selects the one-block kernel, e.g. to compare the two).
template <int64_t DIV, bool GRAD, typename scalar_t, typename acc_t>
bool launch_dense_cluster(const scalar_t* s, const scalar_t* t, const bool* valid, const acc_t* w, acc_t* loss,
                          scalar_t* g, const Params<acc_t>& P, int64_t N, int device, cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;  // 8 bytes a logit: the slices of a 128k row would not fit
  } else {
    const char* off = std::getenv("SDFT_CUDA_NO_CLUSTER");
    if ((off && *off && *off != '0') || P.V < kClusterMinV || N * kCluster > (int64_t(1) << 31) - 1) return false;
    int major = 0, optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const size_t smem = 2 * cluster_slice(P.V) * sizeof(scalar_t);
    if (major < 9) return false;
    auto kernel = distill_dense_cluster_kernel<DIV, GRAD, scalar_t, acc_t, Params<acc_t>, kBlock>;
    // ptxVersion < 90: the device runs code JIT-compiled from pre-sm_90 PTX (e.g. TORCH_CUDA_ARCH_LIST
    // "8.0+PTX"), whose kernel body is compiled out (#if __CUDA_ARCH__ >= 900). sharedSizeBytes: the
    // static shared memory as compiled (the opt-in limit bounds it plus the dynamic part).
    cudaFuncAttributes fa;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    if (fa.ptxVersion < 90 || smem + fa.sharedSizeBytes > static_cast<size_t>(optin)) return false;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(N * kCluster));
    cfg.blockDim = dim3(kBlock);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    const cudaError_t qerr = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (qerr != cudaSuccess || clusters < 1) {
      if (qerr != cudaSuccess) (void)cudaGetLastError();  // clear the query's error (only that one): the
      return false;                                       // one-block kernel runs instead
    }
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, s, t, valid, w, loss, g, P));
    return true;
  }
}

template <int64_t DIV, bool GRAD, typename scalar_t>
void launch_dense(const at::Tensor& s, const at::Tensor& t, const at::Tensor& valid, const at::Tensor& w,
                  at::Tensor& loss,
                  at::Tensor& grad, double beta, double temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0);
  if (N == 0) return;
  const auto cp = sdft::distill::cpu::make_params<acc_t>(s.size(1), beta, temperature);
  Params<acc_t> P{cp.V, cp.inv_tau, cp.beta, cp.log_beta, cp.log_1mbeta};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  const scalar_t *sp = s.const_data_ptr<scalar_t>(), *tp = t.const_data_ptr<scalar_t>();
  const bool* vp = valid.const_data_ptr<bool>();
  const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  acc_t* lp = loss.mutable_data_ptr<acc_t>();
  scalar_t* gp = GRAD ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  if (!launch_dense_cluster<DIV, GRAD, scalar_t, acc_t>(sp, tp, vp, wp, lp, gp, P, N, s.device().index(), stream))
    distill_dense_kernel<DIV, GRAD, scalar_t, acc_t><<<static_cast<unsigned>(N), kBlock, 0, stream>>>(sp, tp, vp, wp,
                                                                                                 lp, gp, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dense_dispatch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& v, const at::Tensor& w,
                    at::Tensor& loss, at::Tensor& grad, int64_t div, bool compute_grad, double beta,
                    double temperature) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_dense_cuda", [&] {
    sdft::distill::cpu::dispatch_div_grad(div, compute_grad, [&](auto DIVC, auto GRADC) {
      launch_dense<decltype(DIVC)::value, decltype(GRADC)::value, scalar_t>(s, t, v, w, loss, grad, beta,
                                                                            temperature);
    });
  });
}

}  // namespace

// Same contract as distill_dense_cpu (csrc/cpu/distill.cpp).
std::tuple<at::Tensor, at::Tensor> distill_dense_cuda(const at::Tensor& student_logits,
                                                      const at::Tensor& teacher_logits, const at::Tensor& valid,
                                                      const std::optional<at::Tensor>& row_weight, int64_t divergence, double beta, double temperature,
                                                      bool compute_grad) {
  sdft::distill::cpu::check_dense_inputs(student_logits, teacher_logits, valid, row_weight, divergence, beta,
                                         temperature);
  TORCH_CHECK(student_logits.size(0) < (int64_t(1) << 31), "student_logits: at most 2^31 - 1 rows, got ",
              student_logits.size(0));
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous(), v = valid.contiguous();
  const at::Tensor w = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  const int64_t N = s.size(0), V = s.size(1);
  at::Tensor loss = at::empty({N}, s.options().dtype(sdft::distill::cpu::loss_dtype(s.scalar_type())));
  at::Tensor grad = at::empty({compute_grad ? N : 0, compute_grad ? V : 0}, s.options());
  dense_dispatch(s, t, v, w, loss, grad, effective_divergence(divergence, beta), compute_grad, beta, temperature);
  return {loss, grad};
}

// Same contract as distill_dense_inplace_cpu: the gradient is written over student_logits.
at::Tensor distill_dense_inplace_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                      const at::Tensor& valid, const std::optional<at::Tensor>& row_weight,
                                      int64_t divergence, double beta, double temperature) {
  sdft::distill::cpu::check_dense_inputs(student_logits, teacher_logits, valid, row_weight, divergence, beta,
                                         temperature);
  TORCH_CHECK(student_logits.is_contiguous(), "student_logits: expected a contiguous tensor (the gradient is "
              "written over it)");
  TORCH_CHECK(student_logits.size(0) < (int64_t(1) << 31), "student_logits: at most 2^31 - 1 rows, got ",
              student_logits.size(0));
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor t = teacher_logits.contiguous(), v = valid.contiguous();
  const at::Tensor w = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  at::Tensor s = student_logits;
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(sdft::distill::cpu::loss_dtype(s.scalar_type())));
  dense_dispatch(s, t, v, w, loss, s, effective_divergence(divergence, beta), true, beta, temperature);
  return loss;
}

}  // namespace sdft::distill::cuda

TORCH_LIBRARY_IMPL(sdft_kernels, CUDA, m) {
  m.impl("distill_dense", &sdft::distill::cuda::distill_dense_cuda);
  m.impl("distill_dense_inplace_", &sdft::distill::cuda::distill_dense_inplace_cuda);
}
