"""Memory of a training run or finetune before it starts: weights + gradients + AdamW state + activations, against the
device's memory.

The estimate is read off the adapted model itself, built under a FakeTensorMode (shapes and dtypes, no
data, so it costs nothing even for evo2-40b), with the dtype every parameter will have on the device:

    weights      sum of numel x element size (frozen matmul weights are bf16 on CUDA, the rest fp32)
    gradients    4 bytes per trainable parameter (fp32)
    optimizer    8 bytes per trainable parameter (AdamW exp_avg and exp_avg_sq, fp32)
    activations  what autograd saves for backward in one forward of train.micro_batch x data.seq_len
                 tokens with the language-model loss, counted by running the fake model under a
                 saved-tensors hook (bf16 autocast emulated on the CPU for CUDA runs); with
                 train.activation_checkpointing only the block inputs and one block's saved tensors

Not counted: the transient buffers of backward (about one block's activations at a time), allocator
slack, CUDA context and kernels' workspaces (several hundred MiB on a GPU), and the Python process itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evo2_cli.errors import InputError

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
    activation_bytes: int
    activations_for: str  # e.g. "micro_batch 4 x seq_len 1024"

    @property
    def static_bytes(self) -> int:
        """What must fit before the first forward: weights, gradients and AdamW state."""
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes

    def describe(self) -> str:
        share = 100 * self.trainable / max(1, self.parameters)
        return (
            f"parameters {self.parameters:,} (trainable {self.trainable:,} = {share:.3g}%, LoRA adapters "
            f"{self.adapters:,}); estimated memory {format_bytes(self.total_bytes)} = weights "
            f"{format_bytes(self.weight_bytes)} + gradients {format_bytes(self.gradient_bytes)} + AdamW "
            f"state {format_bytes(self.optimizer_bytes)} + activations {format_bytes(self.activation_bytes)} "
            f"({self.activations_for})"
        )


def fake_mode():
    """A FakeTensorMode: tensors with shapes, dtypes and devices but no data. Unlike the meta device it
    runs the model's forward as on the CPU (autocast, FFTs), which the activation count needs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def estimate_memory(
    model: nn.Module,
    micro_batch: int,
    seq_len: int,
    *,
    bf16_autocast: bool = False,
    activation_checkpointing: bool = False,
    is_adapter: Callable[[str], bool] = lambda name: False,
) -> MemoryEstimate:
    """The estimate for `model` as adapted (requires_grad marks the trainable parameters; dtypes as they
    will be on the device). `model` must have been built under `fake_mode()`; call this inside it."""
    parameters = trainable = adapters = weight_bytes = 0
    for name, param in model.named_parameters():
        parameters += param.numel()
        weight_bytes += param.numel() * param.element_size()
        if param.requires_grad:
            trainable += param.numel()
        if is_adapter(name):
            adapters += param.numel()
    activations = activation_bytes(model, micro_batch, seq_len, bf16_autocast, activation_checkpointing)
    where = f"micro_batch {micro_batch} x seq_len {seq_len}"
    where += ", activation checkpointing" if activation_checkpointing else ""
    where += ", bf16 autocast" if bf16_autocast else ""
    return MemoryEstimate(
        parameters, trainable, adapters, weight_bytes, 4 * trainable, 8 * trainable, activations, where
    )


def activation_bytes(
    model: nn.Module, micro_batch: int, seq_len: int, bf16_autocast: bool, checkpointing: bool
) -> int:
    """Bytes autograd keeps for backward in one training forward of the (fake) model plus its loss:
    distinct storages saved by autograd that are not parameters or buffers."""
    owned = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}  # storage id -> bytes

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in owned:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    per_block: list[int] = []
    marks: list[int] = []
    hooks = []
    for block in model.blocks:
        hooks.append(block.register_forward_pre_hook(lambda *_: marks.append(sum(saved.values()))))
        hooks.append(
            block.register_forward_hook(lambda *_: per_block.append(sum(saved.values()) - marks[-1]))
        )
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
    was_training = model.training
    model.train()
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast),
        ):
            logits = model(ids)  # (B, L, V)
            F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    total = sum(saved.values())
    if not checkpointing:
        return total
    # Each block is recomputed in backward: its input stays (fp32 residual stream), its saved tensors
    # exist for one block at a time.
    block_inputs = len(per_block) * micro_batch * seq_len * model.config.hidden_size * 4
    return total - sum(per_block) + block_inputs + max(per_block, default=0)


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
        if estimate.static_bytes <= limit:
            fix = (
                "Lower train.micro_batch or data.seq_len, or set train.activation_checkpointing: true "
                "(the weights and optimizer state alone fit)"
            )
        else:
            fix = (
                "Use method: lora (fewer trainable parameters), freeze more (finetune.freeze), or a "
                "device with more memory"
            )
        raise InputError(
            f"this finetune needs about {format_bytes(estimate.total_bytes)}, more than the "
            f"{format_bytes(limit)} {where}: {estimate.describe()}. {fix}"
        )
    return limit
