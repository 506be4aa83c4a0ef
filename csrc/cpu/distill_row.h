// CPU row kernels of the fused distillation divergence, included by distill.cpp (dense teacher) and
// distill_topk.cpp (row_max / exp_row for the student). Loops run over W independent lanes so that the
// compiler vectorises them (float reductions are not reassociated otherwise).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

template <typename acc_t>
struct Lanes;  // W lanes of acc_t as one GCC vector-extension value
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(W * sizeof(double))));
};

// Max of x[0, n) ignoring NaN (-inf if n == 0), in W-lane vectors of GCC's vector extension: GCC leaves
// a float compare-and-select max over an array of lanes scalar (it was a third of the dense kernel's time
// on Intel Xeon), but a vector-typed select compiles to the clone's compare + blend instructions.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = typename Lanes<acc_t>::type;
  constexpr acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  Vec m;
  for (int64_t l = 0; l < W; ++l) m[l] = lowest;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec v;
    std::memcpy(&v, x + j, sizeof(Vec));
    m = v > m ? v : m;
  }
  acc_t r = lowest;
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  for (int64_t l = 0; l < W; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

// e[j] = exp(x[j] * inv_tau - mx); returns sum e. mx = -inf or NaN poisons the sum (detected).
template <typename acc_t>
C10_ALWAYS_INLINE acc_t exp_row(const acc_t* x, acc_t* e, int64_t V, acc_t inv_tau, acc_t mx) {
  acc_t s[W] = {};
  int64_t j = 0;
  for (; j + W <= V; j += W)
    for (int64_t l = 0; l < W; ++l) {
      const acc_t v = fast_exp(x[j + l] * inv_tau - mx);
      e[j + l] = v;
      s[l] += v;
    }
  for (; j < V; ++j) {
    const acc_t v = fast_exp(x[j] * inv_tau - mx);
    e[j] = v;
    s[0] += v;
  }
  return lanes_sum(s);
}

// ---- dense rows: two passes (three for reverse KL / JSD with a gradient) over chunks of CH elements.
// A chunk of logits is converted to float (bf16/fp16) or copied once per pass into a small local buffer,
// so the math loops below only ever see a local float (or double) array and vectorise (see chunk_in).
// The first pass is an online log-sum-exp that also stores every exp (relative to the running max of its
// chunk) in a per-thread row of scratch: two exps per element in all, and no separate max pass.
constexpr int64_t CH = 4096;  // tests/test_distill.py builds rows over several chunks from this value

// HW_HALF: convert fp16 through the compiler's _Float16, i.e. with F16C instructions in the AVX clones
// (and natively on AArch64). Without them, GCC's _Float16 goes through slow libgcc calls, so the x86
// baseline loops use c10's branch-free bit conversion instead.
template <bool HW_HALF, typename T, typename A>
C10_ALWAYS_INLINE void to_acc(const T* x, A* out, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy(x, x + n, out);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* b = reinterpret_cast<const uint16_t*>(x);  // bf16 = the high half of a float
    for (int64_t i = 0; i < n; ++i) out[i] = bits_to_float(static_cast<int32_t>(uint32_t(b[i]) << 16));
#ifdef __FLT16_MAX__
  } else if constexpr (HW_HALF && std::is_same_v<T, c10::Half>) {
    const _Float16* h = reinterpret_cast<const _Float16*>(x);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(h[i]);
#endif
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(x[i]);
  }
}

template <bool HW_HALF, typename A, typename T>
C10_ALWAYS_INLINE void from_acc(const A* v, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy(v, v + n, out);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* b = reinterpret_cast<uint16_t*>(out);
    for (int64_t i = 0; i < n; ++i) {  // round to nearest even, NaN kept a (quiet) NaN, as c10 does
      const uint32_t u = static_cast<uint32_t>(float_to_bits(v[i]));
      const uint16_t r = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      b[i] = v[i] != v[i] ? uint16_t(0x7FC0) : r;
    }
#ifdef __FLT16_MAX__
  } else if constexpr (HW_HALF && std::is_same_v<T, c10::Half>) {  // IEEE round to nearest even, like c10
    _Float16* h = reinterpret_cast<_Float16*>(out);
    for (int64_t i = 0; i < n; ++i) h[i] = static_cast<_Float16>(v[i]);
#endif
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(v[i]);
  }
}

