"""distill_loss_topk (sparse teacher: top-k log-probs + indices, tail bucket) vs the float64 reference."""
import pytest
import torch

from sdft_kernels import distill_loss, distill_loss_topk
from sdft_kernels.reference.distill import distill_loss_ref, distill_loss_topk_ref

DIVS = ["forward_kl", "reverse_kl", "jsd"]


def _inputs(n, v, k, dtype=torch.float32, seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    lp, idx = torch.log_softmax(t / temperature, -1).topk(k, dim=-1)
    return s, t.to(dtype), lp.float(), idx  # the kernel takes float32 log-probs: compare on those


def _check(s, lp, idx, atol=2e-6, **kw):
    x = s.detach().requires_grad_()
    out = distill_loss_topk(x, lp, idx, **kw)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad((out.double() * w).sum(), x)
    x64 = s.detach().double().requires_grad_()
    ref = distill_loss_topk_ref(x64, lp.double(), idx, **kw)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x64)
    assert torch.allclose(out.double(), ref, atol=atol, rtol=1e-5), (out, ref)
    assert torch.allclose(g.double(), g_ref, atol=atol, rtol=1e-4), float((g.double() - g_ref).abs().max())
    return out, g


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("k", [1, 5, 63])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(divergence, k, reduction):
    s, _, lp, idx = _inputs(13, 64, k)
    labels = torch.arange(13) % 64
    labels[3] = -100
    _check(s, lp, idx, divergence=divergence, reduction=reduction, temperature=1.5, beta=0.3, labels=labels)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equals_v_is_dense(divergence, temperature):
    s, t, _, _ = _inputs(9, 40, 40)
    lp, idx = torch.log_softmax(t.double() / temperature, -1).topk(40, dim=-1)
    sparse = distill_loss_topk(s, lp, idx, divergence=divergence, temperature=temperature, reduction="none")
    dense = distill_loss(s, t, divergence=divergence, temperature=temperature, reduction="none")
    assert torch.allclose(sparse, dense, atol=2e-6, rtol=1e-5)
    xs, xd = s.clone().requires_grad_(), s.clone().requires_grad_()
    distill_loss_topk(xs, lp, idx, divergence=divergence, temperature=temperature).backward()
    distill_loss(xd, t, divergence=divergence, temperature=temperature).backward()
    assert torch.allclose(xs.grad, xd.grad, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVS)
def test_gradcheck_float64(divergence):
    s, _, lp, idx = _inputs(3, 6, 2, torch.float64)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: distill_loss_topk(x, lp, idx, divergence=divergence, beta=0.4,
                                                                temperature=1.3, reduction="none"), (s,))


def test_odd_shapes_and_leading_dims():
    s, _, lp, idx = _inputs(97, 7, 3)
    _check(s.reshape(97, 1, 7), lp.reshape(97, 1, 3), idx.reshape(97, 1, 3))
    s, _, lp, idx = _inputs(1, 1, 1)
    out, g = _check(s, lp, idx)
    assert float(out) == 0.0
    s, _, lp, idx = _inputs(3, 32001, 20)
    _check(s, lp, idx, divergence="jsd")


def test_bf16_and_all_ignored():
    s, _, lp, idx = _inputs(8, 300, 10, torch.bfloat16)
    x = s.clone().requires_grad_()
    out = distill_loss_topk(x, lp, idx, reduction="sum")
    (g,) = torch.autograd.grad(out, x)
    x64 = s.double().requires_grad_()
    ref = distill_loss_topk_ref(x64, lp, idx, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, x64)
    assert abs(float(out) - float(ref)) < 1e-4 * abs(float(ref)) + 1e-5
    assert float((g.double() - g_ref).abs().max()) < 1e-2 * float(g_ref.abs().max())
    x = s.clone().requires_grad_()
    out = distill_loss_topk(x, lp, idx, mask=torch.zeros(8, dtype=torch.bool))
    out.backward()
    assert float(out) == 0.0 and not bool(x.grad.any())


def test_bad_inputs():
    s, _, lp, idx = _inputs(4, 20, 5)
    for fn, match in [
        (lambda: distill_loss_topk(s, lp[:, :4], idx), "teacher_topk_indices"),
        (lambda: distill_loss_topk(s, lp, idx.float()), "teacher_topk_indices"),
        (lambda: distill_loss_topk(s[:3], lp, idx), "teacher_topk_logprobs"),
        (lambda: distill_loss_topk(s, lp, torch.where(idx == idx[0, 0], 20, idx)), "teacher_topk_indices"),
        (lambda: distill_loss_topk(s, lp, torch.cat([idx[:, :1], idx[:, :4]], 1)), "teacher_topk_indices"),
        (lambda: distill_loss_topk(s, lp.masked_fill(idx == idx[1, 1], float("nan")), idx), "teacher_topk_logprobs"),
        (lambda: distill_loss_topk(s, lp, idx, beta=-0.1, divergence="jsd"), "beta"),
        (lambda: distill_loss_topk(s, lp, idx, temperature=0), "temperature"),
    ]:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            fn()


