"""The work of a task (records read, split, shaped and stored in spool and record files) and the workers."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from evo2_cli.data import record_store
from evo2_cli.data.fasta import count_lines, display, read_fasta
from evo2_cli.data.preprocess.config import Limits, PreprocessConfig, TagRule, tag_for
from evo2_cli.data.preprocess.plan import Task, record_place
from evo2_cli.data.regions import read_regions
from evo2_cli.data.splits import SPLITS, position_cuts, split_of
from evo2_cli.data.transforms import BaseCounts
from evo2_cli.errors import Evo2Error, InputError, shorten
from evo2_cli.memory import tune_malloc

MAX_EXAMPLES = 20  # skipped-record messages kept in the manifest


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


def split_totals(results: list[TaskResult]) -> list[SplitStats]:
    """Each split's statistics over every task."""
    totals = [SplitStats() for _ in SPLITS]
    for result in results:
        for total, part in zip(totals, result.splits, strict=True):
            total.merge(part)
    return totals


@dataclass
class TaskResult:
    batches: list[record_store.Batch] = field(default_factory=list)  # the task's stored records
    splits: list[SplitStats] = field(default_factory=lambda: [SplitStats() for _ in SPLITS])
    dropped: collections.Counter = field(default_factory=collections.Counter)
    problems: list[tuple[int, int, str]] = field(default_factory=list)  # (input, line, message), first few
    records_read: int = 0  # every record, bad and empty ones included
    empty_records: int = 0  # records read without a base (headers only)
    lines: int = 0  # line ends in the task's byte range (its records' lines count from its start)


@dataclass(frozen=True)
class Job:
    """Everything a worker needs (picklable)."""

    config: PreprocessConfig
    tags: tuple[TagRule, ...]
    spool_dir: Path  # the documents' bytes
    records_dir: Path  # the records' metadata and document lengths
    limits: Limits = field(default_factory=Limits)


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
    buffer: record_store.RecordBuffer, where: Callable[[int], str], job: Job, result: TaskResult
) -> None:
    """Writes a task's buffered records to this process's files: their metadata (a record_store batch) and
    each split's document lengths (raw int64); counts them in `result` and empties the buffer."""
    if not len(buffer):
        return
    columns = buffer.columns()
    most = job.limits.max_document_tokens
    if len(columns.lengths) and columns.lengths.max() > most:
        record = int(np.searchsorted(columns.document_ends, np.argmax(columns.lengths), side="right"))
        place = where(int(columns.fixed["line"][record]))
        raise InputError(
            f"{place}: record '{shorten(display(columns.ids[record]))}' makes a document of "
            f"{columns.lengths.max():,} tokens; the dataset format holds at most "
            f"{most:,} per document: cut long records with --set preprocess.chunk_length=N"
        )
    name = f"{buffer.process}.records"
    with open(job.records_dir / name, "ab") as handle:
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
        with open(job.records_dir / lengths_name(buffer.process, index), "ab") as handle:
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
    pieces = [(index, [sequence[a:b]]) for index, (a, b) in enumerate(itertools.pairwise(bounds)) if b > a]
    return pieces or [(0, parts)]


def run_task(task: Task, job: Job, report: Callable[[int, int], None]) -> TaskResult:
    """Reads, splits and stores the records of one task. A record's line is its header's line counted from the
    task's byte range (the assembly adds the lines of the ranges before), or for a region task the region's
    number (see record_place). Messages need the file's line: the lines before the range are counted for the
    first one (only a task with a bad record pays for that pass)."""
    cfg, recipe = job.config, job.config.recipe()
    group = re.compile(cfg.group_regex.encode()) if cfg.group_regex else None
    result, spools, meter = TaskResult(), _Spools(job.spool_dir), _Meter(report)
    lines_before = functools.cache(lambda: count_lines(task.path, 0, task.start) if task.start else 0)

    def file_line(line: int) -> int:
        return line if task.regions else line + lines_before()

    def where(line: int) -> str:
        return record_place(task.path, task.regions, file_line(line))

    records = record_store.RecordBuffer(task.input_index, os.getpid(), job.limits.flush_documents)
    try:
        whole = recipe.cuts_sequence or cfg.split_by == "position"  # each record in one buffer
        block = job.limits.read_block

        def on_lines(count: int) -> None:
            result.lines = count

        reader = (
            read_regions(task.path, task.regions, meter.on_bytes)
            if task.regions
            else read_fasta(
                task.path,
                task.start,
                task.end,
                meter.on_bytes,
                whole,
                block,
                lines_before=lines_before,
                on_lines=on_lines,
            )
        )
        for number, record in enumerate(reader):
            meter.records += 1
            if not record.problem and not any(map(len, record.parts)):
                result.empty_records += 1
            record_id, line = record.id, number if task.regions else record.line
            key, problem = record_id, record.problem
            if group is not None and problem is None:
                match = group.search(record.header)
                if match is None:
                    problem = f"{where(line)}: header does not match group_regex {cfg.group_regex!r}"
                else:
                    key = match.group(1) if group.groups else match.group(0)
            if problem is not None:
                if cfg.on_bad_record == "error":
                    raise InputError(problem)
                result.dropped["bad_record"] += 1
                if len(result.problems) < MAX_EXAMPLES:
                    result.problems.append((task.input_index, file_line(record.line), problem))
                continue
            tag = tag_for(record_id, job.tags) if job.tags else None
            for split, parts in split_record(record.parts, key, cfg):
                out = recipe.apply(parts, result.splits[split].counts, tag)
                result.dropped.update(out.dropped)
                if not out.documents:
                    continue
                offset, lengths = spools.write(split, out.documents)
                if records.add(record_id, split, line, offset, lengths, out.base_lengths):
                    _write_records(records, where, job, result)
        _write_records(records, where, job, result)
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


