"""distill_loss (dense teacher) against the float64 pure-PyTorch reference."""
import numpy as np
import pytest
import torch

import sdft_kernels
from sdft_kernels import DistillationLoss, distill_loss, distill_loss_topk, fused_linear_distill_loss
from sdft_kernels.reference.distill import distill_loss_ref, distill_loss_topk_ref
from sdft_kernels.ops.distill import DIVERGENCES

DIVS = ["forward_kl", "reverse_kl", "jsd"]


def _close(name, got, want, atol, rtol=0.0):
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bool(bad.any()), (f"{name}: {int(bad.sum())} of {got.numel()} differ, max abs err "
                                 f"{float(err.max()):.3e} at {tuple(int(i) for i in (bad.nonzero()[0]))}")


def _inputs(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


def _check(s, t, atol=2e-6, grad_atol=1e-6, **kw):
    """Value and gradient of distill_loss on (s, t) vs the float64 reference on the same values."""
    s = s.detach().requires_grad_()
    out = distill_loss(s, t, **kw)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad((out.double() * w).sum(), s)
    s64 = s.detach().double().requires_grad_()
    ref = distill_loss_ref(s64, t.double(), **kw)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), s64)
    _close("loss", out, ref, atol, rtol=1e-5)
    _close("grad", g, g_ref, grad_atol, rtol=1e-4)
    assert g.dtype == s.dtype and out.dtype in (torch.float32, torch.float64)
    return out, g


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_matches_reference(divergence, temperature, reduction):
    s, t = _inputs((3, 7, 101))
    labels = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = -100
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 5:] = False
    _check(s, t, divergence=divergence, temperature=temperature, reduction=reduction, labels=labels, mask=mask,
           beta=0.3, scale_by_t2=temperature != 1.0)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_betas_and_edges(beta):
    s, t = _inputs((9, 33))
    _check(s, t, divergence="jsd", beta=beta)
    # TRL convention at the ends: beta = 0 is forward KL, beta = 1 reverse KL.
    if beta in (0.0, 1.0):
        other = "forward_kl" if beta == 0.0 else "reverse_kl"
        assert torch.equal(distill_loss(s, t, divergence="jsd", beta=beta), distill_loss(s, t, divergence=other))


@pytest.mark.parametrize("divergence", DIVS)
def test_gradcheck_float64(divergence):
    s, t = _inputs((3, 5), torch.float64, scale=1.0)
    s.requires_grad_()
    f = lambda x: distill_loss(x, t, divergence=divergence, temperature=1.7, beta=0.4, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,v", [(1, 1), (1, 7), (97, 7), (97, 1), (5, 32001)])
@pytest.mark.parametrize("divergence", DIVS)
def test_odd_shapes(n, v, divergence):
    s, t = _inputs((n, v))
    out, g = _check(s, t, divergence=divergence)
    if v == 1:  # one class: both distributions are [1], no divergence, no gradient
        assert float(out) == 0.0 and not bool(g.any())


def test_non_contiguous():
    s, t = _inputs((40, 2 * 61))
    s_nc, t_nc = s[::2, ::2], t.t().contiguous().t()[::2, ::2]
    assert not s_nc.is_contiguous() and not t_nc.is_contiguous()
    for div in DIVS:
        _check(s_nc, t_nc, divergence=div)


@pytest.mark.parametrize("divergence", DIVS)
def test_neg_inf_entries_and_huge_logits(divergence):
    s, t = _inputs((6, 50))
    vocab_mask = torch.rand(6, 50, generator=torch.Generator().manual_seed(3)) < 0.3
    vocab_mask[:, 0] = False
    s = s.masked_fill(vocab_mask, float("-inf"))
    t = t.masked_fill(vocab_mask, float("-inf"))
    out, g = _check(s, t, divergence=divergence, reduction="none")
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(g).all())
    assert not bool(g[vocab_mask].any())
    big_s, big_t = torch.sign(_inputs((6, 50))[0]) * 1e4, _inputs((6, 50), seed=5)[0] * 1e4
    out, g = _check(big_s, big_t, divergence=divergence, atol=1e-2, grad_atol=1e-6)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(g).all())


