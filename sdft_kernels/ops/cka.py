"""Typed wrappers over the CKA ops (csrc/cpu/cka*.cpp, csrc/cuda/cka*.cu) with their fake registrations.

The public estimators are in sdft_kernels/cka.py; these are the building blocks they call.
"""
from __future__ import annotations

import torch

_ops = torch.ops.sdft_kernels

__all__ = ["column_stats", "shift", "comoment_merge_", "ucentre_", "kernel_hsic_stats", "KERNELS"]

KERNELS = {"linear": 0, "rbf": 1}


def column_stats(x: torch.Tensor):
    """(float64 column sums [d], float64 max |x| [] (0-d)) of features x [n, d] in one read; a NaN or Inf
    in x makes its column's sum non-finite (the max ignores NaN)."""
    return _ops.cka_column_stats.default(_unit_columns(x))


def shift(x: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write x - s into out ([n, d], float32/float64; s [d] in out's dtype) and return the float64 column
    sums of out as written, in one pass over x (any float dtype: bf16/fp16 are not copied to float32 first)."""
    return _ops.cka_shift.default(_unit_columns(x), s, out)


def _unit_columns(x):
    return x if x.dim() != 2 or x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def comoment_merge_(acc: torch.Tensor, raw: torch.Tensor, r_x: torch.Tensor, r_y: torch.Tensor, n_b: float,
                    d_x: torch.Tensor, d_y: torch.Tensor, w: float, upper: bool = False) -> None:
    """acc += (raw - n_b r_x r_y^T) + w d_x d_y^T, in float64 (Chan's parallel co-moment merge).
    upper=True: raw is a self-moment of which only the upper triangle holds values; only acc's upper
    triangle is merged (its lower one is left as it was: mirror it once the whole matrix is needed)."""
    _ops.cka_comoment_merge_.default(acc, raw, r_x, r_y, float(n_b), d_x, d_y, float(w), bool(upper))


def ucentre_(gram: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """U-centre a contiguous stack of symmetric Gram matrices [L, b, b] (b > 3) in place; returns gram.
    upper=True: only the upper triangles hold values on input (read mirrored); on output they are full."""
    _ops.cka_ucentre_.default(gram, bool(upper))
    return gram


def kernel_hsic_stats(x: torch.Tensor, y: torch.Tensor, kernel: str, gamma_x: float, gamma_y: float,
                      tile: int, shift_x: torch.Tensor | None = None, shift_y: torch.Tensor | None = None,
                      minus_one_x: bool = False, minus_one_y: bool = False):
    """(sums [3] = (sum K*L, sum K*K, sum L*L), row sums [2, n], diagonals [2, n]), float64, of the kernel
    Grams of x - shift_x [n, d] and y - shift_y [n, e], computed tile by tile (no n x n matrix; on CPU the
    shift is applied per tile, so no shifted copy of x or y exists either). Sums and row sums leave the
    diagonal out. minus_one_x / _y: an RBF Gram is formed as K - 1 (expm1; for values near 1)."""
    return _ops.kernel_hsic_stats.default(x, y, KERNELS[kernel], float(gamma_x), float(gamma_y), int(tile),
                                          shift_x, shift_y, bool(minus_one_x), bool(minus_one_y))


@torch.library.register_fake("sdft_kernels::cka_ucentre_")
def _ucentre_fake(gram, upper=False):
    return None


@torch.library.register_fake("sdft_kernels::kernel_hsic_stats")
def _stats_fake(x, y, kernel, gamma_x, gamma_y, tile, shift_x=None, shift_y=None, minus_one_x=False,
                minus_one_y=False):
    n = x.shape[0]
    f64 = dict(dtype=torch.float64, device=x.device)
    return x.new_empty(3, **f64), x.new_empty(2, n, **f64), x.new_empty(2, n, **f64)


@torch.library.register_fake("sdft_kernels::cka_comoment_merge_")
def _merge_fake(acc, raw, r_x, r_y, n_b, d_x, d_y, w, upper=False):
    return None


@torch.library.register_fake("sdft_kernels::cka_column_stats")
def _column_stats_fake(x):
    return x.new_empty(x.shape[1], dtype=torch.float64), x.new_empty((), dtype=torch.float64)


@torch.library.register_fake("sdft_kernels::cka_shift")
def _shift_fake(x, s, out):
    return x.new_empty(x.shape[1], dtype=torch.float64)
