"""Record metadata on disk: column round trips, batches by sub-bucket, sorting groups and merging runs, each
against a slow in-memory reference."""

from __future__ import annotations

import hashlib
import random
import zlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from evo2_cli.data import record_store
from evo2_cli.data.record_store import Columns, RecordBuffer, Repeat, plan_groups, sort_group

# Ids as headers give them: first words, any bytes but whitespace (non-UTF-8 included).
ids = st.binary(min_size=1, max_size=12).map(lambda raw: raw.replace(b"\n", b"_") or b"_")


def make_columns(records: list[tuple[bytes, int, int, list[int]]]) -> Columns:
    """(id, split, input, document lengths) per record; line = index, offset = 1000 * index."""
    count = len(records)
    return Columns(
        [record_id for record_id, *_ in records],
        {
            "split": np.array([split for _, split, _, _ in records], dtype=np.int64),
            "input": np.array([input_index for _, _, input_index, _ in records], dtype=np.int64),
            "line": np.arange(count, dtype=np.int64),
            "offset": np.arange(count, dtype=np.int64) * 1000,
            "process": np.full(count, 7, dtype=np.int64),
        },
        np.cumsum([len(lengths) for *_, lengths in records]).astype(np.int64),
        np.array([n for *_, lengths in records for n in lengths], dtype=np.int64),
    )


def rows(columns: Columns) -> list[tuple]:
    """One tuple per record: id, the fixed columns, and its document lengths."""
    lengths, starts = columns.lengths.tolist(), columns.document_starts().tolist()
    return [
        (
            columns.ids[i],
            *(int(columns.fixed[name][i]) for name in record_store.FIXED),
            lengths[starts[i] : int(columns.document_ends[i])],
        )
        for i in range(len(columns))
    ]