def execute(tasks: list[Task], job: Job, pool: list, advance: Callable) -> list[TaskResult]:
    """The tasks' results, in task order: run here, or by the workers of `pool` (see started_workers)."""
    if not pool:
        return [run_task(task, job, advance) for task in tasks]
    return _run_in_workers(tasks, pool, advance)


def _start_method() -> str:
    """'fork' on Linux while this process runs one thread: a forked worker starts at once, with everything
    imported (a fork server or spawn costs a fresh interpreter importing numpy and this code, 0.28 s of CPU
    before the first record). Else 'spawn': a fork copies the locks other threads may hold, and macOS's
    system libraries are not safe to use after a fork."""
    return "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "spawn"


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """A worker needs nothing of `__main__`, but multiprocessing runs the main script again in every worker
    it spawns: for the `evo2` command that is the whole CLI (typer, rich, every command's options), 0.1-0.2 s
    of CPU per worker before its first record. An empty `__main__` while the workers start leaves them
    nothing to run."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextlib.contextmanager
def started_workers(job: Job, count: int) -> Iterator[list]:
    """`count` worker processes (none: the tasks run here), as (process, connection) pairs.
    Start them before any other thread (a progress bar's) so that they can be forked. On leaving, every
    worker still running (after an error or Ctrl-C) is stopped."""
    method = _start_method()
    context = multiprocessing.get_context(method)
    pool: list = []
    try:
        sys.stdout.flush()  # a forked worker would write out what is still buffered again
        sys.stderr.flush()
        for _ in range(count):
            connection, child_end = context.Pipe()
            # A forked worker holds copies of the main process's ends of its pipe and of the earlier workers':
            # it closes them, or a worker would never see its pipe end when the main process dies.
            inherited = [connection, *(other for _, other in pool)] if method == "fork" else []
            process = context.Process(target=_worker, args=(child_end, job, inherited), daemon=True)
            with _main_module_hidden():
                process.start()
            child_end.close()
            pool.append((process, connection))
        yield pool
    finally:
        for process, connection in pool:
            if process.exitcode is None:
                process.terminate()  # after an error or Ctrl-C; harmless for one ending after its last task
            connection.close()
            process.join()


def _run_in_workers(tasks: list[Task], pool: list, advance) -> list[TaskResult]:
    """Runs the tasks in the workers of `pool`, each fed one task at a time through its own pipe. Nothing is
    shared between workers (multiprocessing.Pool shares locked queues: stopping a worker that holds a lock
    hangs the pool), so an error, Ctrl-C or a dead worker stops them all at once (see started_workers)."""
    results: list[TaskResult | None] = [None] * len(tasks)
    queued = enumerate(tasks)
    running: dict = {}  # connection -> (process, index of the task it runs)

    def send_next(connection, process) -> None:
        index, task = next(queued, (None, None))
        if task is None:
            with contextlib.suppress(OSError):  # gone after its last result, which is in: nothing is lost
                connection.send(None)  # the worker ends
            return
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

    for process, connection in pool:
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


def _worker(connection, job: Job, inherited: list) -> None:
    """A worker process: runs the tasks the parent sends, one at a time, and sends back ("progress", bytes,
    records) as it reads, then ("done", result) or ("error", exception). None from the parent ends it."""
    for other in inherited:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops its workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked: not the CLI's handler, which raises Ctrl-C
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
