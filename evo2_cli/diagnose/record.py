"""What diagnose-grads records every step: per-parameter gradient and update statistics, per-site activation
statistics (forward hooks), the order autograd finishes each gradient in (post-accumulate-grad hooks), and the
hcl pole statistics.

Grouping. Every parameter gets a layer (None for the embedding and the final norm), a block type and a kind:

    block type  embedding (tied embedding = unembedding, final norm), hcs, hcm, hcl, attn (the mixer of a
                layer: its pre-norm, in/out projections and filter), mlp (the layer's MLP and its post-norm)
    kind        poles (vortex lambda), p, gamma (modal lambda = -exp(p) exp(gamma)), residues, D, taps
                (hcs/hcm explicit filter), featurizer (the 3-tap short conv), projection, bias, norm,
                embedding, other
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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

    def overflows(self, seq_len: int) -> bool:
        """exp(lambda t) is inf in fp32 for some t < seq_len."""
        return not math.isfinite(self.max_abs_h) or self.max_lambda * (seq_len - 1) > FP32_EXP_LIMIT


@torch.no_grad()
def hcl_stats(model: nn.Module, seq_len: int) -> dict[int, HclStats]:
    """Pole statistics of every hcl layer at the current weights."""
    out = {}
    for i, block in enumerate(model.blocks):
        if getattr(block, "kind", None) != "hcl":
            continue
        lam = block.filter.poles()  # (D, S)
        h = block.filter.filter(seq_len)  # (D, L)
        out[i] = HclStats(
            max_lambda=float(lam.max()),
            frac_nonneg=float((lam >= 0).float().mean()),
            max_abs_h=float(h.abs().max()),
        )
    return out


def _output_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # hyena filters return (y, state)
    return None


class Recorder:
    """Hooks on one model; `start_step`, then forward/backward, then `gradients`, `before_update`,
    `after_update`. Call `close` to remove the hooks."""

    def __init__(self, model: nn.Module):
        kinds = layer_kinds(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [describe_parameter(n, kinds) for n, _ in named]
        self.tensors = [p for _, p in named]
        sites = watched_sites(model)
        self.sites = [info for info, _ in sites]
        self._snapshot: list[Tensor] = []
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

    def _forward_hook(self, index: int):
        def hook(module, inputs, output):
            if index in self._activations or not torch.is_grad_enabled():
                return
            x = _output_tensor(output)
            if x is None:
                return
            a = x.detach().float().abs()
            finite = torch.isfinite(a)
            self._activations[index] = torch.stack(
                (a.max(), a.square().mean().sqrt(), (~finite).sum().float())
            )
            self.forward_order.append(index)

        return hook

    def _grad_hook(self, index: int):
        def hook(param):
            if index not in self._seen_grads:
                self._seen_grads.add(index)
                self.backward_order.append(index)

        return hook

    def start_step(self) -> None:
        # site -> [max_abs, rms, nonfinite] of the first micro-batch
        self._activations: dict[int, Tensor] = {}
        self.forward_order: list[int] = []  # sites in the order their forward finished
        self.backward_order: list[int] = []  # parameters in the order autograd finished their gradient
        self._seen_grads: set[int] = set()

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
