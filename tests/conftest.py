"""Suite-wide settings and the helpers several test files share (`from conftest import ...`)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from evo2_cli.data.indexed import IndexedDatasetWriter
from evo2_cli.model import StripedHyena, preset_config, save_model

VORTEX_TINY = Path(__file__).parent / "fixtures" / "vortex_tiny"  # a tiny Vortex checkpoint and its YAML


def quiet() -> Console:
    """A console that swallows what it prints, wide enough that nothing wraps."""
    return Console(file=io.StringIO(), width=200)


def random_dataset(
    prefix: Path,
    seed: int,
    lengths: dict[str, int],
    documents: int = 1,
    alphabet: bytes = b"ACGT",
    terminated: bool = True,
) -> Path:
    """PREFIX_<split> for each split of `lengths`: `documents` documents of that many bases drawn from
    `alphabet` by one generator of `seed` (split after split, document after document), each followed by a
    0 token when `terminated`. Returns `prefix`; the bytes depend on every argument, so do golden values."""
    rng = np.random.default_rng(seed)
    bases = np.frombuffer(alphabet, np.uint8)
    for split, length in lengths.items():
        with IndexedDatasetWriter(Path(f"{prefix}_{split}")) as writer:
            for _ in range(documents):
                tokens = rng.choice(bases, length)
                writer.add_document(np.concatenate([tokens, [0]]).astype(np.uint8) if terminated else tokens)
    return prefix


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests are skipped, not failed, on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


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
    """A `test` preset checkpoint directory (random init, seed 0): what the infer and finetune tests load."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "ckpt"
    save_model(StripedHyena(preset_config("test")), directory)
    return directory


@pytest.fixture
def vtx_logits(tmp_path):
    """`vtx_logits(config, weights, ids) -> logits (B, L, 512)`: the official engine (vtx on CPU through
    benchmarks/vtx_cpu.py, from the directories of EVO2_VTX_PATH) on a Vortex .pt and its release YAML.
    Tests that use it are skipped when EVO2_VTX_PATH is not set."""
    if not os.environ.get("EVO2_VTX_PATH"):
        pytest.skip("set EVO2_VTX_PATH to an unpacked vtx (see benchmarks/vtx_cpu.py)")

    def run(config: Path, weights: Path, ids: torch.Tensor) -> torch.Tensor:
        torch.save(ids, tmp_path / "vtx_ids.pt")
        request = {
            "paths": os.environ["EVO2_VTX_PATH"].split(os.pathsep),
            "config": str(config),
            "weights": str(weights),
            "ids": str(tmp_path / "vtx_ids.pt"),
            "out": str(tmp_path / "vtx_out.pt"),
        }
        script = Path(__file__).resolve().parents[1] / "benchmarks" / "vtx_cpu.py"
        subprocess.run([sys.executable, str(script), json.dumps(request)], check=True, capture_output=True)
        return torch.load(tmp_path / "vtx_out.pt", weights_only=True)["logits"]

    return run


@pytest.fixture
def torchrun():
    """`torchrun(args, processes)`: `python -m evo2_cli ARGS` as `processes` gloo processes of one torchrun
    (one OpenMP thread each), from the repository root; returns the CompletedProcess."""

    def run(args: list[str], processes: int) -> subprocess.CompletedProcess:
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "evo2_cli", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        repo = Path(__file__).resolve().parents[1]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo, timeout=300)

    return run
