"""What a run reports: the progress line, `metrics.jsonl`, TensorBoard (when installed), MFU.

MFU = achieved model FLOP/s / peak FLOP/s of the devices. Achieved FLOP/s come from the model package's
`estimate_flops` (forward + backward, FFT convolutions counted) times windows per second. The peak is
`train.peak_flops` when set, else the dense bf16 figure of a known GPU (fp32 figure under fp32), else, on a
CPU, the best of several matmul probes at start-up (a busy CPU reads low, so MFU may then pass 100%). The
loop prints which.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evo2_cli.train.checkpoint import METRICS

# Dense peak FLOP/s per device (vendor datasheets, without sparsity): (bf16, fp32 tf32-off).
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "A10G": (70e12, 31e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30e12),
    "V100": (125e12, 15.7e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
}


MATMUL_PROBES = 10


@dataclass(frozen=True)
class PeakFlops:
    """The per-device peak MFU is measured against, and where it came from (printed once at start)."""

    flops: float  # nan when unknown: MFU shown as n/a
    source: str


def measure_matmul_flops(size: int = 1024, probes: int = MATMUL_PROBES) -> float:
    """FLOP/s of an fp32 square matmul on this CPU: the best of `probes` timed runs, since other jobs on a
    busy machine only ever make a run slower. Constant matrices: the global RNG is left alone."""
    a, b = torch.full((size, size), 0.5), torch.full((size, size), 0.25)
    a @ b  # warm-up
    best = math.inf
    for _ in range(probes):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, bf16: bool, configured: float) -> PeakFlops:
    if configured > 0:
        return PeakFlops(configured, "train.peak_flops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16_peak, fp32_peak) in GPU_PEAK_FLOPS.items():
            if key in name:
                return PeakFlops(
                    bf16_peak if bf16 else fp32_peak, f"{key} datasheet, {'bf16' if bf16 else 'fp32'}"
                )
        return PeakFlops(math.nan, f"unknown GPU {name!r}; set train.peak_flops")
    measured = measure_matmul_flops()
    return PeakFlops(
        measured, f"best of {MATMUL_PROBES} fp32 matmul probes on this CPU; set train.peak_flops to fix it"
    )


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(record: dict[str, Any], max_steps: int) -> str:
    mfu = record.get("mfu")
    parts = [
        f"[bold]step {record['step']}/{max_steps}[/]",
        f"loss {record['loss']:.4f}",
        *([f"{record['bits_per_base']:.3f} bits/base"] if "bits_per_base" in record else []),
        f"lr {record['lr']:.2e}",
        f"grad {record['grad_norm']:.3g}",
        f"{record['tokens_per_s'] / 1e3:.1f}k tok/s" if math.isfinite(record["tokens_per_s"]) else "- tok/s",
        f"MFU {100 * mfu:.1f}%" if mfu is not None and math.isfinite(mfu) else "MFU n/a",
        f"ETA {format_duration(record['eta_s'])}",
    ]
    return " | ".join(parts)


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl (and TensorBoard scalars when asked and installed)."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = Path(run_dir) / METRICS
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # the loop says so; metrics.jsonl is always written
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
