"""The CUDA-only Python branches, run on fake CUDA tensors: shapes, dtypes and the ops called; no data.

Without a GPU the CUDA kernels are only built, and the Python code that branches on CUDA (the fused
linear loss accumulating its weight gradient with addmm(out_dtype=float32), its larger chunk budget)
would first run in a GPU session. FakeTensorMode sends the custom ops to their register_fake functions,
so this checks the branches and the fakes' CUDA outputs, not the kernels (the tests marked cuda do).
Forward only: autograd's engine needs a real device to run backward. The fused loss computes its
gradients in the forward pass, so the accumulation is covered. Needs a CUDA build of torch (the CI's
second leg, .ci/cuda_build.sh): the CPU wheel aborts making autograd metadata for CUDA tensors.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import sdft_kernels as sk
from sdft_kernels.ops import fused_linear as FL

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")


class _Ops(TorchDispatchMode):
    """Records every aten / custom op that runs under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def _fused_inputs(device, dtype, n=40, hs=16, ht=24, v=100):
    g = torch.Generator().manual_seed(0)
    make = lambda *s, grad=False: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(grad)  # noqa: E731
    return (make(n, hs, grad=True), make(v, hs, grad=True), make(n, ht), make(v, ht)), make(v, grad=True)


# Where tracing addmm(out_dtype) works (torch >= 2.13) a traced weight-gradient step is that one GEMM
# (no [V, H] product in bf16, no add_); before, tracing must take the plain product and add instead.
_ACCUMULATE = ([torch.ops.aten.addmm.dtype_out] if FL._ADDMM_OUT_DTYPE_TRACES else
               [torch.ops.aten.mm.default, torch.ops.aten.add_.Tensor])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_accumulates_in_float32_through_addmm_out_dtype(dtype):
    assert FL._ADDMM_OUT_DTYPE, "a CUDA build of torch >= 2.8 has addmm.dtype_out"
    with FakeTensorMode():
        acc = torch.zeros(100, 16, device="cuda", dtype=torch.float32)
        a = torch.randn(100, 40, device="cuda", dtype=dtype)
        b = torch.randn(40, 16, device="cuda", dtype=dtype)
        with _Ops() as rec:
            FL._add_product_fp32_(acc, a, b)
    assert rec.seen == _ACCUMULATE, rec.seen
    assert acc.dtype == torch.float32 and acc.shape == (100, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_linear_forward_on_cuda_matches_the_cpu_path_in_shape_and_dtype(dtype, monkeypatch):
    # The NaN report reads a value (bool(isnan(rows).any())): data a fake tensor does not have.
    monkeypatch.setattr(FL, "report_bad_rows", lambda *a, **k: None)
    kw = dict(divergence="jsd", chunk_size=16)  # 40 tokens: chunks of 16, 16 and 8
    (sh, sw, th, tw), sb = _fused_inputs("cpu", dtype)
    want = sk.fused_linear_distill_loss(sh, sw, th, tw, student_bias=sb, **kw)
    with FakeTensorMode(), _Ops() as rec:
        (sh, sw, th, tw), sb = _fused_inputs("cuda", dtype)
        got = sk.fused_linear_distill_loss(sh, sw, th, tw, student_bias=sb, **kw)
    assert (got.shape, got.dtype, got.device.type) == (want.shape, want.dtype, "cuda")
    n_out_dtype = rec.seen.count(torch.ops.aten.addmm.dtype_out)  # one weight-gradient GEMM per chunk
    assert n_out_dtype == (3 if dtype == torch.bfloat16 and FL._ADDMM_OUT_DTYPE_TRACES else 0)
    assert torch.ops.sdft_kernels.distill_dense_inplace_.default in rec.seen


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distill_fakes_give_cuda_outputs_like_the_cpu_kernels(reduction, monkeypatch):
    from sdft_kernels.ops import distill as DI
    monkeypatch.setattr(DI, "report_bad_rows", lambda *a, **k: None)
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(3, 5, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    lp, idx = torch.log_softmax(t.float(), -1).topk(8, dim=-1)
    want = (sk.distill_loss(s.requires_grad_(), t, reduction=reduction),
            sk.distill_loss_topk(s, lp, idx, reduction=reduction))
    real = [x.detach() for x in (s, t, lp, idx)]
    with FakeTensorMode() as mode:
        fs, ft, flp, fidx = (mode.from_tensor(x).to("cuda") for x in real)
        got = (sk.distill_loss(fs.requires_grad_(), ft, reduction=reduction),
               sk.distill_loss_topk(fs, flp, fidx, reduction=reduction))
    for g_, w in zip(got, want):
        assert (g_.shape, g_.dtype, g_.device.type, g_.requires_grad) == (w.shape, w.dtype, "cuda", True)
