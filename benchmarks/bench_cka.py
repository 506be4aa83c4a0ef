"""CKA benchmarks: sdft_kernels (LinearCKA, MinibatchCKA, kernel_hsic) vs the PyPI peers (ckatorch,
cka-pytorch, torch-cka), a plain PyTorch Gram implementation and the float64 NumPy reference.

Workload ("llm"): L student and L teacher layers of n tokens x d features in float32 that look like
LLM residual streams: a shared low-rank signal plus noise, every feature offset by ~100 and three
dimensions 100x larger than the rest ("massive activations"). Student layer i = teacher layer i plus
noise, so the diagonal CKA values are high but not 1. "clean" is the same without offset and outliers.
Every provider's error is max |CKA - CKA_float64| against sdft_kernels.reference.cka on the same data.

Kernels (CSV results/<kernel>.csv), all timed as one full computation ("full"):
  linear_cka_diag   exact linear CKA of the L diagonal pairs: floor = 3 L GEMMs of 2 n d^2 flops
  minibatch_cka     full L x L minibatch CKA (Nguyen et al.) with b-token minibatches:
                    floor = 2L Grams of 2 b^2 d flops per minibatch
  kernel_hsic       long-sequence HSIC (RBF or linear) over n tokens: floor = 2 n^2 (dx + dy) flops
                    (both n x n kernel matrices, without exploiting symmetry)
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch

from .harness import Case
from . import peers


def activations(layers, n, d, seed=0, data="llm", dtype=torch.float32, device="cpu"):
    """(student_layers, teacher_layers): lists of [n, d] tensors (see the module docstring), generated
    on `device` (GPU sizes are too large to draw on the host)."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, 32, generator=g, device=device)
    xs, ys = [], []
    for _ in range(layers):
        a = torch.randn(32, d, generator=g, device=device)
        t = z @ a + torch.randn(n, d, generator=g, device=device)
        s = t + 0.7 * torch.randn(n, d, generator=g, device=device)
        if data == "llm":
            offset = 100.0 * (1.0 + torch.rand(d, generator=g, device=device))
            t, s = t + offset, s + offset
            t[:, :3] *= 100.0
            s[:, :3] *= 100.0
        xs.append(s.to(dtype).contiguous())
        ys.append(t.to(dtype).contiguous())
    return xs, ys