records = st.lists(
    st.tuples(
        ids,
        st.integers(0, 2),
        st.integers(0, 3),
        st.lists(st.integers(0, 5000), min_size=1, max_size=4),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(records, st.data())
def test_columns_read_back_any_range_of_records(tmp_path_factory, records, data):
    columns = make_columns(records)
    path = tmp_path_factory.mktemp("columns") / "meta"
    with open(path, "wb") as handle:
        handle.write(b"something before")
        section = columns.write(handle, "meta")
    start = data.draw(st.integers(0, len(records)))
    end = data.draw(st.integers(start, len(records)))
    with open(path, "rb") as handle:
        read = section.read(handle.fileno(), start, end)
    assert rows(read) == rows(columns)[start:end]
    order = np.array(data.draw(st.permutations(range(len(records)))), dtype=np.int64)
    permuted = [rows(columns)[i] for i in order]
    assert rows(columns.take(order)) == permuted
    assert rows(Columns.concatenate([columns, columns.take(order)])) == rows(columns) + permuted


def test_no_records(tmp_path):
    empty = make_columns([])
    assert empty.document_starts().tolist() == [] and empty.tokens().tolist() == []
    assert len(empty.take(np.zeros(0, dtype=np.int64))) == 0
    path = tmp_path / "meta"
    with open(path, "wb") as handle:
        section = empty.write(handle, "meta")
    assert (section.records, section.documents) == (0, 0)
    with open(path, "rb") as handle:
        assert rows(section.read(handle.fileno(), 0, 0)) == []
        assert list(record_store.merged([section, section], {"meta": handle.fileno()}, 8)) == []
    assert list(record_store.merged([], {}, 8)) == []


def test_a_batch_gives_every_record_once_by_sub_bucket(tmp_path):
    rng = random.Random(0)
    buffer = RecordBuffer(input_index=3, process=11, flush_documents=600)
    added = []
    for i in range(500):
        record_id = b"r%d" % rng.randrange(300)
        lengths = tuple(rng.randrange(1, 50) for _ in range(rng.randint(1, 3)))
        full = buffer.add(record_id, rng.randrange(3), i + 1, 100 * i, lengths, [n - 1 for n in lengths])
        added.append((record_id, lengths))
        assert full == (sum(len(documents) for _, documents in added) >= 600)  # time to write it
    path = tmp_path / "11.records"
    with open(path, "wb") as handle:
        batch = record_store.write_batch(handle, path.name, buffer.columns())
    bucket_of = {record_id: zlib.crc32(record_id) % record_store.SUB_BUCKETS for record_id, _ in added}
    with open(path, "rb") as handle:
        fd = handle.fileno()
        sizes = batch.sizes(fd)
        assert sizes[0].sum() == 500 and sizes[1].sum() == sum(len(lengths) for _, lengths in added)
        buckets = [bucket_of[record_id] for record_id, _ in added]
        assert sizes[0].tolist() == np.bincount(buckets, minlength=record_store.SUB_BUCKETS).tolist()
        documents = np.bincount(buckets, [len(lengths) for _, lengths in added], record_store.SUB_BUCKETS)
        assert sizes[1].tolist() == documents.astype(np.int64).tolist()
        seen = []
        for first, stop in [(0, 5), (5, 600), (600, record_store.SUB_BUCKETS)]:
            part = batch.read_buckets(fd, first, stop)
            assert all(first <= bucket_of[record_id] < stop for record_id in part.ids)
            assert set(part.fixed["input"].tolist()) == {3} and set(part.fixed["process"].tolist()) == {11}
            seen += [(record_id, tuple(lengths)) for record_id, *_, lengths in rows(part)]
        assert batch.read_buckets(fd, 0, 0) is None
        # Records of one sub-bucket keep the order they were added in.
        lines: dict[int, list[int]] = {}
        for record_id, _, _, line, *_ in rows(batch.read_buckets(fd, 0, record_store.SUB_BUCKETS)):
            lines.setdefault(bucket_of[record_id], []).append(line)
    assert sorted(seen) == sorted(added)
    assert all(found == sorted(found) for found in lines.values())


def test_groups_are_bounded_and_cover_every_sub_bucket():
    sizes = np.zeros((2, record_store.SUB_BUCKETS), dtype=np.int64)
    sizes[0, [0, 1, 2, 500, 1023]] = [3, 3, 3, 9, 1]
    sizes[1] = sizes[0]
    sizes[1, 2] = 40  # many documents in one sub-bucket
    groups = plan_groups(sizes, 6, 20)
    # 6 records; 40 documents (over, but alone); 9 records (over, but alone); the last record. A group
    # reaches up to the next one's first records (no empty groups).
    assert groups == [(0, 2), (2, 500), (500, 1023), (1023, 1024)]
    assert plan_groups(np.zeros((2, record_store.SUB_BUCKETS), dtype=np.int64), 6, 20) == []


def test_a_sorted_group_is_written_as_one_section_per_split(tmp_path):
    ordered = make_columns([(b"a", 0, 0, [3]), (b"b", 0, 1, [0, 4]), (b"a", 2, 0, [5])])
    with open(tmp_path / "runs", "wb") as handle:
        sections = record_store.split_sections(handle, "runs", ordered, 3)
    assert [(section.records, section.documents) for section in sections] == [(2, 3), (0, 0), (1, 1)]
    with open(tmp_path / "runs", "rb") as handle:
        read = [rows(section.read(handle.fileno(), 0, section.records)) for section in sections]
    assert read == [rows(ordered)[:2], [], rows(ordered)[2:]]


def digest_of(content: dict):
    """A content digest over `content`: spool offset -> (split, the record's bytes)."""

    def content_digest(process: int, split: int, start: int, end: int) -> bytes:
        assert (process, split, end - start) == (7, content[start][0], len(content[start][1]))
        return hashlib.blake2b(content[start][1], digest_size=16).digest()

    return content_digest


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"a", b"b", b"ab", b"\xff", b"c"]),
            st.integers(0, 2),
            st.integers(0, 2),
            st.sampled_from([b"AC", b"GT", b"ACG"]),
        ),
        max_size=30,
    )
)
def test_sort_group_matches_the_obvious_sort(records):
    # Two documents a record: a digest must cover the bytes of both.
    columns = make_columns(
        [(record_id, split, input_index, [1, len(seq) - 1]) for record_id, split, input_index, seq in records]
    )
    content = {1000 * i: (split, seq) for i, (_, split, _, seq) in enumerate(records)}
    ordered, repeat = sort_group(columns, digest_of(content))
    # Reference: (split, input, id, digest of the bytes, then read order).
    key = [
        (s, n, i, hashlib.blake2b(seq, digest_size=16).digest(), line)
        for line, (i, s, n, seq) in enumerate(records)
    ]
    assert [int(line) for line in ordered.fixed["line"]] == [k[-1] for k in sorted(key)]
    places: dict[bytes, list[tuple[int, int]]] = {}
    for line, (record_id, _, input_index, _) in enumerate(records):
        places.setdefault(record_id, []).append((input_index, line))
    repeats = [(*sorted(p)[1], i, *sorted(p)[0]) for i, p in places.items() if len(p) > 1]
    assert repeat == (Repeat(*min(repeats)) if repeats else None)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"ab", b"\xff", b"c", b"d"]), st.integers(0, 2),
                          st.lists(st.integers(0, 9), min_size=1, max_size=3)), max_size=60),
       st.integers(1, 5), st.integers(1, 7))  # fmt: skip
def test_merging_sorted_runs_gives_the_sorted_whole(tmp_path_factory, records, runs, block):
    """Runs as sort_group leaves them (each sorted by (input, id), an id in one run only, records sharing
    both in a fixed order), merged a few records at a time, give the (input, id) order of all, records
    sharing both still in their run's order (their run may cut them across blocks)."""
    # Each record's last document length tells it apart.
    records = [(r, n, [*lengths, 100 + k]) for k, (r, n, lengths) in enumerate(records)]
    path = tmp_path_factory.mktemp("runs") / "runs"
    by_run: dict[int, list] = {}
    for record_id, input_index, lengths in records:
        by_run.setdefault(zlib.crc32(record_id) % runs, []).append((record_id, 0, input_index, lengths))
    with open(path, "wb") as handle:
        sections = [
            make_columns(sorted(part, key=lambda r: (r[2], r[0]))).write(handle, "runs")
            for part in by_run.values()
        ]
    with open(path, "rb") as handle:
        blocks = list(record_store.merged(sections, {"runs": handle.fileno()}, block * len(sections)))
    assert all(len(part) for part in blocks)
    merged = [
        (record_id, fixed[1], lengths)
        for block_columns in blocks
        for record_id, *fixed, lengths in rows(block_columns)
    ]
    assert merged == sorted(records, key=lambda r: (r[1], r[0]))