CH = 4096  # csrc/cpu/distill_row.h: a CPU row is streamed in chunks of this many logits


def _chunked_rows(dtype=torch.float64):
    """Rows over several CPU chunks that exercise the online log-sum-exp: a first chunk of only -inf,
    a maximum in the last chunk (every chunk rescales the running sum), and a spread of 1e3."""
    V = 3 * CH + 5
    s, t = _inputs((4, V), torch.float64)
    s[0, :CH] = t[0, :CH] = float("-inf")
    ramp = torch.linspace(-30.0, 30.0, V, dtype=torch.float64)
    s[1] += ramp
    t[1] -= ramp
    s[2, -1], t[2, 7] = 1e3, 1e3
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_over_several_chunks(divergence, dtype):
    s, t = _chunked_rows(dtype)
    out, g = _check(s, t, divergence=divergence, reduction="none", atol=1e-5, grad_atol=1e-6)
    assert not bool(g[0, :CH].any())  # -inf logits get exactly zero gradient


def test_nan_in_a_chunk_of_only_neg_inf_is_reported():
    s, t = _chunked_rows(torch.float32)
    s[0, 11] = float("nan")  # inside the all -inf first chunk, before any finite entry
    _bad(lambda: distill_loss(s, t), "student_logits: row 0")
    s, t = _chunked_rows(torch.float32)
    t[3, 2 * CH + 1] = float("inf")
    _bad(lambda: distill_loss(s, t), "teacher_logits: row 3")


_ISA_SCRIPT = """
import sys, torch
from sdft_kernels import distill_loss, distill_loss_topk
s, t = torch.load(sys.argv[1])
out = {}
for div in ("forward_kl", "reverse_kl", "jsd"):
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = s.to(dt).requires_grad_()
        loss = distill_loss(x, t.to(dt), divergence=div, beta=0.3, temperature=1.5, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x)
        out[(div, str(dt))] = (loss.detach(), g)
        lp, idx = t.log_softmax(-1).topk(37, dim=-1)
        x = s.to(dt).requires_grad_()
        lp = lp if dt == torch.float64 else lp.float()
        loss = distill_loss_topk(x, lp, idx, divergence=div, beta=0.3, temperature=1.5, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x)
        out[("topk", div, str(dt))] = (loss.detach(), g)
torch.save(out, sys.argv[2])
"""


def test_cpu_isa_reports_the_variant_the_cap_picks():
    """_C.cpu_isa() (recorded by `sdft info` and the study) names the widest variant this CPU runs, as its
    /proc/cpuinfo flags say, capped by SDFT_CPU_ISA."""
    import os
    import platform
    import subprocess
    import sys
    flags = set()  # no x86 clones elsewhere: the baseline loops only
    if platform.machine() in ("x86_64", "AMD64"):
        if not os.path.exists("/proc/cpuinfo"):
            pytest.skip("no /proc/cpuinfo to read this CPU's flags from")
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    widest = "avx512" if avx512 else "avx2" if avx2 else "base"
    order = ["base", "avx2", "avx512"]
    for cap in ("", "base", "avx2", "avx512"):
        got = subprocess.run([sys.executable, "-c", "import sdft_kernels; print(sdft_kernels._C.cpu_isa())"],
                             check=True, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, SDFT_CPU_ISA=cap)).stdout.strip()
        assert got == (order[min(order.index(cap), order.index(widest))] if cap else widest), cap


