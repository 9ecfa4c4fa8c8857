"""AdamW over the model package's weight-decay groups, and the schedule (linear warmup, cosine to min_lr)."""

from __future__ import annotations

import math

import torch
from torch import nn

from evo2_cli.model.model import optimizer_param_groups
from evo2_cli.train.config import OptimSection


def build_optimizer(model: nn.Module, config: OptimSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; norms, biases, embeddings and hyena filter parameters get no
    weight decay (the model package decides which)."""
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in optimizer_param_groups(model, config.weight_decay)
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def learning_rate(step: int, config: OptimSection, max_steps: int) -> float:
    """lr of optimizer step `step` (0-based): linear warmup to lr over warmup_steps, then cosine to min_lr
    at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
