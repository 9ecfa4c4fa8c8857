"""What a process computes on (`Runtime`): the device, the dtype and autocast of a precision name, torch's
CPU threads, and the RNG state a resume restores. Starting processes (torchrun): train/distributed.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evo2_cli.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# The precision names each use accepts. "auto": bf16 on CUDA, fp32 on CPU (bf16 matmuls are slower there).
# Training autocasts (fp16 would need a loss scaler); infer and convert (no device to choose by) cast weights.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "train": ("auto", "fp32", "bf16"),
    "infer": ("auto", *DTYPES),
    "convert": tuple(DTYPES),
}


def choose_device(name: str = "auto", key: str = "--device") -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'; InputError naming `key` (the flag
    or config key) when unknown or unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"{key}: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{key} {name}: CUDA is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{key}: unsupported device type {device.type!r}; use cpu or cuda")
    return device


def precision_dtype(
    name: str, use: str, device: torch.device | None = None, key: str = "--dtype"
) -> torch.dtype:
    """The dtype of precision `name` for `use` (a key of PRECISIONS) on `device` (for "auto"); InputError
    naming `key` when `use` does not accept it."""
    allowed = PRECISIONS[use]
    if name not in allowed:
        raise InputError(f"{key}: expected {', '.join(allowed)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    return DTYPES[name]


def set_threads(count: int, key: str = "--threads") -> None:
    """torch's CPU threads; 0 keeps torch's default (one per core)."""
    if count < 0:
        raise InputError(f"{key} must be >= 0 (0 = torch's default), got {count}")
    if count:
        torch.set_num_threads(count)


@dataclass(frozen=True)
class Runtime:
    """Where this process computes: its device, its rank among `world_size` processes (torchrun; see
    train/distributed.py) and its autocast dtype (None or fp32: no autocast)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype not in (None, torch.float32)
        dtype = self.autocast_dtype if enabled else torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The RNG states a resume restores: torch's CPU generator, and the CUDA generator of this process's
        device when it runs on one (dropout on a GPU draws from that one)."""
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore_rng_state(self, saved: dict[str, torch.Tensor]) -> None:
        """Put back what `rng_state` saved; a checkpoint from a CPU run leaves a CUDA generator as seeded."""
        torch.set_rng_state(saved["torch"])
        if self.device.type == "cuda" and "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"], self.device)
