"""Memory of a training run or finetune before it starts, per process: weights + gradients + AdamW state +
activations, against the device's memory. `evo2 train` and `evo2 finetune` both print it and refuse (exit 2,
with the fix) when it does not fit.

The estimate is read off the (adapted) model itself, built under a FakeTensorMode (shapes and dtypes, no
data, so it costs nothing even for evo2-40b), with the dtype every parameter will have on the device:

    weights      sum of numel x element size (frozen matmul weights are bf16 on CUDA, the rest fp32)
    gradients    4 bytes per trainable parameter (fp32)
    optimizer    8 bytes per trainable parameter (AdamW exp_avg and exp_avg_sq, fp32)
    activations  what autograd saves for backward in one forward of train.micro_batch x data.seq_len
                 tokens with the language-model loss, counted by running the fake model under a
                 saved-tensors hook (bf16 autocast emulated on the CPU for CUDA runs); with
                 train.activation_checkpointing only the block inputs and one block's saved tensors

Under torchrun with N processes (each one's share; activations do not change, micro_batch is per process):
    DDP          everything above, plus DDP's gradient buckets (a second fp32 copy of the gradients)
    FSDP2        weights, gradients and AdamW state / N, plus the parameters gathered while they are used:
                 two blocks (the one computing and the one prefetched) and the root's own (embedding, final
                 norm), and one block's unsharded gradients before they are reduce-scattered

The peak counts the larger of gradients and activations, not both (see MemoryEstimate.total_bytes).
Not counted: the transient buffers of backward (about one block's activations at a time), allocator
slack, CUDA context and kernels' workspaces (several hundred MiB on a GPU), and the Python process itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evo2_cli.errors import InputError
from evo2_cli.memory import GIB, available_memory, format_bytes
from evo2_cli.model import StripedHyena
from evo2_cli.runtime import Runtime
from evo2_cli.train.config import TrainJob
from evo2_cli.train.distributed import torchrun_value


@dataclass(frozen=True)
class MemoryEstimate:
    """One process's share (see the module docstring)."""

    parameters: int  # all parameters, adapters included
    trainable: int
    adapters: int  # LoRA parameters (part of `parameters`)
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activations_for: str  # e.g. "micro_batch 4 x seq_len 1024"
    parallel_bytes: int = 0  # DDP gradient buckets, or FSDP2's gathered parameters and unsharded gradients
    layout: str = "1 process"  # e.g. "FSDP2 over 8 processes"

    @property
    def static_bytes(self) -> int:
        """What must fit before the first forward: weights, gradients, AdamW state, parallel buffers."""
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.parallel_bytes

    @property
    def total_bytes(self) -> int:
        """The peak: weights, AdamW state and parallel buffers, plus the larger of activations and gradients.
        The two are not at their largest together: gradients are freed after each step (set_to_none), and
        backward frees a block's activations as it makes that block's gradients."""
        rest = self.weight_bytes + self.optimizer_bytes + self.parallel_bytes
        return rest + max(self.activation_bytes, self.gradient_bytes)

    def describe(self) -> str:
        share = 100 * self.trainable / max(1, self.parameters)
        adapters = f", LoRA adapters {self.adapters:,}" if self.adapters else ""
        parallel = (
            f" + {self.layout} buffers {format_bytes(self.parallel_bytes)}" if self.parallel_bytes else ""
        )
        return (
            f"parameters {self.parameters:,} (trainable {self.trainable:,} = {share:.3g}%{adapters}); "
            f"estimated memory per process ({self.layout}) {format_bytes(self.total_bytes)} = weights "
            f"{format_bytes(self.weight_bytes)} + AdamW state {format_bytes(self.optimizer_bytes)}{parallel}"
            f" + the larger of gradients {format_bytes(self.gradient_bytes)} and activations "
            f"{format_bytes(self.activation_bytes)} ({self.activations_for})"
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
    processes: int = 1,
    parallelism: str = "ddp",
) -> MemoryEstimate:
    """The estimate for one of `processes` processes training `model` as adapted (requires_grad marks the
    trainable parameters; dtypes as they will be on the device) under `parallelism` ("ddp" or "fsdp").
    `model` must have been built under `fake_mode()`; call this inside it."""
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
    gradients, optimizer, parallel, layout = 4 * trainable, 8 * trainable, 0, "1 process"
    if processes > 1 and parallelism == "fsdp":
        blocks = [
            (_bytes(b.parameters()), 4 * _count(b.parameters(), trainable_only=True)) for b in model.blocks
        ]
        root = weight_bytes - sum(weights for weights, _ in blocks)  # the embedding and final norm
        parallel = 2 * max(w for w, _ in blocks) + root + max(g for _, g in blocks)
        weight_bytes, gradients, optimizer = (
            -(-x // processes) for x in (weight_bytes, gradients, optimizer)
        )
        layout = f"FSDP2 over {processes} processes"
    elif processes > 1:
        parallel, layout = gradients, f"DDP over {processes} processes"
    return MemoryEstimate(
        parameters,
        trainable,
        adapters,
        weight_bytes,
        gradients,
        optimizer,
        activations,
        where,
        parallel,
        layout,
    )


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _count(params, trainable_only: bool) -> int:
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


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


def check_memory(
    estimate: MemoryEstimate,
    device: torch.device,
    limit_gb: float,
    *,
    subject: str,
    static_fix: str,
) -> int:
    """Raise InputError when the estimate exceeds `limit_gb` (train.memory_limit_gb) or, when 0, this
    process's share of the free memory (a GPU's own; the host's RAM split over the processes torchrun started
    on it). `subject` names the run ("this finetune"); `static_fix` is the advice when the weights and
    optimizer state alone do not fit. Returns the limit in bytes."""
    if limit_gb > 0:
        limit, where = int(limit_gb * GIB), f"train.memory_limit_gb={limit_gb:g}"
    else:
        sharing = 1 if device.type == "cuda" else max(1, torchrun_value("LOCAL_WORLD_SIZE", 1))
        limit = available_memory(device) // sharing
        where = f"free memory on {device.type}" + (f" / {sharing} processes" if sharing > 1 else "")
    if estimate.total_bytes > limit:
        if estimate.static_bytes <= limit:
            fix = (
                "Lower train.micro_batch or data.seq_len, or set train.activation_checkpointing: true (the "
                "weights and optimizer state alone fit)"
            )
        else:
            fix = static_fix
        raise InputError(
            f"{subject} needs about {format_bytes(estimate.total_bytes)}, more than the "
            f"{format_bytes(limit)} {where}: {estimate.describe()}. {fix}"
        )
    return limit


def preflight_memory(job: TrainJob, runtime: Runtime) -> MemoryEstimate:
    """`evo2 train`'s estimate for its own model (a fresh StripedHyena of `job.model`) on this process;
    InputError (exit 2, with the fix) when it does not fit."""
    cfg = job.train
    with fake_mode():
        estimate = estimate_memory(
            StripedHyena(job.model),
            cfg.micro_batch,
            job.data.seq_len,
            bf16_autocast=runtime.autocast_dtype is not None,
            activation_checkpointing=cfg.activation_checkpointing,
            processes=runtime.world_size,
            parallelism=cfg.parallelism,
        )
    if runtime.distributed and cfg.parallelism == "fsdp":
        fix = "Run more processes (FSDP2 splits weights, gradients and AdamW state over them), or bigger GPUs"
    else:
        fix = (
            "Set train.parallelism: fsdp and run N processes under torchrun (weights, gradients and AdamW "
            "state are then split N ways), or use a device with more memory"
        )
    check_memory(estimate, runtime.device, cfg.memory_limit_gb, subject="this training run", static_fix=fix)
    return estimate
