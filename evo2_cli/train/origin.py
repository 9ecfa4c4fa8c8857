"""Where a bad step started: the training guard's report and `evo2 diagnose-grads` share this.

Grouping. Every parameter gets a layer (None for the embedding and the final norm), a block type and a kind:

    block type  embedding (tied embedding = unembedding, final norm), hcs, hcm, hcl, attn (the mixer of a
                layer: its pre-norm, in/out projections and filter), mlp (the layer's MLP and its post-norm)
    kind        poles (vortex lambda), p, gamma (modal lambda = -exp(p) exp(gamma)), residues, D, taps
                (hcs/hcm explicit filter), featurizer (the 3-tap short conv), projection, bias, norm,
                embedding, other

`StepWatch` hooks a model: forward hooks on the watched modules (the embedding, each layer's mixer, MLP and
output, the logits) note which outputs went non-finite and in which order the forward finished them;
post-accumulate-grad hooks note the order autograd finished each parameter's gradient. The rule that reads
them (diagnose/detect.py has the same rule over recorded series):

1. Forward first: the first watched module, in execution order, whose output went non-finite. Everything
   after it (the loss, every gradient) inherits the NaN, so the gradients say nothing about the origin.
2. Otherwise the first parameter with a bad gradient in backward order: backward runs from the loss towards
   the input, so a bad gradient born in layer j reaches everything autograd handles after j.

In the free (vortex) hcl form nothing keeps a pole's lambda below 0; exp(lambda t) overflows fp32 once
lambda x (L - 1) > 88.7, which `HclStats` measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evo2_cli.model.model import modal_filter
from evo2_cli.train.distributed import full_tensor

BLOCK_TYPES: tuple[str, ...] = ("embedding", "hcs", "hcm", "hcl", "attn", "mlp")
FP32_EXP_LIMIT = math.log(torch.finfo(torch.float32).max)  # 88.72: exp(x) is inf in fp32 beyond this

_FILTER_KINDS = {
    "log_poles": "poles",
    "p": "p",
    "gamma": "gamma",
    "residues": "residues",
    "D": "D",
    "h": "taps",
    "short_filter_weight": "featurizer",
}
POLE_KINDS = ("poles", "p", "gamma")


@dataclass(frozen=True)
class ParamInfo:
    name: str
    layer: int | None
    block: str
    kind: str


@dataclass(frozen=True)
class SiteInfo:
    """A module whose output is watched: `role` is mixer, mlp, block (the residual stream after the layer),
    embedding or logits."""

    name: str
    layer: int | None
    block: str
    role: str


def describe_parameter(name: str, layer_kinds: list[str]) -> ParamInfo:
    """Layer, block type and kind of a StripedHyena parameter name (layer_kinds[i]: hcs/hcm/hcl/attn)."""
    parts = name.split(".")
    if parts[0] != "blocks":
        kind = "embedding" if parts[0] == "embedding_layer" else "norm" if parts[-1] == "scale" else "other"
        return ParamInfo(name, None, "embedding", kind)
    layer = int(parts[1])
    mixer = layer_kinds[layer]
    if parts[2] in ("mlp", "post_norm"):
        return ParamInfo(name, layer, "mlp", "norm" if parts[2] == "post_norm" else "projection")
    if parts[2] == "pre_norm":
        kind = "norm"
    elif parts[2] == "filter":
        kind = _FILTER_KINDS.get(parts[3], "other")
    elif parts[-1] == "bias":
        kind = "bias"
    elif parts[-1] == "weight":
        kind = "projection"
    else:
        kind = "other"
    return ParamInfo(name, layer, mixer, kind)


def watched_sites(model: nn.Module) -> list[tuple[SiteInfo, nn.Module]]:
    """The embedding, each layer's mixer (hyena filter or attention), MLP and output, and the logits."""
    kinds = layer_kinds(model)
    sites: list[tuple[SiteInfo, nn.Module]] = [
        (SiteInfo("embedding_layer", None, "embedding", "embedding"), model.embedding_layer)
    ]
    for i, block in enumerate(model.blocks):
        mixer_name = "attn" if kinds[i] == "attn" else "filter"
        sites.append((SiteInfo(f"blocks.{i}.{mixer_name}", i, kinds[i], "mixer"), getattr(block, mixer_name)))
        sites.append((SiteInfo(f"blocks.{i}.mlp", i, "mlp", "mlp"), block.mlp))
        sites.append((SiteInfo(f"blocks.{i}", i, kinds[i], "block"), block))
    sites.append((SiteInfo("logits", None, "embedding", "logits"), model))
    return sites