def test_every_cpu_isa_variant_matches(tmp_path):
    """The row loops are compiled for the baseline ISA, AVX2 and AVX-512 and picked at run time;
    SDFT_CPU_ISA caps the choice, so each variant this CPU can run is checked against float64."""
    import os
    import subprocess
    import sys
    s, t = _inputs((6, CH + 37), torch.float64)
    s[1, ::5] = t[1, ::5] = float("-inf")
    # Confident rows (every other term underflows): the FMA in the AVX clones once made the max term's
    # exp 1 - 2^-24 and the row was rejected as "NaN or +inf"
    for r in (2, 3, 4):
        s[r, 7 * r] += 90.0
    t[4, 11] += 90.0
    torch.save((s, t), tmp_path / "in.pt")
    for isa in ("base", "avx2", "avx512"):
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / f"{isa}.pt")],
                       check=True, env=dict(os.environ, SDFT_CPU_ISA=isa), timeout=300)
        for key, (loss, g) in torch.load(tmp_path / f"{isa}.pt").items():
            div, dt = key[-2:]
            dtype = getattr(torch, dt.split(".")[1])
            x = s.to(dtype).double().requires_grad_()  # the reference sees the same rounded inputs
            if key[0] == "topk":
                lp, idx = t.log_softmax(-1).topk(37, dim=-1)
                lp = lp if dtype == torch.float64 else lp.float().double()
                ref = distill_loss_topk_ref(x, lp, idx, divergence=div, beta=0.3, temperature=1.5,
                                            reduction="none")
            else:
                ref = distill_loss_ref(x, t.to(dtype).double(), divergence=div, beta=0.3, temperature=1.5,
                                       reduction="none")
            (g_ref,) = torch.autograd.grad(ref.sum(), x)
            eps = 1e-7 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
            # float32 sums of V terms: the suite's usual 2e-6 / 1e-5; bf16 / fp16 a few of their epsilons
            _close(f"{isa} {key} loss", loss, ref, max(2e-6, 20 * eps), rtol=max(1e-5, 20 * eps))
            low = dtype in (torch.bfloat16, torch.float16)
            _close(f"{isa} {key} grad", g, g_ref, 10 * eps * float(g_ref.abs().max()) if low else 1e-6,
                   rtol=2 * eps if low else 1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_all_tokens_ignored(reduction):
    s, t = _inputs((4, 30))
    s.requires_grad_()
    labels = torch.full((4,), -100)
    out = distill_loss(s, t, labels=labels, reduction=reduction)
    out.sum().backward()
    assert not bool(torch.isnan(out).any()) and float(out.abs().sum()) == 0.0
    assert s.grad is not None and not bool(s.grad.any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVS)
def test_low_precision_error_bounded_by_pytorch(dtype, divergence):
    s, t = _inputs((64, 1000), dtype, scale=2.0)
    s64, t64 = s.double().requires_grad_(), t.double()
    ref = distill_loss_ref(s64, t64, divergence=divergence, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, s64)
    errs = {}
    for name, fn in (("ours", distill_loss), ("torch", distill_loss_ref)):
        x = s.detach().requires_grad_()
        out = fn(x, t, divergence=divergence, reduction="sum")
        (g,) = torch.autograd.grad(out, x)
        errs[name] = (abs(float(out) - float(ref)), float((g.double() - g_ref).abs().max()))
    # small multiple of plain PyTorch's error in the same dtype (+ the dtype's own rounding of the output)
    eps = torch.finfo(dtype).eps
    assert errs["ours"][0] <= 2 * errs["torch"][0] + 1e-4 * abs(float(ref)), errs
    assert errs["ours"][1] <= 2 * errs["torch"][1] + eps * float(g_ref.abs().max()), errs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_float16_gradient_survives_mean_under_loss_scaling(device):
    # GradScaler multiplies the loss by ~2^16 so that float16 gradients do not underflow. The kernel writes
    # the gradient in forward: with "mean"'s 1 / N folded in there, 90% of it underflowed (relative L2
    # error 9e-2) before the scale arrived. Now as accurate as PyTorch on float32-upcast logits (2e-4).
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(4096, 512, generator=g) * 2).half()
    t = (torch.randn(4096, 512, generator=g) * 2).half()
    m = torch.rand(4096, generator=g) > 0.1
    s64 = s.double().requires_grad_()
    (g_ref,) = torch.autograd.grad(distill_loss_ref(s64, t.double(), mask=m) * 65536, s64)
    errs = {}
    for name, fn, cast in (("ours", distill_loss, torch.float16), ("torch", distill_loss_ref, torch.float32)):
        x = s.to(device).requires_grad_()
        (g,) = torch.autograd.grad(fn(x.to(cast), t.to(device).to(cast), mask=m.to(device)) * 65536, x)
        errs[name] = float((g.double().cpu() - g_ref).norm() / g_ref.norm())
    assert errs["ours"] <= 1.5 * errs["torch"], errs


