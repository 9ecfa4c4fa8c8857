"""`evo2 preprocess`: FASTA files (and regions of indexed FASTA) -> one Megatron indexed dataset per split.

Pipeline: inputs are expanded (globs, sorted) and cut into tasks (a file, a byte range of a large plain file
when several workers run, or a region list). Each task streams its records (fasta.py), assigns every record
to a split by a stable hash, applies the Recipe (transforms.py), appends the documents to a spool file of
its worker and the record's metadata to its worker's record file (record_store.py). The main process then
sorts the records a bounded group at a time, checking ids (record_store.py), writes
`PREFIX_{train,val,test}.bin/.idx` in the canonical order and a `manifest.json`, all inside a temporary
directory renamed into place at the end. A split that got no token gets no files (megatron-core cannot map
an empty .bin) and is listed under `empty_splits` in the manifest. Memory holds a few blocks of records at a
time, never all of them.

Determinism: a record's split is `blake2b(seed, key)` where the key is its id (first header word) or the
`group_regex` match; with `split_by: position` every record is cut instead, its head to train and its tail
to val and test (position_cuts), each piece stored like a record of its split. Inside a split, records are
ordered by (input position in the expanded input list, record id, content digest for records sharing an
id); the documents of one record keep their order (pieces, windows, forward then reverse complement).
Nothing depends on the record order inside a file, the byte ranges tasks were cut into or the worker count,
so those give byte-identical datasets and manifests.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import re
import shutil
import signal
import sys
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from evo2_cli import __version__
from evo2_cli.config import FieldError, check, to_dict
from evo2_cli.data import record_store
from evo2_cli.data.alphabet import EOD_ID, MAX_TAG_BYTES, PAD_ID, TAG_MARKERS, VOCAB_SIZE
from evo2_cli.data.fasta import (
    FastaRecord,
    count_lines,
    display,
    is_gzip,
    read_fasta,
    record_start_after,
)
from evo2_cli.data.indexed import IndexedDatasetWriter
from evo2_cli.data.lengths import summarize_lengths
from evo2_cli.data.regions import Region, parse_interval, read_bed, read_regions, resolve
from evo2_cli.data.transforms import BaseCounts, Recipe, letter_table
from evo2_cli.errors import Evo2Error, InputError, shorten
from evo2_cli.fsio import (
    atomic_output_dir,
    atomic_write_text,
    directory_kind,
    json_listing,
    pread_exact,
    sha256_file,
)
from evo2_cli.memory import tune_malloc

SPLITS = ("train", "val", "test")
MIN_SHARD_BYTES = 16 << 20  # with several workers, a plain file is cut into this many bytes or more
# `workers: auto` starts one worker per this much input: a worker reads it in about the 0.15 s that starting
# the workers costs, so two workers pay off from about twice this much.
AUTO_BYTES_PER_WORKER = 64 << 20
MAX_EXAMPLES = 20  # skipped-record messages kept in the manifest
MAX_DOCUMENT_TOKENS = 2**31 - 1  # the .idx stores each document's length as int32


# ---------------------------------------------------------------- config


@dataclass
class RegionSource:
    """Regions of one indexed FASTA (plain or bgzip; pyfaidx writes FASTA.fai beside it when missing)."""

    fasta: Path
    bed: Path | None = None  # BED regions: 0-based, half-open
    intervals: list[str] = field(default_factory=list)  # "chrom:start-end" (1-based, inclusive) or "chrom"

    def __post_init__(self):
        check(self.bed is not None or bool(self.intervals), "intervals", "give a bed file or intervals")
        for i, text in enumerate(self.intervals):
            try:
                parse_interval(text)
            except ValueError as exc:
                raise FieldError(f"intervals.{i}", str(exc)) from None


@dataclass
class PreprocessConfig:
    inputs: list[str] = field(default_factory=list)  # FASTA files or globs (plain, .gz, bgzip)
    regions: list[RegionSource] = field(default_factory=list)
    output_dir: Path = Path("runs/dataset")
    prefix: str = "data"  # files are PREFIX_{train,val,test}.bin/.idx
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train, val, test fractions
    seed: int = 1234
    split_by: Literal["record", "position"] = "record"  # records by hash, or every record cut by position
    group_regex: str | None = None  # split by this regex's first group in the header instead of the id
    workers: int | Literal["auto"] = "auto"  # auto: auto_workers
    append_eod: bool = True
    uppercase: bool = False
    reverse_complement: bool = False  # store a reverse-complement copy of every document, same split
    rna: Literal["keep", "transcribe", "back_transcribe"] = "keep"  # T -> U, or U -> T
    iupac: Literal["keep", "to_n"] = "keep"  # keep ambiguity codes, or map them to N (case kept)
    drop_empty: bool = True
    min_length: int = 0  # applied to each piece after N-run splitting, before windows
    max_length: int | None = None
    n_run_length: int | None = None  # act on runs of at least this many N
    n_run_action: Literal["split", "drop"] = "split"
    chunk_length: int | None = None  # cut longer pieces into windows of this many bases
    chunk_overlap: int = 0
    tags_file: Path | None = None  # lines "ID_REGEX<TAB>|d__...;s__...|"; first full match of the id wins
    tag_every: int | None = None  # re-insert the tag every this many bases
    duplicate_ids: Literal["error", "keep"] = "error"
    on_bad_record: Literal["error", "skip"] = "error"  # skip: count bad records in the manifest

    def __post_init__(self):
        check(bool(self.inputs or self.regions), "inputs", "no inputs: list FASTA files or globs, or regions")
        check(
            bool(self.prefix) and "/" not in self.prefix, "prefix", "must be a file name prefix without '/'"
        )
        check(all(f >= 0 for f in self.split), "split", f"fractions must be >= 0, got {list(self.split)}")
        check(abs(sum(self.split) - 1) < 1e-6, "split", f"fractions must sum to 1, got {sum(self.split)}")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.workers == "auto" or self.workers >= 1, "workers", "must be >= 1 or auto")
        check(self.min_length >= 0, "min_length", "must be >= 0")
        check(
            self.max_length is None or self.max_length >= max(1, self.min_length),
            "max_length",
            "must be >= 1 and >= min_length",
        )
        check(self.n_run_length is None or self.n_run_length >= 1, "n_run_length", "must be >= 1")
        if self.chunk_length is None:
            check(self.chunk_overlap == 0, "chunk_overlap", "needs chunk_length")
        else:
            check(self.chunk_length >= 1, "chunk_length", "must be >= 1")
            check(
                0 <= self.chunk_overlap < self.chunk_length, "chunk_overlap", "must be in [0, chunk_length)"
            )
        check(self.tag_every is None or self.tag_every >= 1, "tag_every", "must be >= 1")
        check(self.tag_every is None or self.tags_file is not None, "tag_every", "needs tags_file")
        if self.group_regex is not None:
            check(self.split_by == "record", "group_regex", "splits records by group: needs split_by: record")
            try:
                re.compile(self.group_regex.encode())
            except re.error as exc:
                raise FieldError("group_regex", f"not a valid regular expression: {exc}") from None

    def recipe(self) -> Recipe:
        return Recipe(
            letters=letter_table(self.rna, self.iupac, self.uppercase),
            n_run_length=self.n_run_length,
            n_run_action=self.n_run_action,
            drop_empty=self.drop_empty,
            min_length=self.min_length,
            max_length=self.max_length,
            chunk_length=self.chunk_length,
            chunk_overlap=self.chunk_overlap,
            reverse_complement=self.reverse_complement,
            tag_every=self.tag_every,
            append_eod=self.append_eod,
        )


@dataclass
class PreprocessJob:
    """Root of a preprocess config file."""

    preprocess: PreprocessConfig


# ---------------------------------------------------------------- splits and tags


def split_of(key: bytes, seed: int, split: tuple[float, float, float]) -> int:
    """0 train, 1 val, 2 test: a uniform draw from a 64-bit hash of (seed, key), the same on every machine."""
    digest = hashlib.blake2b(b"%d\0" % seed + key, digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2.0**64
    train, val, _ = split
    return 0 if draw < train else 1 if draw < train + val else 2


def position_cuts(length: int, split: tuple[float, float, float]) -> tuple[int, int]:
    """Where `split_by: position` cuts a record of `length` bases: train is the first floor(length * train)
    bases, test the last floor(length * test), val the bases between (so val takes the rounding)."""
    train, _, test = split
    train_end = math.floor(length * train)
    return train_end, max(train_end, length - math.floor(length * test))


def split_record(
    parts: list[bytes | bytearray], key: bytes, cfg: PreprocessConfig
) -> list[tuple[int, list[bytes | bytearray]]]:
    """(split, sequence parts) of each piece of a record that a split gets. By record: the whole record, in
    its hashed split. By position (records read contiguous: `parts` is one buffer, or none when empty): the
    stretches of position_cuts that hold bases, each in its split; a record without bases goes to train."""
    if cfg.split_by == "record":
        return [(split_of(key, cfg.seed, cfg.split), parts)]
    sequence = parts[0] if parts else b""
    bounds = (0, *position_cuts(len(sequence), cfg.split), len(sequence))
    pieces = [
        (index, [sequence[start:end]])
        for index, (start, end) in enumerate(itertools.pairwise(bounds))
        if end > start
    ]
    return pieces or [(0, parts)]


@dataclass(frozen=True)
class TagRule:
    pattern: str  # regex that must match the whole record id
    lineage: bytes  # "|d__...;...|"
    line: int


def load_tags(path: Path) -> tuple[TagRule, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read tags file: {exc}") from None
    rules = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        pattern, sep, lineage = line.partition("\t")
        lineage = lineage.strip()
        if not sep or not pattern:
            raise InputError(f"{path}:{number}: expected ID_REGEX<TAB>|lineage|, got {shorten(repr(line))}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"{path}:{number}: bad regex {shorten(repr(pattern))}: {exc}") from None
        inner = lineage[1:-1]
        if not (
            len(lineage) > 2 and lineage[0] == lineage[-1] == "|" and "|" not in inner and inner.isascii()
        ):
            raise InputError(
                f"{path}:{number}: a lineage is ASCII between two '|', like |d__Bacteria;s__Escherichia coli|"
            )
        if not any(marker in inner for marker in TAG_MARKERS.decode()):
            raise InputError(
                f"{path}:{number}: a lineage needs rank prefixes such as d__ or ';' separators, like "
                "|d__Bacteria;s__Escherichia coli| (training finds tags by them to mask them out of the loss)"
            )
        if len(lineage) > MAX_TAG_BYTES:
            raise InputError(f"{path}:{number}: lineage is {len(lineage)} bytes; at most {MAX_TAG_BYTES}")
        rules.append(TagRule(pattern, lineage.encode(), number))
    if not rules:
        raise InputError(f"{path}: no tag rules")
    return tuple(rules)


@cache
def _compiled(rules: tuple[TagRule, ...]) -> list[tuple[re.Pattern[str], bytes]]:
    return [(re.compile(rule.pattern), rule.lineage) for rule in rules]


def tag_for(record_id: bytes, rules: tuple[TagRule, ...]) -> bytes | None:
    text = display(record_id)
    return next((lineage for pattern, lineage in _compiled(rules) if pattern.fullmatch(text)), None)


# ---------------------------------------------------------------- tasks (run in worker processes)


@dataclass(frozen=True)
class Task:
    input_index: int
    path: Path  # a FASTA file, or the indexed FASTA that `regions` cut from
    start: int = 0
    end: int | None = None
    regions: tuple[Region, ...] = ()
    size: int = 0  # bytes (or region bases) for the progress bar
    first_line: int | None = None  # the line number `start` is on (None: the reader counts it)


@dataclass
class SplitStats:
    """A split's record, document and token counts and its letter statistics."""

    records: int = 0
    documents: int = 0
    tokens: int = 0
    counts: BaseCounts = field(default_factory=BaseCounts)

    def merge(self, other: SplitStats) -> None:
        self.records += other.records
        self.documents += other.documents
        self.tokens += other.tokens
        self.counts.merge(other.counts)