def layer_kinds(model: nn.Module) -> list[str]:
    return [model.config.kind(i) for i in range(len(model.blocks))]


@dataclass
class HclStats:
    max_lambda: float
    frac_nonneg: float  # fraction of modes with lambda >= 0
    max_abs_h: float  # largest |h[t]| over t < seq_len (inf: the filter overflowed)
    nonneg: int = 0  # modes with lambda >= 0

    def overflows(self, seq_len: int) -> bool:
        """exp(lambda t) is inf in fp32 for some t < seq_len."""
        return not math.isfinite(self.max_abs_h) or self.max_lambda * (seq_len - 1) > FP32_EXP_LIMIT


@torch.no_grad()
def hcl_stats(model: nn.Module, seq_len: int) -> dict[int, HclStats]:
    """Pole statistics of every hcl layer at the current weights (gathered first under FSDP)."""
    out = {}
    for i, block in enumerate(model.blocks):
        if getattr(block, "kind", None) != "hcl":
            continue
        lam = full_tensor(block.filter.poles())  # (D, S)
        h = modal_filter(lam, full_tensor(block.filter.residues), seq_len)  # (D, L)
        nonneg = int((lam >= 0).sum())
        out[i] = HclStats(
            max_lambda=float(lam.max()),
            frac_nonneg=nonneg / lam.numel(),
            max_abs_h=float(h.abs().max()),
            nonneg=nonneg,
        )
    return out


def hcl_overflow_detail(layer: int, stats: HclStats, seq_len: int) -> str:
    """One sentence on an hcl filter whose exp(lambda t) overflowed."""
    return (
        f"forward overflow in the hcl filter of layer {layer}: max lambda {stats.max_lambda:.4g} x (L - 1) = "
        f"{stats.max_lambda * (seq_len - 1):.4g} > {FP32_EXP_LIMIT:.1f}, exp(lambda t) is inf in fp32 "
        f"({100 * stats.frac_nonneg:.0f}% of its modes have lambda >= 0)"
    )


def output_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # hyena filters return (y, state)
    return None


class StepWatch:
    """Hooks on one model (module docstring). `start_step` before each step's forward; `close` removes the
    hooks. Passes without gradients (evaluation) are not watched."""

    def __init__(self, model: nn.Module):
        kinds = layer_kinds(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [describe_parameter(n, kinds) for n, _ in named]
        self.tensors = [p for _, p in named]
        sites = watched_sites(model)
        self.sites = [info for info, _ in sites]
        self.start_step()
        self._handles = [
            module.register_forward_hook(self._forward_hook(i)) for i, (_, module) in enumerate(sites)
        ]
        self._handles += [
            p.register_post_accumulate_grad_hook(self._grad_hook(i)) for i, p in enumerate(self.tensors)
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start_step(self) -> None:
        self.forward_order: list[int] = []  # sites in the order their forward first finished this step
        self.backward_order: list[int] = []  # parameters in the order autograd finished their gradient
        self._seen_grads: set[int] = set()
        self._nonfinite: dict[int, Tensor] = {}  # site -> any non-finite output this step (on the device)

    def observe(self, index: int, output: Tensor) -> None:
        """A watched module's output. Kept on the device: nothing waits for it unless a step goes bad."""
        # min and max are non-finite iff some value is (NaN propagates): one reduction, ~20x cheaper on a
        # CPU than isfinite over the whole tensor.
        bad = torch.stack(torch.aminmax(output)).isfinite().all().logical_not()
        if index in self._nonfinite:
            self._nonfinite[index] |= bad
        else:
            self._nonfinite[index] = bad
            self.forward_order.append(index)

    def first_nonfinite_site(self) -> SiteInfo | None:
        """The first watched module, in forward order, whose output went non-finite this step."""
        if not self.forward_order:
            return None
        flags = torch.stack([self._nonfinite[i] for i in self.forward_order]).tolist()
        return next((self.sites[i] for i, bad in zip(self.forward_order, flags, strict=True) if bad), None)

    def in_backward_order(self, names: list[str]) -> list[str]:
        """`names` (parameters) in the order autograd finished their gradients; any it did not report (FSDP
        assigns sharded gradients without the hook) follow in module order."""
        order = [self.params[i].name for i in self.backward_order]
        rank = {name: k for k, name in enumerate(order)}
        return sorted(names, key=lambda name: rank.get(name, len(order)))

    def _forward_hook(self, index: int):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return
            x = output_tensor(output)
            if x is not None:
                self.observe(index, x.detach())

        return hook

    def _grad_hook(self, index: int):
        def hook(param):
            if index not in self._seen_grads:
                self._seen_grads.add(index)
                self.backward_order.append(index)

        return hook
