"""Log-likelihood of FASTA records under the model.

A record x of length L is scored as the official Evo 2 scorer does: sum over t = 1..L-1 of
log p(x_t | x_<t) (natural log; the first base has no context and is not scored, there is no BOS token).
mean = sum / (L - 1); bits per base = -mean / ln 2. With `reverse_complement=True` the reverse complement
is scored the same way and the reported sum and mean are the average of both strands. Records longer than
the window are scored in overlapping windows (see windows.py for the stitching rule).

Records are read in pools of about `pool_tokens` tokens; each pool is windowed, length-bucketed, scored and
emitted in input order, so memory stays bounded on large files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from evo2_cli.data.alphabet import reverse_complement as revcomp
from evo2_cli.infer.sequences import Sequence
from evo2_cli.infer.windows import DEFAULT_BATCH_TOKENS, DEFAULT_WINDOW, run_windows, token_logprobs
from evo2_cli.model.model import StripedHyena

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Score:
    id: str
    length: int
    sum_ll: float  # averaged over both strands when the reverse complement was scored
    mean_ll: float
    bits_per_base: float
    tokens: np.ndarray  # (L,) uint8, upper-cased, as scored
    logprobs: np.ndarray  # (L,) float32 forward strand, NaN at position 0
    sum_ll_forward: float
    sum_ll_rc: float | None = None

    @property
    def n_scored(self) -> int:
        return self.length - 1

    def per_token_lines(self) -> str:
        """TSV lines `id position base logprob` for positions 1..L-1 (0-based positions)."""
        bases = self.tokens.tobytes().decode("ascii", "replace")
        return "".join(
            f"{self.id}\t{t}\t{bases[t]}\t{float(self.logprobs[t])!r}\n" for t in range(1, self.length)
        )

    def row(self) -> dict[str, object]:
        row: dict[str, object] = {
            "id": self.id,
            "length": self.length,
            "n_scored": self.n_scored,
            "sum_ll": self.sum_ll,
            "mean_ll": self.mean_ll,
            "bits_per_base": self.bits_per_base,
        }
        if self.sum_ll_rc is not None:
            row["sum_ll_forward"] = self.sum_ll_forward
            row["sum_ll_rc"] = self.sum_ll_rc
        return row


def _summary(sequence: Sequence, forward: np.ndarray, rc: np.ndarray | None) -> Score:
    n = len(sequence.tokens) - 1
    sum_forward = float(np.sum(forward[1:], dtype=np.float64))
    sum_rc = float(np.sum(rc[1:], dtype=np.float64)) if rc is not None else None
    total = sum_forward if sum_rc is None else (sum_forward + sum_rc) / 2
    mean = total / n if n > 0 else float("nan")
    return Score(
        sequence.id,
        len(sequence.tokens),
        total,
        mean,
        -mean / LN2,
        sequence.tokens,
        forward,
        sum_forward,
        sum_rc,
    )


def score_sequences(
    model: StripedHyena,
    sequences: Iterable[Sequence],
    *,
    window: int = DEFAULT_WINDOW,
    overlap: int = DEFAULT_WINDOW // 4,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    reverse_complement: bool = False,
    pool_tokens: int = 1 << 22,
    on_tokens: Callable[[int], None] | None = None,
) -> Iterator[Score]:
    """One Score per sequence, in input order (sequences are upper-cased uint8 tokens)."""

    def flush(pool: list[Sequence]) -> list[Score]:
        arrays = [s.tokens for s in pool]
        if reverse_complement:
            arrays += [revcomp(s.tokens) for s in pool]
        per_token = run_windows(
            model,
            arrays,
            lambda ids: token_logprobs(model, ids),
            window,
            overlap,
            batch_tokens,
            on_tokens,
        )
        rcs = per_token[len(pool) :] if reverse_complement else [None] * len(pool)
        return [_summary(s, f, r) for s, f, r in zip(pool, per_token[: len(pool)], rcs, strict=True)]

    pool: list[Sequence] = []
    size = 0
    for sequence in sequences:
        pool.append(sequence)
        size += len(sequence.tokens)
        if size >= pool_tokens:
            yield from flush(pool)
            pool, size = [], 0
    if pool:
        yield from flush(pool)


@torch.no_grad()
def score_reference(model: StripedHyena, tokens: np.ndarray) -> np.ndarray:
    """Per-position log-probs of one record from ONE forward over the whole record (no windows, no batch)."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)[None]  # (1, L)
    return token_logprobs(model, ids)[0].cpu().numpy()
