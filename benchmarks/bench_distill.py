"""Distillation-loss benchmarks: sdft_kernels vs naive PyTorch, torch.compile, torchtune, Liger.

Kernels (CSV results/<kernel>.csv):
  distill_loss          logits [N, V] -> loss, forward+backward ("full"): memory-bound, the floor moves
                        student + teacher logits once and writes the gradient once (3 N V elements).
  distill_topk          student logits [N, V] against a top-k teacher (log-probs + indices [N, k], the
                        rest of its mass as a tail bucket), full: the floor reads the student logits once
                        and writes the gradient once (2 N V elements).
  fused_linear_distill  hidden [N, H] x lm_head [V, H] for student and teacher -> loss, full: GEMM-bound,
                        its floor is the four matmuls (student logits, teacher logits, grad_hidden,
                        grad_weight) = 2 N V (3 Hs + Ht) flops; the "matmuls" provider times exactly those.
Inputs are realistic, never zeros: teacher logits ~ 2 N(0, 1), student = teacher + N(0, 1).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .harness import Case
from . import peers

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




def _logits(n, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    t = 2.0 * torch.randn(n, v, device=device, generator=g)
    s = t + torch.randn(n, v, device=device, generator=g)
    return s.to(dtype).requires_grad_(True), t.to(dtype)


@contextlib.contextmanager
def _one_block_per_row(on: bool):
    """SDFT_CUDA_NO_CLUSTER=1 while on: the CUDA dense kernel then runs one block per row instead of the
    sm_90 cluster kernel (read at each launch), so the two are timed side by side."""
    old = os.environ.get("SDFT_CUDA_NO_CLUSTER")
    if on:
        os.environ["SDFT_CUDA_NO_CLUSTER"] = "1"
    try:
        yield
    finally:
        if on and old is None:
            del os.environ["SDFT_CUDA_NO_CLUSTER"]
        elif on:
            os.environ["SDFT_CUDA_NO_CLUSTER"] = old


def _loss_case(provider, n, v, dtype, device, divergence="forward_kl", tag=""):
    """Build a forward+backward case of one provider's loss on [n, v] logits."""
    esize = torch.finfo(DT[dtype]).bits // 8
    skip = None
    if provider.startswith("ours"):  # "ours(one block per row)": the pre-Hopper CUDA kernel, on sm_90
        fn, skip = peers.ours("distill_loss")
        one_block = provider != "ours"

        def make():
            def loss(s, t):
                with _one_block_per_row(one_block):  # the gradient is formed in the forward launch
                    return fn(s, t, divergence=divergence)
            return loss
    elif provider == "naive":
        from sdft_kernels.reference.distill import distill_loss_ref
        make = lambda: (lambda s, t: distill_loss_ref(s, t, divergence=divergence))  # noqa: E731
    elif provider == "torch.compile(naive)":
        from sdft_kernels.reference.distill import distill_loss_ref

        def make():
            torch._dynamo.reset()
            c = torch.compile(distill_loss_ref, dynamic=False)
            return lambda s, t: c(s, t, divergence=divergence)
    elif provider == "torchtune":
        skip = peers.torchtune_available() or (None if divergence == "forward_kl" else
                                               "torchtune's chunked KD loss is forward KL only")
        make = lambda: peers.torchtune_kd_loss(8)  # noqa: E731
    elif provider == "liger":
        skip = peers.liger_available(device) or (None if divergence == "jsd" else "Liger is timed on JSD")
        make = lambda: peers.liger_jsd(0.5)  # noqa: E731
    else:
        raise ValueError(provider)

    def build():
        s, t = _logits(n, v, DT[dtype], device)
        loss_fn = make()

        def prepare():
            s.grad = None

        def step(_):
            loss = loss_fn(s, t)
            loss.backward()
            return loss, s.grad
        return {"step": step, "prepare": prepare}

    naive_like = provider in ("naive", "torchtune")
    # Peak bytes per logit measured at N=4096, V=32000 fp32 (naive ~19, torchtune ~10, compile ~4) plus
    # the inputs and their fp32 generation temporaries.
    per = {"naive": 20, "torchtune": 12}.get(provider, 5) * (esize / 4 if provider == "naive" else 1)
    est = n * v * (per + 12)
    return Case("distill_loss", provider + tag, "full", {"N": n, "V": v, "div": divergence}, dtype, build,
                bytes=3.0 * n * v * esize, skip=skip, est_bytes=est,
                slow=naive_like and n * v > 2**26, timeout=900)


