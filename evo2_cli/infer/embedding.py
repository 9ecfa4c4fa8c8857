"""Hidden-state embeddings of FASTA records.

Layers are named by index or name:
    N, -N, blocks.N     the residual stream after block N (negative counts from the end; -1 = last block)
    final_norm          the last block's output after the final RMSNorm (what the tied unembedding reads)
Default: `blocks.{num_layers // 2}`, a middle layer: Evo 2's own embedding examples read intermediate blocks,
which carry more general features than the last one (trained to predict the next byte).

`pooling='mean'` averages over every position of the record; `'none'` keeps one vector per position.
Long records are windowed and stitched with the scoring rule (windows.py): each position's vector comes
from the window that gives it the most left context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import Tensor

from evo2_cli.errors import InputError
from evo2_cli.infer.sequences import Sequence
from evo2_cli.infer.windows import DEFAULT_BATCH_TOKENS, DEFAULT_WINDOW, run_windows
from evo2_cli.model.model import StripedHyena

Pooling = Literal["mean", "none"]
FINAL_NORM = "final_norm"


def default_layer(model: StripedHyena) -> str:
    return f"blocks.{len(model.blocks) // 2}"


def resolve_layer(model: StripedHyena, layer: str | int | None) -> tuple[str, int | None]:
    """(canonical name, block index or None for final_norm). InputError names the valid range."""
    n = len(model.blocks)
    if layer is None:
        layer = default_layer(model)
    text = str(layer).strip()
    if text == FINAL_NORM:
        return FINAL_NORM, None
    number = text.removeprefix("blocks.")
    try:
        index = int(number)
    except ValueError:
        raise InputError(
            f"--layer: {text!r} is not a layer; use an index 0..{n - 1} (or negative), blocks.N "
            f"or {FINAL_NORM}"
        ) from None
    if not -n <= index < n:
        raise InputError(
            f"--layer {text}: out of range for a model with {n} blocks (0..{n - 1}, or -{n}..-1)"
        )
    return f"blocks.{index % n}", index % n


def hidden_states(model: StripedHyena, ids: Tensor, block: int | None) -> Tensor:
    """(B, L, D) float32: the residual stream after `block`, or the final-norm output when None."""
    index = len(model.blocks) - 1 if block is None else block
    _, hidden = model(ids, return_hidden_layers=[index])
    h = hidden[index]
    if block is None:
        h = model.norm(h)
    return h.float()


@dataclass(frozen=True)
class Embeddings:
    layer: str
    pooling: Pooling
    ids: list[str]
    lengths: list[int]
    vectors: np.ndarray  # mean: (N, D); none: (sum of lengths, D), record i at offsets[i]:offsets[i+1]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths))).astype(np.int64)


def check_pooling(pooling: str) -> Pooling:
    if pooling not in ("mean", "none"):
        raise InputError(f"--pooling: expected mean or none, got {pooling!r}")
    return pooling  # type: ignore[return-value]


def embed_sequences(
    model: StripedHyena,
    sequences: list[Sequence],
    *,
    layer: str | int | None = None,
    pooling: Pooling = "mean",
    window: int = DEFAULT_WINDOW,
    overlap: int = DEFAULT_WINDOW // 4,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_tokens: Callable[[int], None] | None = None,
) -> Embeddings:
    pooling = check_pooling(pooling)
    name, block = resolve_layer(model, layer)
    per_token = run_windows(
        model,
        [s.tokens for s in sequences],
        lambda ids: hidden_states(model, ids, block),
        window,
        overlap,
        batch_tokens,
        on_tokens,
    )
    dim = model.config.hidden_size
    if pooling == "mean":
        vectors = np.stack([h.mean(0, dtype=np.float64) for h in per_token]).astype(np.float32)
    else:
        vectors = np.concatenate(per_token) if per_token else np.zeros((0, dim), np.float32)
    vectors = vectors.reshape(-1, dim)
    return Embeddings(name, pooling, [s.id for s in sequences], [len(s.tokens) for s in sequences], vectors)
