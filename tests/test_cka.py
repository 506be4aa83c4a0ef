"""Streaming linear CKA and minibatch CKA against the float64 NumPy references
(sdft_kernels.reference.cka), plus invariances, streaming == one-shot, stress inputs and bad inputs."""
import numpy as np
import pytest
import torch

from sdft_kernels import LinearCKA, MinibatchCKA
from sdft_kernels.reference import cka as R


def _acts(n, d, seed, dtype=torch.float64, offset=0.0, big=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if big:
        x[:, :3] *= big  # "massive activations": a few dimensions much larger than the rest
    return (x + offset).to(dtype)


def _related(x, e, seed, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], e, generator=g, dtype=torch.float64)
    return (x.double() @ w + noise * torch.randn(x.shape[0], e, generator=g, dtype=torch.float64)).to(x.dtype)


def _layers(n=120, widths=(12, 7, 9), tw=(8, 12, 5), seed=0, **kw):
    xs = [_acts(n, d, seed + i, **kw) for i, d in enumerate(widths)]
    ys = [_related(xs[i % len(xs)], e, seed + 10 + i) for i, e in enumerate(tw)]
    return xs, ys


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_all_pairs_matches_reference(debiased):
    xs, ys = _layers()
    m = LinearCKA("all", debiased=debiased).update(xs, ys)
    f = R.linear_cka_debiased if debiased else R.linear_cka
    ref = np.array([[f(x, y) for y in ys] for x in xs]).reshape(-1)
    np.testing.assert_allclose(m.compute().numpy(), ref, rtol=0, atol=1e-12)
    assert m.pairs == [(i, j) for i in range(3) for j in range(3)] and m.tokens == 120
    res = m.results()
    assert res[5] == {"student": 1, "teacher": 2, "cka": pytest.approx(ref[5], abs=1e-12), "tokens": 120}


