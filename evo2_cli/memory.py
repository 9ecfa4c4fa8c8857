"""Memory as the pre-flights of `train`, `finetune` and `infer` read it: the bytes free on a device, and byte
counts written for people; and how the host allocator treats long runs of large buffers. One home, below
every command package."""

from __future__ import annotations

import ctypes
import os
import sys

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


def unmap_large_buffers(threshold: int = 1 << 20) -> None:
    """Fix glibc malloc's mmap threshold at `threshold` bytes for this process, so buffers that large are
    mappings of their own, returned to the kernel when freed. By default glibc raises the threshold after
    each large free (up to 32 MiB), so a chunk's activations (MiBs each) come from the heap, and the small
    tensors that outlive the chunk (carried states, output pieces) sit between them and keep the heap from
    shrinking: exact scoring of 1M tokens crept by about 150 bytes per token of free heap. Linux only."""
    if sys.platform != "linux":
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc; absent elsewhere
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)


_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
