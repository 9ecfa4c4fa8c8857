"""Records sorted a bounded group at a time, merged into the canonical order, written as indexed files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from evo2_cli.data import record_store
from evo2_cli.data.fasta import display
from evo2_cli.data.indexed import IndexedDatasetWriter
from evo2_cli.data.preprocess.plan import Task, record_place
from evo2_cli.data.preprocess.worker import Job, TaskResult, split_totals, spool_name
from evo2_cli.data.splits import SPLITS
from evo2_cli.errors import InputError, shorten
from evo2_cli.fsio import pread_exact


def write_splits(tasks: list[Task], results: list[TaskResult], job: Job, directory: Path, progress) -> dict:
    """Writes each split that got a token as `directory`/PREFIX_SPLIT.bin/.idx; returns the sha256 of each
    .bin by file name. `progress(total, label, unit)`: a context giving advance(bytes, items)."""
    stored = sum(stats.tokens for stats in split_totals(results))
    spools, records, digests = _OpenFiles(job.spool_dir), _OpenFiles(job.records_dir), {}
    try:
        with progress(stored, "sorting", "records") as advance:
            runs, repeat = _sorted_runs(tasks, results, job, spools, records, advance)
        if repeat is not None and job.config.duplicate_ids == "error":
            sources = {task.input_index: (task.path, task.regions) for task in tasks}
            first = record_place(*sources[repeat.first_input], repeat.first_line)
            raise InputError(
                f"{record_place(*sources[repeat.input_index], repeat.line)}: duplicate record id "
                f"'{shorten(display(repeat.record_id))}' (also at {first}); make ids unique, or keep "
                "both with --set preprocess.duplicate_ids=keep"
            )
        with progress(stored, "writing", "documents") as advance:
            empty = empty_splits(results)
            for index, name in enumerate(SPLITS):
                if name in empty:
                    continue  # megatron-core cannot open an empty .bin: an empty split has no files
                ordered = record_store.merged([run[index] for run in runs], records, job.limits.merge_records)
                prefix = directory / f"{job.config.prefix}_{name}"
                digests[prefix.name + ".bin"] = _write_split(
                    prefix, index, ordered, spools, advance, job.limits.write_batch
                )
    finally:
        spools.close()
        records.close()
    return digests


def empty_splits(results: list[TaskResult]) -> list[str]:
    """The splits that got no token (too few records for their fraction): they get no files."""
    return [name for name, stats in zip(SPLITS, split_totals(results), strict=True) if not stats.tokens]


class _OpenFiles(dict):
    """Read descriptors of the files in a directory by name, opened on first use (pread and descriptors:
    memory maps would count the spools' pages in the resident set, which must not grow with the input)."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    def __missing__(self, name: str) -> int:
        fd = self[name] = os.open(self.directory / name, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self.values():
            os.close(fd)
        self.clear()


def _lines_before(tasks: list[Task], results: list[TaskResult]) -> list[int]:
    """The line ends before each task's byte range: the sum of the ranges before it in its file."""
    before: list[int] = []
    counted: dict[int, int] = {}  # input -> line ends of its ranges so far (a file's ranges come in order)
    for task, result in zip(tasks, results, strict=True):
        before.append(counted.get(task.input_index, 0))
        counted[task.input_index] = before[-1] + result.lines
    return before


def _sorted_runs(
    tasks: list[Task], results: list[TaskResult], job: Job, spools: _OpenFiles, records: _OpenFiles, advance
) -> tuple[list[list[record_store.Section]], record_store.Repeat | None]:
    """Sorts the stored records a group of sub-buckets at a time into runs (one section per split each);
    returns the runs and the earliest repeated id. Memory holds one group (bounded as record_store says).
    Records' lines become the file's lines here (workers count them from their byte range)."""
    shifts = _lines_before(tasks, results)
    batches = [(batch, shifts[i]) for i, result in enumerate(results) for batch in result.batches]
    sizes = np.zeros((2, record_store.SUB_BUCKETS), dtype=np.int64)
    for batch, _ in batches:
        sizes += batch.sizes(records[batch.section.file])

    def content_digest(process: int, split: int, start: int, end: int) -> bytes:
        hasher = hashlib.blake2b(digest_size=16)
        _hash_range(hasher, spools[spool_name(process, split)], start, end, job.limits.write_batch)
        return hasher.digest()

    runs, earliest = [], None
    with open(job.records_dir / "runs", "ab") as handle:
        limits = job.limits
        for first, stop in record_store.plan_groups(sizes, limits.group_records, limits.group_documents):
            parts = []
            for batch, shift in batches:
                part = batch.read_buckets(records[batch.section.file], first, stop)
                if part is not None:
                    part.fixed["line"] = part.fixed["line"] + shift
                    parts.append(part)
            group = record_store.Columns.concatenate(parts)
            ordered, repeat = record_store.sort_group(group, content_digest)
            runs.append(record_store.split_sections(handle, "runs", ordered, len(SPLITS)))
            if repeat is not None and (earliest is None or repeat.place < earliest.place):
                earliest = repeat
            advance(int(ordered.lengths.sum()), len(ordered))
    return runs, earliest


def _hash_range(hasher, fd: int, start: int, end: int, batch: int) -> None:
    """Feeds bytes [start, end) of a file to `hasher` `batch` bytes at a time (bounded memory)."""
    for at in range(start, end, batch):
        hasher.update(pread_exact(fd, min(batch, end - at), at))


def _runs(blocks: Iterator[record_store.Columns]) -> Iterator[tuple[int, int, int, list[int]]]:
    """(process, start, end, document lengths) of the longest stretches of records (inside each block) that
    lie back to back in one process's spool (reads named in order arrive in order: one stretch a block)."""
    for block in blocks:
        process, starts = block.fixed["process"], block.fixed["offset"]
        ends = starts + block.tokens()
        cuts = np.flatnonzero((process[1:] != process[:-1]) | (starts[1:] != ends[:-1])) + 1
        firsts, lasts = np.concatenate(([0], cuts)), np.concatenate((cuts, [len(block)])) - 1
        lengths = block.lengths.tolist()
        document_bounds = zip(
            block.document_starts()[firsts].tolist(), block.document_ends[lasts].tolist(), strict=True
        )
        yield from zip(
            process[firsts].tolist(),
            starts[firsts].tolist(),
            ends[lasts].tolist(),
            [lengths[first:stop] for first, stop in document_bounds],
            strict=True,
        )


def _write_split(
    prefix: Path, split: int, ordered: Iterator[record_store.Columns], spools: _OpenFiles, advance, batch: int
) -> str:
    """Write one split's records in the canonical order (`ordered`: blocks of them); returns the sha256 of its
    .bin. Stretches of `batch` bytes or more are copied by the kernel (copy_file_range) while a second
    thread hashes them from the spool; shorter ones (short reads out of order) are read and written `batch`
    bytes at a time. The hash runs one piece behind the writer (file writes, copies and hashlib release the
    GIL). `advance(bytes, documents)` reports progress."""
    digest = hashlib.sha256()
    hashing = None
    gathered: list[bytes] = []
    gathered_lengths: list[int] = []

    def hash_next(job: Callable, *args) -> None:
        nonlocal hashing
        if hashing is not None:
            hashing.result()  # in file order, and at most one piece held for the hasher
        hashing = hasher.submit(job, *args)

    def write_gathered() -> None:
        if gathered:
            data = b"".join(gathered)
            hash_next(digest.update, data)
            writer.add_documents_bytes(data, gathered_lengths)
            advance(len(data), len(gathered_lengths))
            gathered.clear()
            gathered_lengths.clear()

    with IndexedDatasetWriter(prefix) as writer, ThreadPoolExecutor(1) as hasher:
        gathered_size = 0
        for process, start, end, lengths in _runs(ordered):
            spool = spools[spool_name(process, split)]
            if end - start >= batch:
                write_gathered()
                gathered_size = 0
                hash_next(_hash_range, digest, spool, start, end, batch)
                writer.add_documents_from(spool, start, lengths)
                advance(end - start, len(lengths))
                continue
            gathered.append(pread_exact(spool, end - start, start))
            gathered_lengths.extend(lengths)
            gathered_size += end - start
            if gathered_size >= batch:
                write_gathered()
                gathered_size = 0
        write_gathered()
        if hashing is not None:
            hashing.result()
    return digest.hexdigest()
