"""One optimizer step, for every objective the loop trains (`evo2 train`, `evo2 finetune` LM and heads)
and for `evo2 diagnose-grads`.

An objective says what a batch of the endless training stream is, its loss sum and weight, the metric sums
logged beside the loss, and how it is evaluated; `LanguageModel` is the windows of indexed datasets (the
finetune heads' objective lives in evo2_cli/finetune/heads.py). A step (`TrainStep`) is: forward and backward
over this process's micro-batches, the loss normalized over the whole global batch, the hooks, the gradient
norm, the guard's verdict (none: every step applied), clipping, the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from evo2_cli.runtime import Runtime
from evo2_cli.train.data import Batch, WindowSampler, token_losses
from evo2_cli.train.distributed import all_reduce_sum, full_tensor, gradient_sync
from evo2_cli.train.guard import GradientGuard, Verdict

LN2 = math.log(2)


class Objective:
    """What the loop trains. `batch(first, size, device)`: samples first..first+size-1 of the training stream;
    `weight(batch)`: its share of the step's normalizer; `loss(model, batch)`: (loss summed over the batch,
    fp64 metric sums); `train_metrics(sums)`: the logged metrics from those sums over the global batch;
    `evaluate(model, micro_batch, runtime)`: the validation metrics (`val_loss` first), called
    when `evaluates`; `describe(val)`: their log line. `identity` (data a resume must find unchanged) and
    `meta` (extra meta.json entries of every checkpoint) are plain data."""

    kind = "lm"  # what a checkpoint of this objective was made by
    identity: dict | None = None
    meta: dict = {}  # noqa: RUF012 (never mutated)
    evaluates = False

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return {}

    def describe(self, val: dict[str, float]) -> str:
        return " | ".join(f"{k} {v:.4f}" for k, v in val.items())


class LanguageModel(Objective):
    """Next-token prediction on the windows of indexed datasets, weighted per token (tags masked, lowercase
    down-weighted); bits per base over nucleotide labels."""

    def __init__(self, train: WindowSampler | None = None, val=None, val_count: int = 0, identity=None):
        """`val` (a WindowSampler) and its first `val_count` windows when evaluating; `identity`: the data."""
        self.train, self.val, self.val_count, self.identity = train, val, val_count, identity
        self.evaluates = val is not None

    def batch(self, first: int, size: int, device: torch.device) -> Batch:
        return self.train.batch(range(first, first + size)).to(device)

    def weight(self, batch: Batch) -> torch.Tensor:
        return batch.loss_weights.sum()

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        nll = token_losses(model(batch.input_ids), batch.labels)
        bases = batch.counts_as_base
        metrics = torch.stack([(nll.detach() * bases).sum().double(), bases.sum().double()])
        return (nll * batch.loss_weights).sum(), metrics

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return {"bits_per_base": (sums[0] / sums[1].clamp_min(1)).item() / LN2}

    def describe(self, val: dict[str, float]) -> str:
        return f"val loss {val['val_loss']:.4f} | {val['val_bits_per_base']:.3f} bits/base"

    @torch.no_grad()
    def evaluate(self, model, micro_batch: int, runtime: Runtime) -> dict[str, float]:
        """Validation loss (weighted like training) and bits per base over the fixed windows 0..count-1,
        split evenly over the processes."""
        model.eval()
        usable = max(runtime.world_size, self.val_count - self.val_count % runtime.world_size)
        mine = range(runtime.rank, usable, runtime.world_size)
        totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)
        for first in range(0, len(mine), micro_batch):
            batch = self.val.batch(mine[first : first + micro_batch]).to(runtime.device)
            with runtime.autocast():
                nll = token_losses(model(batch.input_ids), batch.labels)
            totals += torch.stack(
                [
                    (nll * batch.loss_weights).sum().double(),
                    batch.loss_weights.sum().double(),
                    (nll * batch.counts_as_base).sum().double(),
                    batch.counts_as_base.sum().double(),
                ]
            )
        all_reduce_sum(totals, runtime)
        model.train()
        return {
            "val_loss": (totals[0] / totals[1]).item(),
            "val_bits_per_base": (totals[2] / totals[3]).item() / LN2,
        }


def backward_global_batch(
    model: nn.Module,
    batches: list,
    runtime: Runtime,
    objective: Objective | None = None,
) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one step, the gradient all-reduce on the last
    one only. The loss is the objective's loss sum over the whole global batch (every micro-batch of every
    process) divided by its weight sum, so neither accumulation nor the process count changes a step.

    Returns this process's share, fp64: (loss, *the objective's metric sums) (language modelling: NLL summed
    over nucleotide labels, number of nucleotide labels); summed over the processes, the first is the step's
    loss."""
    objective = objective or LanguageModel()
    step_weight = torch.stack([objective.weight(b) for b in batches]).sum().double()
    step_weight = all_reduce_sum(step_weight, runtime).clamp_min(1e-8)
    sums = 0
    for micro, batch in enumerate(batches):
        with gradient_sync(model, micro == len(batches) - 1):
            with runtime.autocast():
                loss_sum, metrics = objective.loss(model, batch)
            # DDP and FSDP average gradients over processes: scale the sum back up.
            (loss_sum * (runtime.world_size / step_weight)).backward()
        sums = sums + torch.cat([(loss_sum.detach() / step_weight).double().reshape(1), metrics])
    return sums


@dataclass
class StepInfo:
    """What a hook sees. `model` is the unwrapped module; gradients are present in `after_backward`."""

    step: int
    model: nn.Module
    lr: float
    loss: float
    grad_norm: float | None = None
    verdict: Verdict | None = None


@dataclass
class TrainHooks:
    after_backward: Callable[[StepInfo], None] | None = None  # gradients accumulated, before clipping
    after_step: Callable[[StepInfo], None] | None = None  # after the optimizer step (or the skip)


@dataclass
class TrainStep:
    """The parts one step needs; `model` is the unwrapped module, `wrapped` what runs forward (DDP, FSDP2).
    `guard` None applies every step; `on_problem(info)` sees a bad step while its gradients are there."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    runtime: Runtime
    grad_clip: float
    wrapped: nn.Module | None = None  # None: the model itself
    guard: GradientGuard | None = None
    hooks: TrainHooks | None = None
    on_problem: Callable[[StepInfo], None] | None = None

    def __post_init__(self):
        self.hooks, self.wrapped = self.hooks or TrainHooks(), self.wrapped or self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def __call__(
        self, step: int, lr: float, batches: list, stop: bool = False
    ) -> tuple[StepInfo, torch.Tensor]:
        """Take optimizer step `step` at `lr` on this process's micro-batches. Returns what the hooks saw and
        the sums over every process: (loss, *the objective's metric sums, processes asked to stop)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.wrapped.train()
        sums = backward_global_batch(self.wrapped, batches, self.runtime, self.objective)
        totals = torch.cat([sums, sums.new_tensor([float(stop)])])  # one all-reduce
        all_reduce_sum(totals, self.runtime)
        info = StepInfo(step, self.model, lr, totals[0].item())
        if self.hooks.after_backward:
            self.hooks.after_backward(info)

        total_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        info.grad_norm = full_tensor(total_norm).item()
        if self.guard is None:
            info.verdict = Verdict(apply_step=True)
        else:
            info.verdict = self.guard.assess(info.loss, info.grad_norm)
        if info.verdict.problem and self.on_problem:
            self.on_problem(info)
        if info.verdict.apply_step:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, total_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.hooks.after_step:
            self.hooks.after_step(info)
        return info, totals
