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


@pytest.fixture(scope="module")
def rendezvous_port():
    """Port of a TCPStore this process holds open for the ranks the test forks or spawns.

    The ranks join it as clients (TORCHELASTIC_USE_AGENT_STORE, as under torchrun), so no port is
    picked free and then given up: another process cannot take it between pick and bind.
    """
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield store.port
    del store


def rank_env(port, **extra):
    """Environment a rank needs to join the store behind `rendezvous_port`."""
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                **{k: str(v) for k, v in extra.items()})