def test_teacher_gets_no_gradient_and_eval_mode():
    s, t = _inputs((5, 20))
    s.requires_grad_()
    t.requires_grad_()
    distill_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        assert torch.allclose(distill_loss(s, t), distill_loss_ref(s, t), atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_upstream_gradient_not_one(reduction):
    s, t = _inputs((5, 30))
    x = s.clone().requires_grad_()
    (distill_loss(x, t, reduction=reduction, divergence="reverse_kl") * 3.5).backward()
    x64 = s.double().requires_grad_()
    (distill_loss_ref(x64, t.double(), reduction=reduction, divergence="reverse_kl") * 3.5).backward()
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-6)


def test_retain_graph_refused():
    s, t = _inputs((4, 10))
    s.requires_grad_()
    loss = distill_loss(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def _bad(fn, match, exc=(ValueError, TypeError, RuntimeError)):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_name_the_argument():
    s, t = _inputs((4, 10))
    _bad(lambda: distill_loss(s, t[:, :9]), "teacher_logits")
    _bad(lambda: distill_loss(s, t.double()), "teacher_logits")
    _bad(lambda: distill_loss(s.long(), t), "student_logits")
    _bad(lambda: distill_loss(s, t, labels=torch.tensor([0, 1, 2, 10])), "labels")
    _bad(lambda: distill_loss(s, t, labels=torch.tensor([0, 1, 2])), "labels")
    pad = torch.tensor([True, True, True, False])  # labels under mask False are padding: not range-checked
    assert distill_loss(s, t, labels=torch.tensor([0, 1, 2, 10]), mask=pad) == distill_loss(s, t, mask=pad)
    _bad(lambda: distill_loss(s, t, labels=torch.tensor([0, 1, 10, 2]), mask=pad), "labels")  # this one counts
    _bad(lambda: distill_loss(s, t, mask=torch.ones(3, dtype=torch.bool)), "mask")
    _bad(lambda: distill_loss(s, t, beta=1.5, divergence="jsd"), "beta")
    _bad(lambda: distill_loss(s, t, beta=True, divergence="jsd"), "beta")  # a bool is no mixing weight
    assert distill_loss(s, t, temperature=np.float32(2.0)) == distill_loss(s, t, temperature=2.0)  # NumPy scalar
    _bad(lambda: distill_loss(s, t, temperature=0.0), "temperature")
    _bad(lambda: distill_loss(s, t, temperature=-1.0), "temperature")
    _bad(lambda: distill_loss(s, t, divergence="kl"), "divergence")
    _bad(lambda: distill_loss(s, t, reduction="avg"), "reduction")
    s_nan = s.clone()
    s_nan[2, 3] = float("nan")
    _bad(lambda: distill_loss(s_nan, t), "student_logits")
    t_inf = t.clone()
    t_inf[1, 0] = float("inf")
    _bad(lambda: distill_loss(s, t_inf), "teacher_logits")
    _bad(lambda: distill_loss(torch.full((2, 3), float("-inf")), torch.zeros(2, 3)), "student_logits")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("scale,offset,temperature", [(2.0, 1e4, 1.0), (2.0, 1e4, 0.01), (10.0, 0.0, 0.1)])
def test_float32_loss_keeps_precision_at_large_logits(device, scale, offset, temperature):
    # Log-probs must be (x / T - max) - log(sum): computing x / T - (max + log(sum)) shifts every term by an
    # ulp of |max / T| (relative loss errors of 5e-4 at offset 1e4 and 6e-3 at T = 0.1, against float64 on
    # the same float32 inputs). Both are ~1e-7 when the max is taken out first.
    g = torch.Generator().manual_seed(3)
    s = torch.randn(64, 1000, generator=g) * scale + offset
    t = torch.randn(64, 1000, generator=g) * scale + offset
    lp, idx = (t.double() / temperature).log_softmax(-1).topk(1000, dim=-1)
    for div in DIVERGENCES:
        kw = dict(divergence=div, temperature=temperature, beta=0.3)
        x, x64 = s.to(device).requires_grad_(), s.double().requires_grad_()
        got, want = distill_loss(x, t.to(device), **kw), distill_loss_ref(x64, t.double(), **kw)
        assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item()), (div, got, want)
        if div != "jsd":  # (JSD's gradient cancels in float32 where the two distributions barely overlap)
            (g,), (g_ref,) = torch.autograd.grad(got, x), torch.autograd.grad(want, x64)
            assert float((g.double().cpu() - g_ref).abs().max()) <= 1e-5 * float(g_ref.abs().max()), div
    got = distill_loss_topk(s.to(device), lp.float().to(device), idx.to(device), temperature=temperature).item()
    want = distill_loss_topk_ref(s.double(), lp.float().double(), idx, temperature=temperature).item()
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_float32_loss_keeps_precision_over_a_very_large_vocabulary(device):
    # A float32 running sum per vector lane over a whole row of V = 262144 lost 1.2e-5 of the loss (32k
    # terms per lane); float lanes per 4096-logit chunk with the chunk totals in float64 keep ~1e-7.
    # Top-k with k = V sums 10^5 buckets: the same holds there.
    g = torch.Generator().manual_seed(5)
    s, t = 3 * torch.randn(4, 262144, generator=g), 3 * torch.randn(4, 262144, generator=g)
    for div in DIVERGENCES:
        got = distill_loss(s.to(device), t.to(device), divergence=div, reduction="none").double().cpu()
        want = distill_loss(s.double(), t.double(), divergence=div, reduction="none")  # float64 kernel
        assert float(((got - want) / want).abs().max()) <= 2e-6, div
    s = 3 * torch.randn(2, 100_000, generator=g)
    lp, idx = (3 * torch.randn(2, 100_000, generator=g, dtype=torch.float64)).log_softmax(-1).topk(100_000, dim=-1)
    got = distill_loss_topk(s.to(device), lp.float().to(device), idx.to(device), reduction="none").double().cpu()
    want = distill_loss_topk(s.double(), lp, idx, reduction="none")
    assert float(((got - want) / want).abs().max()) <= 2e-6


