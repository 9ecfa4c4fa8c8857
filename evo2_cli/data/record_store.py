"""Where preprocess stored every record, kept on disk so that memory does not grow with the record count.

Workers append each record's metadata (id, split, input, header line, place in a spool file and the token
length of each of its documents) to a metadata file, in batches sorted by sub-bucket: a hash of the id into
SUB_BUCKETS parts. Every copy of an id lands in the same sub-bucket, so the main process takes sub-buckets a
group at a time, finds repeated ids inside each group, sorts the group by (split, input, id, content digest
for records sharing all three) and writes it back as a sorted run per split. Groups are bounded while no
sub-bucket alone outgrows one: up to about SUB_BUCKETS * group_records (134M) records; past that, or with one
id repeated that often, a group is one sub-bucket and grows with the records. Merging the runs of a split by
(input, id) gives the canonical order: records of one id never sit in two runs, so the merge never has to
break a tie between runs.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from evo2_cli.fsio import pread_exact

SUB_BUCKETS = 1024  # ids hash into this many parts; a sorting group is a range of them
FIXED = ("split", "input", "line", "offset", "process")  # int64 columns (process: the pid that spooled it)


def _pread_int64(fd: int, count: int, offset: int) -> np.ndarray:
    return np.frombuffer(pread_exact(fd, 8 * count, offset), dtype=np.int64)


@dataclass
class Columns:
    """Metadata of some records as columns: ids, the FIXED int64 columns, and each record's documents (the
    end of its documents in `lengths`, which holds the token length of every document, record by record)."""

    ids: list[bytes]
    fixed: dict[str, np.ndarray]
    document_ends: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def document_starts(self) -> np.ndarray:
        return np.concatenate(([0], self.document_ends))[:-1].astype(np.int64)

    def document_counts(self) -> np.ndarray:
        """Documents of each record."""
        return self.document_ends - self.document_starts()

    def tokens(self) -> np.ndarray:
        """Tokens of each record (all its documents)."""
        cumulative = np.concatenate(([0], np.cumsum(self.lengths))).astype(np.int64)
        return cumulative[self.document_ends] - cumulative[self.document_starts()]

    def take(self, order: np.ndarray) -> Columns:
        """The records at the indices `order`, in that order."""
        starts = self.document_starts()[order]
        counts = self.document_ends[order] - starts
        ends = np.cumsum(counts)
        # The index of every document of the chosen records: each record's run, shifted to its new place.
        documents = np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)
        return Columns(
            list(map(self.ids.__getitem__, order.tolist())),
            {name: column[order] for name, column in self.fixed.items()},
            ends,
            self.lengths[documents],
        )

    @staticmethod
    def concatenate(parts: list[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        shifts = np.cumsum([0] + [len(part.lengths) for part in parts[:-1]])
        return Columns(
            list(itertools.chain.from_iterable(part.ids for part in parts)),
            {name: np.concatenate([part.fixed[name] for part in parts]) for name in FIXED},
            np.concatenate([part.document_ends + shift for part, shift in zip(parts, shifts, strict=True)]),
            np.concatenate([part.lengths for part in parts]),
        )

    def write(self, handle, file: str) -> Section:
        """Appends the columns to `handle` (the file named `file`): FIXED columns, id ends, document ends
        (all int64, one value per record), token lengths (one per document), then the ids back to back."""
        at = handle.tell()
        # Ids end with a newline (an id is the first word of a header: it never holds one), so a range of them
        # reads back with one split.
        blob = b"\n".join(self.ids) + b"\n" if self.ids else b""
        id_ends = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == ord("\n")) + 1
        if len(id_ends) != len(self):
            raise ValueError("a record id holds a newline")
        for column in (*(self.fixed[name] for name in FIXED), id_ends, self.document_ends, self.lengths):
            handle.write(np.ascontiguousarray(column, dtype=np.int64))
        handle.write(blob)
        return Section(file, at, len(self), len(self.lengths))


@dataclass(frozen=True)
class Section:
    """Records written by Columns.write: where, and how many records and documents."""

    file: str
    at: int
    records: int
    documents: int

    def read(self, fd: int, start: int, end: int) -> Columns:
        """Records [start, end)."""
        count, columns = end - start, len(FIXED)

        def column(k: int, first: int, stop: int) -> np.ndarray:  # int64 column k, rows [first, stop)
            return _pread_int64(fd, stop - first, self.at + 8 * (k * self.records + first))

        fixed = {name: column(k, start, end) for k, name in enumerate(FIXED)}
        # The previous record's ends are where this range's ids and documents start.
        before = max(start - 1, 0)
        id_ends = column(columns, before, end)
        document_ends = column(columns + 1, before, end)
        id_base = int(id_ends[0]) if start else 0
        document_base = int(document_ends[0]) if start else 0
        id_ends, document_ends = id_ends[len(id_ends) - count :], document_ends[len(document_ends) - count :]
        documents_at = self.at + 8 * (columns + 2) * self.records
        document_stop = int(document_ends[-1]) if count else document_base
        lengths = _pread_int64(fd, document_stop - document_base, documents_at + 8 * document_base)
        id_stop = int(id_ends[-1]) if count else id_base
        blob = pread_exact(fd, id_stop - id_base, documents_at + 8 * self.documents + id_base)
        ids = blob.split(b"\n")[:-1] if count else []
        return Columns(ids, fixed, document_ends - document_base, lengths)


@dataclass(frozen=True)
class Batch:
    """Records of one task written together, sorted by sub-bucket. Before the section, at `starts_at`: where
    each sub-bucket's records start, then where its documents start (SUB_BUCKETS + 1 int64 each)."""

    section: Section
    starts_at: int

    def sizes(self, fd: int) -> np.ndarray:
        """Records and documents of each sub-bucket: shape (2, SUB_BUCKETS)."""
        starts = _pread_int64(fd, 2 * (SUB_BUCKETS + 1), self.starts_at).reshape(2, SUB_BUCKETS + 1)
        return np.diff(starts, axis=1)

    def read_buckets(self, fd: int, first: int, stop: int) -> Columns | None:
        """The records of sub-buckets [first, stop), or None when there are none."""
        start = int(_pread_int64(fd, 1, self.starts_at + 8 * first)[0])
        end = int(_pread_int64(fd, 1, self.starts_at + 8 * stop)[0])
        return self.section.read(fd, start, end) if end > start else None


