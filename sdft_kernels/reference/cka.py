"""Float64 NumPy references for every CKA estimator, written from the published formulas.

Tests and benchmarks both import this module, so what the kernels are checked against and what they are
timed against never drift apart. Everything here holds the data (and, for the Gram forms, n x n
matrices) in memory: these are references, not the streaming implementation (see sdft_kernels.cka).

Conventions (the same as the streaming estimators):
- linear CKA (Kornblith et al. 2019): CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), with Xc, Yc
  the column-centred features; the normalisation of HSIC cancels in the ratio.
- unbiased HSIC (Song et al. 2012, used by Kornblith et al. 2019 as "debiased" and by Nguyen et al. 2021
  for minibatch CKA): with Kt = K with its diagonal zeroed, and n > 3,
      HSIC_u = [tr(Kt Lt) + 1'Kt1 1'Lt1 / ((n-1)(n-2)) - 2/(n-2) 1'Kt Lt1] / (n (n-3)).
  It may be negative; a CKA whose self-HSIC is <= 0 is NaN.
- biased HSIC (Gretton et al. 2005): HSIC_b = tr(K H L H) / (n-1)^2, H = I - 11'/n.
- RBF kernel: k(x, x') = exp(-||x - x'||^2 / (2 sigma^2)).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "as_f64", "linear_cka", "linear_cka_debiased", "gram_linear", "gram_rbf", "hsic_biased",
    "hsic_unbiased", "kernel_hsic", "kernel_cka", "minibatch_cka", "median_sigma", "torch_gram_cka",
]


def as_f64(x) -> np.ndarray:
    """Any array-like or torch tensor (any float dtype, any device) as a float64 NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu")
        import torch
        x = x.to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x, y) -> float:
    """Biased linear CKA in feature space: x [n, d], y [n, e]."""
    xc, yc = _centre(as_f64(x)), _centre(as_f64(y))
    xy = np.linalg.norm(xc.T @ yc) ** 2
    return float(xy / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def gram_linear(x) -> np.ndarray:
    x = as_f64(x)
    return x @ x.T


def gram_rbf(x, sigma: float) -> np.ndarray:
    x = as_f64(x)
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.exp(-d2 / (2.0 * sigma * sigma))


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """Gretton et al. 2005: tr(K H L H) / (n-1)^2."""
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012 unbiased HSIC (needs n > 3)."""
    n = k.shape[0]
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 samples, got {n}")
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    t1 = np.sum(kt * lt)
    t2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((t1 + t2 - t3) / (n * (n - 3)))


def linear_cka_debiased(x, y) -> float:
    """Debiased linear CKA (Kornblith et al. 2019): unbiased HSIC of the linear Grams."""
    kx, ky = gram_linear(_centre(as_f64(x))), gram_linear(_centre(as_f64(y)))
    return float(hsic_unbiased(kx, ky) / np.sqrt(hsic_unbiased(kx, kx) * hsic_unbiased(ky, ky)))


def median_sigma(x, pilot: int = 1024, seed: int = 0) -> float:
    """Median heuristic: the median Euclidean distance between distinct points of a pilot subsample
    (rows chosen without replacement by numpy's default_rng(seed) when n > pilot)."""
    x = as_f64(x)
    n = x.shape[0]
    if n > pilot:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=pilot, replace=False))
        x = x[idx]
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    iu = np.triu_indices(x.shape[0], k=1)
    return float(np.sqrt(np.median(d2[iu])))


def _gram(x, kernel: str, sigma):
    if kernel == "linear":
        return gram_linear(_centre(as_f64(x)))
    if kernel == "rbf":
        return gram_rbf(x, median_sigma(x) if sigma is None else float(sigma))
    raise ValueError(f"kernel: expected 'linear' or 'rbf', got {kernel!r}")


def kernel_hsic(x, y, kernel: str = "linear", sigma=None, unbiased: bool = False) -> float:
    """Dense-Gram HSIC; sigma may be a float, a pair (sigma_x, sigma_y), or None (median heuristic)."""
    sx, sy = sigma if isinstance(sigma, (tuple, list)) else (sigma, sigma)
    k, l = _gram(x, kernel, sx), _gram(y, kernel, sy)
    return hsic_unbiased(k, l) if unbiased else hsic_biased(k, l)


def kernel_cka(x, y, kernel: str = "linear", sigma=None, unbiased: bool = False) -> float:
    sx, sy = sigma if isinstance(sigma, (tuple, list)) else (sigma, sigma)
    k, l = _gram(x, kernel, sx), _gram(y, kernel, sy)
    f = hsic_unbiased if unbiased else hsic_biased
    return float(f(k, l) / np.sqrt(f(k, k) * f(l, l)))


def minibatch_cka(xs_batches, ys_batches) -> np.ndarray:
    """Nguyen et al. 2021: xs_batches[t][i] = student layer i's features [b_t, d_i] in minibatch t
    (likewise ys_batches for teacher layers). Per batch the linear Grams of the centred features, the
    unbiased HSIC of every pair summed over batches; CKA[i, j] = sum HSIC_ij / sqrt(sum HSIC_ii sum HSIC_jj)."""
    nx, ny = len(xs_batches[0]), len(ys_batches[0])
    hxy, hxx, hyy = np.zeros((nx, ny)), np.zeros(nx), np.zeros(ny)
    for xs, ys in zip(xs_batches, ys_batches):
        kx = [gram_linear(_centre(as_f64(x))) for x in xs]
        ky = [gram_linear(_centre(as_f64(y))) for y in ys]
        for i in range(nx):
            hxx[i] += hsic_unbiased(kx[i], kx[i])
            for j in range(ny):
                hxy[i, j] += hsic_unbiased(kx[i], ky[j])
        for j in range(ny):
            hyy[j] += hsic_unbiased(ky[j], ky[j])
    with np.errstate(invalid="ignore"):
        return hxy / np.sqrt(hxx[:, None] * hyy[None, :])


def torch_gram_cka(x, y, unbiased: bool = False):
    """The plain-PyTorch baseline a user would write: n x n linear Grams of the centred features in the
    input's dtype and device, centred with H, HSIC as the Frobenius inner product. Memory O(n^2)."""
    import torch
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    k, l = x @ x.T, y @ y.T
    n = k.shape[0]
    if unbiased:
        def hs(a, b):
            a = a - torch.diag(torch.diagonal(a))
            b = b - torch.diag(torch.diagonal(b))
            t1 = (a * b).sum()
            t2 = a.sum() * b.sum() / ((n - 1) * (n - 2))
            t3 = 2.0 / (n - 2) * (a.sum(1) * b.sum(1)).sum()
            return (t1 + t2 - t3) / (n * (n - 3))
    else:
        def hs(a, b):
            a = a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()
            return (a * b).sum() / (n - 1) ** 2
    return hs(k, l) / torch.sqrt(hs(k, k) * hs(l, l))