def _topk_case(provider, n, v, k, dtype, device):
    """Forward+backward of the top-k teacher loss: ours, or the pure-PyTorch reference in the input dtype
    (what a user writes with gather + logsumexp), or torch.compile of it."""
    esize = torch.finfo(DT[dtype]).bits // 8
    skip = None
    from sdft_kernels.reference.distill import distill_loss_topk_ref
    if provider == "ours":
        fn, skip = peers.ours("distill_loss_topk")
        make = lambda: fn  # noqa: E731
    elif provider == "naive":
        make = lambda: distill_loss_topk_ref  # noqa: E731
    elif provider == "torch.compile(naive)":
        def make():
            torch._dynamo.reset()
            return torch.compile(distill_loss_topk_ref, dynamic=False)
    else:
        raise ValueError(provider)

    def build():
        s, t = _logits(n, v, DT[dtype], device)
        lp, idx = t.float().log_softmax(-1).topk(k, dim=-1)
        loss_fn = make()

        def prepare():
            s.grad = None

        def step(_):
            loss = loss_fn(s, lp, idx)
            loss.backward()
            return loss, s.grad
        return {"step": step, "prepare": prepare}

    per = 20 if provider == "naive" else 5
    return Case("distill_topk", provider, "full", {"N": n, "V": v, "k": k}, dtype, build,
                bytes=2.0 * n * v * esize, skip=skip, est_bytes=n * v * (per + 12),
                slow=provider == "naive" and n * v > 2**26, timeout=900)


def _fused_case(provider, n, hs, ht, v, dtype, device, divergence="forward_kl"):
    esize = torch.finfo(DT[dtype]).bits // 8
    flops = 2.0 * n * v * (3 * hs + ht)
    skip = None
    if provider == "ours":
        fn, skip = peers.ours("fused_linear_distill_loss")
        loss_fn = (lambda *a: fn(*a, divergence=divergence)) if fn else None
    elif provider == "naive":
        from sdft_kernels.reference.distill import fused_linear_distill_loss_ref
        loss_fn = lambda *a: fused_linear_distill_loss_ref(*a, divergence=divergence)  # noqa: E731
    elif provider == "liger":
        skip = peers.liger_available(device) or (None if divergence == "jsd" else "Liger is timed on JSD")
        loss_fn = None
    elif provider != "matmuls":
        raise ValueError(provider)

    def build():
        g = torch.Generator(device=device).manual_seed(0)
        dt = DT[dtype]
        h_s = torch.randn(n, hs, device=device, generator=g).to(dt).requires_grad_(True)
        h_t = torch.randn(n, ht, device=device, generator=g).to(dt)
        w_s = (torch.randn(v, hs, device=device, generator=g) / hs ** 0.5).to(dt).requires_grad_(True)
        w_t = (torch.randn(v, ht, device=device, generator=g) / ht ** 0.5).to(dt)
        if provider == "matmuls":
            # The four GEMMs any implementation must do, into preallocated outputs (no loss math).
            logits_s = torch.empty(n, v, device=device, dtype=dt)
            logits_t = torch.empty(n, v, device=device, dtype=dt)
            g_h, g_w = torch.empty(n, hs, device=device, dtype=dt), torch.empty(v, hs, device=device, dtype=dt)
            hd, wd = h_s.detach(), w_s.detach()

            def step(_):
                torch.mm(hd, wd.t(), out=logits_s)
                torch.mm(h_t, w_t.t(), out=logits_t)
                torch.mm(logits_s, wd, out=g_h)          # grad_hidden = G W   (G stands in: N x V)
                torch.mm(logits_s.t(), hd, out=g_w)      # grad_weight = G^T H
                return g_h
            return {"step": step}
        fn = loss_fn or peers.liger_fused_linear_jsd(0.5)

        def prepare():
            h_s.grad = None
            w_s.grad = None

        def step(_):
            loss = fn(h_s, w_s, h_t, w_t)
            loss.backward()
            return loss, h_s.grad, w_s.grad
        return {"step": step, "prepare": prepare}

    est = n * v * (10 * 4 if provider == "naive" else 3 * 4) + (n + v) * (hs + ht) * esize * 2
    return Case("fused_linear_distill", provider, "full", {"N": n, "Hs": hs, "Ht": ht, "V": v, "div": divergence},
                dtype, build, flops=flops, skip=skip, est_bytes=est,
                slow=n * v * (hs + ht) > 2**36, timeout=900)


