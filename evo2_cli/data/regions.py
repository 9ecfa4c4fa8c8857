"""Regions of an indexed FASTA (pyfaidx) as records: from a BED file or `chrom:start-end` strings.

`chrom:start-end` is 1-based and inclusive (samtools style); a bare `chrom` is the whole sequence. BED is
0-based, half-open. Each region becomes a record whose id is `chrom:start-end` (1-based inclusive), so it
splits and sorts like any other record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from evo2_cli.data.fasta import FastaRecord, make_record
from evo2_cli.errors import InputError, shorten

_INTERVAL = re.compile(r"^(?P<chrom>[^:\s]+)(?::(?P<start>[\d,]+)-(?P<end>[\d,]+))?$")


@dataclass(frozen=True)
class Region:
    chrom: str
    start: int  # 0-based
    end: int | None  # exclusive; None = to the end of the sequence
    name: str  # added to the header (BED name column)
    source: str  # where the region was given, for messages: a BED file or a config key
    line: int


def parse_interval(text: str) -> tuple[str, int, int | None]:
    """`chrom:start-end` (1-based, inclusive) or `chrom` -> (chrom, 0-based start, exclusive end)."""
    match = _INTERVAL.match(text.strip())
    if not match:
        raise ValueError(f"'{text}' is not chrom:start-end (1-based, inclusive) or a bare chrom name")
    if match["start"] is None:
        return match["chrom"], 0, None
    start, end = int(match["start"].replace(",", "")), int(match["end"].replace(",", ""))
    if not 1 <= start <= end:
        raise ValueError(f"'{text}': need 1 <= start <= end (1-based, inclusive)")
    return match["chrom"], start - 1, end


def numbered_lines(path: Path, kind: str, comments: tuple[str, ...] = ("#",)) -> list[tuple[int, str]]:
    """(line number, line) of the lines of a text file that are neither blank nor comments."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read {kind} file: {exc}") from None
    return [(n, line) for n, line in enumerate(lines, 1) if line.strip() and not line.startswith(comments)]


def read_bed(path: Path) -> list[Region]:
    regions = []
    for number, line in numbered_lines(path, "BED", ("#", "track", "browser")):
        fields = line.split("\t") if "\t" in line else line.split()
        try:
            chrom, start, end = fields[0], int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            raise InputError(
                f"{path}:{number}: a BED line needs chrom, start and end (integers), "
                f"got {shorten(repr(line))}"
            ) from None
        if not 0 <= start < end:
            raise InputError(f"{path}:{number}: need 0 <= start < end (BED is 0-based, half-open)")
        name = fields[3] if len(fields) > 3 else ""
        regions.append(Region(chrom, start, end, name, str(path), number))
    if not regions:
        raise InputError(f"{path}: no regions in the BED file")
    return regions


def open_indexed(fasta: Path):
    """pyfaidx.Fasta over `fasta` (builds FASTA.fai next to it when missing)."""
    import pyfaidx

    try:
        return pyfaidx.Fasta(str(fasta), as_raw=True, sequence_always_upper=False)
    except (OSError, pyfaidx.FastaIndexingError, pyfaidx.IndexNotFoundError) as exc:
        raise InputError(
            f"{fasta}: cannot index for region access: {exc}; regions need a plain or bgzip FASTA "
            "with equal-length lines"
        ) from None


def resolve(fasta: Path, regions: list[Region]) -> list[Region]:
    """Check every region against the index and fill in open ends."""
    index = open_indexed(fasta)
    resolved = []
    for region in regions:
        if region.chrom not in index:
            known = ", ".join(list(index.keys())[:5])
            raise InputError(
                f"{region.source}:{region.line}: sequence '{region.chrom}' is not in {fasta} (it has {known})"
            )
        length = len(index[region.chrom])
        end = length if region.end is None else region.end
        if end > length:
            raise InputError(
                f"{region.source}:{region.line}: region ends at {end} but '{region.chrom}' has {length} bases"
            )
        resolved.append(Region(region.chrom, region.start, end, region.name, region.source, region.line))
    return resolved


def read_regions(
    fasta: Path, regions: tuple[Region, ...], on_bytes: Callable[[int], None]
) -> Iterator[FastaRecord]:
    index = open_indexed(fasta)
    for region in regions:
        sequence = index[region.chrom][region.start : region.end].encode("ascii", "replace")
        on_bytes(len(sequence))
        header = f"{region.chrom}:{region.start + 1}-{region.end}" + (
            f" {region.name}" if region.name else ""
        )
        yield make_record(Path(region.source), header.encode(), region.line, sequence)