def test_opcheck():
    s, _, lp, idx = _inputs(5, 30, 4)
    valid = torch.tensor([True, True, False, True, True])
    for div in (0, 1, 2):
        torch.library.opcheck(torch.ops.sdft_kernels.distill_topk.default,
                              (s.requires_grad_(), lp.float(), idx, valid, div, 0.5, 1.0, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("divergence", DIVS)
def test_cuda_matches_reference(dtype, divergence):
    for n, v, k in ((97, 7, 3), (17, 32001, 50), (5, 40, 40)):
        s, _, lp, idx = _inputs(n, v, k, dtype)
        x = s.cuda().requires_grad_()
        out = distill_loss_topk(x, lp.cuda(), idx.cuda(), divergence=divergence, temperature=1.2, reduction="sum")
        (g,) = torch.autograd.grad(out, x)
        x64 = s.double().requires_grad_()
        ref = distill_loss_topk_ref(x64, lp.double(), idx, divergence=divergence, temperature=1.2, reduction="sum")
        (g_ref,) = torch.autograd.grad(ref, x64)
        tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}.get(dtype, 1e-5)
        assert abs(float(out) - float(ref)) <= tol * max(1.0, abs(float(ref)))
        assert float((g.double().cpu() - g_ref).abs().max()) <= tol


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("gap", [50.0, 120.0, 300.0])
def test_student_tail_far_below_its_max(device, divergence, gap):
    # The student's unlisted entries lie `gap` nats below its listed ones while the teacher leaves 1e-4
    # of its mass in the tail: past ~90 nats their exps underflow relative to the row max, and a tail
    # summed that way made forward KL inf (true value ~1e-4 * gap) and zeroed the tail's gradient.
    n, v, k = 3, 70, 4
    s = torch.full((n, v), -gap)
    s[:, :k] = torch.tensor([0.0, -1.0, 0.5, -0.25])
    s[1, k:] -= torch.linspace(0, 3, v - k)  # an uneven tail
    idx = torch.arange(k).repeat(n, 1)
    lp = torch.full((n, k), (1 - 1e-4) / k).log()
    x = s.to(device).requires_grad_()
    out = distill_loss_topk(x, lp.to(device), idx.to(device), divergence=divergence, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), x)
    x64 = s.double().requires_grad_()
    ref = distill_loss_topk_ref(x64, lp.double(), idx, divergence=divergence, reduction="none")
    (g_ref,) = torch.autograd.grad(ref.sum(), x64)
    assert torch.isfinite(out).all(), out
    assert torch.allclose(out.double().cpu(), ref, rtol=1e-5, atol=1e-7), (out, ref)
    assert torch.allclose(g.double().cpu(), g_ref, rtol=1e-4, atol=1e-9), float((g.double().cpu() - g_ref).abs().max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_empty_student_tail_gets_zero_gradient(device, divergence):
    # every unlisted student logit -inf (a masked vocabulary): the tail is empty, its gradient 0 (the CUDA
    # kernel computed 0 * exp(-inf - -inf) = NaN there, behind a finite loss)
    s = torch.randn(3, 8)
    s[:, 4:] = float("-inf")
    idx = torch.arange(4).repeat(3, 1)
    lp = torch.full((3, 4), 0.25).log()
    x = s.to(device).requires_grad_()
    out = distill_loss_topk(x, lp.to(device), idx.to(device), divergence=divergence)
    (g,) = torch.autograd.grad(out, x)
    assert torch.isfinite(out) and bool((g[:, 4:] == 0).all()) and bool(torch.isfinite(g).all())
    x64 = s[:, :4].double().requires_grad_()  # the listed entries hold all of both distributions
    (g_ref,) = torch.autograd.grad(distill_loss_ref(x64, lp.double(), divergence=divergence), x64)
    assert torch.allclose(g[:, :4].double().cpu(), g_ref, atol=1e-6)


@pytest.mark.cuda
def test_cuda_bad_index_reported():
    s, _, lp, idx = _inputs(4, 20, 5)
    idx[2, 1] = idx[2, 0]
    with pytest.raises(ValueError, match="row 2"):
        distill_loss_topk(s.cuda(), lp.cuda(), idx.cuda())


def test_listed_probabilities_above_one_are_refused():
    # the tail is clamped to 0 there: the value is no divergence and the kernel's gradient not its derivative
    lp = torch.log(torch.tensor([[0.6, 0.6], [0.7, 0.2]], dtype=torch.float64))
    idx = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(RuntimeError, match="teacher_topk_logprobs: row 0 has probabilities summing to more than 1"):
        distill_loss_topk(torch.randn(2, 5, dtype=torch.float64), lp, idx)
    full = torch.randn(3, 6).log_softmax(-1)  # k = V of a real distribution: rounding above 1 is fine
    lpk, ik = full.topk(6, dim=-1)
    distill_loss_topk(torch.randn(3, 6), lpk, ik)


@pytest.mark.cuda
def test_cuda_listed_probabilities_above_one_are_refused():
    lp = torch.log(torch.tensor([[0.3, 0.2], [0.7, 0.6]]))
    with pytest.raises(ValueError, match="row 1 is invalid"):
        distill_loss_topk(torch.randn(2, 5).cuda(), lp.cuda(), torch.tensor([[0, 1], [2, 3]]).cuda())
