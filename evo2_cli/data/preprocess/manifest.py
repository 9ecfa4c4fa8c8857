"""The manifest.json of a dataset, and the error for inputs that left nothing to store."""

from __future__ import annotations

import collections
from pathlib import Path

from evo2_cli import __version__
from evo2_cli.config import to_dict
from evo2_cli.data.alphabet import EOD_ID, PAD_ID, VOCAB_SIZE
from evo2_cli.data.lengths import summarize_lengths
from evo2_cli.data.preprocess.assemble import empty_splits
from evo2_cli.data.preprocess.config import PreprocessConfig
from evo2_cli.data.preprocess.worker import MAX_EXAMPLES, SplitStats, TaskResult, lengths_name, split_totals
from evo2_cli.data.splits import SPLITS
from evo2_cli.errors import InputError
from evo2_cli.fsio import directory_kind, json_listing, sha256_file

MANIFEST = "manifest.json"
# What `--overwrite` may replace: a directory with our manifest and the files it lists, nothing else.
DATASET_DIR = directory_kind("a dataset directory", MANIFEST, json_listing(MANIFEST, lambda m: "splits" in m))


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
    dropped: collections.Counter = collections.Counter()
    for result in results:
        dropped.update(result.dropped)
    problems = sorted(problem for result in results for problem in result.problems)
    return dict(sorted(dropped.items())), problems


def manifest_of(
    cfg: PreprocessConfig, names: list, results: list[TaskResult], records: Path, out: Path, digests: dict
) -> dict:
    """The manifest of the dataset in `out`; `records`: the directory of the document lengths; `digests`:
    sha256 of files already hashed while they were written, by file name."""
    splits = split_totals(results)
    dropped, problems = _dropped(results)
    # Where the output went and how many processes wrote it do not change a byte of it.
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "workers")}
    files = {}
    for path in sorted(out.iterdir()):
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
            name: _split_summary(stats, summarize_lengths(sorted(records.glob(lengths_name("*", i)))))
            for i, (name, stats) in enumerate(zip(SPLITS, splits, strict=True))
        },
        "dropped": dropped,
        "dropped_examples": [message for _, _, message in problems[:MAX_EXAMPLES]],
        "files": files,
    }
    if empty := empty_splits(results):
        manifest["empty_splits"] = empty  # no files: nothing to read (they would not open in megatron-core)
    return manifest


# What to change when a filter dropped every record, by the reason the manifest counts it under.
_DROP_FIXES = {
    "too_short": "lower preprocess.min_length",
    "too_long": "raise preprocess.max_length",
    "n_run": "raise preprocess.n_run_length or set preprocess.n_run_action=split",
}


def no_sequence(names: list, results: list[TaskResult]) -> InputError:
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
