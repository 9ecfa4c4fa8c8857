"""Autoregressive generation with the model's cached decoding (prefill once, then one `step` per token).

Each output row is one (prompt, sample) pair. Rows are grouped by prompt length so a batch never needs
padding (the cache has no notion of padding), and every row draws from its own generator seeded from
(seed, prompt index, sample index): the output does not depend on --batch-size or on the other prompts.

Prompts of any length: the prefill runs `chunk` tokens at a time (`model.prefill_chunks`, exact), so a
1 Mbase prompt needs one chunk's activations plus the attention KV cache, which is reserved once for the
prompt and every new token (no regrowth while decoding).

`generate_reference` re-runs the full forward over the whole sequence for every new token (the naive
baseline of the benchmark) with the same sampler and generators; tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evo2_cli.infer.config import DEFAULT_CHUNK
from evo2_cli.infer.sampling import SamplingSettings, restrict, row_generator, sample
from evo2_cli.infer.windows import pick_logprobs
from evo2_cli.memory import unmap_large_buffers
from evo2_cli.model.model import StripedHyena

DNA_TOKENS = b"ACGT"
LOGPROB_COLUMNS = ("id", "position", "token", "logprob")  # generate --logprobs' table


@dataclass(frozen=True)
class Generation:
    """One generated continuation: prompt `prompt_index`, sample `sample_index` (0-based)."""

    prompt_index: int
    sample_index: int
    tokens: np.ndarray  # (N,) int64 generated ids (prompt excluded)
    logprobs: np.ndarray  # (N,) float64 log p(token | everything before) under the model's raw distribution


def allowed_mask(alphabet: bytes | None, vocab_size: int, device: torch.device) -> Tensor | None:
    """A bool mask over the vocab allowing only `alphabet`'s bytes, or None for the whole vocabulary."""
    if alphabet is None:
        return None
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[list(alphabet)] = True
    return mask


def _draw(
    logits: Tensor, mask: Tensor | None, settings: SamplingSettings, generators: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """One token per row from (B, V) logits, and its log-prob under the raw distribution: (B,), (B,).
    Both decoders draw through here, so they can differ only in how they get the logits."""
    token = sample(restrict(logits, mask), settings, generators)
    return token, pick_logprobs(logits, token)


def _batches(prompts: list[np.ndarray], num_samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt index, sample index) rows grouped by prompt length, at most batch_size per batch."""
    rows = sorted(
        ((p, s) for p in range(len(prompts)) for s in range(num_samples)),
        key=lambda row: (len(prompts[row[0]]), row),
    )
    batches: list[list[tuple[int, int]]] = []
    for row in rows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and len(prompts[last[0][0]]) == len(prompts[row[0]]):
            last.append(row)
        else:
            batches.append([row])
    return batches


@torch.no_grad()
def generate(
    model: StripedHyena,
    prompts: list[np.ndarray],
    max_new_tokens: int,
    settings: SamplingSettings,
    *,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    alphabet: bytes | None = DNA_TOKENS,
    chunk: int = DEFAULT_CHUNK,
    on_tokens: Callable[[int], None] | None = None,
    on_prefill: Callable[[int], None] | None = None,
    before_long: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Continue each prompt (uint8 tokens, already validated and upper-cased) `num_samples` times.

    `alphabet`: the tokens that may be sampled (default A C G T; None = the whole vocabulary as the official
    engine). Returns Generations ordered by (prompt, sample). `on_tokens(n)` reports generated tokens,
    `on_prefill(n)` prefilled ones (rows x chunk); `before_long(prompt + new tokens, rows)` runs before
    a batch whose prompts are longer than one chunk (the memory pre-flight).
    """
    device = next(model.parameters()).device
    mask = allowed_mask(alphabet, model.config.vocab_size, device)
    results: list[Generation] = []
    for rows in _batches(prompts, num_samples, batch_size):
        ids = torch.as_tensor(np.stack([prompts[p] for p, _ in rows]), dtype=torch.long, device=device)
        generators = [row_generator(seed, p, s) for p, s in rows]
        total = ids.shape[1] + max_new_tokens
        if ids.shape[1] > chunk:
            if before_long is not None:
                before_long(total, len(rows))
            unmap_large_buffers()  # else the heap creeps with the chunk count (memory.py)
        cache = model.new_cache(len(rows), max_length=total)  # KV buffers sized once, no regrowth
        for logits, _ in model.prefill_chunks(ids, cache, chunk):  # (B, c, V)
            if on_prefill is not None:
                on_prefill(logits.shape[0] * logits.shape[1])
        logits = logits[:, -1]  # (B, V): the prompt's last position
        tokens, logprobs = [], []
        for n in range(max_new_tokens):
            token, logprob = _draw(logits, mask, settings, generators)
            tokens.append(token)
            logprobs.append(logprob)
            if n + 1 < max_new_tokens:
                logits = model.step(token, cache)
            if on_tokens is not None:
                on_tokens(len(rows))
        results.extend(_collect(rows, tokens, logprobs))
    return sorted(results, key=lambda g: (g.prompt_index, g.sample_index))


@torch.no_grad()
def generate_reference(
    model: StripedHyena,
    prompts: list[np.ndarray],
    max_new_tokens: int,
    settings: SamplingSettings,
    *,
    num_samples: int = 1,
    seed: int = 0,
    alphabet: bytes | None = DNA_TOKENS,
) -> list[Generation]:
    """The same as `generate` without any cache: one full forward over the whole sequence per new token."""
    device = next(model.parameters()).device
    mask = allowed_mask(alphabet, model.config.vocab_size, device)
    results: list[Generation] = []
    for p, prompt in enumerate(prompts):
        for s in range(num_samples):
            generators = [row_generator(seed, p, s)]
            ids = torch.from_numpy(np.asarray(prompt, dtype=np.int64)).to(device)[None]  # (1, P)
            tokens, logprobs = [], []
            for _ in range(max_new_tokens):
                logits = model(ids)[:, -1]  # (1, V)
                token, logprob = _draw(logits, mask, settings, generators)
                tokens.append(token)
                logprobs.append(logprob)
                ids = torch.cat((ids, token[:, None]), dim=1)
            results.extend(_collect([(p, s)], tokens, logprobs))
    return results


def _collect(rows: list[tuple[int, int]], tokens: list[Tensor], logprobs: list[Tensor]) -> list[Generation]:
    if tokens:
        token_array = torch.stack(tokens, 1).cpu().numpy()  # (B, N)
        logprob_array = torch.stack(logprobs, 1).double().cpu().numpy()
    else:
        token_array = np.zeros((len(rows), 0), dtype=np.int64)
        logprob_array = np.zeros((len(rows), 0), dtype=np.float64)
    return [Generation(p, s, token_array[i], logprob_array[i]) for i, (p, s) in enumerate(rows)]