// x[0, n) as acc_t, converted (or, for float32/float64 rows, copied) into buf, a local array of the
// caller. The copy is not wasted: the math loops then read an array that the compiler knows aliases none
// of the heap rows they write (stored exps, gradient), so they vectorise without run-time alias checks.
// Reading float32 rows in place instead was 2x slower on Intel Xeon (N=1024, V=32000, one thread:
// forward 186 vs 95 ms, with gradient 210 vs 124 ms).
template <bool HW_HALF, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE const acc_t* chunk_in(const scalar_t* x, int64_t n, acc_t* buf) {
  to_acc<HW_HALF>(x, buf, n);
  return buf;
}

// Online log-sum-exp step over one chunk x[0, n): (m, s) = running max of x * it and sum of
// exp(x * it - m). Writes e[j] = exp(x[j] * it - m) with the chunk's m (returned), so that a later pass
// gets exp(x[j] * it - max) = e[j] * exp(m - max) without another exp per element. NaN anywhere makes s
// NaN (sticky) and +inf makes it NaN through exp(inf - inf): the caller's s >= 1 test then flags the
// row. A chunk seen while every entry so far is -inf stores zeros.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t lse_chunk(const acc_t* x, int64_t n, acc_t it, acc_t& m, acc_t& s, acc_t* e) {
  const acc_t cm = row_max(x, n) * it;  // ignores NaN; the exps below catch it
  lse_merge(m, s, cm, acc_t(0));  // rescale the running sum to the new max (csrc/common/distill_math.h)
  if (m == -std::numeric_limits<acc_t>::infinity()) {  // rare: no finite entry yet; only NaN matters
    for (int64_t j = 0; j < n; ++j) {
      if (x[j] != x[j]) s = std::numeric_limits<acc_t>::quiet_NaN();
      e[j] = 0;
    }
    return m;
  }
  s += exp_row(x, e, n, it, m);
  return m;
}

// Per-thread scratch of dense_row: the row's exps (student, teacher) and each chunk's running max.
template <typename acc_t>
struct RowScratch {
  acc_t *es, *et, *cs, *ct;
};

