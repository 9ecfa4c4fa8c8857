"""Memory of a finetune before it starts: weights + gradients + AdamW state, against the device's memory.

The estimate is read off the adapted model itself (built on the meta device, so it costs nothing), with the
dtype every parameter will have on the device:

    weights     sum of numel x element size (frozen matmul weights are bf16 on CUDA, the rest fp32)
    gradients   4 bytes per trainable parameter (fp32)
    optimizer   8 bytes per trainable parameter (AdamW exp_avg and exp_avg_sq, fp32)

Activations come on top and scale with train.micro_batch x data.seq_len (train.activation_checkpointing
cuts them); they are not part of the refusal, which is about what must fit before the first step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from evo2_cli.errors import InputError
from evo2_cli.finetune.freeze import is_adapter_parameter

GIB = 1024**3


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int  # all parameters, adapters included
    trainable: int
    adapters: int  # LoRA parameters (part of `parameters`)
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes

    def describe(self) -> str:
        share = 100 * self.trainable / max(1, self.parameters)
        return (
            f"parameters {self.parameters:,} (trainable {self.trainable:,} = {share:.3g}%, LoRA adapters "
            f"{self.adapters:,}); estimated memory {format_bytes(self.total_bytes)} = weights "
            f"{format_bytes(self.weight_bytes)} + gradients {format_bytes(self.gradient_bytes)} + AdamW "
            f"state {format_bytes(self.optimizer_bytes)}, plus activations"
        )


def estimate_memory(model: nn.Module) -> MemoryEstimate:
    """The estimate for `model` as adapted (requires_grad marks the trainable parameters; dtypes as they
    will be on the device). Works on meta-device models."""
    parameters = trainable = adapters = weight_bytes = 0
    for name, param in model.named_parameters():
        parameters += param.numel()
        weight_bytes += param.numel() * param.element_size()
        if param.requires_grad:
            trainable += param.numel()
        if is_adapter_parameter(name):
            adapters += param.numel()
    return MemoryEstimate(parameters, trainable, adapters, weight_bytes, 4 * trainable, 8 * trainable)


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


def check_memory(estimate: MemoryEstimate, device: torch.device, limit_gb: float = 0.0) -> int:
    """Raise InputError when the estimate exceeds `limit_gb` (or, when 0, the device's free memory);
    returns the limit in bytes."""
    limit = int(limit_gb * GIB) if limit_gb > 0 else available_memory(device)
    where = f"finetune.memory_limit_gb={limit_gb:g}" if limit_gb > 0 else f"free memory on {device.type}"
    if estimate.total_bytes > limit:
        raise InputError(
            f"this finetune needs about {format_bytes(estimate.total_bytes)} before activations, more than "
            f"the {format_bytes(limit)} {where}: {estimate.describe()}. Use method: lora (fewer trainable "
            "parameters), freeze more (finetune.freeze), or a device with more memory"
        )
    return limit
