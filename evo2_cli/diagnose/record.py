"""What diagnose-grads records every step: per-parameter gradient and update statistics, per-site activation
statistics (forward hooks), the order autograd finishes each gradient in (post-accumulate-grad hooks), and the
hcl pole statistics. The grouping of parameters and sites, the hooks and the pole statistics are the training
guard's (evo2_cli/train/origin.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from evo2_cli.train.origin import HclStats, StepWatch


class Recorder(StepWatch):
    """The guard's hooks (train/origin.py), recording more: activation statistics of the first micro-batch
    of a step; `start_step`, then forward/backward, then `gradients`, `before_update`, `after_update`."""

    def __init__(self, model):
        super().__init__(model)
        self._snapshot: list[Tensor] = []

    def start_step(self) -> None:
        super().start_step()
        # site -> [max_abs, rms, nonfinite] of the first micro-batch
        self._activations: dict[int, Tensor] = {}

    def observe(self, index: int, output: Tensor) -> None:
        if index in self._activations:
            return
        a = output.float().abs()
        finite = torch.isfinite(a)
        self._activations[index] = torch.stack((a.max(), a.square().mean().sqrt(), (~finite).sum().float()))
        self.forward_order.append(index)

    def activations(self) -> list[tuple[float, float, int]]:
        """(max |x|, rms, non-finite count) per site, first micro-batch of the step; NaN where not run."""
        rows = []
        values = {i: v.tolist() for i, v in self._activations.items()}
        for i in range(len(self.sites)):
            max_abs, rms, bad = values.get(i, (math.nan, math.nan, 0.0))
            rows.append((max_abs, rms, int(bad)))
        return rows

    @torch.no_grad()
    def gradients(self) -> tuple[list[float], list[int]]:
        """Gradient norm (fp32) and non-finite count per parameter; a parameter without grad counts 0."""
        stats = []
        for p in self.tensors:
            if p.grad is None:
                stats.append(torch.zeros(2, device=p.device))
                continue
            g = p.grad.detach().float()
            stats.append(torch.stack((g.norm(), (~torch.isfinite(g)).sum().float())))
        table = torch.stack(stats).cpu().tolist() if stats else []
        return [row[0] for row in table], [int(row[1]) for row in table]

    @torch.no_grad()
    def before_update(self) -> None:
        self._snapshot = [p.detach().clone() for p in self.tensors]

    @torch.no_grad()
    def after_update(self) -> tuple[list[float], list[float], list[int]]:
        """Parameter norm, update-to-parameter ratio ||new - old|| / ||old||, non-finite count (after the
        step)."""
        stats = []
        for p, old in zip(self.tensors, self._snapshot, strict=True):
            new, old = p.detach().float(), old.float()
            old_norm = old.norm()
            # A zero-initialized parameter (a bias at step 0) has no meaningful ratio: NaN, not 1e30.
            ratio = torch.where(old_norm > 0, (new - old).norm() / old_norm, torch.nan)
            stats.append(torch.stack((new.norm(), ratio, (~torch.isfinite(new)).sum().float())))
        self._snapshot = []
        table = torch.stack(stats).cpu().tolist() if stats else []
        return [r[0] for r in table], [r[1] for r in table], [int(r[2]) for r in table]


def group_norm(norms: list[float], members: list[int]) -> float:
    """sqrt(sum of squares) of the member norms (no overflow on the way); inf and NaN propagate."""
    return math.hypot(*(norms[i] for i in members))


@dataclass
class StepRecord:
    """Everything recorded at one training step of one variant (lists are indexed like Recorder.params or
    Recorder.sites). Gradient values are before clipping; hcl stats are at the weights the step's forward
    used; parameter norms and update ratios are after the optimizer step."""

    step: int
    lr: float
    loss: float
    grad_norm: float  # total, before clipping
    grad: list[float]
    grad_nonfinite: list[int]
    param_norm: list[float]
    update_ratio: list[float]
    param_nonfinite: list[int]
    activations: list[tuple[float, float, int]]  # per site: max |x|, rms, non-finite count
    forward_order: list[int]
    backward_order: list[int]
    hcl: dict[int, HclStats]