def test_torch_func_and_forward_ad_are_refused_by_name_and_vmap_works():
    s, t = _inputs((3, 4, 10))
    _bad(lambda: torch.func.grad(lambda x: distill_loss(x, t[0]))(s[0]), "student_logits: torch.func")
    lp, idx = t[0].log_softmax(-1).topk(3, dim=-1)
    _bad(lambda: torch.func.grad(lambda x: distill_loss_topk(x, lp, idx))(s[0]), "student_logits: torch.func")
    w = torch.randn(10, 5)
    _bad(lambda: torch.func.grad(lambda h: fused_linear_distill_loss(h, w, h.detach(), w))(torch.randn(4, 5)),
         "student_hidden: torch.func")
    fw = torch.autograd.forward_ad
    with fw.dual_level():  # forward-mode AD got a silent zero tangent
        dual = fw.make_dual(s[0], torch.ones_like(s[0]))
        _bad(lambda: distill_loss(dual, t[0]), "student_logits: forward-mode AD")
        _bad(lambda: distill_loss_topk(dual, lp, idx), "student_logits: forward-mode AD")
        h = fw.make_dual(torch.randn(4, 5), torch.ones(4, 5))
        _bad(lambda: fused_linear_distill_loss(h, w, torch.randn(4, 5), w), "student_hidden: forward-mode AD")
    got = torch.vmap(lambda a, b: distill_loss(a, b, divergence="jsd"))(s, t)  # forward: per-sample fallback
    assert torch.allclose(got, torch.stack([distill_loss(a, b, divergence="jsd") for a, b in zip(s, t)]))