@dataclass
class TaskResult:
    batches: list[record_store.Batch] = field(default_factory=list)  # the task's stored records
    splits: list[SplitStats] = field(default_factory=lambda: [SplitStats() for _ in SPLITS])
    dropped: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[int, int, str]] = field(default_factory=list)  # (input, line, message), first few
    records_read: int = 0  # every record, bad and empty ones included
    empty_records: int = 0  # records read without a base (headers only)


@dataclass(frozen=True)
class Job:
    """Everything a worker needs (picklable)."""

    config: PreprocessConfig
    tags: tuple[TagRule, ...]
    spool_dir: Path  # the documents' bytes
    records_dir: Path  # the records' metadata and document lengths


def spool_name(process: int, split: int) -> str:
    return f"{process}-{SPLITS[split]}.spool"


def lengths_name(process: int | str, split: int) -> str:
    """The file of a process's document lengths in a split (raw int64); process "*" globs every process."""
    return f"{process}-{SPLITS[split]}.lengths"


class _Spools:
    """This process's append-only spool file per split."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.handles: dict[int, BinaryIO] = {}
        self.sizes: dict[int, int] = {}

    def write(self, split: int, documents: list) -> tuple[int, tuple[int, ...]]:
        """Appends the documents; returns where they start and their lengths."""
        if split not in self.handles:
            handle = open(self.directory / spool_name(os.getpid(), split), "ab")  # noqa: SIM115 - see close()
            self.handles[split], self.sizes[split] = handle, handle.tell()  # after the worker's earlier tasks
        handle = self.handles[split]
        lengths = tuple([sum(map(len, parts)) for parts in documents])
        offset = self.sizes[split]
        self.sizes[split] += sum(lengths)
        for parts in documents:
            handle.writelines(parts)
        return offset, lengths

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def _write_records(
    buffer: record_store.RecordBuffer, task: Task, directory: Path, result: TaskResult
) -> None:
    """Writes a task's buffered records to this process's files: their metadata (a record_store batch) and
    each split's document lengths (raw int64); counts them in `result` and empties the buffer."""
    if not len(buffer):
        return
    columns = buffer.columns()
    if len(columns.lengths) and columns.lengths.max() > MAX_DOCUMENT_TOKENS:
        record = int(np.searchsorted(columns.document_ends, np.argmax(columns.lengths), side="right"))
        where = record_place(task.path, task.regions, int(columns.fixed["line"][record]))
        raise InputError(
            f"{where}: record '{shorten(display(columns.ids[record]))}' makes a "
            f"document of {columns.lengths.max():,} tokens; the dataset format holds at most "
            f"{MAX_DOCUMENT_TOKENS:,} per document: cut long records with --set preprocess.chunk_length=N"
        )
    name = f"{buffer.process}.records"
    with open(directory / name, "ab") as handle:
        result.batches.append(record_store.write_batch(handle, name, columns))
    splits = columns.fixed["split"]
    document_splits = np.repeat(splits, columns.document_counts())
    base_lengths = np.array(buffer.base_lengths, dtype=np.int64)
    tokens = columns.tokens()
    for index, stats in enumerate(result.splits):
        in_split = splits == index
        if not in_split.any():
            continue
        stats.records += int(in_split.sum())
        stats.documents += int((document_splits == index).sum())
        stats.tokens += int(tokens[in_split].sum())
        with open(directory / lengths_name(buffer.process, index), "ab") as handle:
            handle.write(base_lengths[document_splits == index])
    buffer.clear()


