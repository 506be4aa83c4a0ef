"""The distillation benchmark cases through pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Same cases as `sdft bench distill --quick` (SDFT_BENCH_FULL=1 for the full grid), timed in-process by
pytest-benchmark (peak memory and floors are only in `sdft bench`, which isolates each case)."""
import os

import pytest
import torch

from benchmarks import bench_distill
from benchmarks.harness import pytest_benchmark_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench_distill.cases(DEVICE, quick=os.environ.get("SDFT_BENCH_FULL") != "1")
bench_distill.setup_env()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.provider}-{c.dtype}-{c.sizes_str}" for c in CASES])
def test_distill(benchmark, case):
    pytest_benchmark_case(benchmark, case, DEVICE)