def test_opcheck():
    s, t = _inputs((6, 37))
    valid = torch.tensor([True, False, True, True, True, True])
    for div in (0, 1, 2):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            w = torch.rand(6, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            for rw in (None, w):
                args = (s.to(dtype).requires_grad_(), t.to(dtype), valid, rw, div, 0.3, 1.5, True)
                torch.library.opcheck(torch.ops.sdft_kernels.distill_dense.default, args,
                                      test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    s, t = _inputs((2, 5, 64))
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(4)) > 0.3

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y, m):
        return distill_loss(x, y, divergence="jsd", beta=0.3, temperature=2.0, mask=m)

    x = s.clone().requires_grad_()
    out = step(x, t, mask)
    out.backward()
    x_ref = s.clone().requires_grad_()
    ref = distill_loss(x_ref, t, divergence="jsd", beta=0.3, temperature=2.0, mask=mask)
    ref.backward()
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(x.grad, x_ref.grad, atol=1e-7)


def test_module_hf_shift_and_labels():
    s, t = _inputs((2, 6, 40))
    labels = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(6))
    labels[1, 4] = -100
    mod = DistillationLoss(divergence="reverse_kl", temperature=2.0, scale_by_t2=True, shift_labels=True)
    got = mod(s, t, labels=labels)
    want = distill_loss_ref(s[:, :-1].double(), t[:, :-1].double(), divergence="reverse_kl", temperature=2.0,
                            scale_by_t2=True, labels=labels[:, 1:])
    assert abs(float(got) - float(want)) < 1e-6
    assert "reverse_kl" in repr(mod)
    assert sdft_kernels.DistillationLoss is DistillationLoss


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("divergence", DIVS)
def test_cuda_matches_reference(dtype, divergence):
    for n, v in ((97, 7), (33, 32001), (1, 1)):
        s, t = _inputs((n, v), dtype)
        s, t = s.cuda(), t.cuda()
        labels = torch.randint(0, v, (n,), device="cuda")
        labels[::5] = -100
        x = s.clone().requires_grad_()
        out = distill_loss(x, t, divergence=divergence, temperature=1.3, labels=labels, reduction="sum")
        (g,) = torch.autograd.grad(out, x)
        x64 = s.double().cpu().requires_grad_()
        ref = distill_loss_ref(x64, t.double().cpu(), divergence=divergence, temperature=1.3,
                               labels=labels.cpu(), reduction="sum")
        (g_ref,) = torch.autograd.grad(ref, x64)
        eps = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
        _close("cuda loss", out.cpu(), ref, eps * max(1.0, abs(float(ref))))
        _close("cuda grad", g.cpu(), g_ref, eps)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("one_block", [False, True])
