"""Hardware ceilings measured in the same run as the kernels: memory bandwidth and GEMM rate.

A kernel's floor is max(bytes it must move / bandwidth, flops it must do / GEMM rate). Datasheet
numbers mean little on a shared 2-core VM, so both ceilings are measured here, on the same machine,
minutes apart from the kernels they judge, and written as rows of results/floors.csv.
"""
from __future__ import annotations

import torch

from .harness import Case, Settings, run_isolated, rows_for, append_rows


def _copy_case(device: str, quick: bool) -> Case:
    # Large enough to leave every cache (256 MiB per side on CPU, 1 GiB on GPU).
    n = (32 if quick else 64) * 2**20 if device == "cpu" else 256 * 2**20

    def build():
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        return {"step": lambda _: dst.copy_(src)}

    return Case("floors", "copy", "full", {"bytes": 2 * 4 * n}, "float32", build, bytes=2 * 4 * n)


def _gemm_case(device: str, dtype: torch.dtype, quick: bool) -> Case:
    if device == "cuda":
        n = 8192
    else:
        n = 1024 if quick else 2048
    name = str(dtype).replace("torch.", "")

    def build():
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        out = torch.empty(n, n, device=device, dtype=dtype)
        return {"step": lambda _: torch.mm(a, b, out=out)}

    return Case("floors", f"matmul_{name}", "full", {"m": n, "n": n, "k": n}, name, build,
                flops=2.0 * n ** 3)


def measure_floors(st: Settings, log=print) -> dict:
    """Measure bandwidth (B/s) and GEMM rates (flop/s) and store them in st.floors."""
    dtypes = [torch.float32, torch.float64] if st.device == "cpu" else [torch.bfloat16, torch.float32]
    cases = [_copy_case(st.device, st.quick)] + [_gemm_case(st.device, d, st.quick) for d in dtypes]
    rows = []
    old_mem, st.measure_memory = st.measure_memory, False
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 rate means IEEE fp32, as our kernels use
    try:
        for case in cases:
            res = run_isolated(case, st)
            if "error" in res:
                rows += rows_for(case, res, st)
                continue
            med = sorted(res["samples"])[len(res["samples"]) // 2]
            if case.provider == "copy":
                st.floors["bandwidth"] = case.bytes / med
                value, unit = case.bytes / med / 1e9, "GB/s"
            else:
                st.floors[f"gemm_{case.dtype}"] = case.flops / med
                value, unit = case.flops / med / 1e9, "GFLOP/s"
            res["extra"] = {"rate": (value, unit)}
            rows += rows_for(case, res, st)
    finally:
        st.measure_memory = old_mem
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    append_rows(rows, st.out_dir, "floors")
    if log:
        parts = [f"bandwidth {st.floors.get('bandwidth', float('nan')) / 1e9:.1f} GB/s"]
        parts += [f"{k[5:]} GEMM {v / 1e9:.1f} GFLOP/s" for k, v in st.floors.items() if k.startswith("gemm_")]
        log("floors: " + ", ".join(parts))
    return st.floors