class _Meter:
    """Bytes and records done, reported a block at a time. The reader's thread reports while the task's thread
    counts records: each writes only its own counter, so no count is lost between the two."""

    def __init__(self, report: Callable[[int, int], None]):
        self.report, self.records, self.reported = report, 0, 0

    def on_bytes(self, count: int) -> None:
        records = self.records
        self.report(count, records - self.reported)
        self.reported = records


def _records(task: Task, meter: _Meter, contiguous: bool) -> Iterator[FastaRecord]:
    if task.regions:
        return read_regions(task.path, task.regions, meter.on_bytes)
    return read_fasta(task.path, task.start, task.end, meter.on_bytes, contiguous, task.first_line)


def record_place(path: Path, regions: tuple[Region, ...], line: int) -> str:
    """Where a record came from, for messages: FILE:LINE of its header or, for a region task, where region
    number `line` was given (its BED line or config key) and what it cut."""
    if not regions:
        return f"{path}:{line}"
    region = regions[line]
    return f"{region.source}:{region.line} (region {region.chrom}:{region.start + 1}-{region.end} of {path})"


def run_task(task: Task, job: Job, report: Callable[[int, int], None]) -> TaskResult:
    """Reads, splits and stores the records of one task. A record's line is its header's line, or for a region
    task the region's number (see record_place)."""
    cfg, recipe = job.config, job.config.recipe()
    group = re.compile(cfg.group_regex.encode()) if cfg.group_regex else None
    result, spools, meter = TaskResult(), _Spools(job.spool_dir), _Meter(report)
    records = record_store.RecordBuffer(task.input_index, os.getpid())
    try:
        contiguous = recipe.cuts_sequence or cfg.split_by == "position"
        for number, record in enumerate(_records(task, meter, contiguous)):
            meter.records += 1
            if not record.problem and not any(map(len, record.parts)):
                result.empty_records += 1
            record_id, line = record.id, number if task.regions else record.line
            key, problem = record_id, record.problem
            if group is not None and problem is None:
                match = group.search(record.header)
                if match is None:
                    where = record_place(task.path, task.regions, line)
                    problem = f"{where}: header does not match group_regex {cfg.group_regex!r}"
                else:
                    key = match.group(1) if group.groups else match.group(0)
            if problem is not None:
                if cfg.on_bad_record == "error":
                    raise InputError(problem)
                result.dropped["bad_record"] = result.dropped.get("bad_record", 0) + 1
                if len(result.problems) < MAX_EXAMPLES:
                    result.problems.append((task.input_index, record.line, problem))
                continue
            tag = tag_for(record_id, job.tags) if job.tags else None
            for split, parts in split_record(record.parts, key, cfg):
                out = recipe.apply(parts, result.splits[split].counts, tag)
                for reason, count in out.dropped.items():
                    result.dropped[reason] = result.dropped.get(reason, 0) + count
                if not out.documents:
                    continue
                offset, lengths = spools.write(split, out.documents)
                if records.add(record_id, split, line, offset, lengths, out.base_lengths):
                    _write_records(records, task, job.records_dir, result)
        _write_records(records, task, job.records_dir, result)
        result.records_read = meter.records
        for stats in result.splits:
            stats.counts.flush()
        meter.on_bytes(0)
    finally:
        spools.close()
    return result


