"""Suite-wide settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evo2_cli.model import StripedHyena, preset_config, save_model


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every model in the suite is tiny: a second OpenMP thread only adds synchronization, and on a busy
    2-core machine threads spinning against each other made steps 60x slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A `test` preset checkpoint directory (random init, seed 0): the finetune tests' starting point."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "ckpt"
    save_model(StripedHyena(preset_config("test")), directory)
    return directory
