"""Log-likelihood of FASTA records under the model.

A record x of length L is scored as the official Evo 2 scorer does: sum over t = 1..L-1 of
log p(x_t | x_<t) (natural log; the first base has no context and is not scored, there is no BOS token).
mean = sum / (L - 1); bits per base = -mean / ln 2. With `reverse_complement=True` the reverse complement
is scored the same way and the reported sum and mean are the average of both strands. Records longer than
one chunk are scored exactly through the chunked prefill (every position sees its whole left context), or
in overlapping windows with `Context(mode='windows')` (context.py).

Records are read in pools of about `pool_tokens` tokens; each pool is length-bucketed, scored and
emitted in input order, so memory stays bounded on large files.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evo2_cli.data.alphabet import reverse_complement as revcomp
from evo2_cli.infer.context import DEFAULT_POOL_TOKENS, Context, Readout, per_token_pieces, token_ids
from evo2_cli.infer.sequences import Sequence
from evo2_cli.infer.windows import pick_logprobs, token_logprobs
from evo2_cli.model.model import StripedHyena

LN2 = math.log(2.0)
# The header lines of the score table (plus RC_COLUMNS with --rc) and of --per-token's table
SCORE_COLUMNS = ("id", "length", "n_scored", "sum_ll", "mean_ll", "bits_per_base")
RC_COLUMNS = ("sum_ll_forward", "sum_ll_rc")
PER_TOKEN_COLUMNS = ("id", "position", "base", "logprob")


@dataclass(frozen=True)
class Score:
    id: str
    length: int
    sum_ll: float  # averaged over both strands when the reverse complement was scored
    mean_ll: float
    bits_per_base: float
    tokens: np.ndarray  # (L,) uint8, upper-cased, as scored
    logprobs: np.ndarray | None  # (L,) float32 forward strand, NaN at position 0 (None: not kept)
    sum_ll_forward: float
    sum_ll_rc: float | None = None

    @property
    def n_scored(self) -> int:
        return self.length - 1

    def per_token_lines(self, block: int = 1 << 16) -> Iterator[str]:
        """TSV lines `id position base logprob` for positions 1..L-1 (0-based positions), `block` lines per
        string: a 1M-token record's text is never held whole (it would cost ~100 bytes per token)."""
        bases = self.tokens.tobytes().decode("ascii", "replace")
        for start in range(1, self.length, block):
            yield "".join(
                f"{self.id}\t{t}\t{bases[t]}\t{float(self.logprobs[t])!r}\n"
                for t in range(start, min(start + block, self.length))
            )

    def row(self) -> dict[str, object]:
        values = (self.id, self.length, self.n_scored, self.sum_ll, self.mean_ll, self.bits_per_base)
        row: dict[str, object] = dict(zip(SCORE_COLUMNS, values, strict=True))
        if self.sum_ll_rc is not None:
            row.update(zip(RC_COLUMNS, (self.sum_ll_forward, self.sum_ll_rc), strict=True))
        return row


class _StrandSum:
    """One strand's log-probs as its pieces come: their sum over positions 1.., added exactly as np.sum(
    logprobs[1:], dtype=float64) adds (pairwise within blocks of numpy's buffer size, the blocks in turn: no
    digit changes), and the values themselves only when `keep` (else 4 bytes per base are never held)."""

    def __init__(self, keep: bool):
        self.total, self.tail, self.kept = 0.0, None, [] if keep else None

    def add(self, piece: np.ndarray) -> None:
        if self.kept is not None:
            self.kept.append(piece)
        values = piece[1:] if self.tail is None else np.concatenate((self.tail, piece))  # skip position 0
        block = np.getbufsize()
        full = len(values) - len(values) % block
        for at in range(0, full, block):
            self.total += float(np.sum(values[at : at + block], dtype=np.float64))
        self.tail = values[full:]

    def finish(self) -> tuple[float, np.ndarray | None]:
        if self.tail is not None and len(self.tail):
            self.total += float(np.sum(self.tail, dtype=np.float64))
        return self.total, None if self.kept is None else np.concatenate(self.kept)