class RecordBuffer:
    """A task's records since its last flush, appended one at a time (the hot path of many short reads), with
    the base count of each of their documents (for the manifest's length percentiles)."""

    def __init__(self, input_index: int, process: int, flush_documents: int):
        self.input_index, self.process, self.flush_documents = input_index, process, flush_documents
        self.clear()

    def clear(self) -> None:
        self.ids: list[bytes] = []
        self.splits, self.lines, self.offsets = array("q"), array("q"), array("q")
        self.document_ends, self.lengths, self.base_lengths = array("q"), array("q"), array("q")

    def __len__(self) -> int:
        return len(self.ids)

    def add(
        self, record_id: bytes, split: int, line: int, offset: int, lengths: tuple, base_lengths: list
    ) -> bool:
        """Appends a record; True when the buffer is full (time to write it). A record has one document or
        more, so the documents bound the records too."""
        self.ids.append(record_id)
        self.splits.append(split)
        self.lines.append(line)
        self.offsets.append(offset)
        self.lengths.extend(lengths)
        self.document_ends.append(len(self.lengths))
        self.base_lengths.extend(base_lengths)
        return len(self.lengths) >= self.flush_documents

    def columns(self) -> Columns:
        count = len(self)
        return Columns(
            self.ids,
            {
                "split": np.array(self.splits, dtype=np.int64),
                "input": np.full(count, self.input_index, dtype=np.int64),
                "line": np.array(self.lines, dtype=np.int64),
                "offset": np.array(self.offsets, dtype=np.int64),
                "process": np.full(count, self.process, dtype=np.int64),
            },
            np.array(self.document_ends, dtype=np.int64),
            np.array(self.lengths, dtype=np.int64),
        )


def write_batch(handle, file: str, columns: Columns) -> Batch:
    """Appends records (a RecordBuffer's columns) to `handle` (the file named `file`) as one batch."""
    # Sub-bucket of each record: ids hashed (crc32) into SUB_BUCKETS parts; int16 sorts by radix.
    buckets = np.fromiter(map(zlib.crc32, columns.ids), dtype=np.int64, count=len(columns)) % SUB_BUCKETS
    records = np.bincount(buckets, minlength=SUB_BUCKETS)
    documents = np.bincount(buckets, columns.document_counts(), SUB_BUCKETS)
    starts_at = handle.tell()
    for sizes in (records, documents):
        handle.write(np.concatenate(([0], np.cumsum(sizes))).astype(np.int64))
    order = np.argsort(buckets.astype(np.int16), kind="stable")
    return Batch(columns.take(order).write(handle, file), starts_at)


def plan_groups(sizes: np.ndarray, most_records: int, most_documents: int) -> list[tuple[int, int]]:
    """Consecutive ranges of sub-buckets of at most `most_records` records and `most_documents` documents
    (`sizes`: records and documents of each sub-bucket); a sub-bucket larger than that is a group alone. A
    group reaches up to the next one's first records (empty sub-buckets never start one)."""
    groups: list[tuple[int, int]] = []
    first, records, documents = 0, 0, 0
    for bucket in range(SUB_BUCKETS):
        more_records, more_documents = int(sizes[0, bucket]), int(sizes[1, bucket])
        over = records + more_records > most_records or documents + more_documents > most_documents
        if records and more_records and over:
            groups.append((first, bucket))
            first, records, documents = bucket, 0, 0
        records, documents = records + more_records, documents + more_documents
    if records:
        groups.append((first, SUB_BUCKETS))
    return groups


@dataclass(frozen=True)
class Repeat:
    """A record whose id an earlier record (in input order, then line) already has."""

    input_index: int
    line: int
    record_id: bytes
    first_input: int
    first_line: int

    @property
    def place(self) -> tuple[int, int]:
        return self.input_index, self.line


ContentDigest = Callable[[int, int, int, int], bytes]  # (process, split, start, end) -> digest of the bytes


