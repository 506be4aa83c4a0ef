import pytest
import torch

import sdft_kernels  # noqa: F401  (loads the extension once for every test)


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` need a device; on the CPU-only CI machine they are skipped, not failed.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
