"""The preprocess config (its keys, checked as they load), the limits that bound its work, the tag rules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from evo2_cli.config import FieldError, check
from evo2_cli.data.alphabet import MAX_TAG_BYTES, TAG_MARKERS
from evo2_cli.data.fasta import BLOCK_SIZE, display
from evo2_cli.data.regions import numbered_lines, parse_interval
from evo2_cli.data.transforms import Recipe, letter_table
from evo2_cli.errors import InputError, shorten


@dataclass(frozen=True)
class Limits:
    """Sizes that bound memory and work (tests pass small ones); none but the last changes the output."""

    read_block: int = BLOCK_SIZE  # bytes read from a plain file at a time (gzip: a quarter of it)
    shard_bytes: int = 16 << 20  # with several workers, plain and bgzip files are cut into ranges this large
    # `workers: auto` starts one worker per this much input: a worker reads it in about the 0.15 s that
    # starting the workers costs, so two workers pay off from about twice this much.
    auto_bytes_per_worker: int = 64 << 20
    flush_documents: int = 1 << 17  # a task writes its records' metadata to disk every this many documents
    group_records: int = 1 << 17  # a sorting group holds at most this many records (a few hundred bytes each)
    group_documents: int = 1 << 22  # ... and this many documents (unless one sub-bucket alone holds more)
    merge_records: int = 1 << 16  # records held by all the runs being merged together, read a block per run
    write_batch: int = 1 << 22  # bytes: larger runs are copied by the kernel, smaller ones gathered to this
    max_document_tokens: int = 2**31 - 1  # the .idx stores each document's length as int32


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
        """The per-record steps: every field of Recipe but its letter table is the key of the same name."""
        steps = {step.name: getattr(self, step.name) for step in fields(Recipe) if step.name != "letters"}
        return Recipe(letters=letter_table(self.rna, self.iupac, self.uppercase), **steps)


@dataclass
class PreprocessJob:
    """Root of a preprocess config file."""

    preprocess: PreprocessConfig


@dataclass(frozen=True)
class TagRule:
    pattern: re.Pattern[str]  # must match the whole record id
    lineage: bytes  # "|d__...;...|"


def load_tags(path: Path) -> tuple[TagRule, ...]:
    rules = []
    for number, line in numbered_lines(path, "tags"):
        pattern, sep, lineage = line.partition("\t")
        lineage = lineage.strip()
        if not sep or not pattern:
            raise InputError(f"{path}:{number}: expected ID_REGEX<TAB>|lineage|, got {shorten(repr(line))}")
        try:
            compiled = re.compile(pattern)
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
        rules.append(TagRule(compiled, lineage.encode()))
    if not rules:
        raise InputError(f"{path}: no tag rules")
    return tuple(rules)


def tag_for(record_id: bytes, rules: tuple[TagRule, ...]) -> bytes | None:
    text = display(record_id)
    return next((rule.lineage for rule in rules if rule.pattern.fullmatch(text)), None)