def test_cuda_cluster_and_one_block_kernels_match_reference(dtype, divergence, one_block, monkeypatch):
    """On sm_90+ rows of V >= 4096 are split over a cluster of 8 blocks that keep them in shared memory
    (SDFT_CUDA_NO_CLUSTER=1 selects one block per row): both kernels against float64, with ignored rows,
    -inf entries, row weights, in place, and a bad row reported as NaN."""
    if torch.cuda.get_device_capability()[0] < 9 and not one_block:
        pytest.skip("the cluster kernel needs sm_90+")
    if one_block:
        monkeypatch.setenv("SDFT_CUDA_NO_CLUSTER", "1")
    ops = torch.ops.sdft_kernels
    for n, v in ((5, 4096), (7, 32001), (3, 128256)):
        s, t = _inputs((n, v), dtype)
        s[1, ::7] = t[1, ::7] = float("-inf")
        s, t = s.cuda(), t.cuda()
        valid = torch.ones(n, dtype=torch.bool, device="cuda")
        valid[-1] = False
        w = torch.linspace(0.5, 2.0, n, device="cuda")
        loss, g = ops.distill_dense(s, t, valid, w, DIVERGENCES[divergence], 0.3, 1.5, True)
        buf = s.clone()
        assert torch.equal(ops.distill_dense_inplace_(buf, t, valid, w, DIVERGENCES[divergence], 0.3, 1.5), loss)
        assert torch.equal(buf, g)
        x64 = s.double().cpu().requires_grad_()
        rows = distill_loss_ref(x64, t.double().cpu(), divergence=divergence, beta=0.3, temperature=1.5,
                                mask=valid.cpu(), reduction="none")
        (g_ref,) = torch.autograd.grad((rows * w.double().cpu()).sum(), x64)
        eps = 1e-5 if dtype == torch.float32 else 2e-2
        rows = rows.detach()
        _close(f"loss V={v}", loss.cpu().double(), rows, eps * max(1.0, float(rows.abs().max())))
        _close(f"grad V={v}", g.cpu().double(), g_ref, eps)
        assert not g[-1].any() and loss[-1].item() == 0  # the ignored row
        s[2, 5] = float("nan")
        loss, g = ops.distill_dense(s, t, valid, w, DIVERGENCES[divergence], 0.3, 1.5, True)
        assert loss[2].isnan() and g[2].isnan().all() and torch.isfinite(loss[:2]).all()


@pytest.mark.cuda
def test_cuda_nan_reported():
    s, t = _inputs((4, 100))
    s[1, 7] = float("nan")
    with pytest.raises(ValueError, match="row 1"):
        distill_loss(s.cuda(), t.cuda())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_op_equals_out_of_place(divergence, dtype, device):
    """distill_dense_inplace_ (used by the fused linear path) writes exactly distill_dense's gradient
    over the student logits, over several chunks, with ignored rows and row weights."""
    s, t = _chunked_rows(torch.float64)
    s, t = s.to(device, dtype), t.to(device, dtype)
    valid = torch.tensor([True, True, False, True], device=device)
    w = torch.tensor([0.5, 1.0, 1.0, 2.0], device=device)
    ops = torch.ops.sdft_kernels
    loss, g = ops.distill_dense(s, t, valid, w, DIVERGENCES[divergence], 0.3, 1.5, True)
    buf = s.clone()
    loss2 = ops.distill_dense_inplace_(buf, t, valid, w, DIVERGENCES[divergence], 0.3, 1.5)
    assert torch.equal(loss, loss2) and torch.equal(buf, g)
    torch.library.opcheck(ops.distill_dense_inplace_.default, (s.clone(), t, valid, w, 0, 0.3, 1.5))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.distill_dense_inplace_(s.t().contiguous().t(), t, valid, w, 0, 0.3, 1.5)


def test_confident_rows_at_any_temperature():
    # Finite rows whose max dominates: 50-70% of such rows were rejected at T != 1 before (AVX clones)
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        s = torch.randn(64, 50, generator=g, dtype=torch.float64)
        s[torch.arange(64), torch.randint(0, 50, (64,), generator=g)] += 30.0 + 40 * torch.rand(64, generator=g,
                                                                                               dtype=torch.float64)
        t = torch.randn(64, 50, generator=g, dtype=torch.float64)
        for temperature in (0.7, 0.9, 1.5, 3.0):
            for div in ("forward_kl", "reverse_kl", "jsd"):
                out = distill_loss(s.to(dtype), t.to(dtype), divergence=div, temperature=temperature, reduction="none")
                ref = distill_loss_ref(s.to(dtype).double(), t.to(dtype).double(), divergence=div,
                                       temperature=temperature, reduction="none")
                _close(f"{dtype} T={temperature} {div}", out, ref, 2e-6, rtol=1e-5)
    s, t = torch.tensor([[20.2, 0.0]]), torch.zeros(1, 2)  # the first reported case
    ref = distill_loss_ref(s.double(), t.double(), temperature=0.7)
    assert abs(float(distill_loss(s, t, temperature=0.7)) - float(ref)) < 1e-5