def test_linear_explicit_pairs_and_fp32():
    xs, ys = _layers(dtype=torch.float32)
    pairs = [(2, 0), (0, 2), (1, 1)]
    got = LinearCKA(pairs).update(xs, ys).compute().numpy()
    ref = [R.linear_cka(xs[i], ys[j]) for i, j in pairs]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_self_cka_is_one(debiased):
    x = _acts(64, 10, 3)
    got = LinearCKA(debiased=debiased).update([x], [x.clone()]).compute()
    assert abs(got.item() - 1.0) < 1e-12


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_transform_and_isotropic_scale(debiased):
    xs, ys = _layers(widths=(10,), tw=(10,))
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    a = LinearCKA(debiased=debiased).update(xs, ys).compute()
    b = LinearCKA(debiased=debiased).update([xs[0] * 7.5], [ys[0] @ q]).compute()
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)
    mb_a = MinibatchCKA().update(xs, ys).compute()
    mb_b = MinibatchCKA().update([xs[0] @ q * 0.25], [ys[0]]).compute()
    np.testing.assert_allclose(mb_a.numpy(), mb_b.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_any_batch_split_equals_one_shot(debiased):
    xs, ys = _layers(n=150, offset=3.0)
    one = LinearCKA("all", debiased=debiased).update(xs, ys)
    rng = np.random.default_rng(0)
    for _ in range(3):
        cuts = np.sort(rng.choice(np.arange(1, 150), size=rng.integers(1, 8), replace=False))
        m = LinearCKA("all", debiased=debiased)
        for lo, hi in zip([0, *cuts], [*cuts, 150]):  # includes 1-token batches when cuts are adjacent
            m.update([x[lo:hi] for x in xs], [y[lo:hi] for y in ys])
        np.testing.assert_allclose(m.compute().numpy(), one.compute().numpy(), rtol=0, atol=1e-10)
    # merging two accumulators and a state_dict round trip are exact too
    a = LinearCKA("all", debiased=debiased).update([x[:40] for x in xs], [y[:40] for y in ys])
    b = LinearCKA("all", debiased=debiased).update([x[40:] for x in xs], [y[40:] for y in ys])
    c = LinearCKA("all", debiased=debiased).load_state_dict(a.state_dict()).merge(b)
    np.testing.assert_allclose(c.compute().numpy(), one.compute().numpy(), rtol=0, atol=1e-10)
    assert c.tokens == 150


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("pairs", ["diagonal", "all", [(1, 0), (0, 1), (2, 2), (1, 1), (0, 1)]])
def test_streamed_equal_width_layers_share_pooled_buffers_correctly(pairs, debiased):
    # Equal widths and equal batch sizes: every layer's shifted copy comes from one buffer pool, reused
    # within a batch (after a layer's last pair) and across batches; a buffer handed out while still in
    # use would corrupt a later pair.
    xs, ys = _layers(n=100, widths=(6, 6, 6), tw=(6, 6, 6), offset=5.0, dtype=torch.float32)
    one = LinearCKA(pairs, debiased=debiased).update(xs, ys)
    m = LinearCKA(pairs, debiased=debiased)
    for lo in range(0, 100, 25):
        m.update([x[lo:lo + 25] for x in xs], [y[lo:lo + 25] for y in ys])
    f = R.linear_cka_debiased if debiased else R.linear_cka
    ref = [f(xs[i].double(), ys[j].double()) for i, j in m.pairs]
    np.testing.assert_allclose(m.compute().numpy(), ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(m.compute().numpy(), one.compute().numpy(), rtol=0, atol=2e-6)
    if pairs == "diagonal":  # one student and one teacher layer shifted at a time
        assert sum(len(b) for b in m._pool.values()) == 2


@pytest.mark.parametrize("debiased", [False, True])
def test_stress_large_offset_and_massive_dims_fp32(debiased):
    # mean offset 1e4, three dimensions 1000x larger, given as fp32: within 1e-4 of float64 (we ask 1e-6).
    x64 = _acts(2048, 64, 1, offset=1e4, big=1000.0)
    y64 = _related(x64 - 1e4, 48, 2, noise=300.0) + 1e4
    x32, y32 = x64.float(), y64.float()
    f = R.linear_cka_debiased if debiased else R.linear_cka
    ref = f(x32, y32)  # reference on the same (fp32-rounded) values, in float64
    m = LinearCKA(debiased=debiased)
    for lo in range(0, 2048, 512):
        m.update([x32[lo:lo + 512]], [y32[lo:lo + 512]])
    assert abs(m.compute().item() - ref) < 1e-6
    # bf16 input: read as it is (no float32 copy), so the result matches float64 on the bf16-rounded values
    xb, yb = x64.bfloat16(), y64.bfloat16()
    got = LinearCKA(debiased=debiased).update([xb], [yb]).compute().item()
    assert np.isfinite(got) and abs(got - f(xb, yb)) < 1e-4


def test_mask_and_drop_first_select_the_right_tokens():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 20, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(3, 20, 5, generator=g, dtype=torch.float64) + x[..., :1] for x in xs]
    mask = torch.rand(3, 20, generator=g) > 0.3
    keep = mask.clone()
    keep[:, :2] = False
    m = LinearCKA("all", drop_first=2).update(xs, ys, mask=mask)
    ref = [R.linear_cka(x[keep], y[keep]) for x in xs for y in ys]
    np.testing.assert_allclose(m.compute().numpy(), ref, rtol=0, atol=1e-12)
    assert m.tokens == int(keep.sum())
    # [T, d] inputs with a [T] mask
    m1 = LinearCKA().update([xs[0][0]], [ys[0][0]], mask=mask[0])
    assert abs(m1.compute().item() - R.linear_cka(xs[0][0][mask[0]], ys[0][0][mask[0]])) < 1e-12


def test_minibatch_all_pairs_matches_reference():
    xs, ys = _layers(n=200, offset=50.0)
    xsb = [[x[lo:lo + 50] for x in xs] for lo in range(0, 200, 50)]
    ysb = [[y[lo:lo + 50] for y in ys] for lo in range(0, 200, 50)]
    m = MinibatchCKA()
    for bx, by in zip(xsb, ysb):
        m.update(bx, by)
    np.testing.assert_allclose(m.compute().numpy(), R.minibatch_cka(xsb, ysb), rtol=0, atol=1e-12)
    assert m.compute().shape == (3, 3) and m.tokens == 200 and m.batches == 4
    # merge == sequential
    a, b = MinibatchCKA().update(xsb[0], ysb[0]), MinibatchCKA().update(xsb[1], ysb[1])
    seq = MinibatchCKA().update(xsb[0], ysb[0]).update(xsb[1], ysb[1])
    np.testing.assert_allclose(a.merge(b).compute().numpy(), seq.compute().numpy(), rtol=0, atol=1e-14)


def test_minibatch_fp32_stress_and_nan_for_constant_layer():
    x64 = _acts(256, 32, 4, offset=1e4, big=1000.0)
    y64 = _related(x64 - 1e4, 24, 5, noise=300.0) + 1e4
    m = MinibatchCKA().update([x64.float()], [y64.float()])
    ref = R.minibatch_cka([[x64.float()]], [[y64.float()]])
    assert abs(m.compute().item() - ref[0, 0]) < 1e-5
    const = torch.ones(256, 32)
    out = MinibatchCKA().update([const], [y64.float()]).compute()
    assert torch.isnan(out).all()  # self-HSIC of a constant layer is 0: CKA undefined, reported as NaN


def test_bad_inputs_raise_clear_errors():
    x, y = _acts(10, 4, 0), _acts(10, 3, 1)
    with pytest.raises(ValueError, match=r"ys\[0\]"):
        LinearCKA().update([x], [y[:9]])  # token counts differ
    with pytest.raises(ValueError, match="mask"):
        LinearCKA().update([x], [y], mask=torch.ones(9, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        LinearCKA().update([x], [y], mask=torch.ones(10))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        LinearCKA().update([bad], [y])
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False  # NaN only in a masked-out (padding) token is fine
    ok = LinearCKA().update([bad], [y], mask=keep).compute()
    assert abs(ok.item() - R.linear_cka(x[keep], y[keep])) < 1e-12
    with pytest.raises(TypeError, match="xs\\[0\\]"):
        LinearCKA().update([x.long()], [y])
    with pytest.raises(ValueError, match="diagonal"):
        LinearCKA().update([x, x], [y])
    with pytest.raises(ValueError, match="out of range"):
        LinearCKA([(0, 3)]).update([x], [y])
    with pytest.raises(ValueError, match="widths"):
        LinearCKA().update([x], [y]).update([x[:, :2]], [y])
    with pytest.raises(ValueError, match="drop_first"):
        LinearCKA(drop_first=-1)
    with pytest.raises(ValueError, match="more than 3"):
        MinibatchCKA().update([x[:3]], [y[:3]])
    with pytest.raises(RuntimeError, match="no tokens"):
        LinearCKA().compute()


def test_ucentre_op_matches_formula_and_opcheck():
    from sdft_kernels.ops.cka import ucentre_
    g = torch.randn(3, 9, 9, dtype=torch.float64)
    g = g + g.transpose(1, 2)
    u = ucentre_(g.clone())
    n = 9
    for k in range(3):
        kt = g[k] - torch.diag(torch.diagonal(g[k]))
        r = kt.sum(1)
        ref = kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + kt.sum() / ((n - 1) * (n - 2))
        ref.fill_diagonal_(0)
        torch.testing.assert_close(u[k], ref, rtol=0, atol=1e-12)
    torch.library.opcheck(torch.ops.sdft_kernels.cka_ucentre_.default, (g.clone(),))
    with pytest.raises(RuntimeError, match="contiguous"):
        ucentre_(g.transpose(1, 2))


def _strided_features(dtype, n=1001, d=31):
    g = torch.Generator().manual_seed(3)
    full = (torch.randn(n, d + 6, generator=g, dtype=torch.float64) * 3 + 50).to(dtype)
    return full[:, 2:2 + d]  # row stride d + 6: the ops read rows of unit column stride, any row stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_column_stats_and_shift_ops_match_float64(dtype):
    from sdft_kernels.ops.cka import column_stats, shift
    x = _strided_features(dtype)  # 1001 rows: unequal row parts across threads
    x64 = x.double()
    sums, amax = column_stats(x)
    torch.testing.assert_close(sums, x64.sum(0), rtol=1e-13, atol=0)
    assert amax.dim() == 0 and amax.item() == x64.abs().max().item()
    for wdt in (torch.float64, torch.float32) if dtype == torch.float64 else (torch.float32,):
        s = x64.mean(0).to(wdt)
        out = torch.full(x.shape, float("nan"), dtype=wdt)
        col = shift(x, s, out)
        assert torch.equal(out, (x64 - s.double()).to(wdt))  # subtracted, then rounded once
        torch.testing.assert_close(col, out.double().sum(0), rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.sdft_kernels.cka_column_stats.default, (x.contiguous(),))
    torch.library.opcheck(torch.ops.sdft_kernels.cka_shift.default, (x.contiguous(), s, out))


_ISA_SCRIPT = """
import sys, torch
from sdft_kernels.ops.cka import column_stats, shift
out = {}
for x in torch.load(sys.argv[1]):
    s = x.double().mean(0).float()
    u = torch.empty(x.shape)
    out[str(x.dtype)] = (*column_stats(x), shift(x, s, u), u)
torch.save(out, sys.argv[2])
"""


def test_column_ops_every_cpu_isa_variant_matches(tmp_path):
    """The column loops are compiled for the baseline ISA, AVX2 and AVX-512 (SDFT_CPU_ISA caps the choice):
    each variant this CPU runs gives the float64 sums and max and the once-rounded shift."""
    import os
    import subprocess
    import sys
    xs = [_strided_features(dt, n=600) for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]
    torch.save(xs, tmp_path / "in.pt")
    for isa in ("base", "avx2", "avx512"):
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / f"{isa}.pt")],
                       check=True, env=dict(os.environ, SDFT_CPU_ISA=isa), timeout=300)
        got = torch.load(tmp_path / f"{isa}.pt")
        for x in xs:
            sums, amax, col, u = got[str(x.dtype)]
            x64 = x.double()
            s = x64.mean(0).float().double()
            torch.testing.assert_close(sums, x64.sum(0), rtol=1e-13, atol=0)
            assert amax.item() == x64.abs().max().item()
            assert torch.equal(u, (x64 - s).float())
            torch.testing.assert_close(col, u.double().sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_equal_their_float32_widening_exactly(dtype):
    # bf16/fp16 layers are widened inside the column ops, not copied first: the state must be the one
    # that float32 copies of the same values give, bit for bit, for every estimator
    xs, ys = _layers(n=300, widths=(12, 260), tw=(8, 257), offset=30.0)
    half = ([x.to(dtype) for x in xs], [y.to(dtype) for y in ys])
    wide = ([x.float() for x in half[0]], [y.float() for y in half[1]])
    for make in (lambda: LinearCKA("all"), lambda: LinearCKA("all", debiased=True), MinibatchCKA):
        a, b = make().update(*half), make().update(*wide)
        assert torch.equal(a.compute(), b.compute())


def test_column_stats_and_shift_edge_cases_and_bad_inputs():
    from sdft_kernels.ops.cka import column_stats, shift
    sums, amax = column_stats(torch.empty(0, 4))
    assert torch.equal(sums, torch.zeros(4, dtype=torch.float64)) and amax.item() == 0
    x = torch.ones(600, 3)
    x[517, 1], x[3, 2] = float("nan"), -float("inf")
    sums, amax = column_stats(x)
    assert sums[0].item() == 600 and sums[1].isnan() and sums[2].item() == -float("inf")
    with pytest.raises(RuntimeError, match="x: expected a 2-d"):
        column_stats(torch.ones(3))
    with pytest.raises(RuntimeError, match="x: expected a float32"):
        column_stats(torch.ones(3, 2, dtype=torch.int32))
    x, s = torch.randn(8, 5), torch.zeros(5)
    with pytest.raises(RuntimeError, match="out: expected float32 or float64"):
        shift(x, s, torch.empty(8, 5, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out: expected a contiguous tensor of x's shape"):
        shift(x, s, torch.empty(8, 4))
    with pytest.raises(RuntimeError, match="shift: expected a contiguous Float vector of length 5"):
        shift(x, s.double(), torch.empty(8, 5))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_column_stats_and_shift_match_cpu(dtype):
    from sdft_kernels.ops.cka import column_stats, shift
    x = _strided_features(dtype)
    for a, b in zip(column_stats(x.cuda()), column_stats(x)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=0)
    s = x.double().mean(0).float()
    out_g, out_c = torch.empty(x.shape, device="cuda"), torch.empty(x.shape)
    torch.testing.assert_close(shift(x.cuda(), s.cuda(), out_g).cpu(), shift(x, s, out_c), rtol=1e-12, atol=1e-12)
    assert torch.equal(out_g.cpu(), out_c)
    sums, amax = column_stats(torch.empty(0, 5, device="cuda", dtype=dtype))
    assert torch.equal(sums.cpu(), torch.zeros(5, dtype=torch.float64)) and amax.item() == 0
    big = torch.randn(70000, 33, device="cuda").to(dtype)  # several row slabs and a column tail
    for a, b in zip(column_stats(big), column_stats(big.cpu())):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("debiased", [False, True])
def test_cuda_linear_and_minibatch_match_cpu(debiased):
    xs, ys = _layers(n=300, offset=100.0, dtype=torch.float32)
    cpu = LinearCKA("all", debiased=debiased).update(xs, ys).compute()
    gpu = LinearCKA("all", debiased=debiased).update([x.cuda() for x in xs], [y.cuda() for y in ys]).compute()
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), rtol=0, atol=1e-6)
    mc = MinibatchCKA().update(xs, ys).compute()
    mg = MinibatchCKA().update([x.cuda() for x in xs], [y.cuda() for y in ys]).compute()
    np.testing.assert_allclose(mg.numpy(), mc.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("debiased", [False, True])
def test_wide_layers_symmetric_half_gemm_path(debiased):
    # width >= 256 takes the upper-block-triangle self-moment path: batches merge the upper triangle
    # only, and whatever reads a whole accumulator (state_dict, merge, compute) mirrors it first
    x = _acts(90, 300, 7, offset=20.0)
    y = _related(x, 260, 8)
    xc = x.numpy() - x.numpy().mean(0)

    def fed(parts):
        m = LinearCKA(debiased=debiased)
        for lo, hi in parts:
            m.update([x[lo:hi]], [y[lo:hi]])
        return m
    m = fed(((0, 31), (31, 61), (61, 90)))
    np.testing.assert_allclose(m.state_dict()["mom"]["x0|x0"].numpy(), xc.T @ xc, rtol=1e-10, atol=1e-8)
    f = R.linear_cka_debiased if debiased else R.linear_cka
    assert abs(m.compute().item() - f(x, y)) < 1e-12
    np.testing.assert_allclose(m.mom["x0|x0"].numpy(), xc.T @ xc, rtol=1e-10, atol=1e-8)
    merged = fed(((0, 40),)).merge(fed(((40, 70), (70, 90))))
    np.testing.assert_allclose(merged.mom["x0|x0"].numpy(), xc.T @ xc, rtol=1e-10, atol=1e-8)
    assert abs(merged.compute().item() - f(x, y)) < 1e-12


def test_minibatch_large_batch_upper_gram_path_and_ucentre_upper():
    # b >= 256 takes the upper-block-triangle Gram path (the U-centring kernel mirrors it)
    xs, ys = _layers(n=300, widths=(6, 5), tw=(4,), offset=10.0)
    got = MinibatchCKA().update(xs, ys).compute().numpy()
    np.testing.assert_allclose(got, R.minibatch_cka([xs], [ys]), rtol=0, atol=1e-12)
    from sdft_kernels.ops.cka import ucentre_
    g = torch.randn(2, 7, 7, dtype=torch.float64)
    g = g + g.transpose(1, 2)
    torch.testing.assert_close(ucentre_(torch.triu(g) + 1e30 * torch.tril(torch.ones(7, 7), -1), upper=True),
                               ucentre_(g.clone()), rtol=0, atol=1e-12)


def test_float64_layer_paired_with_float32_layer():
    # one working dtype per batch (float32 unless every layer is float64); the mixed batch used to fail
    # in the GEMM after the self-moments were already merged, leaving the state corrupted
    x, y = _acts(300, 6, 0), _related(_acts(300, 6, 0), 5, 1)
    m = LinearCKA().update([x[:100]], [y[:100]])
    m.update([x[100:]], [y[100:].float()])
    assert abs(m.compute().item() - R.linear_cka(x, y)) < 1e-6
    mb = MinibatchCKA().update([x[:100]], [y[:100].float()]).compute()
    assert abs(mb.item() - R.minibatch_cka([[x[:100]]], [[y[:100]]])[0, 0]) < 1e-5


@pytest.mark.parametrize("cls", [LinearCKA, MinibatchCKA])
def test_state_dict_is_a_snapshot_and_loading_copies(cls):
    xs, ys = _layers(n=60, widths=(6, 6), tw=(5, 4))
    m = cls().update(xs, ys)
    snap, before = m.state_dict(), m.compute().clone()
    other = cls().load_state_dict(snap)
    m.update([x.flip(0) * 2 + 1 for x in xs], [y.roll(7, 0) for y in ys])  # in-place accumulators move on
    torch.testing.assert_close(cls().load_state_dict(snap).compute(), before, rtol=0, atol=0)
    other.update(xs, ys)  # a loaded object is independent of the one it came from
    torch.testing.assert_close(cls().load_state_dict(snap).compute(), before, rtol=0, atol=0)


def test_constant_features_give_nan_not_a_number():
    # the float32 mean of a constant column is not exact; its residue once made a tiny Gram and +-inf
    y = _acts(100, 3, 1).float()
    assert torch.isnan(MinibatchCKA().update([torch.full((100, 4), 0.1)], [y]).compute()).all()
    assert torch.isnan(LinearCKA().update([torch.full((100, 4), 0.1)], [y]).compute()).all()


def test_merge_checks_pairs_and_drop_first():
    xs, ys = _layers(n=40, widths=(6, 6), tw=(5, 4))
    diag = LinearCKA().update(xs, ys)
    with pytest.raises(ValueError, match="pairs"):
        LinearCKA([(1, 0)]).merge(diag)  # a fresh object keeps its own pairs
    with pytest.raises(ValueError, match="drop_first"):
        LinearCKA(drop_first=1).merge(diag)
    assert LinearCKA("diagonal").merge(diag).pairs == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="drop_first"):
        MinibatchCKA(drop_first=2).merge(MinibatchCKA().update(xs, ys))


def test_malformed_arguments_raise_clear_errors():
    x, y = _acts(10, 4, 0), _acts(10, 3, 1)
    for pairs in [(0, 0), [(0, 0, 1)], np.array([[0, 0]]), "rows"]:
        with pytest.raises(ValueError, match="pairs"):
            LinearCKA(pairs)
    assert LinearCKA([(np.int64(0), 0)]).update([x], [y]).pairs == [(0, 0)]
    with pytest.raises(ValueError, match="drop_first"):
        LinearCKA(drop_first=True)
    assert MinibatchCKA(drop_first=np.int64(1)).drop_first == 1
    with pytest.raises(ValueError, match="chunk"):
        MinibatchCKA(chunk=0)
    with pytest.raises(ValueError, match="feature"):
        LinearCKA().update([x[:, :0]], [y])


def test_float32_overflow_raises_before_any_state_changes():
    xs, ys = _layers(n=40, widths=(6,), tw=(5,))
    m = MinibatchCKA().update([xs[0].float()], [ys[0].float()])
    before = m.compute().clone()
    with pytest.raises(ValueError, match="overflow"):
        m.update([xs[0].float() * 1e12], [ys[0].float()])
    torch.testing.assert_close(m.compute(), before, rtol=0, atol=0)
    # LinearCKA merged the infinities of u^T u (~1e40 in float32) into its moments: NaN for good
    lin = LinearCKA(debiased=True).update([xs[0].float()], [ys[0].float()])
    before = lin.compute().clone()
    with pytest.raises(ValueError, match=r"xs\[0\]: .*overflow"):
        lin.update([xs[0].float() * 3e19], [ys[0].float()])
    torch.testing.assert_close(lin.compute(), before, rtol=0, atol=0)
    lin.update([xs[0].double() * 3e19], [ys[0].double()])  # float64 holds them
    assert bool(torch.isfinite(lin.compute()).all())
