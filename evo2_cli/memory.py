"""Memory as the pre-flights of `train`, `finetune` and `infer` read it: the bytes free on a device, and byte
counts written for people; and how the host allocator treats long runs of large buffers. One home, below
every command package."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a device is asked about: preprocess imports this module, not torch
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
        import torch

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


def tune_malloc(mmap_threshold: int, trim_threshold: int | None = None) -> None:
    """Fix glibc malloc's thresholds for this process (mallopt): buffers of `mmap_threshold` bytes or more are
    mappings of their own, and the heap keeps at most `trim_threshold` free bytes (glibc's own when None).
    Linux with glibc only; elsewhere (macOS, musl) nothing."""
    if sys.platform != "linux":
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    if trim_threshold is not None:
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def unmap_large_buffers(threshold: int = 1 << 20) -> None:
    """Buffers of `threshold` bytes or more become mappings of their own, returned to the kernel when freed.
    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so a chunk's activations
    (MiBs each) come from the heap, and the small tensors that outlive the chunk (carried states, output
    pieces) sit between them and keep the heap from shrinking: exact scoring of 1M tokens crept by about 150
    bytes per token of free heap."""
    tune_malloc(threshold)