def _cached(key: str, compute):
    """Float64 reference values cached on disk for the run (computed once, read by every provider)."""
    path = os.path.join(tempfile.gettempdir(), f"sdft_bench_ref_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
    if os.path.exists(path):
        return np.load(path)
    val = np.asarray(compute(), dtype=np.float64)
    tmp = path + f".{os.getpid()}.tmp.npy"
    np.save(tmp, val)
    os.replace(tmp, path)
    return val


def _error(values, ref):
    v = np.asarray(torch.as_tensor(values).double().cpu().numpy(), dtype=np.float64).reshape(ref.shape)
    if not np.all(np.isfinite(v)):
        return f"{int(np.sum(~np.isfinite(v)))}/{v.size} non-finite"
    return float(np.max(np.abs(v - ref)))




# ----------------------------------------------------------------------------- linear CKA, diagonal pairs

def _diag_case(provider, layers, n, d, device, data="llm", chunk=2048, mb=1024):
    from sdft_kernels.reference import cka as ref
    sizes = {"L": layers, "n": n, "d": d, "data": data}
    skip, gemm_dtype = None, "float32"
    if provider.startswith("ours"):  # "ours(full self-moments)": one full GEMM per self-moment (GPU question)
        LinearCKA, skip = peers.ours("LinearCKA")
    elif provider == "ckatorch":
        skip = peers.ckatorch_available()
        sizes["b"] = mb
    elif provider == "numpy-f64":
        gemm_dtype = "float64"
    elif provider.startswith("gemm"):
        gemm_dtype = provider[5:-1]
    key = f"diag-{layers}-{n}-{d}-{data}"

    def build():
        xs, ys = activations(layers, n, d, data=data, device=device)
        holder = {}
        if provider.startswith("ours"):
            from sdft_kernels import cka as cka_module
            widths = cka_module.HALF_SELF_MOMENT_MIN_WIDTH
            full = {**widths, device.split(":")[0]: float("inf")} if provider != "ours" else widths

            def step(_):
                old, cka_module.HALF_SELF_MOMENT_MIN_WIDTH = widths, full
                try:
                    m = LinearCKA(pairs="diagonal")
                    for s in range(0, n, chunk):   # streamed: memory independent of n
                        m.update([x[s:s + chunk] for x in xs], [y[s:s + chunk] for y in ys])
                    holder["v"] = m.compute()
                finally:
                    cka_module.HALF_SELF_MOMENT_MIN_WIDTH = old
                return holder["v"]
        elif provider == "numpy-f64":
            xn, yn = [x.cpu().numpy() for x in xs], [y.cpu().numpy() for y in ys]

            def step(_):
                holder["v"] = np.array([ref.linear_cka(a, b) for a, b in zip(xn, yn)])
                return holder["v"]
        elif provider == "torch-gram":
            def step(_):
                holder["v"] = torch.stack([ref.torch_gram_cka(a, b) for a, b in zip(xs, ys)])
                return holder["v"]
        elif provider == "ckatorch":
            def step(_):
                holder["v"] = peers.ckatorch_pairs(xs, ys, [(i, i) for i in range(layers)], mb)
                return holder["v"]
        elif provider.startswith("gemm"):
            dt = getattr(torch, gemm_dtype)
            xg, yg = [x.to(dt) for x in xs], [y.to(dt) for y in ys]
            outs = [torch.empty(d, d, dtype=dt, device=device) for _ in range(3)]

            def step(_):   # the co-moment products alone: X^T X, Y^T Y, X^T Y per pair
                for a, b in zip(xg, yg):
                    torch.mm(a.t(), a, out=outs[0])
                    torch.mm(b.t(), b, out=outs[1])
                    torch.mm(a.t(), b, out=outs[2])
                return outs[2]
            return {"step": step}
        else:
            raise ValueError(provider)

        if n * d * d > 2**33:   # the float64 reference would take minutes on the host: time only
            return {"step": step}

        def extra():
            if provider == "ckatorch":   # minibatch CKA estimates a different quantity: compare like with like
                r = _cached(key + f"-mb{mb}", lambda: np.diag(ref.minibatch_cka(
                    _batches(xs, mb), _batches(ys, mb))))
            else:
                r = _cached(key, lambda: [ref.linear_cka(a, b) for a, b in zip(xs, ys)])
            return {"max_abs_err": (_error(holder["v"], r), "")}
        return {"step": step, "extra": extra}

    flops = 3 * layers * 2.0 * n * d * d
    slow = provider in ("torch-gram", "ckatorch", "numpy-f64") and n * d >= 2**22
    est = 2 * layers * n * d * 4 * (3 if provider != "numpy-f64" else 6) + (3 * n * n * 4 if provider == "torch-gram" else 0)
    return Case("linear_cka_diag", provider, "full", sizes, "float32", build, flops=flops, gemm_dtype=gemm_dtype,
                skip=skip, slow=slow, est_bytes=est, timeout=600)


def _batches(xs, b):
    """[[layer i's features in minibatch t for i] for t]: the reference's minibatch layout."""
    n = xs[0].shape[0]
    return [[x[s:s + b] for x in xs] for s in range(0, n - b + 1, b)]


# ----------------------------------------------------------------------------- minibatch CKA, all pairs

def _minibatch_case(provider, layers, n, d, b, device, data="llm"):
    from sdft_kernels.reference import cka as ref
    sizes = {"L": layers, "n": n, "d": d, "b": b, "data": data}
    skip, gemm_dtype = None, "float32"
    if provider == "ours":
        MinibatchCKA, skip = peers.ours("MinibatchCKA")
    elif provider == "cka-pytorch":
        skip = peers.cka_pytorch_available()
    elif provider == "torch-cka":
        skip = peers.torch_cka_available()
    elif provider == "numpy-f64":
        gemm_dtype = "float64"
    elif provider == "ckatorch":
        skip = ("not run: ckatorch's full matrix is L^2 independent cka_batch calls (L x its diagonal time, "
                "see linear_cka_diag), over this run's time budget")
    key = f"mb-{layers}-{n}-{d}-{b}-{data}"

    def build():
        xs, ys = activations(layers, n, d, data=data, device=device)
        holder = {}
        if provider == "ours":
            def step(_):
                m = MinibatchCKA()
                for s in range(0, n - b + 1, b):
                    m.update([x[s:s + b] for x in xs], [y[s:s + b] for y in ys])
                holder["v"] = m.compute()
                return holder["v"]
        elif provider == "numpy-f64":
            def step(_):
                holder["v"] = ref.minibatch_cka(_batches(xs, b), _batches(ys, b))
                return holder["v"]
        elif provider == "cka-pytorch":
            def step(_):
                holder["v"] = peers.cka_pytorch_matrix(xs, ys, b)
                return holder["v"]
        elif provider == "torch-cka":
            def step(_):
                holder["v"] = peers.torch_cka_matrix(xs, ys, b)
                return holder["v"]
        else:
            raise ValueError(provider)

        def extra():
            r = _cached(key, lambda: ref.minibatch_cka(_batches(xs, b), _batches(ys, b)))
            return {"max_abs_err": (_error(holder["v"], r), "")}
        return {"step": step, "extra": extra}

    flops = (n // b) * (2 * layers * 2.0 * b * b * d + layers * layers * 2.0 * b * b)
    slow = provider != "ours" and n * d * layers >= 2**24
    est = 2 * layers * n * d * 4 * 2 + 2 * layers * b * b * 8 * 3
    return Case("minibatch_cka", provider, "full", sizes, "float32", build, flops=flops, gemm_dtype=gemm_dtype,
                skip=skip, slow=slow, est_bytes=est, timeout=600)


# ----------------------------------------------------------------------------- long-sequence kernel HSIC

def dense_torch_hsic(x, y, kernel, sigma, unbiased):
    """The plain PyTorch a user writes: both n x n kernel matrices in memory, then the estimator."""
    def gram(a):
        if kernel == "linear":
            a = a - a.mean(0, keepdim=True)
            return a @ a.T
        return torch.exp(-torch.cdist(a, a).square() / (2.0 * sigma * sigma))
    k, l = gram(x), gram(y)
    n = k.shape[0]
    if unbiased:
        k.fill_diagonal_(0)
        l.fill_diagonal_(0)
        t1 = (k * l).sum()
        t2 = k.sum() * l.sum() / ((n - 1) * (n - 2))
        t3 = 2.0 / (n - 2) * (k.sum(1) * l.sum(1)).sum()
        return (t1 + t2 - t3) / (n * (n - 3))
    k = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    return (k * l).sum() / (n - 1) ** 2


def _hsic_case(provider, n, d, kernel, device, unbiased=None, with_error=False):
    from sdft_kernels.reference import cka as ref
    unbiased = (kernel == "rbf") if unbiased is None else unbiased
    sizes = {"n": n, "d": d, "kernel": kernel, "unbiased": unbiased}
    skip = None
    if provider == "ours":
        kernel_hsic, skip = peers.ours("kernel_hsic")
    elif provider == "torch-dense" and device == "cpu" and n > 16384:
        skip = f"dense n x n Grams need {3 * n * n * 4 / 2**30:.0f} GiB"
    elif provider == "numpy-f64" and n > 4096:
        skip = "float64 dense reference only run at n <= 4096"
    key = f"hsic-{n}-{d}-{kernel}-{unbiased}"

    def build():
        g = torch.Generator().manual_seed(1)
        z = torch.randn(n, 16, generator=g)
        x = (z @ torch.randn(16, d, generator=g) + torch.randn(n, d, generator=g)) / d ** 0.5
        y = (z @ torch.randn(16, d, generator=g) + torch.randn(n, d, generator=g)) / d ** 0.5
        sigma = ref.median_sigma(x) if kernel == "rbf" else None
        x, y = x.to(device), y.to(device)
        holder = {}
        if provider == "ours":
            step = lambda _: holder.setdefault("v", kernel_hsic(x, y, kernel=kernel, sigma=sigma, unbiased=unbiased))  # noqa: E731
        elif provider == "torch-dense":
            step = lambda _: holder.setdefault("v", float(dense_torch_hsic(x, y, kernel, sigma, unbiased)))  # noqa: E731
        elif provider == "numpy-f64":
            step = lambda _: holder.setdefault("v", ref.kernel_hsic(x, y, kernel=kernel, sigma=sigma, unbiased=unbiased))  # noqa: E731
        else:
            raise ValueError(provider)
        spec = {"step": step}
        if with_error:
            def extra():
                r = _cached(key, lambda: [ref.kernel_hsic(x, y, kernel=kernel, sigma=sigma, unbiased=unbiased)])
                v = float(holder["v"])
                return {"rel_err": (abs(v - float(r[0])) / max(abs(float(r[0])), 1e-300), "")}
            spec["extra"] = extra
        return spec

    flops = 2.0 * n * n * 2 * d
    slow = n >= 32768 or (provider != "ours" and n >= 8192)
    est = (3 * n * n * 4 if provider == "torch-dense" else 0) + (6 * n * n * 8 if provider == "numpy-f64" else 0)
    return Case("kernel_hsic", provider, "full", sizes, "float32", build, flops=flops, skip=skip, slow=slow,
                est_bytes=est, timeout=900)


# ----------------------------------------------------------------------------- the run

def cases(device: str = "cpu", quick: bool = False) -> list:
    out = []
    if device == "cuda":
        for p in ("gemm(float32)", "ours", "ours(full self-moments)", "torch-gram"):
            out.append(_diag_case(p, 12, 32768, 4096, device))
        for p in ("ours", "cka-pytorch", "torch-cka"):
            out.append(_minibatch_case(p, 12, 8192, 768, 1024, device))
        for n in (65536, 262144):
            out.append(_hsic_case("ours", n, 4096, "rbf", device))
        out.append(_hsic_case("torch-dense", 32768, 4096, "rbf", device))
        return out
    if quick:
        for p in ("gemm(float32)", "ours", "numpy-f64", "torch-gram", "ckatorch"):
            out.append(_diag_case(p, 4, 1024, 128, device, mb=256))
        for p in ("ours", "numpy-f64", "cka-pytorch", "torch-cka"):
            out.append(_minibatch_case(p, 4, 1024, 128, 256, device))
        for p in ("ours", "torch-dense", "numpy-f64"):
            out.append(_hsic_case(p, 1024, 32, "rbf", device, with_error=True))
        return out
    # Issue 4's sizes: 12 + 12 layers, n = 8192 tokens, d = 768, LLM-like float32 activations.
    for p in ("gemm(float32)", "ours", "numpy-f64", "torch-gram", "ckatorch"):
        out.append(_diag_case(p, 12, 8192, 768, device))
    out[-2].skip = ("not run at n=8192 on this CPU: 24 n x n Grams = 2.5 TFLOP (minutes); "
                    "see the n=2048 row")
    # Growth in n, d and layers (cheap providers + the ckatorch peer).
    for L, n, d in ((12, 2048, 768), (4, 8192, 768), (12, 8192, 256)):
        for p in ("ours", "numpy-f64", "ckatorch") + (("torch-gram",) if n == 2048 else ()):
            out.append(_diag_case(p, L, n, d, device))
    # n=4096 (4 minibatches of b=1024) rather than 8192: every provider's cost is per minibatch, so the
    # ratios are those of n=8192 at half the run time (this CPU is shared; see the load column).
    for p in ("ours", "numpy-f64", "cka-pytorch", "torch-cka", "ckatorch"):
        out.append(_minibatch_case(p, 12, 4096, 768, 1024, device))
    # Long sequences: errors at n=4096 (where the float64 dense reference fits), growth to 65536.
    for p in ("ours", "torch-dense", "numpy-f64"):
        out.append(_hsic_case(p, 4096, 256, "rbf", device, with_error=True))
    for p in ("ours", "torch-dense"):
        out.append(_hsic_case(p, 16384, 256, "rbf", device))
    for n in (65536, 262144):
        big = _hsic_case("ours", n, 256, "rbf", device)
        if os.environ.get("SDFT_BENCH_LONG") != "1":
            big.skip = (f"not run by default: {big.flops / 1e12:.1f} TFLOP, minutes even on an idle 2-core CPU "
                        "(SDFT_BENCH_LONG=1 sdft bench cka --kernels kernel_hsic --match n=" + str(n) + ")")
        out.append(big)
    return out
