"""Document-length summary of the manifest, read from raw length files in memory that does not grow with them.

A length file holds int64 values (native byte order, no header), one per document; a split may have any
number of them, in any order, some empty. `summarize_lengths` gives what `np.percentile(..., method="lower")`
over all the values at once would: one streaming pass for the count, exact total, min, max and power-of-two
histogram, then a few passes that narrow down the exact values at the p10, median and p90 ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Buckets per selection pass: 16 bits of the value range resolved per pass (512 KiB of counts at most).
_BUCKET_BITS = 16
# 2^0 .. 2^62: the bit length of a non-negative int64 is the number of these it is not below.
_POWERS = np.left_shift(1, np.arange(63, dtype=np.int64))


def summarize_lengths(paths: list[Path], chunk: int = 1 << 20) -> dict:
    """documents, min, p10, median, p90, max, mean and histogram_log2 of the lengths in `paths`.

    Reads at most `chunk` values at a time. Lengths are expected to be >= 0.
    """
    if not 1 <= chunk <= 1 << 31:  # past 2^31 values a chunk, the split sums of the total could overflow
        raise ValueError(f"chunk must be between 1 and 2^31, got {chunk}")
    for path in paths:
        size = Path(path).stat().st_size
        if size % 8:
            raise ValueError(f"{path}: {size} bytes is not a whole number of int64 lengths")
    count = total = 0
    low = high = None
    bins = np.zeros(64, dtype=np.int64)
    for values in _chunks(paths, chunk):
        count += values.size
        # Exact whatever the lengths: the high and low 32 bits are summed apart, neither sum can overflow
        # int64 below 2^31 values a chunk, and the total is a Python int.
        total += (int((values >> 32).sum()) << 32) + int((values & 0xFFFFFFFF).sum())
        chunk_low, chunk_high = int(values.min()), int(values.max())
        low = chunk_low if low is None else min(low, chunk_low)
        high = chunk_high if high is None else max(high, chunk_high)
        # "2^k" counts 2^(k-1) < bases <= 2^k, that is bit_length(bases - 1) == k ("2^0" holds 0 and 1).
        # Integer comparisons, so exact where a float log2 would round (values past 2^49).
        bits = np.searchsorted(_POWERS, np.maximum(values, 1) - 1, side="right")
        bins += np.bincount(bits, minlength=64)
    if not count:
        return {"documents": 0}
    # numpy's "lower" method: the value at index floor((n - 1) * q / 100) of the sorted values, with
    # q / 100 and the product in float64 exactly as numpy computes them.
    ranks = [math.floor((count - 1) * (q / 100)) for q in (10, 50, 90)]
    p10, p50, p90 = _select(paths, chunk, ranks, low, high)
    return {
        "documents": count,
        "min": low,
        "p10": p10,
        "median": p50,
        "p90": p90,
        "max": high,
        "mean": round(total / count, 3),
        "histogram_log2": {f"2^{k}": int(c) for k, c in enumerate(bins.tolist()) if c},
    }


def _chunks(paths: list[Path], chunk: int) -> Iterator[np.ndarray]:
    for path in paths:
        with open(path, "rb") as file:
            while (values := np.fromfile(file, dtype=np.int64, count=chunk)).size:
                yield values


def _select(paths: list[Path], chunk: int, ranks: list[int], low: int, high: int) -> list[int]:
    """The values at 0-based `ranks` of all the values sorted, every value lying in [low, high].

    Each rank keeps the value range [lo, hi] that holds it and how many values lie below that range. A pass
    counts the values of each range in at most 2^_BUCKET_BITS buckets of equal width and keeps the bucket
    holding the rank, until the ranges are single values. Ranks whose ranges coincide share their counts.
    """
    targets = [[low, high, 0] for _ in ranks]  # lo, hi, values below lo
    while any(lo < hi for lo, hi, _ in targets):
        shifts = {}  # (lo, hi) of an unresolved range -> bucket width as a power of two
        for lo, hi, _ in targets:
            if lo < hi:
                shifts[lo, hi] = max((hi - lo).bit_length() - _BUCKET_BITS, 0)
        counts = {
            key: np.zeros(((key[1] - key[0]) >> shift) + 1, dtype=np.int64) for key, shift in shifts.items()
        }
        for values in _chunks(paths, chunk):
            for (lo, hi), shift in shifts.items():
                inside = values[(values >= lo) & (values <= hi)]
                counts[lo, hi] += np.bincount((inside - lo) >> shift, minlength=counts[lo, hi].size)
        for target, rank in zip(targets, ranks, strict=True):
            lo, hi, below = target
            if lo == hi:
                continue
            cumulative = np.cumsum(counts[lo, hi])
            bucket = int(np.searchsorted(cumulative, rank - below, side="right"))
            shift = shifts[lo, hi]
            if bucket:
                below += int(cumulative[bucket - 1])
            start = lo + (bucket << shift)
            target[:] = [start, min(hi, start + (1 << shift) - 1), below]
    return [lo for lo, _, _ in targets]
