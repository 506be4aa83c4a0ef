// Per-element math of the fused distillation divergence, shared by the CPU (csrc/cpu/distill*.cpp)
// and CUDA (csrc/cuda/distill*.cu) kernels, so the CPU tests exercise the formulas the GPU runs.
//
// Notation for one row (one token): s = student_logits / T, u = teacher_logits / T,
// q = softmax(s) (student), p = softmax(u) (teacher), lq = log q, lp = log p.
// Every function returns a per-element term; the kernels sum terms over the row in float32 (float64
// for float64 inputs). Gradients are with respect to s (the kernels multiply by 1/T for the raw
// logits):
//   forward KL  L = sum p (lp - lq)                  dL/ds_j = q_j - p_j
//   reverse KL  L = sum q (lq - lp)                  dL/ds_j = q_j (lq_j - lp_j - L)
//   JSD(beta)   m = beta p + (1 - beta) q,  L = beta KL(p||m) + (1 - beta) KL(q||m)
//               dL/dq_j = (1 - beta)(lq_j - lm_j) + const (the p/m and q/m terms cancel), hence
//               dL/ds_j = (1 - beta) q_j (lq_j - lm_j - K),  K = KL(q||m) = sum q (lq - lm)
// 0 log 0 = 0: an element with zero probability adds nothing to the loss or to the gradient.
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace sdft::distill {

enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// ---- exp / log: libm on the GPU and in float64, a vectorisable polynomial for float32 on the CPU.
C10_HOST_DEVICE inline float bits_to_float(int32_t i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}
C10_HOST_DEVICE inline int32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
#endif
}

// exp(x) for x <= 88: 2^n * e^r with n = round(x / ln 2) and a degree-6 polynomial for e^r on
// [-ln2/2, ln2/2] (Cephes coefficients, ~2 ulp). Below ln(FLT_MIN) (and for -inf) it returns 0; NaN
// stays NaN (only ternaries, no fmin/fmax, which would swallow it) so bad rows are detected.
C10_HOST_DEVICE inline float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  const float lo = -87.33654f, hi = 88.0f;
  const bool under = x < lo;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  const int32_t ni = float_to_bits(t) - float_to_bits(magic);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale = bits_to_float((ni + 127) << 23);
  return under ? 0.0f : y * scale;
#endif
}
C10_HOST_DEVICE inline double fast_exp(double x) { return ::exp(x); }

// log(x) for positive normal x (callers guarantee it): x = m 2^e with m in [sqrt(.5), sqrt(2)),
// log(m) by the Cephes logf polynomial (~1 ulp).
C10_HOST_DEVICE inline float fast_log(float x) {
#ifdef __CUDA_ARCH__
  return logf(x);
#else
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + fe * 0.693359375f;
#endif
}
C10_HOST_DEVICE inline double fast_log(double x) { return ::log(x); }

// Rounding error of s = fl(a + b), exactly (Knuth's TwoSum: a + b = s + err in real arithmetic; needs
// IEEE sums, i.e. no -ffast-math / reassociation).
template <typename T>
C10_HOST_DEVICE inline T two_sum_err(T a, T b, T s) {
  const T bb = s - a;
  return (a - (s - bb)) + (b - bb);
}

// ---- online log-sum-exp: a running (max, sum of exp(x - max)) pair; merge two of them.
template <typename T>
C10_HOST_DEVICE inline void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 > m) {
    s = s * fast_exp(m - m2) + s2;  // exp(-inf) = 0 covers an empty (m = -inf) accumulator
    m = m2;
  } else if (m2 > -std::numeric_limits<T>::infinity()) {
    s = s + s2 * fast_exp(m2 - m);
  }
}

// ---- per-element divergence terms and gradients.
// a (la - lb) with 0 log 0 = 0.
template <typename T>
C10_HOST_DEVICE inline T xlogy_diff(T a, T la, T lb) {
  return a > T(0) ? a * (la - lb) : T(0);
}

// log m with m = beta p + (1 - beta) q. When m underflows, max of the two logs is within log 2 of the
// truth and the element's contribution (weighted by p or q < 1e-30) is negligible anyway.
template <typename T>
C10_HOST_DEVICE inline T jsd_log_mix(T p, T q, T lp, T lq, T beta, T log_beta, T log_1mbeta) {
  const T m = beta * p + (T(1) - beta) * q;
  const T a = lp + log_beta, b = lq + log_1mbeta;
  const T tiny = sizeof(T) == 4 ? T(1e-30) : T(1e-300);
  return m > tiny ? fast_log(m) : (a > b ? a : b);
}

// Loss term of one element. For kJSD also returns K's term (q (lq - lm)) in k_term and lm in lm_out.
template <typename T>
C10_HOST_DEVICE inline T divergence_term(int64_t div, T p, T q, T lp, T lq, T beta, T log_beta,
                                         T log_1mbeta, T& k_term, T& lm_out) {
  if (div == kForwardKL) return xlogy_diff(p, lp, lq);
  if (div == kReverseKL) return xlogy_diff(q, lq, lp);
  const T lm = jsd_log_mix(p, q, lp, lq, beta, log_beta, log_1mbeta);
  lm_out = lm;
  k_term = xlogy_diff(q, lq, lm);
  return beta * xlogy_diff(p, lp, lm) + (T(1) - beta) * k_term;
}

// dL/ds_j. row_scalar: unused for forward KL, L for reverse KL, K = KL(q||m) for JSD; lm only for JSD.
template <typename T>
C10_HOST_DEVICE inline T divergence_grad(int64_t div, T p, T q, T lp, T lq, T lm, T beta, T row_scalar) {
  if (div == kForwardKL) return q - p;
  if (div == kReverseKL) return q > T(0) ? q * (lq - lp - row_scalar) : T(0);
  return q > T(0) ? (T(1) - beta) * q * (lq - lm - row_scalar) : T(0);
}

// The edge betas of JSD follow TRL's GKD: beta = 0 is forward KL and beta = 1 reverse KL (the mixture
// formula is identically 0 there). Returns the divergence the kernel actually runs.
inline int64_t effective_divergence(int64_t div, double beta) {
  if (div == kJSD && beta == 0.0) return kForwardKL;
  if (div == kJSD && beta == 1.0) return kReverseKL;
  return div;
}

}  // namespace sdft::distill
