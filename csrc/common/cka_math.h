// CKA math shared by the CPU and CUDA kernels (csrc/cpu/cka*.cpp, csrc/cuda/cka*.cu): every function is
// a C10_HOST_DEVICE inline on scalars, so the CPU tests exercise exactly the arithmetic the GPU runs.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>

namespace sdft::cka {

// Chan et al.'s parallel update of one element of a centred co-moment matrix.
// acc        : accumulated co-moment sum_i (x_i - mu_a)(y_i - nu_a) of the first part (n_a tokens)
// raw        : sum_i u_i v_i over the new batch, where u = x - s_x, v = y - s_y are the batch's features
//              minus a SHIFT s (the batch mean rounded to the working precision, so u, v are small and
//              exact); r_x = mean_b - s_x, r_y likewise (tiny), so the batch's centred co-moment is
//              raw - n_b r_x r_y
// d_x, d_y   : mu_a - mu_b and nu_a - nu_b (float64 means of the two parts)
// w          : n_a n_b / (n_a + n_b)
// Never forms uncentred sums: every term is a product of small, centred quantities.
C10_HOST_DEVICE inline double chan_comoment(double acc, double raw, double r_x, double r_y, double n_b,
                                            double d_x, double d_y, double w) {
  return acc + (raw - n_b * r_x * r_y) + w * d_x * d_y;
}

// Mean of the union of two parts: mu_a + n_b / n (mu_b - mu_a) (stable for large, close means).
C10_HOST_DEVICE inline double chan_mean(double mu_a, double mu_b, double n_a, double n_b) {
  const double n = n_a + n_b;
  return n > 0 ? mu_a + (n_b / n) * (mu_b - mu_a) : 0.0;
}

// U-centring (Song et al. 2012) of one off-diagonal element of a Gram matrix with zeroed diagonal:
//   K~_ij - r_i/(n-2) - r_j/(n-2) + total/((n-1)(n-2)),  r = row sums of K~, total = sum of K~.
// The diagonal of the U-centred matrix is zero. <U(K), U(L)> / (n(n-3)) is the unbiased HSIC.
C10_HOST_DEVICE inline double ucentre(double k, double r_i, double r_j, double total, double n, bool diag) {
  if (diag) return 0.0;
  return k - (r_i + r_j) / (n - 2.0) + total / ((n - 1.0) * (n - 2.0));
}

// Unbiased HSIC (Song et al. 2012) from the sufficient statistics of a Gram pair with zeroed diagonals:
//   kl  = sum_ij K~_ij L~_ij,  rkl = sum_i (K~1)_i (L~1)_i,  sk = 1'K~1,  sl = 1'L~1.
C10_HOST_DEVICE inline double hsic_unbiased(double kl, double rkl, double sk, double sl, double n) {
  return (kl + sk * sl / ((n - 1.0) * (n - 2.0)) - 2.0 / (n - 2.0) * rkl) / (n * (n - 3.0));
}

// Biased HSIC (Gretton et al. 2005), tr(KHLH)/(n-1)^2, from the full (diagonal included) statistics:
//   kl = sum K∘L, rkl = sum_i (K1)_i (L1)_i, sk = 1'K1, sl = 1'L1.
C10_HOST_DEVICE inline double hsic_biased(double kl, double rkl, double sk, double sl, double n) {
  return (kl - 2.0 / n * rkl + sk * sl / (n * n)) / ((n - 1.0) * (n - 1.0));
}

// RBF kernel value from a dot product and the two squared norms, minus 1 when minus_one (expm1: the
// digits of values near 1 survive); distances that round below zero (nearby points, cancellation) are
// clamped to zero. A NaN distance (norms that overflowed: inf - inf) stays NaN, as in the CPU kernel's
// clamp_min, so the caller's finiteness check raises instead of reading a kernel value of 1.
template <typename T>
C10_HOST_DEVICE inline T rbf_from_dot(T dot, T nrm_i, T nrm_j, T neg_gamma, bool minus_one) {
  T d2 = nrm_i + nrm_j - T(2) * dot;
  d2 = d2 < T(0) ? T(0) : d2;
  return minus_one ? ::expm1(neg_gamma * d2) : ::exp(neg_gamma * d2);
}

}  // namespace sdft::cka