def test_double_backward_is_refused():
    s, t = _inputs((4, 9))
    x = s.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):  # a Hessian from it would be silently zero
        torch.autograd.grad(distill_loss(x, t, reduction="sum"), x, create_graph=True)


def test_compile_dynamic_default_temperature():
    s, t = _inputs((3, 11), torch.float32)
    f = torch.compile(lambda a, b: distill_loss(a, b), fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (3, 5):
        a, b = torch.randn(n, 11), torch.randn(n, 11)
        torch.testing.assert_close(f(a, b), distill_loss(a, b))


def test_random_option_combinations_match_the_float64_reference():
    # A seeded sweep over what the grids above test one at a time, combined: leading shapes, V across the
    # 4096-logit chunk edge, every divergence / beta / temperature / reduction, masks and labels with
    # ignore_index together, -inf entries, strided (non-contiguous) logits, a random incoming gradient.
    import random
    rng = random.Random(0)
    compared = 0
    for case in range(300):
        lead = [rng.randint(1, 5) for _ in range(rng.randint(1, 2))]
        V = rng.choice([1, 2, 7, 100, 4095, 4097])
        kw = dict(divergence=rng.choice(sorted(DIVERGENCES)), beta=rng.choice([0.0, 0.3, 1.0]),
                  temperature=rng.choice([0.5, 1.0, 2.0]), scale_by_t2=rng.random() < 0.5,
                  reduction=rng.choice(["mean", "sum", "batchmean", "none"]))
        g = torch.Generator().manual_seed(case)
        scale = rng.choice([1.0, 5.0, 30.0])
        s = scale * torch.randn(*lead, V, generator=g, dtype=torch.float64)
        t = scale * torch.randn(*lead, V, generator=g, dtype=torch.float64)
        if V > 1 and rng.random() < 0.3:  # a masked vocabulary: -inf on both sides
            off = torch.rand(*lead, V, generator=g) < 0.2
            off[..., 0] = False
            s, t = s.masked_fill(off, float("-inf")), t.masked_fill(off, float("-inf"))
        if rng.random() < 0.4:
            kw["mask"] = torch.rand(*lead, generator=g) < 0.6
        if rng.random() < 0.4:
            labels = torch.randint(0, V, tuple(lead), generator=g)
            labels[torch.rand(*lead, generator=g) < 0.3] = -100
            kw["labels"] = labels
        # ours reads strided student rows (every other element of a leaf buffer), the reference a copy
        buf = torch.zeros(*lead, 2 * V, dtype=torch.float64)
        buf[..., ::2] = s
        buf.requires_grad_()
        b = s.clone().requires_grad_()
        got, want = distill_loss(buf[..., ::2], t, **kw), distill_loss_ref(b, t, **kw)
        w = torch.randn(want.shape, generator=g, dtype=torch.float64)
        (got * w).sum().backward()
        (want * w).sum().backward()
        if not (torch.isfinite(want).all() and torch.isfinite(b.grad).all()):
            continue  # the reference's autograd meets 0 * log 0 at -inf entries
        what = f"case {case}: {lead} V={V} {kw}"
        assert got.shape == want.shape and torch.all(buf.grad[..., 1::2] == 0), what
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * max(1.0, want.abs().max().item()), msg=what)
        torch.testing.assert_close(buf.grad[..., ::2], b.grad, rtol=1e-9,
                                   atol=1e-9 * max(1.0, b.grad.abs().max().item()), msg=what)
        compared += 1
    assert compared >= 200, compared  # the reference's NaN cases must not empty the sweep
