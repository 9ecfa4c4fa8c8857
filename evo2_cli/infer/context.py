"""How a record meets the model: exactly (chunked prefill, the default) or in overlapping windows.

mode 'exact': a record of at most `chunk` tokens is one forward (records batched by length, as windows.py
packs them); a longer one goes through `model.prefill_chunks`, `chunk` tokens at a time, each chunk
continuing the cache the chunks before it left (hcl modal state, hcs/hcm taps, attention KV cache). Every
position sees its whole left context, and memory does not grow with the record except for the attention
KV cache (2 x attention layers x length x hidden size numbers); see memory.py.
mode 'windows': windows.py's overlapping windows of `window` tokens; positions past the first window see
only `overlap` tokens or more of left context (an approximation), at a cost that stays linear in the
record's length even with attention layers.

`per_token_pieces` yields every record's per-position outputs in input order, in pieces as they are
computed (a long record's chunks or windows one after another), so callers can stream them to a file.
A `Readout` says what is read off the model per position (log-probs, a layer's output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evo2_cli.infer.config import Context
from evo2_cli.infer.windows import plan_windows, run_windows
from evo2_cli.memory import unmap_large_buffers
from evo2_cli.model.model import StripedHyena

DEFAULT_POOL_TOKENS = 1 << 22  # records read, run and emitted together (memory stays bounded)


@dataclass(frozen=True)
class Readout:
    """What is read off the model at every position, computed two ways:
    forward(ids (B, L)) -> (B, L, ...) in one forward; chunks(ids (1, L), chunk) -> (1, c, ...) per chunk of
    the chunked prefill, in order (position t's row sees every token up to t)."""

    forward: Callable[[Tensor], Tensor]
    chunks: Callable[[Tensor, int], Iterator[Tensor]]


def per_token_pieces(
    model: StripedHyena,
    records: Iterable[np.ndarray],
    readout: Readout,
    context: Context = Context(),
    *,
    pool_tokens: int = DEFAULT_POOL_TOKENS,
    on_tokens: Callable[[int], None] | None = None,
    before_long: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(record index, rows (n, ...)) pieces of every record's per-position outputs (CPU numpy, the dtype
    `readout` returns): records in input order, each record's pieces consecutive and in position order,
    covering its positions exactly once. `before_long(length)` runs before each record longer than one
    chunk (exact mode; the memory pre-flight)."""
    pool: list[tuple[int, np.ndarray]] = []
    size = 0

    def flush() -> Iterator[tuple[int, np.ndarray]]:
        if pool:
            span = max(len(tokens) for _, tokens in pool)  # every record one window: never split
            outputs = run_windows(
                model,
                [tokens for _, tokens in pool],
                readout.forward,
                window=max(span, 2),
                overlap=1,
                batch_tokens=context.batch_tokens,
                on_tokens=on_tokens,
            )
            yield from zip((index for index, _ in pool), outputs, strict=True)
            pool.clear()

    for index, tokens in enumerate(records):
        if len(tokens) <= context.span:
            pool.append((index, tokens))
            size += len(tokens)
            if size >= pool_tokens:
                yield from flush()
                size = 0
            continue
        yield from flush()
        size = 0
        if context.mode == "exact":
            if before_long is not None:
                before_long(len(tokens))
            unmap_large_buffers()  # else the heap creeps with the chunk count (memory.py)
            pieces = _chunked(model, tokens, readout, context.chunk, on_tokens)
        else:
            pieces = _windowed(model, tokens, readout, context, on_tokens)
        for piece in pieces:
            yield index, piece
    yield from flush()


def token_ids(model: StripedHyena, tokens: np.ndarray) -> Tensor:
    device = next(model.parameters()).device
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)[None]  # (1, L)


def _chunked(
    model: StripedHyena,
    tokens: np.ndarray,
    readout: Readout,
    chunk: int,
    on_tokens: Callable[[int], None] | None,
) -> Iterator[np.ndarray]:
    with torch.no_grad():
        for piece in readout.chunks(token_ids(model, tokens), chunk):
            rows = piece[0].cpu().numpy()  # (c, ...)
            if on_tokens is not None:
                on_tokens(len(rows))
            yield rows


def _windowed(
    model: StripedHyena,
    tokens: np.ndarray,
    readout: Readout,
    context: Context,
    on_tokens: Callable[[int], None] | None,
) -> Iterator[np.ndarray]:
    """One long record's windows (all `window` tokens long) in batches of batch_tokens, in order."""
    windows = plan_windows(len(tokens), context.window, context.overlap)
    rows = max(1, context.batch_tokens // context.window)
    ids = token_ids(model, tokens)[0]
    for at in range(0, len(windows), rows):
        batch = windows[at : at + rows]
        with torch.no_grad():
            result = readout.forward(torch.stack([ids[w.start : w.stop] for w in batch])).cpu().numpy()
        for row, w in enumerate(batch):
            if on_tokens is not None:
                on_tokens(w.stop - w.keep_from)
            yield result[row, w.keep_from - w.start :]
