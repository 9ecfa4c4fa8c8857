"""`evo2 doctor`: what this environment can run, and a self-test of the model's numerics on it.

Used when a bug report comes in or a cluster node behaves differently from a laptop: one command shows the
versions, the devices and their bf16 support, the optional extras, and whether cached decoding reproduces the
full forward on each device (the invariant every other command rests on).
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from evo2_cli import __version__

# Optional packages and the feature each one switches on.
OPTIONAL_PACKAGES = {
    "matplotlib": "the learning-curve plot of examples/ecoli",
    "isal": "fast gzip input in `evo2 preprocess` (2.6x zlib)",
    "pyarrow": "Parquet output of `evo2 infer score`",
    "tensorboard": "TensorBoard logging in `evo2 train`",
    "megatron-core": "the Megatron compatibility test",
}
SELF_TEST_TOLERANCE = 1e-4  # fp32, as the model package's cache tests


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # a failed required check makes `evo2 doctor` exit 1


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_checks() -> list[Check]:
    """Versions, devices and optional extras; never raises."""
    checks = [
        Check("evo2-cli", True, __version__),
        Check("python", sys.version_info >= (3, 10), f"{platform.python_version()} ({sys.executable})"),
        Check(
            "torch",
            True,
            f"{torch.__version__}, "
            + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build")
            + f", {torch.get_num_threads()} CPU threads",
        ),
    ]
    for name in ("numpy", "safetensors", "typer", "rich", "pyyaml", "biopython", "pyfaidx"):
        version = _package_version(name)
        checks.append(Check(name, version is not None, version or "missing: reinstall evo2-cli"))
    for index in range(torch.cuda.device_count()):
        checks.append(_guarded(f"cuda:{index}", partial(_device_check, index)))
    if not torch.cuda.is_available():
        checks.append(Check("cuda", True, "no CUDA device: CPU only (fp32)", required=False))
    for name, feature in OPTIONAL_PACKAGES.items():
        version = _package_version(name)
        detail = f"{version}: {feature}" if version else f"not installed: no {feature}"
        checks.append(Check(name, version is not None, detail, required=False))
    return checks


def _device_check(index: int) -> Check:
    props = torch.cuda.get_device_properties(index)
    return Check(
        f"cuda:{index}",
        True,
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor}, "
        # this device's own capability: is_bf16_supported() asks about the current device only
        + ("bf16" if props.major >= 8 else "no bf16: train with fp32"),
    )


def self_test(device: str) -> Check:
    """The `test` preset on `device` in fp32: prefill + one-token steps must equal the full forward."""
    from evo2_cli.model import StripedHyena, preset_config

    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = StripedHyena(preset_config("test")).to(device).eval()
    ids = torch.randint(0, 256, (2, 24), generator=generator).to(device)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2)
        stepped = [model.prefill(ids[:, :5], cache)]
        stepped += [model.step(ids[:, i], cache)[:, None] for i in range(5, ids.shape[1])]
    error = (torch.cat(stepped, dim=1) - full).abs().max().item()
    ok = error <= SELF_TEST_TOLERANCE and bool(torch.isfinite(full).all())
    return Check(f"self-test {device}", ok, f"cached decoding vs full forward: max abs diff {error:.1e}")


def run_checks() -> list[Check]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    checks = [_guarded(f"self-test {device}", partial(self_test, device)) for device in devices]
    return environment_checks() + checks


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """A device that cannot even be queried or run the test (a CUDA error, out of memory) is a failed check,
    not a traceback: a broken device is what `evo2 doctor` is run to find."""
    try:
        return check()
    except Exception as exc:  # any failure of the device is the finding
        return Check(name, False, f"{type(exc).__name__}: {exc}")
