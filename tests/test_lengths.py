"""The streamed length summary: hand-computed figures, and the in-memory numpy summary on random files."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evo2_cli.data import lengths
from evo2_cli.data.lengths import summarize_lengths


def reference_summary(values: list[int]) -> dict:
    """The summary preprocess computed with every length in memory: the slow, obvious reference."""
    if not values:
        return {"documents": 0}
    array = np.array(values, dtype=np.int64)
    low, p10, p50, p90, high = np.percentile(array, [0, 10, 50, 90, 100], method="lower").tolist()
    bins = np.ceil(np.log2(np.maximum(array, 1))).astype(np.int64)
    histogram = {f"2^{k}": int(c) for k, c in zip(*np.unique(bins, return_counts=True), strict=True)}
    return {
        "documents": len(array),
        "min": low,
        "p10": p10,
        "median": p50,
        "p90": p90,
        "max": high,
        "mean": round(float(array.mean()), 3),
        "histogram_log2": histogram,
    }


def write(directory: Path, parts: list[list[int]]) -> list[Path]:
    paths = []
    for i, part in enumerate(parts):
        path = directory / f"lengths_{i}.bin"
        np.array(part, dtype=np.int64).tofile(path)
        paths.append(path)
    return paths


def same(got: dict, want: dict) -> None:
    """Equal values, and the same key order and types (what json.dumps of the manifest sees)."""
    assert got == want
    assert list(got) == list(want)
    assert list(got.get("histogram_log2", {})) == list(want.get("histogram_log2", {}))
    for key, value in got.items():
        assert type(value) is type(want[key]), key


def test_hand_computed(tmp_path):
    paths = write(tmp_path, [[5, 0, 3], [], [8, 1, 1000, 2, 7, 4, 9, 6]])
    # Sorted: 0 1 2 3 4 5 6 7 8 9 1000; n = 11, so ranks floor(10 * q): 1, 5 and 9.
    want = {
        "documents": 11,
        "min": 0,
        "p10": 1,
        "median": 5,
        "p90": 9,
        "max": 1000,
        "mean": 95.0,  # 1045 / 11
        "histogram_log2": {"2^0": 2, "2^1": 1, "2^2": 2, "2^3": 4, "2^4": 1, "2^10": 1},
    }
    for chunk in (1, 2, 1 << 20):
        same(summarize_lengths(paths, chunk=chunk), want)
        same(summarize_lengths(paths[::-1], chunk=chunk), want)


def test_exact_past_float_precision(tmp_path):
    # 2^53 + 1 is not a float64: numpy's mean and log2 round it; the streamed summary does not.
    values = [2**53 + 1, 2**60 + 1, 2**53 + 1, 1]
    got = summarize_lengths(write(tmp_path, [values[:2], values[2:]]), chunk=1)
    assert (got["p10"], got["median"], got["p90"]) == (1, 2**53 + 1, 2**53 + 1)
    assert got["max"] == 2**60 + 1
    assert got["histogram_log2"] == {"2^0": 1, "2^54": 2, "2^61": 1}
    # Total 2^60 + 2^54 + 3 = 1170935903116328963, over 4: 292733975779082240.75, whose nearest float64
    # (a multiple of 64 there) is 292733975779082240.
    assert got["mean"] == 292733975779082240.0
    # [2^53 + 1, 2^53 + 1, 1]: exactly 6004799503160662.33, numpy's float sum loses the two ones.
    three = summarize_lengths(write(tmp_path, [[2**53 + 1, 2**53 + 1, 1]]))
    assert three["mean"] == 6004799503160662.0
    assert reference_summary([2**53 + 1, 2**53 + 1, 1])["mean"] == 6004799503160661.0
    assert reference_summary([2**53 + 1])["histogram_log2"] == {"2^53": 1}  # log2 of the rounded float


def test_no_documents(tmp_path):
    assert summarize_lengths([]) == {"documents": 0}
    assert summarize_lengths(write(tmp_path, [[], []]), chunk=3) == {"documents": 0}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9, 10, 11, 12, 19, 20, 21, 101])
def test_percentile_ranks_of_small_counts(tmp_path, n):
    # Distinct values in a scrambled order, so a wrong rank shows as a wrong value.
    values = [(i * 37) % 101 for i in range(n)]
    same(summarize_lengths(write(tmp_path, [values]), chunk=2), reference_summary(values))


def test_bad_input(tmp_path):
    torn = tmp_path / "torn.bin"
    torn.write_bytes(bytes(12))
    with pytest.raises(ValueError, match="12 bytes is not a whole number"):
        summarize_lengths([torn])
    with pytest.raises(ValueError, match="chunk must be between"):
        summarize_lengths([], chunk=0)


values_strategy = st.one_of(
    st.lists(st.integers(0, 2**40), max_size=40),
    st.lists(st.integers(0, 20), max_size=40),  # many ties
    st.tuples(st.integers(0, 2**40), st.integers(1, 40)).map(lambda vn: [vn[0]] * vn[1]),  # all equal
    st.tuples(st.lists(st.integers(0, 1000), min_size=1, max_size=40), st.integers(2**30, 2**48)).map(
        lambda lo: [*lo[0], lo[1]]  # one huge outlier
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    values=values_strategy,
    cuts=st.lists(st.integers(0, 40), max_size=4),
    chunk=st.sampled_from([1, 2, 3, 7, 1 << 20]),
    bucket_bits=st.sampled_from([1, 3, 16]),
    data=st.data(),
)
def test_random_files_match_numpy(tmp_path_factory, values, cuts, chunk, bucket_bits, data):
    """Values cut into files (some empty) in a shuffled order; narrow buckets make many selection passes."""
    bounds = sorted(min(c, len(values)) for c in cuts)
    parts = [values[a:b] for a, b in zip([0, *bounds], [*bounds, len(values)], strict=True)]
    parts = data.draw(st.permutations(parts))
    paths = write(tmp_path_factory.mktemp("lengths"), parts)
    with mock.patch.object(lengths, "_BUCKET_BITS", bucket_bits):
        got = summarize_lengths(paths, chunk=chunk)
    same(got, reference_summary(values))
