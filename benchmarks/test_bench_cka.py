"""The CKA benchmark cases through pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Same cases as `sdft bench cka --quick` (SDFT_BENCH_FULL=1 for the full grid), timed in-process by
pytest-benchmark (peak memory and floors are only in `sdft bench`, which isolates each case)."""
import os

import pytest
import torch

from benchmarks import bench_cka

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench_cka.cases(DEVICE, quick=os.environ.get("SDFT_BENCH_FULL") != "1")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.provider}-{c.dtype}-{c.sizes_str}" for c in CASES])
def test_cka(benchmark, case):
    if case.skip:
        pytest.skip(case.skip)
    spec = case.build()
    step, prepare = spec["step"], spec.get("prepare")
    benchmark.group = f"{case.kernel} {case.dtype} {case.sizes_str}"
    step(prepare() if prepare else None)   # warm-up (and torch.compile's compile)

    def run(state):
        out = step(state)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, setup=lambda: ((prepare() if prepare else None,), {}),
                       rounds=1 if case.slow else 5, iterations=1)