def sort_group(columns: Columns, content_digest: ContentDigest) -> tuple[Columns, Repeat | None]:
    """The group's records in (split, input, id) order, records sharing all three ordered by a digest of their
    bytes; and the earliest repeated id of the group (in input order, then line), if any."""
    ids, inputs, lines = columns.ids, columns.fixed["input"], columns.fixed["line"]
    by_id = sorted(range(len(ids)), key=ids.__getitem__)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[by_id] = np.arange(len(ids))
    sorted_ids = [ids[i] for i in by_id]
    equal_next = map(operator.eq, sorted_ids, itertools.islice(sorted_ids, 1, None))
    repeated_at = list(itertools.compress(itertools.count(), equal_next))  # j: ids j and j + 1 are equal
    earliest: Repeat | None = None
    tokens = columns.tokens() if repeated_at else None
    for _, run in itertools.groupby(enumerate(repeated_at), key=lambda item: item[1] - item[0]):
        positions = [j for _, j in run]
        members = by_id[positions[0] : positions[-1] + 2]  # every record of one repeated id
        # One record split by position is stored once per split, all at its (input, line): not a repeat.
        places = sorted({(int(inputs[i]), int(lines[i])) for i in members})
        if len(places) > 1:
            repeat = Repeat(*places[1], ids[members[0]], *places[0])
            if earliest is None or repeat.place < earliest.place:
                earliest = repeat
        # Records of this id that share split and input: by content (bytes-identical ones keep read order).
        for _, same in itertools.groupby(
            sorted(members, key=lambda i: (columns.fixed["split"][i], inputs[i], rank[i])),
            key=lambda i: (columns.fixed["split"][i], inputs[i]),
        ):
            same = list(same)
            if len(same) > 1:
                digests = {i: _digest_of(columns, tokens, i, content_digest) for i in same}
                places_in_order = sorted(rank[i] for i in same)
                for place, i in zip(
                    places_in_order, sorted(same, key=lambda i: (digests[i], rank[i])), strict=True
                ):
                    rank[i] = place
    order = np.lexsort((rank, inputs, columns.fixed["split"]))
    return columns.take(order), earliest


def _digest_of(columns: Columns, tokens: np.ndarray, i: int, content_digest: ContentDigest) -> bytes:
    start = int(columns.fixed["offset"][i])
    return content_digest(
        int(columns.fixed["process"][i]), int(columns.fixed["split"][i]), start, start + int(tokens[i])
    )


def split_sections(handle, file: str, ordered: Columns, splits: int) -> list[Section]:
    """Writes a sorted group as one section per split (records of a split are consecutive in `ordered`)."""
    bounds = np.searchsorted(ordered.fixed["split"], np.arange(splits + 1)).tolist()
    return [
        ordered.take(np.arange(first, stop)).write(handle, file) for first, stop in itertools.pairwise(bounds)
    ]


def _blocks(section: Section, fd: int, block: int) -> Iterator[Columns]:
    for first in range(0, section.records, block):
        yield section.read(fd, first, min(first + block, section.records))


class _Cursor:
    """A sorted section read a block at a time, and how far into the current block the merge has taken."""

    def __init__(self, blocks: Iterator[Columns]):
        self.blocks = blocks
        self.next_block()

    def next_block(self) -> None:
        self.block = next(self.blocks, None)
        if self.block is not None:
            self.keys = list(zip(self.block.fixed["input"].tolist(), self.block.ids, strict=True))
            self.position = 0

    def take_through(self, limit: tuple[int, bytes]) -> tuple[Columns, list]:
        """The records of the current block up to key `limit` not taken yet, and their keys."""
        cut = bisect.bisect_right(self.keys, limit, lo=self.position)
        taken = self.block.take(np.arange(self.position, cut)), self.keys[self.position : cut]
        self.position = cut
        if cut == len(self.keys):
            self.next_block()
        return taken


def merged(sections: list[Section], fds, held_records: int) -> Iterator[Columns]:
    """The records of sorted sections in (input, id) order, a block at a time (`fds`: file name -> read
    descriptor; the sections' blocks hold `held_records` together). Each round takes from every section's
    current block the records up to the smallest of the blocks' last keys (no record after that can come
    before them) and sorts them together: Python's sort merges the sorted pieces in C. Keys never tie between
    sections (an id lives in one)."""
    sections = [section for section in sections if section.records]
    block = max(1, held_records // max(len(sections), 1))
    if len(sections) == 1:
        yield from _blocks(sections[0], fds[sections[0].file], block)
        return
    cursors = [_Cursor(_blocks(section, fds[section.file], block)) for section in sections]
    while cursors:
        limit = min(cursor.keys[-1] for cursor in cursors)
        parts, keys = [], []
        for cursor in cursors:
            part, part_keys = cursor.take_through(limit)
            if part_keys:
                parts.append(part)
                keys += part_keys
        order = sorted(range(len(keys)), key=keys.__getitem__)
        yield Columns.concatenate(parts).take(np.array(order, dtype=np.int64))
        cursors = [cursor for cursor in cursors if cursor.block is not None]
