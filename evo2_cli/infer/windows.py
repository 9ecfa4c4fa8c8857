"""Long sequences through a fixed context: overlapping windows, length-bucketed batches, stitching.

Stitching rule (scoring and embedding alike). A record of length L and a window W with overlap O (1 <= O < W):
windows start at 0, S, 2S, ... (stride S = W - O) while they end before L, and one last window ends exactly
at L. Each position is taken from the FIRST window that contains it, the one that gives it the most left
context: window k keeps the positions from where window k-1 ended up to its own end. So every position is
computed exactly once, and every position past the first window sees at least O tokens of left context
(the first window's positions see everything before them). A record with L <= W is one window, exactly the
unwindowed computation.

Batches: windows are sorted by length and packed up to `batch_tokens` tokens (rows x longest window), padded
on the right with PAD; the model is causal, so padding never changes an earlier position's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evo2_cli.data.alphabet import PAD_ID
from evo2_cli.infer.config import DEFAULT_BATCH_TOKENS, DEFAULT_WINDOW, check_window
from evo2_cli.model.model import StripedHyena


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window
    stop: int  # one past its last token
    keep_from: int  # first position this window owns (positions keep_from..stop-1)


def plan_windows(length: int, window: int, overlap: int) -> list[Window]:
    """The windows of a record of `length` tokens (see the module docstring for the rule)."""
    check_window(window, overlap)
    if length <= window:
        return [Window(0, length, 0)]
    stride = window - overlap
    starts = [*range(0, length - window, stride), length - window]
    windows, previous_stop = [], 0
    for start in starts:
        windows.append(Window(start, start + window, previous_stop))
        previous_stop = start + window
    return windows


def pick_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, n) float32 log p(targets) under logits (B, n, V)."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def token_logprobs(model: StripedHyena, ids: Tensor) -> Tensor:
    """(B, L) float32: log p(ids[:, t] | ids[:, :t]) at t >= 1; NaN at t = 0 (no context, no BOS)."""
    picked = pick_logprobs(model(ids)[:, :-1], ids[:, 1:])  # (B, L - 1)
    return torch.cat((picked.new_full((ids.shape[0], 1), float("nan")), picked), dim=1)


def run_windows(
    model: StripedHyena,
    sequences: list[np.ndarray],
    forward: Callable[[Tensor], Tensor],
    window: int = DEFAULT_WINDOW,
    overlap: int = DEFAULT_WINDOW // 4,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_tokens: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """`forward(ids (B, W)) -> (B, W, ...)` evaluated over every record's windows and stitched back:
    one array (L, ...) per record, in order (float32 or float64 as `forward` returns, on the CPU)."""
    device = next(model.parameters()).device
    jobs = [(i, w) for i, tokens in enumerate(sequences) for w in plan_windows(len(tokens), window, overlap)]
    jobs.sort(key=lambda job: (-(job[1].stop - job[1].start), job[0], job[1].start))
    outputs: list[np.ndarray | None] = [None] * len(sequences)
    at = 0
    while at < len(jobs):
        longest = jobs[at][1].stop - jobs[at][1].start
        rows = max(1, batch_tokens // longest)
        batch = jobs[at : at + rows]
        at += len(batch)
        ids = np.full((len(batch), longest), PAD_ID, dtype=np.int64)  # (B, W), right-padded
        for row, (i, w) in enumerate(batch):
            ids[row, : w.stop - w.start] = sequences[i][w.start : w.stop]
        with torch.no_grad():
            result = forward(torch.from_numpy(ids).to(device)).cpu().numpy()  # (B, W, ...)
        for row, (i, w) in enumerate(batch):
            if outputs[i] is None:
                outputs[i] = np.empty((len(sequences[i]), *result.shape[2:]), dtype=result.dtype)
            outputs[i][w.keep_from : w.stop] = result[row, w.keep_from - w.start : w.stop - w.start]
            if on_tokens is not None:
                on_tokens(w.stop - w.keep_from)
    return outputs  # every record has >= 1 window, so none is left None
