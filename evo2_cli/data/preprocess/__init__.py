"""`evo2 preprocess`: FASTA files (and regions of indexed FASTA) -> one Megatron indexed dataset per split.
Stages: config, plan (inputs -> tasks), worker (tasks -> spooled records), assemble (records sorted -> .bin
and .idx files), manifest; all in a temporary directory renamed into place at the end. A split without a token
gets no files (megatron-core cannot map an empty .bin): the manifest lists it under `empty_splits`. Memory
holds a few blocks of records at a time, never all of them.

Determinism: a record's split is `blake2b(seed, key)` (data/splits.py) where the key is its id (first
header word) or the `group_regex` match; with `split_by: position` every record is cut instead, its head to
train and its tail to val and test, each piece stored like a record of its split. Inside a split, records
are ordered by (input position in the expanded input list, record id, content digest for records sharing an
id); the documents of one record keep their order (pieces, windows, forward then reverse complement).
Nothing depends on the record order inside a file, the byte ranges tasks were cut into, the worker count or
the limits, so those give byte-identical datasets and manifests.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from functools import partial

from evo2_cli.data.preprocess.assemble import write_splits
from evo2_cli.data.preprocess.config import Limits, PreprocessConfig, load_tags
from evo2_cli.data.preprocess.manifest import DATASET_DIR, MANIFEST, manifest_of, no_sequence
from evo2_cli.data.preprocess.plan import plan_workers
from evo2_cli.data.preprocess.worker import Job, execute, keep_freed_memory, started_workers
from evo2_cli.fsio import atomic_output_dir, atomic_write_text


def run_preprocess(cfg: PreprocessConfig, overwrite: bool = False, console=None, limits=Limits()) -> dict:
    """Run the whole preprocess; returns the manifest. `console` (rich) shows progress when given."""
    names, tasks, workers, workers_note = plan_workers(cfg, limits)
    keep_freed_memory()
    tags = load_tags(cfg.tags_file) if cfg.tags_file is not None else ()
    say = partial(console.print, highlight=False, soft_wrap=True) if console else (lambda text: None)
    if workers_note:
        say(workers_note)
    progress = partial(_progress_bar, console)
    with atomic_output_dir(cfg.output_dir, DATASET_DIR, overwrite, say=say) as tmp:
        job = Job(cfg, tags, tmp / ".spool", tmp / ".records", limits)
        job.spool_dir.mkdir()
        job.records_dir.mkdir()
        processes = min(workers, len(tasks))
        with (
            started_workers(job, processes if processes > 1 else 0) as pool,
            progress(sum(task.size for task in tasks), "reading", "records") as advance,
        ):
            results = execute(tasks, job, pool, advance)
        if not any(stats.counts.bases for result in results for stats in result.splits):
            raise no_sequence(names, results)
        digests = write_splits(tasks, results, job, tmp, progress)
        shutil.rmtree(job.spool_dir)
        manifest = manifest_of(cfg, names, results, job.records_dir, tmp, digests)
        shutil.rmtree(job.records_dir)
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def _progress_bar(console, total: int, label: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """Yields advance(bytes, items) driving a rich bar of bytes and of `unit`; silent without a console."""
    if console is None:
        yield lambda count, records: None
        return
    from rich import progress as bar

    columns = [bar.TextColumn(f"[bold]{label}"), bar.BarColumn(), bar.DownloadColumn()]
    columns += [bar.TransferSpeedColumn(), bar.TextColumn(f"{{task.fields[records]:,}} {unit}")]
    with bar.Progress(*columns, bar.TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task(label, total=total, records=0)
        records = 0

        def advance(count: int, new_records: int) -> None:
            nonlocal records
            records += new_records
            progress.update(task, advance=count, records=records)

        yield advance
        progress.update(task, completed=total)
