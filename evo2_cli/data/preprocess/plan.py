"""Planning: inputs expanded, regions resolved, large plain and bgzip files cut into byte ranges, the worker
count."""

from __future__ import annotations

import functools
import glob
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from evo2_cli.data.fasta import bgzf_blocks, bgzf_record_start_after, is_gzip, record_start_after
from evo2_cli.data.preprocess.config import Limits, PreprocessConfig
from evo2_cli.data.regions import Region, parse_interval, read_bed, resolve
from evo2_cli.errors import InputError


@dataclass(frozen=True)
class Task:
    input_index: int
    path: Path  # a FASTA file, or the indexed FASTA that `regions` cut from
    # The byte range to read; of a bgzip file, virtual offsets (a block's compressed offset << 16 | an offset
    # in its inflated bytes, see fasta.bgzf_record_start_after).
    start: int = 0
    end: int | None = None
    regions: tuple[Region, ...] = ()
    size: int = 0  # bytes as stored (or region bases) for the progress bar


def record_place(path: Path, regions: tuple[Region, ...], line: int) -> str:
    """Where a record came from, for messages: FILE:LINE of its header or, for a region task, where region
    number `line` was given (its BED line or config key) and what it cut."""
    if not regions:
        return f"{path}:{line}"
    region = regions[line]
    return f"{region.source}:{region.line} (region {region.chrom}:{region.start + 1}-{region.end} of {path})"


# What a directory given as an input contributes: its files named like FASTA, compressed or not.
_KINDS, _COMPRESSIONS = (".fa", ".fasta", ".fna", ".ffn", ".frn", ".fas"), ("", ".gz", ".bgz", ".bgzf")
FASTA_NAMES = tuple(kind + compression for kind in _KINDS for compression in _COMPRESSIONS)


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


def _file_tasks(index: int, path: Path, workers: int, shard_bytes: int) -> list[Task]:
    size = path.stat().st_size
    # Two byte ranges per worker: ranges end at record starts, so their work differs; one done early frees
    # its worker for another.
    shards = 1 if workers == 1 else min(2 * workers, size // shard_bytes)
    if shards <= 1:
        return [Task(index, path, size=size)]
    if is_gzip(path):  # bgzip is cut at virtual offsets; a gzip stream only inflates from its start
        blocks = bgzf_blocks(path)
        if blocks is None:
            return [Task(index, path, size=size)]
        shift, cut_at = 16, functools.partial(bgzf_record_start_after, path, blocks)
    else:
        shift, cut_at = 0, functools.partial(record_start_after, path)
    cuts = {cut_at(k * size // shards) for k in range(1, shards)}
    file_end = size << shift
    bounds = [*sorted({0, *(cut for cut in cuts if cut < file_end)}), file_end]
    return [
        Task(index, path, start, end, size=(end >> shift) - (start >> shift))
        for start, end in itertools.pairwise(bounds)
    ]


def plan_tasks(cfg: PreprocessConfig, workers: int, limits: Limits) -> tuple[list[Path | str], list[Task]]:
    """Input names (by input index) and the tasks that read them (large plain and bgzip files cut for
    `workers`)."""
    names: list[Path | str] = []
    tasks: list[Task] = []
    for path in expand_inputs(cfg.inputs):
        tasks += _file_tasks(len(names), path, workers, limits.shard_bytes)
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
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_workers(tasks: list[Task], cores: int, bytes_per_worker: int) -> int:
    """`workers: auto` for tasks planned for `cores` workers: one worker per `bytes_per_worker` of input
    (bytes as stored, bases for regions), at most one per core and one per task (a plain gzip file is one)."""
    size = sum(task.size for task in tasks)
    return max(1, min(cores, len(tasks), size // bytes_per_worker))


def plan_workers(
    cfg: PreprocessConfig, limits: Limits
) -> tuple[list[Path | str], list[Task], int, str | None]:
    """Input names, tasks and the worker count; with `workers: auto`, also a line saying what was chosen and
    why. The worker count never changes a byte of the output."""
    if cfg.workers != "auto":
        return *plan_tasks(cfg, cfg.workers, limits), cfg.workers, None
    cores = available_cores()
    names, tasks = plan_tasks(cfg, cores, limits)
    workers = auto_workers(tasks, cores, limits.auto_bytes_per_worker)
    mib = sum(task.size for task in tasks) / 2**20
    note = (
        f"workers: {workers} (chosen automatically: {mib:,.0f} MiB of input in {len(tasks)} part(s) that can "
        f"be read at once, {cores} core(s), a worker per {limits.auto_bytes_per_worker >> 20} MiB; set "
        "--workers to choose)"
    )
    if workers != cores:
        names, tasks = plan_tasks(cfg, workers, limits)
    return names, tasks, workers, note
