"""Tiled long-sequence kernel HSIC/CKA (no n x n Gram) against the dense float64 references."""
import math

import numpy as np
import pytest
import torch

from sdft_kernels import kernel_cka, kernel_hsic
from sdft_kernels.ops.cka import kernel_hsic_stats
from sdft_kernels.reference import cka as R


def _pair(n=53, d=7, e=5, seed=0, dtype=torch.float64, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(d, e, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        n, e, generator=g, dtype=torch.float64)
    return (x + offset).to(dtype), (y + offset).to(dtype)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_tiled_equals_dense_for_every_tile_size(kernel, unbiased):
    x, y = _pair()
    ref_h = R.kernel_hsic(x, y, kernel, unbiased=unbiased)
    ref_c = R.kernel_cka(x, y, kernel, unbiased=unbiased)
    for tile in (1, 2, 5, 8, 16, 17, 52, 53, 64, 300):  # dividing, non-dividing, single tile, larger than n
        h = kernel_hsic(x, y, kernel, unbiased=unbiased, tile=tile)
        assert abs(h - ref_h) <= 1e-12 * max(1.0, abs(ref_h)), (tile, h, ref_h)
        c = kernel_cka(x, y, kernel, unbiased=unbiased, tile=tile)
        assert abs(c - ref_c) < 1e-12, (tile, c, ref_c)


@pytest.mark.parametrize("m1x,m1y", [(False, False), (True, False), (False, True)])
def test_stats_op_matches_dense_grams(m1x, m1y):
    # sums and row sums leave the diagonal out; minus_one forms the RBF Gram as K - 1
    x, y = _pair(n=37)
    sums, rows, diag = kernel_hsic_stats(x, y, "rbf", 0.1, 0.3, 10, None, None, m1x, m1y)
    k, l = R.gram_rbf(x, math.sqrt(5.0)) - m1x, R.gram_rbf(y, math.sqrt(1 / 0.6)) - m1y
    dk, dl = np.diag(k).copy(), np.diag(l).copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    np.testing.assert_allclose(sums.numpy(), [(k * l).sum(), (k * k).sum(), (l * l).sum()], rtol=1e-12)
    np.testing.assert_allclose(rows.numpy(), np.stack([k.sum(1), l.sum(1)]), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(diag.numpy(), np.stack([dk, dl]), rtol=1e-12)
    torch.library.opcheck(torch.ops.sdft_kernels.kernel_hsic_stats.default, (x, y, 1, 0.1, 0.3, 10, None, None,
                                                                             m1x, m1y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unbiased", [False, True])
def test_rbf_keeps_precision_at_extreme_bandwidths(dtype, unbiased):
    # Bandwidth 16x the median distance: kernel values 1 - ~2e-3, whose small differences are the HSIC
    # (float32 row partials of K lost them: 9% off). 0.1x: off-diagonal values ~1e-14 beside a diagonal
    # of 1 (subtracting the diagonal from sums that held it gave NaN). The reference: dense float64 Grams, as
    # K - 1 (expm1) at the large bandwidth (HSIC is shift invariant; exp's K itself is 4e-9 off there).
    def cka_ref(a, b, sigma, minus_one):
        grams = [R.gram_rbf(t, s) for t, s in zip((a, b), sigma)]
        if minus_one:
            grams = [np.expm1(np.log(k)) for k in grams]  # log(exp(-u)) = -u exactly enough here
        f = R.hsic_unbiased if unbiased else R.hsic_biased
        k, l = grams
        return f(k, l) / math.sqrt(f(k, k) * f(l, l))

    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 64, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(64, 32, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        400, 32, generator=g, dtype=torch.float64)
    xs, ys = x.to(dtype), y.to(dtype)
    for f in (16.0, 0.1):
        sigma = (f * R.median_sigma(xs.double()), f * R.median_sigma(ys.double()))
        want = cka_ref(xs.double(), ys.double(), sigma, minus_one=f > 1)
        got = kernel_cka(xs, ys, "rbf", sigma=sigma, unbiased=unbiased)
        assert abs(got - want) <= (1e-5 if dtype == torch.float32 else 1e-10) * abs(want), (f, got, want)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_stats_op_shift_equals_shifted_inputs(kernel):
    """The op's row shift (applied tile by tile on CPU) equals shifting the inputs first, for tiles that
    do and do not divide n; a shift of the wrong length is refused."""
    x, y = _pair(n=45)
    sx, sy = torch.linspace(-3, 3, x.shape[1], dtype=x.dtype), torch.linspace(1, 2, y.shape[1], dtype=y.dtype)
    for tile in (7, 45):
        got = kernel_hsic_stats(x, y, kernel, 0.1, 0.3, tile, sx, sy)
        want = kernel_hsic_stats(x - sx, y - sy, kernel, 0.1, 0.3, tile)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.sdft_kernels.kernel_hsic_stats.default, (x, y, 1, 0.1, 0.3, 10, sx, sy))
    with pytest.raises(RuntimeError, match="shift_y"):
        kernel_hsic_stats(x, y, kernel, 0.1, 0.3, 10, sx, sy[:-1])


def test_given_sigma_pair_and_median_heuristic():
    x, y = _pair(n=40)
    assert abs(kernel_cka(x, y, "rbf", sigma=(1.5, 0.7)) - R.kernel_cka(x, y, "rbf", sigma=(1.5, 0.7))) < 1e-12
    big_x, big_y = _pair(n=1500, d=4, e=3, seed=2)  # > 1024 tokens: the pilot subsample is used
    from sdft_kernels.cka import _median_sigma
    assert abs(_median_sigma(big_x) - R.median_sigma(big_x)) < 1e-12


def test_self_cka_invariances_and_mask():
    x, y = _pair(n=60)
    assert abs(kernel_cka(x, x.clone(), "rbf", tile=16) - 1.0) < 1e-12
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for kernel in ("linear", "rbf"):  # median-heuristic RBF is scale invariant too
        a = kernel_cka(x, y, kernel, tile=16)
        b = kernel_cka(3.0 * x, y @ q, kernel, tile=16)
        assert abs(a - b) < 1e-12
    mask = torch.rand(60, generator=torch.Generator().manual_seed(3)) > 0.4
    got = kernel_cka(x, y, "linear", unbiased=True, mask=mask, tile=9)
    assert abs(got - R.kernel_cka(x[mask], y[mask], "linear", unbiased=True)) < 1e-12


def test_fp32_large_offset_close_to_float64():
    x, y = _pair(n=300, d=16, e=12, offset=1e4)
    x[:, :2] *= 1000
    xf, yf = x.float(), y.float()
    for kernel in ("linear", "rbf"):
        ref = R.kernel_cka(xf, yf, kernel)
        assert abs(kernel_cka(xf, yf, kernel, tile=64) - ref) < 1e-5


def test_bad_inputs():
    x, y = _pair(n=20)
    with pytest.raises(ValueError, match="tokens"):
        kernel_hsic(x, y[:19])
    with pytest.raises(ValueError, match="kernel"):
        kernel_hsic(x, y, kernel="poly")
    with pytest.raises(ValueError, match="mask"):
        kernel_hsic(x, y, mask=torch.ones(19, dtype=torch.bool))
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernel_cka(bad, y)
    with pytest.raises(ValueError, match="more than 3"):
        kernel_hsic(x[:3], y[:3], unbiased=True)
    with pytest.raises(ValueError, match="sigma"):
        kernel_hsic(x, y, "rbf", sigma=0.0)
    with pytest.raises(ValueError, match="tile"):
        kernel_hsic(x, y, tile=0)
    for sigma in [(1.0,), (1.0, 2.0, 3.0), float("inf"), 1e200]:
        with pytest.raises(ValueError, match="sigma"):
            kernel_hsic(x, y, "rbf", sigma=sigma)
    with pytest.raises(ValueError, match=r"^x: .*NaN"):  # named as the argument, not as a layer list
        kernel_hsic(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="overflow"):  # float32 dot products past 3.4e38
        kernel_hsic(x.float() * 1e20, y.float())
    # ... while their squares (1e48 at 1e12) are summed in float64: no overflow, and CKA is scale invariant
    assert abs(kernel_cka(x.float() * 1e12, y.float()) - kernel_cka(x, y)) < 1e-6
    # a constant feature set centres exactly: zero self-HSIC, CKA undefined (NaN), not a finite number
    for unbiased in (False, True):
        assert math.isnan(kernel_cka(torch.full((300, 4), 0.1), torch.randn(300, 3), unbiased=unbiased))
        # the RBF Gram of constant features is K - 1 = 0 exactly (unbiased gave 0.05 in float32)
        c = torch.full((1000, 4), 0.1)
        assert math.isnan(kernel_cka(c, torch.randn(1000, 3), "rbf", sigma=1.0, unbiased=unbiased))
    with pytest.raises(ValueError, match="sigma"):  # 1 / (2 sigma^2) overflows: ValueError, not ZeroDivision
        kernel_hsic(x, y, "rbf", sigma=1e-200)
    with pytest.raises(ValueError, match="more than 1 tokens, got 0"):  # not "zero median distance"
        kernel_hsic(x, y, "rbf", mask=torch.zeros(x.shape[0], dtype=torch.bool))
    w = torch.randn(x.shape[1], 3, dtype=x.dtype, requires_grad=True)  # activations with autograd history
    assert abs(kernel_cka(x @ w, y, "rbf") - kernel_cka((x @ w).detach(), y, "rbf")) == 0
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        kernel_hsic(x[None], y)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cuda_tiled_matches_cpu(kernel):
    x, y = _pair(n=1000, d=70, e=33, dtype=torch.float32)
    s_c, r_c, d_c = kernel_hsic_stats(x, y, kernel, 0.01, 0.02, 128)
    for tile in (128, 333, 1000, 4096):  # tiles that do and do not divide n, one tile, one larger than n
        s_g, r_g, d_g = kernel_hsic_stats(x.cuda(), y.cuda(), kernel, 0.01, 0.02, tile)
        torch.testing.assert_close(s_g.cpu(), s_c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_g.cpu(), r_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_g.cpu(), d_c, rtol=1e-5, atol=1e-5)
    for unbiased in (False, True):
        ref = R.kernel_cka(x, y, kernel, unbiased=unbiased)
        assert abs(kernel_cka(x.cuda(), y.cuda(), kernel, unbiased=unbiased) - ref) < 1e-5
    sx, sy = x.mean(0), y.mean(0)  # the op's row shifts, subtracted tile by tile on both devices
    got = kernel_hsic_stats(x.cuda(), y.cuda(), kernel, 0.01, 0.02, 128, sx.cuda(), sy.cuda())
    for g, w in zip(got, kernel_hsic_stats(x, y, kernel, 0.01, 0.02, 128, sx, sy)):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cuda_tiled_float64_keeps_float64_precision(kernel):
    # float64 tiles must be formed in float64 on CUDA as on CPU (a float32 dot product would agree only to
    # ~1e-7 relative, and RBF distances of near points cancel badly in float32).
    x, y = _pair(n=300, d=70, e=33, dtype=torch.float64)
    for c, g in zip(kernel_hsic_stats(x, y, kernel, 0.01, 0.02, 128),
                    kernel_hsic_stats(x.cuda(), y.cuda(), kernel, 0.01, 0.02, 128)):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-11, atol=1e-10)
