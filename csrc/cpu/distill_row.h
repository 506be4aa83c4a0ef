// CPU row kernels of the fused distillation divergence (dense teacher), included by distill.cpp.
// A row is processed in three or four passes that stay in L2 after the first: (A) max of s and u,
// (B) exp(s - max), exp(u - max) into two float scratch rows and their sums (the only exps),
// (C) per-element loss terms (+ the gradient for forward KL), (D) the gradient for reverse KL / JSD,
// which needs the row total from (C). Loops run over W independent lanes so that the compiler
// vectorises them (float reductions are not reassociated otherwise).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include <c10/macros/Macros.h>
#include "common/distill_math.h"

namespace sdft::distill::cpu {

constexpr int64_t W = 16;  // lanes: two AVX2 registers of floats

template <typename acc_t>
struct RowParams {
  int64_t V;
  acc_t inv_tau, beta, log_beta, log_1mbeta;
  acc_t grad_scale;  // multiplies the gradient: 1/T times the row's weight
};

template <typename acc_t>
C10_ALWAYS_INLINE acc_t lanes_sum(const acc_t* a) {
  acc_t s = 0;
  for (int64_t l = 0; l < W; ++l) s += a[l];
  return s;
}

template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t row_max(const scalar_t* x, int64_t V) {
  acc_t m[W];
  for (int64_t l = 0; l < W; ++l) m[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  for (; j + W <= V; j += W)
    for (int64_t l = 0; l < W; ++l) {
      const acc_t v = static_cast<acc_t>(x[j + l]);
      m[l] = v > m[l] ? v : m[l];
    }
  for (; j < V; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    m[0] = v > m[0] ? v : m[0];
  }
  acc_t r = m[0];
  for (int64_t l = 1; l < W; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

// e[j] = exp(x[j] * inv_tau - mx); returns sum e. mx = -inf or NaN poisons the sum (detected).
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t exp_row(const scalar_t* x, acc_t* e, int64_t V, acc_t inv_tau, acc_t mx) {
  acc_t s[W] = {};
  int64_t j = 0;
  for (; j + W <= V; j += W)
    for (int64_t l = 0; l < W; ++l) {
      const acc_t v = fast_exp(static_cast<acc_t>(x[j + l]) * inv_tau - mx);
      e[j + l] = v;
      s[l] += v;
    }
  for (; j < V; ++j) {
    const acc_t v = fast_exp(static_cast<acc_t>(x[j]) * inv_tau - mx);
    e[j] = v;
    s[0] += v;
  }
  return lanes_sum(s);
}

// Pass (C) for element j: loss term into Lacc (and K's term into Kacc for JSD); forward KL writes its
// gradient, the others keep q (and lm) in the scratch rows for pass (D).
template <int64_t DIV, bool GRAD, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void dense_elem_c(const RowParams<acc_t>& P, const scalar_t* z, const scalar_t* t,
                                           scalar_t* g, acc_t* bq, acc_t* bp, int64_t j, acc_t lzs,
                                           acc_t lzu, acc_t izs, acc_t izu, acc_t& Lacc, acc_t& Kacc) {
  const acc_t it = P.inv_tau;
  const acc_t q = bq[j] * izs, p = bp[j] * izu;
  const acc_t lq = static_cast<acc_t>(z[j]) * it - lzs, lp = static_cast<acc_t>(t[j]) * it - lzu;
  acc_t kt = 0, lm = 0;
  Lacc += divergence_term<acc_t>(DIV, p, q, lp, lq, P.beta, P.log_beta, P.log_1mbeta, kt, lm);
  if constexpr (DIV == kJSD) Kacc += kt;
  if constexpr (GRAD) {
    if constexpr (DIV == kForwardKL) {
      g[j] = static_cast<scalar_t>((q - p) * P.grad_scale);
    } else {
      bq[j] = q;
      if constexpr (DIV == kJSD) bp[j] = lm;
    }
  }
}

// One row. Returns 0 on success, 1 if the student row is bad (NaN, +inf, all -inf), 2 if the teacher's.
template <int64_t DIV, bool GRAD, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE int dense_row(const RowParams<acc_t>& P, const scalar_t* z, const scalar_t* t,
                                       scalar_t* g, acc_t* bq, acc_t* bp, acc_t& loss) {
  const int64_t V = P.V;
  const acc_t it = P.inv_tau, beta = P.beta;
  // (A) + (B): both log-sum-exps.
  const acc_t ms = row_max<scalar_t, acc_t>(z, V) * it;
  const acc_t mu = row_max<scalar_t, acc_t>(t, V) * it;
  const acc_t zs = exp_row(z, bq, V, it, ms);
  const acc_t zu = exp_row(t, bp, V, it, mu);
  if (!(zs >= acc_t(1))) return 1;  // the max element contributes exactly 1; NaN fails the test
  if (!(zu >= acc_t(1))) return 2;
  const acc_t lzs = ms + std::log(zs), lzu = mu + std::log(zu);
  const acc_t izs = acc_t(1) / zs, izu = acc_t(1) / zu;
  // (C): loss terms; forward KL writes its gradient here, the others keep q (and lm) for (D).
  acc_t L[W] = {}, K[W] = {};
  int64_t j = 0;
  for (; j + W <= V; j += W)
    for (int64_t l = 0; l < W; ++l)
      dense_elem_c<DIV, GRAD>(P, z, t, g, bq, bp, j + l, lzs, lzu, izs, izu, L[l], K[l]);
  for (; j < V; ++j) dense_elem_c<DIV, GRAD>(P, z, t, g, bq, bp, j, lzs, lzu, izs, izu, L[0], K[0]);
  loss = lanes_sum(L);
  if constexpr (GRAD && DIV != kForwardKL) {
    // (D): gradient with the row scalar (L for reverse KL, K = KL(q||m) for JSD).
    const acc_t rs = DIV == kJSD ? lanes_sum(K) : loss;
    for (int64_t i = 0; i < V; ++i) {
      const acc_t lq = static_cast<acc_t>(z[i]) * it - lzs;
      const acc_t lp = DIV == kReverseKL ? static_cast<acc_t>(t[i]) * it - lzu : acc_t(0);
      const acc_t lm = DIV == kJSD ? bp[i] : acc_t(0);
      g[i] = static_cast<scalar_t>(divergence_grad<acc_t>(DIV, acc_t(0), bq[i], lp, lq, lm, beta, rs) * P.grad_scale);
    }
  }
  return 0;
}

}  // namespace sdft::distill::cpu