def keep_freed_memory() -> None:
    """Tell glibc malloc to serve block-sized buffers from the heap and to keep some freed heap memory rather
    than hand it back to the kernel at once. Every block read allocates and frees a few MB; with glibc's
    defaults much of it goes back and is faulted in again (about 80,000 page faults, a quarter of the data
    path, per 200 Mbases). Blocks (4 MB) sit below the 8 MB mapping threshold; buffers above it (whole
    records) are mappings that grow by mremap as before. The heap keeps at most 32 MB unused."""
    tune_malloc(8 << 20, 32 << 20)


def _worker(connection, job: Job) -> None:
    """A worker process: runs the tasks the parent sends, one at a time, and sends back ("progress", bytes,
    records) as it reads, then ("done", result) or ("error", exception). None from the parent ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops its workers
    keep_freed_memory()
    while (task := connection.recv()) is not None:
        try:
            result = run_task(task, job, lambda count, records: connection.send(("progress", count, records)))
        except Exception as exc:  # every failure goes to the parent, which raises it
            connection.send(("error", _sendable(exc)))
            return
        connection.send(("done", result))


def _sendable(exc: Exception) -> Exception:
    """`exc`, or its text in an Evo2Error when it does not come back from pickle: some exceptions pickle but
    cannot be rebuilt (an __init__ taking other arguments than their message), and the parent's recv fails."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return Evo2Error(f"a preprocess worker failed: {exc!r}")
    return exc


# ---------------------------------------------------------------- planning


