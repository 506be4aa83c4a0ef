"""Adapters that call the PyPI peers the way their users do (never vendored: `pip install -e .[bench]`).

Each `*_available()` returns None when the peer can run here, else the reason it cannot (that reason
becomes the row's status, so a missing peer is visible in the CSV rather than a silent gap).

How each peer is driven (checked against the installed versions' source):
- torchtune 0.6.1 `ForwardKLWithChunkedOutputLoss(num_output_chunks, ignore_index)`: forward(list of
  student chunks [B, T/c, V], list of teacher chunks, labels [B, T]). It returns the cross-entropy
  -sum p log q (forward KL minus the teacher's entropy, a constant), mean over non-ignored tokens.
- Liger-Kernel (GPU only, Triton): `LigerJSD(jsd_beta)` on log-probabilities and
  `LigerFusedLinearJSD(jsd_beta, temperature)` on hidden states and lm_head weights.
- ckatorch `cka_batch(x [k, b, d], y [k, b, e])`: minibatch CKA (Nguyen et al.) of one layer pair over
  k minibatches of b tokens; its full-matrix class calls it once per layer pair.
- cka-pytorch `CKACalculator(model1, model2, layers, ...)` and torch-cka `CKA(model1, model2, ...)`:
  both hook modules of two models and read a DataLoader; we give them "replay" models whose layers
  return the stored activations of the token indices in the batch, so they see exactly our data.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn


def _missing(*modules):
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return f"{m} not installed (pip install -e .[bench])"
    return None


def torchtune_available():
    why = _missing("torchtune")
    if why:
        return why
    try:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss  # noqa: F401
    except Exception as e:  # torchtune imports much of itself; a broken dependency shows here
        return f"torchtune import failed: {type(e).__name__}: {e}"[:160]
    return None


def torchtune_kd_loss(num_chunks: int = 8):
    """loss(student [N, V], teacher [N, V]) through torchtune's chunked forward-KL loss."""
    from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss
    fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=num_chunks)

    def loss(student, teacher):
        s = student.unsqueeze(0).chunk(num_chunks, dim=1)
        t = teacher.unsqueeze(0).chunk(num_chunks, dim=1)
        labels = torch.zeros(1, student.shape[0], dtype=torch.long, device=student.device)
        return fn(list(s), list(t), labels)

    return loss


def liger_available(device: str):
    if device != "cuda":
        return "Liger-Kernel needs a CUDA GPU (Triton)"
    why = _missing("liger_kernel", "triton")
    if why:
        return why
    return None


def liger_jsd(beta: float = 0.5):
    """loss(student_logits, teacher_logits) with Liger's JSD on log-probs (the log_softmax is timed too)."""
    from liger_kernel.transformers import LigerJSD
    fn = LigerJSD(beta=beta)

    def loss(student, teacher):
        return fn(torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1))

    return loss


def liger_fused_linear_jsd(beta: float = 0.5, temperature: float = 1.0):
    from liger_kernel.transformers import LigerFusedLinearJSD
    fn = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
        return fn(student_hidden, student_weight, teacher_hidden, teacher_weight)

    return loss


# ----------------------------------------------------------------------------- CKA peers

class _Tap(nn.Module):
    """A 'layer' that returns stored activations [n, d] at the token indices of the batch."""

    def __init__(self, acts: torch.Tensor):
        super().__init__()
        self.acts = acts

    def forward(self, idx):
        return self.acts[idx]


class ReplayModel(nn.Module):
    """A model whose layers replay stored activations, so hook-based CKA tools see our data.
    It owns one dummy parameter (some tools read next(model.parameters()).device)."""

    def __init__(self, acts: list):
        super().__init__()
        self.layers = nn.ModuleList([_Tap(a) for a in acts])
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, idx):
        out = None
        for tap in self.layers:
            out = tap(idx)
        return out


def index_loader(n: int, batch: int):
    from torch.utils.data import DataLoader, TensorDataset
    idx = torch.arange(n)
    return DataLoader(TensorDataset(idx, torch.zeros(n)), batch_size=batch, shuffle=False, drop_last=False)


def ckatorch_available():
    return _missing("ckatorch", "seaborn")


def ckatorch_pairs(xs, ys, pairs, batch: int):
    """CKA of the given (i, j) pairs through ckatorch.cka_batch over n/batch minibatches."""
    from ckatorch import cka_batch
    out = []
    for i, j in pairs:
        x, y = xs[i], ys[j]
        k = x.shape[0] // batch
        out.append(float(cka_batch(x[:k * batch].reshape(k, batch, -1), y[:k * batch].reshape(k, batch, -1))))
    return torch.tensor(out, dtype=torch.float64)


def cka_pytorch_available():
    return _missing("cka_pytorch", "lightning", "torchmetrics")


def cka_pytorch_matrix(xs, ys, batch: int):
    """Full [len(xs), len(ys)] minibatch CKA through cka-pytorch's CKACalculator."""
    from cka_pytorch import CKACalculator
    m1, m2 = ReplayModel(xs), ReplayModel(ys)
    layers = [f"layers.{i}" for i in range(len(xs))]
    layers2 = [f"layers.{i}" for i in range(len(ys))]
    calc = CKACalculator(m1, m2, model1_layers=layers, model2_layers=layers2, verbose=False,
                         device=torch.device("cpu") if xs[0].device.type == "cpu" else xs[0].device)
    out = calc.calculate_cka_matrix(index_loader(xs[0].shape[0], batch), num_epochs=1)
    calc.hook_manager1.clear_all()
    calc.hook_manager2.clear_all()
    return out.double()


def torch_cka_available():
    return _missing("torch_cka")


def torch_cka_matrix(xs, ys, batch: int):
    """Full matrix through torch-cka's CKA.compare (it asserts when its result has NaNs)."""
    import warnings
    from torch_cka import CKA
    m1, m2 = ReplayModel(xs), ReplayModel(ys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(m1, m2, model1_name="student", model2_name="teacher",
                  model1_layers=[f"layers.{i}" for i in range(len(xs))],
                  model2_layers=[f"layers.{i}" for i in range(len(ys))], device=str(xs[0].device))
        loader = index_loader(xs[0].shape[0], batch)
        import contextlib
        import io
        with contextlib.redirect_stderr(io.StringIO()):   # its tqdm bar
            cka.compare(loader, loader)
    return cka.hsic_matrix.double()


# ----------------------------------------------------------------------------- ours

_OUR_MODULES = {"distill_loss": "sdft_kernels.ops.distill", "fused_linear_distill_loss": "sdft_kernels.ops.fused_linear",
                "LinearCKA": "sdft_kernels.cka", "MinibatchCKA": "sdft_kernels.cka",
                "kernel_hsic": "sdft_kernels.cka", "kernel_cka": "sdft_kernels.cka"}


def ours(name: str):
    """(our public function or class, None) or (None, why not): the package's public name first, then
    the module that defines it (before its export line lands in sdft_kernels/__init__.py)."""
    import importlib
    import sdft_kernels
    obj = getattr(sdft_kernels, name, None)
    if obj is None and name in _OUR_MODULES:
        try:
            obj = getattr(importlib.import_module(_OUR_MODULES[name]), name, None)
        except Exception as e:
            return None, f"sdft_kernels.{name} unavailable: {type(e).__name__}: {e}"[:160]
    return obj, (None if obj is not None else f"sdft_kernels.{name} not available in this build")
