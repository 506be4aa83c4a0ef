"""The CKA benchmark cases through pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Same cases as `sdft bench cka --quick` (SDFT_BENCH_FULL=1 for the full grid), timed in-process by
pytest-benchmark (peak memory and floors are only in `sdft bench`, which isolates each case)."""
import os

import pytest
import torch

from benchmarks import bench_cka
from benchmarks.harness import pytest_benchmark_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench_cka.cases(DEVICE, quick=os.environ.get("SDFT_BENCH_FULL") != "1")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.provider}-{c.dtype}-{c.sizes_str}" for c in CASES])
def test_cka(benchmark, case):
    pytest_benchmark_case(benchmark, case, DEVICE)