# What a directory given as an input contributes: its files named like FASTA, compressed or not.
FASTA_NAMES = tuple(
    kind + compression
    for kind in (".fa", ".fasta", ".fna", ".ffn", ".frn", ".fas")
    for compression in ("", ".gz", ".bgz", ".bgzf")
)


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Input files by input index: files as given, globs and directories (their FASTA-named files, not
    recursive) expanded and sorted."""
    paths: list[Path] = []
    for i, pattern in enumerate(patterns):
        if any(char in pattern for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise InputError(f"config key 'preprocess.inputs.{i}': '{pattern}' matches no file")
        elif Path(pattern).is_dir():
            matches = sorted(
                path
                for path in Path(pattern).iterdir()
                if path.is_file() and path.name.lower().endswith(FASTA_NAMES)
            )
            if not matches:
                raise InputError(
                    f"{pattern}: a directory without FASTA files (*.fa, *.fasta, *.fna, *.ffn, *.frn, *.fas, "
                    f"plain or .gz/.bgz); list the files or a glob (config key 'preprocess.inputs.{i}')"
                )
        else:
            if not Path(pattern).is_file():
                raise InputError(f"{pattern}: input file not found (config key 'preprocess.inputs.{i}')")
            matches = [Path(pattern)]
        paths += matches
    seen: dict[Path, Path] = {}
    for path in paths:
        real = path.resolve()
        if real in seen:
            raise InputError(f"{path}: listed twice in preprocess.inputs (also as {seen[real]}); keep one")
        seen[real] = path
    return paths


def _file_tasks(index: int, path: Path, workers: int) -> list[Task]:
    size = path.stat().st_size
    shards = min(workers, size // MIN_SHARD_BYTES)
    if shards <= 1 or is_gzip(path):
        return [Task(index, path, size=size)]
    # One byte range per worker: each range counts the line ends before it, so more ranges cost more.
    cuts = {record_start_after(path, k * size // shards) for k in range(1, shards)}
    bounds = [*sorted({0, *(cut for cut in cuts if cut < size)}), size]
    return [Task(index, path, start, end, size=end - start) for start, end in itertools.pairwise(bounds)]


def plan_tasks(cfg: PreprocessConfig, workers: int = 1) -> tuple[list[Path | str], list[Task]]:
    """Input names (by input index) and the tasks that read them (large plain files cut for `workers`)."""
    names: list[Path | str] = []
    tasks: list[Task] = []
    for path in expand_inputs(cfg.inputs):
        tasks += _file_tasks(len(names), path, workers)
        names.append(path)
    for i, source in enumerate(cfg.regions):
        regions = read_bed(source.bed) if source.bed is not None else []
        for number, text in enumerate(source.intervals):
            chrom, start, end = parse_interval(text)
            regions.append(Region(chrom, start, end, "", f"preprocess.regions.{i}.intervals", number))
        regions = resolve(source.fasta, regions)
        size = sum(region.end - region.start for region in regions)
        tasks.append(Task(len(names), source.fasta, regions=tuple(regions), size=size))
        names.append(f"{source.fasta} ({len(regions)} regions)")
    return names, tasks


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which batch schedulers set), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_workers(tasks: list[Task], cores: int) -> int:
    """`workers: auto` for tasks planned for `cores` workers: one worker per AUTO_BYTES_PER_WORKER of input
    (bytes as stored, bases for regions), at most one per core and one per task (a gzip file is one task)."""
    size = sum(task.size for task in tasks)
    return max(1, min(cores, len(tasks), size // AUTO_BYTES_PER_WORKER))


def plan_workers(cfg: PreprocessConfig) -> tuple[list[Path | str], list[Task], int, str | None]:
    """Input names, tasks and the worker count; with `workers: auto`, also a line saying what was chosen and
    why. The worker count never changes a byte of the output."""
    if cfg.workers != "auto":
        return *plan_tasks(cfg, cfg.workers), cfg.workers, None
    cores = available_cores()
    names, tasks = plan_tasks(cfg, cores)
    workers = auto_workers(tasks, cores)
    mib = sum(task.size for task in tasks) / 2**20
    note = (
        f"workers: {workers} (chosen automatically: {mib:,.0f} MiB of input in {len(tasks)} part(s) that can "
        f"be read at once, {cores} core(s), a worker per {AUTO_BYTES_PER_WORKER >> 20} MiB; set --workers "
        "to choose)"
    )
    if workers != cores:
        names, tasks = plan_tasks(cfg, workers)
    return names, tasks, workers, note


# ---------------------------------------------------------------- running


def _execute(tasks: list[Task], job: Job, workers: int, console) -> list[TaskResult]:
    with _progress_bar(console, sum(task.size for task in tasks)) as advance:
        if workers == 1 or len(tasks) == 1:
            return [run_task(task, job, advance) for task in tasks]
        return _run_in_workers(tasks, job, min(workers, len(tasks)), advance)


def _start_method() -> str:
    """'forkserver' where it can run, else 'spawn'. The fork server listens on a socket under the temporary
    directory, and a socket path longer than the AF_UNIX limit (107 bytes on Linux, 103 on macOS) cannot be
    bound: a long $TMPDIR, common on clusters, would stop every multi-worker run. Spawn needs no socket."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    # The name forkserver gives its socket: listener- and 8 random characters.
    socket_path = os.path.join(multiprocessing.util.get_temp_dir(), "listener-12345678")
    return "forkserver" if len(os.fsencode(socket_path)) <= 103 else "spawn"


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """A worker needs nothing of `__main__`, but multiprocessing runs the main script again in every worker
    it starts with a fork server or spawn: for the `evo2` command that is the whole CLI (typer, rich, every
    command's options), 0.1-0.2 s of CPU per worker before its first record. An empty `__main__` while the
    workers start leaves them nothing to run."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _with_first_lines(tasks: list[Task]) -> list[Task]:
    """The tasks, byte ranges given the line they start on: counted here in one pass over each file's bytes
    before its last range, while the workers start, rather than by each range's worker over every byte
    before its range (the last worker would count almost the whole file before reading)."""
    counted: dict[Path, tuple[int, int]] = {}  # path -> (offset, the line it is on), offsets ascending
    with_lines = []
    for task in tasks:
        if task.start and not task.regions:
            offset, line = counted.get(task.path, (0, 1))
            line += count_lines(task.path, offset, task.start)
            counted[task.path] = task.start, line
            task = replace(task, first_line=line)
        with_lines.append(task)
    return with_lines


def _run_in_workers(tasks: list[Task], job: Job, workers: int, advance) -> list[TaskResult]:
    """Runs the tasks in `workers` processes, each fed one task at a time through its own pipe. Nothing is
    shared between workers (multiprocessing.Pool shares locked queues: stopping a worker that holds a lock
    hangs the pool), so an error, Ctrl-C or a dead worker stops them all at once."""
    # A fork server imports this module once, in a clean process, and forks each worker from it: workers
    # start without importing numpy and the CLI again (spawn) or copying the parent's threads (fork).
    method = _start_method()
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver

        context.set_forkserver_preload([__name__])
        forkserver.ensure_running()  # it imports in the background ...
    tasks = _with_first_lines(tasks)  # ... while this process counts the lines before each byte range
    results: list[TaskResult | None] = [None] * len(tasks)
    queued = collections.deque(enumerate(tasks))
    processes = []
    running: dict = {}  # connection -> (process, index of the task it runs)

    def send_next(connection, process) -> None:
        if not queued:
            with contextlib.suppress(OSError):  # gone after its last result, which is in: nothing is lost
                connection.send(None)  # the worker ends
            connection.close()
            return
        index, task = queued.popleft()
        running[connection] = (process, index)
        try:
            connection.send(task)
        except OSError:  # the worker is gone
            stopped(process, index)

    def stopped(process, index: int) -> None:
        process.join()
        raise Evo2Error(
            f"a preprocess worker stopped (exit code {process.exitcode}: killed, or out of memory?) while "
            f"reading {tasks[index].path}; try fewer --workers"
        )

    try:
        for _ in range(workers):
            connection, child_end = context.Pipe()
            process = context.Process(target=_worker, args=(child_end, job), daemon=True)
            with _main_module_hidden():
                process.start()
            processes.append(process)
            child_end.close()
            send_next(connection, process)
        while running:
            for connection in multiprocessing.connection.wait(list(running)):
                process, index = running[connection]
                try:
                    kind, *message = connection.recv()
                except (EOFError, OSError):  # the worker is gone
                    stopped(process, index)
                if kind == "progress":
                    advance(*message)
                elif kind == "error":
                    raise message[0]  # at once, not after the other workers' tasks end
                else:
                    results[index] = message[0]
                    del running[connection]
                    send_next(connection, process)
        return results
    finally:
        for connection, (process, _) in running.items():
            process.terminate()  # after an error or Ctrl-C
            connection.close()
        for process in processes:
            process.join()


@contextlib.contextmanager
def _progress_bar(
    console, total: int, label: str = "reading", unit: str = "records"
) -> Iterator[Callable[[int, int], None]]:
    """Yields advance(bytes, items) driving a rich bar of bytes and of `unit`; silent without a console."""
    if console is None:
        yield lambda count, records: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn(f"{{task.fields[records]:,}} {unit}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=total, records=0)
        records = 0

        def advance(count: int, new_records: int) -> None:
            nonlocal records
            records += new_records
            progress.update(task, advance=count, records=records)

        yield advance
        progress.update(task, completed=total)


class _OpenFiles:
    """Read descriptors of the files in a directory, opened on first use (pread and descriptors: memory maps
    would count the spools' pages in the resident set, which must not grow with the input)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.fds: dict[str, int] = {}

    def __getitem__(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.directory / name, os.O_RDONLY)
        return self.fds[name]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _sorted_runs(
    results: list[TaskResult], job: Job, spools: _OpenFiles, records: _OpenFiles, advance
) -> tuple[list[list[record_store.Section]], record_store.Repeat | None]:
    """Sorts the stored records a group of sub-buckets at a time into runs (one section per split each);
    returns the runs and the earliest repeated id. Memory holds one group (bounded as record_store says)."""
    batches = [batch for result in results for batch in result.batches]
    sizes = np.zeros((2, record_store.SUB_BUCKETS), dtype=np.int64)
    for batch in batches:
        sizes += batch.sizes(records[batch.section.file])

    def content_digest(process: int, split: int, start: int, end: int) -> bytes:
        hasher = hashlib.blake2b(digest_size=16)
        _hash_range(hasher, spools[spool_name(process, split)], start, end)
        return hasher.digest()

    runs, earliest = [], None
    with open(job.records_dir / "runs", "ab") as handle:
        for first, stop in record_store.plan_groups(sizes):
            parts = [batch.read_buckets(records[batch.section.file], first, stop) for batch in batches]
            group = record_store.Columns.concatenate([part for part in parts if part is not None])
            ordered, repeat = record_store.sort_group(group, content_digest)
            runs.append(record_store.split_sections(handle, "runs", ordered, len(SPLITS)))
            if repeat is not None and (earliest is None or repeat.place < earliest.place):
                earliest = repeat
            advance(int(ordered.lengths.sum()), len(ordered))
    return runs, earliest


_WRITE_BATCH = 1 << 22  # bytes: larger runs are copied by the kernel, smaller ones gathered to this size


def _hash_range(hasher, fd: int, start: int, end: int) -> None:
    """Feeds bytes [start, end) of a file to `hasher` a few MB at a time (bounded memory for huge records)."""
    for at in range(start, end, _WRITE_BATCH):
        hasher.update(pread_exact(fd, min(_WRITE_BATCH, end - at), at))


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
    prefix: Path,
    split: int,
    ordered: Iterator[record_store.Columns],
    spools: _OpenFiles,
    advance: Callable[[int, int], None],
) -> str:
    """Write one split's records in the canonical order (`ordered`: blocks of them); returns the sha256 of its
    .bin. Stretches of a few MB or more are copied by the kernel (copy_file_range) while a second thread
    hashes them from the spool; shorter ones (short reads out of order) are read and written a few MB at a
    time. The hash runs one piece behind the writer (file writes, copies and hashlib release the GIL).
    `advance(bytes, documents)` reports progress."""
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
            if end - start >= _WRITE_BATCH:
                write_gathered()
                gathered_size = 0
                hash_next(_hash_range, digest, spool, start, end)
                writer.add_documents_from(spool, start, lengths)
                advance(end - start, len(lengths))
                continue
            gathered.append(pread_exact(spool, end - start, start))
            gathered_lengths.extend(lengths)
            gathered_size += end - start
            if gathered_size >= _WRITE_BATCH:
                write_gathered()
                gathered_size = 0
        write_gathered()
        if hashing is not None:
            hashing.result()
    return digest.hexdigest()


