"""Suite-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every model in the suite is tiny: a second OpenMP thread only adds synchronization, and on a busy
    2-core machine threads spinning against each other made steps 60x slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