def _summary(record: Sequence, forward: _StrandSum, rc: _StrandSum | None) -> Score:
    n = len(record.tokens) - 1
    sum_forward, logprobs = forward.finish()
    sum_rc = rc.finish()[0] if rc is not None else None
    total = sum_forward if sum_rc is None else (sum_forward + sum_rc) / 2
    mean = total / n if n > 0 else float("nan")
    return Score(
        record.id, len(record.tokens), total, mean, -mean / LN2, record.tokens, logprobs, sum_forward, sum_rc
    )


def chunked_logprobs(model: StripedHyena, ids: Tensor, chunk: int) -> Iterator[Tensor]:
    """`token_logprobs` of ids (B, L) through the chunked prefill: (B, c) float32 per chunk, in order. Each
    logits row is read where it stands (row t predicts token t + 1): no chunk's logits are copied or kept."""
    cache = model.new_cache(ids.shape[0])
    carried = ids.new_full((ids.shape[0], 1), float("nan"), dtype=torch.float32)  # no context at t = 0
    start = 0
    for logits, _ in model.prefill_chunks(ids, cache, chunk):  # (B, c, V)
        stop = start + logits.shape[1]
        targets = ids[:, start + 1 : stop + 1]  # the last chunk has no next token for its last row
        picked = pick_logprobs(logits[:, : targets.shape[1]], targets)  # (B, c) or (B, c - 1)
        yield torch.cat((carried, picked[:, : stop - start - 1]), dim=1)
        carried, start = picked[:, stop - start - 1 :], stop


def logprob_readout(model: StripedHyena) -> Readout:
    """Per-position log p(x_t | x_<t) (NaN at t = 0), in one forward or chunk by chunk."""
    return Readout(
        lambda ids: token_logprobs(model, ids), lambda ids, chunk: chunked_logprobs(model, ids, chunk)
    )


def score_sequences(
    model: StripedHyena,
    sequences: Iterable[Sequence],
    context: Context = Context(),
    *,
    reverse_complement: bool = False,
    pool_tokens: int = DEFAULT_POOL_TOKENS,
    on_tokens: Callable[[int], None] | None = None,
    before_long: Callable[[int], None] | None = None,
    keep_logprobs: bool = True,
) -> Iterator[Score]:
    """One Score per sequence, in input order (sequences are upper-cased uint8 tokens). `before_long`: see
    `per_token_pieces`. `keep_logprobs=False` leaves Score.logprobs None and keeps only running sums."""
    kept: collections.deque[Sequence] = collections.deque()  # scores not out yet (one pool's worth at most)

    def strands() -> Iterator[np.ndarray]:
        for sequence in sequences:
            kept.append(sequence)
            yield sequence.tokens
            if reverse_complement:
                yield revcomp(sequence.tokens)

    strand = _StrandSum(keep_logprobs)
    forward: _StrandSum | None = None  # with the reverse complement, while its strand runs
    current = 0
    stream = per_token_pieces(
        model,
        strands(),
        logprob_readout(model),
        context,
        pool_tokens=pool_tokens,
        on_tokens=on_tokens,
        before_long=before_long,
    )
    for index, piece in stream:
        if index != current:  # pieces of one strand are consecutive: `current` is complete
            if reverse_complement and forward is None:
                forward = strand
            else:
                yield _summary(kept.popleft(), forward or strand, strand if forward else None)
                forward = None
            strand, current = _StrandSum(keep_logprobs and forward is None), index
        strand.add(piece)
    if kept:  # the last record's last strand
        yield _summary(kept.popleft(), forward or strand, strand if forward else None)


@torch.no_grad()
def score_reference(model: StripedHyena, tokens: np.ndarray) -> np.ndarray:
    """Per-position log-probs of one record from ONE forward over the whole record (no windows, no batch)."""
    return token_logprobs(model, token_ids(model, tokens))[0].cpu().numpy()
