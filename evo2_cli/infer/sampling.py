"""Next-token sampling with the official engine's semantics, and a per-row random stream.

Order (as the Vortex / flash-attn sampler): keep the `top_k` largest logits (0 = all), divide by
`temperature`, then keep the smallest set of those whose probability reaches `top_p` (nucleus, within the
top-k), renormalize and draw. `top_k == 1` is greedy (argmax; temperature and top_p ignored).

Optionally the logits are first restricted to a set of allowed tokens (`allowed`, e.g. A C G T): the
official engine samples over the whole vocabulary, which a trained model makes irrelevant but a random one
does not.

Draws are by inverse CDF from one uniform number per row taken from that row's own `torch.Generator`, so a
row's output depends only on its seed, never on which other rows share its batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evo2_cli.infer.config import SamplingSettings


def restrict(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """Logits with every token outside `allowed` (a bool mask over the vocab) set to -inf."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed, float("-inf"))


def filtered_probs(logits: Tensor, settings: SamplingSettings) -> tuple[Tensor, Tensor]:
    """(probabilities (B, K), vocab ids (B, K)) of the candidate tokens after top-k, temperature, top-p."""
    logits = logits.float()
    if settings.top_k > 0:
        values, ids = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1)  # (B, K) descending
    else:
        values, ids = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    values = values / settings.temperature
    probs = torch.softmax(values, dim=-1)  # (B, K), descending
    if settings.top_p < 1.0:
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= settings.top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, ids


def sample(logits: Tensor, settings: SamplingSettings, generators: list[torch.Generator]) -> Tensor:
    """One token id per row of `logits` (B, V); row b draws one uniform number from `generators[b]`."""
    if settings.greedy:
        return logits.argmax(-1)
    probs, ids = filtered_probs(logits, settings)
    cdf = torch.cumsum(probs.double(), dim=-1)  # (B, K)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])  # (B,)
    u = u.to(cdf.device) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).clamp_max(cdf.shape[-1] - 1)  # (B, 1)
    return ids.gather(-1, pick)[:, 0]


def sample_reference(logits: Tensor, settings: SamplingSettings, u: float) -> int:
    """One row, plain Python: the same rule as `sample`, written out step by step (tests compare them)."""
    row = [float(x) for x in logits]
    if settings.greedy:
        return max(range(len(row)), key=lambda i: (row[i], -i))
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    if settings.top_k > 0:
        order = order[: settings.top_k]
    scaled = [row[i] / settings.temperature for i in order]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]  # exp(-inf) = 0 for restricted tokens
    total = sum(weights)
    probs = [w / total for w in weights]
    kept, mass = [], 0.0
    for p in probs:
        kept.append(p if (settings.top_p >= 1.0 or mass < settings.top_p) else 0.0)
        mass += p
    total = sum(kept)
    target, running = u * total, 0.0
    for token, p in zip(order, kept, strict=True):
        running += p
        if running > target and p > 0:
            return token
    return next(t for t, p in zip(reversed(order), reversed(kept), strict=True) if p > 0)


def row_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, keys): independent streams per prompt and sample."""
    mixed = seed & 0xFFFFFFFFFFFF
    for key in keys:
        mixed = (mixed * 1_000_003 + key + 1) % (2**61 - 1)  # a Mersenne prime: no collisions for small keys
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mixed)
    return generator