// One row. Returns 0 on success, 1 if the student row is bad (NaN, +inf, all -inf), 2 if the teacher's.
// Pass 1 (online, chunk by chunk): both log-sum-exps and every exp. Pass 2: loss terms from the stored
// exps (forward KL writes its gradient; the others keep q, and log m for JSD). Pass 3 (reverse KL, JSD):
// the gradient, which needs the row's total from pass 2. Each chunk is read through a local buffer
// (chunk_in), so the math loops only see local float arrays and vectorise.
template <int64_t DIV, bool GRAD, bool HW_HALF, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE int dense_row(const RowParams<acc_t>& P, const scalar_t* z, const scalar_t* t, scalar_t* g,
                                const RowScratch<acc_t>& R, acc_t& loss) {
  constexpr bool kConv = !std::is_same_v<scalar_t, acc_t>;
  const int64_t V = P.V;
  const acc_t it = P.inv_tau, beta = P.beta, gs = P.grad_scale;
  acc_t bz[CH], bt[CH], bg[kConv ? CH : 1];  // bg: the gradient chunk before conversion
  acc_t ms = -std::numeric_limits<acc_t>::infinity(), mu = ms, zs = 0, zu = 0;
  for (int64_t j0 = 0, c = 0; j0 < V; j0 += CH, ++c) {
    const int64_t n = std::min(CH, V - j0);
    R.cs[c] = lse_chunk(chunk_in<HW_HALF>(z + j0, n, bz), n, it, ms, zs, R.es + j0);
    R.ct[c] = lse_chunk(chunk_in<HW_HALF>(t + j0, n, bt), n, it, mu, zu, R.et + j0);
  }
  // The max element contributes exp(x_max * it - m) = 1 up to one rounding (the AVX clones contract
  // x * it - m into an FMA, so it can be 1 - 2^-24 while every other term underflows): test against 1/2.
  // NaN fails the test, and so does a row with no finite entry (zs = 0).
  if (!(zs >= acc_t(0.5))) return 1;
  if (!(zu >= acc_t(0.5))) return 2;
  // Log-probabilities are x / T - c with c = max + log(sum) rounded: one FMA per element. Rounding c shifts
  // every log-prob of the row by the same e (an ulp of |max|: 1e-3 at logits of 1e4, a 5e-4 relative
  // loss error), so e is recovered exactly (two_sum_err) and taken out of the row's loss once, below; in
  // the gradient it cancels (lq - lp - L, lq - lm - K shift together). (x / T - max) - log(sum) per
  // element is as exact and costs two more operations: JSD ran 20% slower.
  const acc_t ls = std::log(zs), lu = std::log(zu), izs = acc_t(1) / zs, izu = acc_t(1) / zu;
  const acc_t lzs = ms + ls, lzu = mu + lu;
  const acc_t es = two_sum_err(ms, ls, lzs), eu = two_sum_err(mu, lu, lzu);  // log q = x/T - lzs - es
  // The loss sums: float lanes within a chunk (vectorised), the chunks' totals in double. Float lanes
  // over a whole row lost ~1e-5 of the loss at V = 262144 (32k terms per lane); now ~1e-7.
  double Lrow = 0, Krow = 0;
  for (int64_t j0 = 0, c = 0; j0 < V; j0 += CH, ++c) {
    const int64_t n = std::min(CH, V - j0);
    acc_t L[W] = {}, K[W] = {};
    const acc_t* zc = chunk_in<HW_HALF>(z + j0, n, bz);
    const acc_t* tc = chunk_in<HW_HALF>(t + j0, n, bt);
    acc_t *es = R.es + j0, *et = R.et + j0;
    const acc_t fs = fast_exp(R.cs[c] - ms) * izs, fu = fast_exp(R.ct[c] - mu) * izu;
    acc_t* gc = nullptr;
    if constexpr (GRAD && DIV == kForwardKL) {
      if constexpr (kConv) gc = bg; else gc = g + j0;
    }
    auto elem = [&](int64_t j, int64_t l) {
      const acc_t q = es[j] * fs, p = et[j] * fu;
      const acc_t lq = zc[j] * it - lzs, lp = tc[j] * it - lzu;
      acc_t kt = 0, lm = 0;
      L[l] += divergence_term<acc_t>(DIV, p, q, lp, lq, beta, P.log_beta, P.log_1mbeta, kt, lm);
      if constexpr (DIV == kJSD) K[l] += kt;
      if constexpr (GRAD && DIV == kForwardKL) gc[j] = (q - p) * gs;
      if constexpr (GRAD && DIV != kForwardKL) es[j] = q;
      if constexpr (GRAD && DIV == kJSD) et[j] = lm;
    };
    int64_t j = 0;
    for (; j + W <= n; j += W)
      for (int64_t l = 0; l < W; ++l) elem(j + l, l);
    for (; j < n; ++j) elem(j, 0);
    if constexpr (GRAD && DIV == kForwardKL && kConv) from_acc<HW_HALF>(bg, g + j0, n);
    Lrow += lanes_sum(L);
    if constexpr (DIV == kJSD) Krow += lanes_sum(K);
  }
  const acc_t L0 = static_cast<acc_t>(Lrow);  // with the shifted log-probs; corrected by the shifts' exact effect:
  loss = L0 + (DIV == kForwardKL ? es - eu : DIV == kReverseKL ? eu - es : -(beta * eu + (acc_t(1) - beta) * es));
  if constexpr (GRAD && DIV != kForwardKL) {
    const acc_t rs = DIV == kJSD ? static_cast<acc_t>(Krow) : L0;  // L for reverse KL, K = KL(q||m) for JSD (as shifted)
    for (int64_t j0 = 0; j0 < V; j0 += CH) {
      const int64_t n = std::min(CH, V - j0);
      const acc_t* zc = chunk_in<HW_HALF>(z + j0, n, bz);
      const acc_t* tc = DIV == kReverseKL ? chunk_in<HW_HALF>(t + j0, n, bt) : nullptr;
      const acc_t *es = R.es + j0, *et = R.et + j0;
      acc_t* gc;
      if constexpr (kConv) gc = bg; else gc = g + j0;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t lq = zc[j] * it - lzs;
        const acc_t lp = DIV == kReverseKL ? tc[j] * it - lzu : acc_t(0);
        const acc_t lm = DIV == kJSD ? et[j] : acc_t(0);
        gc[j] = divergence_grad<acc_t>(DIV, acc_t(0), es[j], lp, lq, lm, beta, rs) * gs;
      }
      if constexpr (kConv) from_acc<HW_HALF>(bg, g + j0, n);
    }
  }
  return 0;
}

}  // namespace sdft::distill::cpu
