"""LoRA: low-rank adapters on the linear layers of StripedHyena, and folding them back into the weights.

`LoRALinear` replaces an `nn.Linear` in place and keeps its `weight` and `bias` under the same names, so a
state dict of an adapted model is the base model's state dict plus `<layer>.lora_A` (rank, in) and
`<layer>.lora_B` (out, rank):

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T        A ~ kaiming-uniform, B = 0 at the start

so an adapted model computes exactly what its base computes until B moves. `merge_lora` replaces each
`LoRALinear` by a plain `nn.Linear` holding W + (alpha / rank) B A (computed in fp32), which gives back a
plain StripedHyena for save_model / export_vortex (the arithmetic is the model package's `folded_weight`,
which also folds the adapters of a checkpoint's base when it is read back).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evo2_cli.errors import InputError
from evo2_cli.finetune.config import LORA_ALIASES, LORA_TARGETS, LoraSection
from evo2_cli.model.checkpoint import folded_weight


class LoRALinear(nn.Module):
    """A linear layer with a frozen-by-convention base (weight, bias) and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        if device.type != "meta":
            # nn.Linear's own init for A (kaiming-uniform, a = sqrt(5)), drawn from the adapter generator.
            bound = 1 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        base = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return base + self.scaling * update

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = folded_weight(self.weight, self.lora_A, self.lora_B, self.scaling)
        linear.weight = nn.Parameter(weight.detach(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def _targets(model: nn.Module, leaves: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every nn.Linear inside model.blocks whose attribute is in `leaves`."""
    found = []
    for parent in model.blocks.modules():
        for attribute, child in parent.named_children():
            if attribute in leaves and isinstance(child, nn.Linear):
                found.append((parent, attribute, child))
    return found


def inject_lora(model: nn.Module, config: LoraSection, seed: int = 0) -> list[str]:
    """Replace the targeted linear layers of `model.blocks` by LoRALinear (in place); returns their module
    names. Adapter init is drawn from a generator seeded with `seed`, so it is the same on every run.
    InputError when a target matches no layer of this model."""
    leaves = config.target_leaves()
    targets = _targets(model, leaves)
    present = {attribute for _, attribute, _ in targets}
    for name in config.targets:
        if not set(LORA_ALIASES.get(name, (name,))) & present:
            raise InputError(
                f"finetune.lora.targets: {name!r} matches no linear layer of this model (layout "
                f"{model.config.layout}); layers present: {', '.join(sorted(_all_leaves(model)))}"
            )
    generator = torch.Generator().manual_seed(seed)
    names = {id(module): name for name, module in model.named_modules()}
    adapted = []
    for parent, attribute, linear in targets:
        adapted.append(f"{names[id(parent)]}.{attribute}")
        setattr(parent, attribute, LoRALinear(linear, config.rank, config.alpha, config.dropout, generator))
    return adapted


def _all_leaves(model: nn.Module) -> set[str]:
    return {attribute for _, attribute, _ in _targets(model, LORA_TARGETS)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear of `model` into a plain nn.Linear (in place); returns how many were merged."""
    merged = 0
    for parent in list(model.modules()):
        for attribute, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attribute, child.merged())
                merged += 1
    return merged
