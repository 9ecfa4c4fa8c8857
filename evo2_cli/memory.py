"""Memory as the pre-flights of `train`, `finetune` and `infer` read it: the bytes free on a device, and byte
counts written for people. One home, below every command package."""

from __future__ import annotations

import os

import torch

GIB = 1024**3


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def available_memory(device: torch.device) -> int:
    """Free bytes: CUDA device memory, or the host's available RAM (MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