# ---------------------------------------------------------------- manifest


def _split_summary(stats: SplitStats, lengths: dict) -> dict:
    """One split's figures from its merged statistics and the summary of its document lengths."""
    counts = stats.counts

    def fraction(part: int) -> float:
        return round(part / counts.bases, 6) if counts.bases else 0.0

    return {
        "records": stats.records,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "bases": counts.bases,
        "gc_fraction": fraction(counts.gc),
        "n_fraction": fraction(counts.n),
        "lowercase_fraction": fraction(counts.lowercase),
        "length": lengths,
    }


def _dropped(results: list[TaskResult]) -> tuple[dict[str, int], list[tuple[int, int, str]]]:
    """Records dropped by reason (sorted by reason) and the kept bad-record messages in input order."""
    dropped: dict[str, int] = {}
    for result in results:
        for reason, count in result.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    problems = sorted(problem for result in results for problem in result.problems)
    return dict(sorted(dropped.items())), problems


def _manifest(
    cfg: PreprocessConfig, names: list, results: list[TaskResult], job: Job, directory: Path, digests: dict
) -> dict:
    """`digests`: sha256 of files already hashed while they were written, by file name."""
    splits = [SplitStats() for _ in SPLITS]
    for result in results:
        for total, part in zip(splits, result.splits, strict=True):
            total.merge(part)
    dropped, problems = _dropped(results)
    # Where the output went and how many processes wrote it do not change a byte of it.
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "workers")}
    files = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in (".bin", ".idx"):
            digest = digests.get(path.name) or sha256_file(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": digest}
    manifest = {
        "tool": "evo2-cli",
        "version": __version__,
        "format": {
            "kind": "megatron-core indexed dataset",
            "dtype": "uint8",
            "files": f"{cfg.prefix}_{{train,val,test}}.bin/.idx",
            "eod_id": EOD_ID,
            "pad_id": PAD_ID,
            "vocab_size": VOCAB_SIZE,
            "eod_appended": cfg.append_eod,
            "tags": "phylogenetic tags are the bytes between two '|' (mask them out of the loss)"
            if cfg.tags_file
            else None,
        },
        "config": config,
        "inputs": [str(name) for name in names],
        "splits": {
            name: _split_summary(stats, summarize_lengths(sorted(job.records_dir.glob(lengths_name("*", i)))))
            for i, (name, stats) in enumerate(zip(SPLITS, splits, strict=True))
        },
        "dropped": dropped,
        "dropped_examples": [message for _, _, message in problems[:MAX_EXAMPLES]],
        "files": files,
    }
    if empty := empty_splits(results):
        manifest["empty_splits"] = empty  # no files: nothing to read (they would not open in megatron-core)
    return manifest


def empty_splits(results: list[TaskResult]) -> list[str]:
    """The splits that got no token (too few records for their fraction): they get no files."""
    return [
        name
        for index, name in enumerate(SPLITS)
        if not any(result.splits[index].tokens for result in results)
    ]


# What to change when a filter dropped every record, by the reason the manifest counts it under.
_DROP_FIXES = {
    "too_short": "lower preprocess.min_length",
    "too_long": "raise preprocess.max_length",
    "n_run": "raise preprocess.n_run_length or set preprocess.n_run_action=split",
}


def _no_sequence(names: list, results: list[TaskResult]) -> InputError:
    """The error for inputs that left no base to store: how many records were read and why none was kept."""
    where = f"{names[0]}: " if len(names) == 1 else f"{len(names)} inputs: "
    read = sum(result.records_read for result in results)
    empty = sum(result.empty_records for result in results)
    if empty == read:
        records = f"{read:,} records, all empty" if read else "no records"
        return InputError(f"{where}no sequence in the input ({records})")
    dropped, problems = _dropped(results)
    text = f"{where}no sequence in the input: {read:,} records read, none kept"
    if dropped:
        text += " (dropped: " + ", ".join(f"{reason} {count:,}" for reason, count in dropped.items()) + ")"
    fixes = [_DROP_FIXES[reason] for reason in dropped if reason in _DROP_FIXES]
    if problems:
        fixes.append(f"first bad record: {problems[0][2]}")
    return InputError("; ".join([text, *fixes]))


MANIFEST = "manifest.json"
# What `--overwrite` may replace: a directory with our manifest and the files it lists, nothing else.
DATASET_DIR = directory_kind("a dataset directory", MANIFEST, json_listing(MANIFEST, lambda m: "splits" in m))


def run_preprocess(cfg: PreprocessConfig, overwrite: bool = False, console=None) -> dict:
    """Run the whole preprocess; returns the manifest. `console` (rich) shows progress when given."""
    names, tasks, workers, workers_note = plan_workers(cfg)
    keep_freed_memory()
    tags = load_tags(cfg.tags_file) if cfg.tags_file is not None else ()
    say = (
        (lambda text: console.print(text, highlight=False, soft_wrap=True))
        if console
        else (lambda text: None)
    )
    if workers_note:
        say(workers_note)
    with atomic_output_dir(cfg.output_dir, DATASET_DIR, overwrite, say=say) as tmp:
        job = Job(cfg, tags, tmp / ".spool", tmp / ".records")
        job.spool_dir.mkdir()
        job.records_dir.mkdir()
        results = _execute(tasks, job, workers, console)
        if not any(stats.counts.bases for result in results for stats in result.splits):
            raise _no_sequence(names, results)
        stored = sum(stats.tokens for result in results for stats in result.splits)
        spools, records, digests = _OpenFiles(job.spool_dir), _OpenFiles(job.records_dir), {}
        try:
            with _progress_bar(console, stored, "sorting") as advance:
                runs, repeat = _sorted_runs(results, job, spools, records, advance)
            if repeat is not None and cfg.duplicate_ids == "error":
                sources = {task.input_index: (task.path, task.regions) for task in tasks}
                first = record_place(*sources[repeat.first_input], repeat.first_line)
                raise InputError(
                    f"{record_place(*sources[repeat.input_index], repeat.line)}: duplicate record id "
                    f"'{shorten(display(repeat.record_id))}' (also at {first}); make ids unique, or keep "
                    "both with --set preprocess.duplicate_ids=keep"
                )
            with _progress_bar(console, stored, "writing", "documents") as advance:
                empty = empty_splits(results)
                for index, name in enumerate(SPLITS):
                    if name in empty:
                        continue  # megatron-core cannot open an empty .bin: an empty split has no files
                    ordered = record_store.merged([run[index] for run in runs], records)
                    prefix = tmp / f"{cfg.prefix}_{name}"
                    digests[prefix.name + ".bin"] = _write_split(prefix, index, ordered, spools, advance)
        finally:
            spools.close()
            records.close()
        shutil.rmtree(job.spool_dir)
        manifest = _manifest(cfg, names, results, job, tmp, digests)
        shutil.rmtree(job.records_dir)
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def summary_table(manifest: dict):
    """A rich table of the manifest's per-split figures."""
    from rich.table import Table

    table = Table(title="evo2 preprocess", title_justify="left")
    for column in ("split", "records", "docs", "tokens", "GC", "N", "lowercase", "median length"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in manifest["splits"].items():
        table.add_row(
            name,
            f"{split['records']:,}",
            f"{split['documents']:,}",
            f"{split['tokens']:,}",
            f"{split['gc_fraction']:.3f}",
            f"{split['n_fraction']:.4f}",
            f"{split['lowercase_fraction']:.3f}",
            f"{split['length'].get('median', 0):,}",
        )
    notes = []
    if manifest["dropped"]:
        notes.append("dropped: " + ", ".join(f"{reason} {n:,}" for reason, n in manifest["dropped"].items()))
    if "empty_splits" in manifest:
        notes.append(f"no files for the empty split(s): {', '.join(manifest['empty_splits'])}")
    table.caption = "\n".join(notes) or None
    return table
