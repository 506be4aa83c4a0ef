// Host-side tile helpers of kernel_hsic_stats, shared by the CPU kernel (csrc/cpu/cka_tiled.cpp) and
// the CUDA one (csrc/cuda/cka_tiled.cu): shifted row tiles and one kernel tile (linear or RBF) formed
// with ATen ops (a GEMM for the dot products), written into caller-owned scratch.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace sdft {

// A contiguous [rows, cols] view at the start of a flat scratch buffer.
inline at::Tensor scratch(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// Rows [r0, r0 + len) of x minus the shift, written into buf (flat, >= tile * d), or a view of x when
// there is no shift.
inline at::Tensor shifted_rows(const at::Tensor& x, const at::Tensor& shift, int64_t r0, int64_t len,
                               const at::Tensor& buf) {
  auto rows = x.narrow(0, r0, len);
  if (!shift.defined()) return rows;
  auto out = scratch(buf, len, x.size(1));
  return at::sub_out(out, rows, shift);
}

// A worker's scratch (one per CPU thread; one on CUDA), allocated once: two shifted row tiles (empty without a shift: the
// rows are then views of x) and one kernel tile. Every tile is written into it, so the tile loop
// allocates nothing (on CPU, with per-tile temporaries, malloc handed the memory back to the OS and
// faulted it in again: n=65536 took 30 s instead of 18.5 s under the benchmark's malloc settings).
struct TileScratch {
  at::Tensor ri, rj, kt;
  TileScratch(const at::Tensor& x, const at::Tensor& shift, int64_t tile)
      : ri(at::empty({shift.defined() ? tile * x.size(1) : 0}, x.options())),
        rj(at::empty({shift.defined() ? tile * x.size(1) : 0}, x.options())),
        kt(at::empty({tile * tile}, x.options())) {}
};

// One kernel tile, into s.kt: linear (dot products) or RBF exp(-gamma ||x_i - x_j||^2) (minus 1 when
// minus_one), from a GEMM.
inline at::Tensor kernel_tile(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& nrm, int64_t i0,
                              int64_t ti, int64_t j0, int64_t tj, int64_t kernel, double gamma, bool minus_one,
                              TileScratch& s) {
  auto xi = shifted_rows(x, shift, i0, ti, s.ri), xj = shifted_rows(x, shift, j0, tj, s.rj);
  auto out = scratch(s.kt, ti, tj);
  if (kernel == 0) return at::mm_out(out, xi, xj.t());
  // ||xi||^2 + ||xj||^2 - 2 xi.xj, clamped at 0 (rounding), exact zero on the true diagonal.
  at::add_out(out, nrm.narrow(0, i0, ti).unsqueeze(1), nrm.narrow(0, j0, tj).unsqueeze(0));
  out.addmm_(xi, xj.t(), /*beta=*/1, /*alpha=*/-2);
  out.clamp_min_(0);
  if (i0 == j0) out.diagonal().zero_();
  out.mul_(-gamma);
  return minus_one ? out.expm1_() : out.exp_();
}

// Squared norms of the shifted rows, a block of rows at a time (no shifted copy of x).
inline at::Tensor shifted_sq_norms(const at::Tensor& x, const at::Tensor& shift) {
  const int64_t n = x.size(0), block = 4096;
  auto out = at::empty({n}, x.options());
  auto buf = at::empty({shift.defined() ? block * x.size(1) : 0}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t len = std::min(block, n - r0);
    auto u = shifted_rows(x, shift, r0, len, buf);
    out.narrow(0, r0, len).copy_(u.mul(u).sum(1));
  }
  return out;
}

// The op's inputs as both kernels use them: contiguous x and y, their shifts (undefined when absent)
// and, for the RBF kernel (kernel == 1), the squared norms of the shifted rows.
struct TiledInputs {
  at::Tensor x, y, sx, sy, nx, ny;
  TiledInputs(const at::Tensor& x_, const at::Tensor& y_, int64_t kernel, const std::optional<at::Tensor>& shift_x,
              const std::optional<at::Tensor>& shift_y)
      : x(x_.contiguous()), y(y_.contiguous()), sx(shift_x.value_or(at::Tensor())),
        sy(shift_y.value_or(at::Tensor())) {
    if (kernel == 1) {
      nx = shifted_sq_norms(x, sx);
      ny = shifted_sq_norms(y, sy);
    }
  }
};

}  // namespace sdft