LOSS_PROVIDERS = ["ours", "naive", "torch.compile(naive)", "torchtune"]


def cases(device: str = "cpu", quick: bool = False) -> list:
    """All distillation cases for one run, in the order they are run."""
    out = []
    if device == "cuda":
        # The GPU targets of issue 3: N=8192, V=128256, bf16; the fused linear at Liger's published setting.
        for p in LOSS_PROVIDERS[:1] + ["ours(one block per row)"] + LOSS_PROVIDERS[1:]:
            out.append(_loss_case(p, 8192, 128256, "bfloat16", device))
        for p in ("ours", "ours(one block per row)", "liger"):
            out.append(_loss_case(p, 8192, 128256, "bfloat16", device, divergence="jsd"))
        for p in ("matmuls", "ours", "naive"):
            out.append(_fused_case(p, 8192, 2048, 4096, 128256, "bfloat16", device))
        for p in ("ours", "liger"):
            out.append(_fused_case(p, 8192, 2048, 4096, 128256, "bfloat16", device, divergence="jsd"))
        for n in (1024, 4096):   # growth, last: gpu_check.sh's deadline drops it first
            for p in ("ours", "naive"):
                out.append(_loss_case(p, n, 128256, "bfloat16", device))
        return out
    if quick:
        for n in (128, 512):
            for p in LOSS_PROVIDERS:
                if p.startswith("torch.compile") and n != 512:
                    continue
                out.append(_loss_case(p, n, 8000, "float32", device))
        for p in ("matmuls", "ours", "naive"):
            out.append(_fused_case(p, 256, 128, 128, 4000, "float32", device))
        return out
    # Issue 3's grid (fp32 and bf16), every provider side by side; the target sizes (N=4096) first.
    for dtype in ("float32", "bfloat16"):
        for n in ((4096, 1024) if dtype == "float32" else (4096,)):   # bf16 N=1024 trimmed for CPU time
            for v in (32000, 128256):
                for p in LOSS_PROVIDERS:
                    out.append(_loss_case(p, n, v, dtype, device))
        if dtype == "float32":
            for p in ("matmuls", "ours", "naive"):
                out.append(_fused_case(p, 4096, 512, 512, 32000, "float32", device))
        for p in ("ours", "naive", "torch.compile(naive)"):   # offline teacher logits: top-64
            out.append(_topk_case(p, 4096, 32000, 64, dtype, device))
    # Cost growth below the grid (N sweep at V=32000, V sweep at N=1024), no compile (one compile per shape).
    for p in ("ours", "naive", "torchtune"):
        out.append(_loss_case(p, 256, 32000, "float32", device))
        out.append(_loss_case(p, 1024, 8000, "float32", device))
    for p in ("matmuls", "ours", "naive"):
        out.append(_fused_case(p, 1024, 512, 512, 32000, "float32", device))
    return out


def setup_env():
    # One compile worker: this machine has 2 cores shared by a team; a worker pool only adds noise.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
