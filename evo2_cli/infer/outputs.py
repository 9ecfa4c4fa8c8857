"""Writers for infer outputs. Every file is written to a temporary sibling and renamed into place when
complete (fsio's rule: nothing half-written ever carries a final name); '-' means stdout.

Tables: TSV (default), CSV, or Parquet (needs pyarrow), chosen by `format` or the file suffix.
Embeddings: `.safetensors` (tensors `embeddings` and, per-token, `offsets`; metadata layer/pooling) or `.npy`
(the array), each with an index `OUT.ids.tsv`: index, id, length, offset. Both are written header first and
then streamed row by row (`embeddings_file`): per-token vectors of a 1 Mbase record never sit in memory, and
the finished file memory-maps (np.load(mmap_mode='r'), safetensors' safe_open).

An existing output is replaced only with --overwrite, and only when it is the kind of file the command
writes (fsio.check_replaceable): each OutputKind below recognizes one by its first bytes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from evo2_cli.errors import InputError
from evo2_cli.fsio import (
    OutputKind,
    atomic_path,
    check_replaceable,
    file_kind,
    temporary_sibling,
)
from evo2_cli.infer.config import TableFormat

STDOUT = Path("-")
INDEX_COLUMNS = ("index", "id", "length", "offset")  # the embeddings index OUT.ids.tsv

FASTA = file_kind("a FASTA file", b">")
PARQUET = file_kind("a Parquet table", b"PAR1")
NPY = file_kind("a .npy file", b"\x93NUMPY")
# Our safetensors: an 8-byte header length, then the JSON header, our metadata first (_safetensors_header)
EMBEDDINGS_SAFETENSORS = file_kind("an embeddings .safetensors file", b'{"__metadata__":{"layer":', offset=8)


def table_kind(noun: str, columns: Sequence[str], fmt: TableFormat) -> OutputKind:
    """A table of ours: TSV or CSV starting with the header line of `columns` (a prefix: optional columns may
    follow), or any Parquet file (its magic bytes; the columns are in its footer)."""
    if fmt == "parquet":
        return PARQUET
    separator = "\t" if fmt == "tsv" else ","
    return file_kind(f"{noun} ({fmt.upper()})", separator.join(columns).encode())


def check_output(path: Path, kind: OutputKind, overwrite: bool = False) -> None:
    """InputError unless `path` ('-' = stdout) may be written: it is new, or it is a `kind` evo2 wrote and
    `overwrite` is given (fsio.check_replaceable), and its directory is writable. Commands call it on every
    output before any work, so a typo in an output path never costs a whole run. Creates missing parent
    directories."""
    if str(path) == "-":
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give an output file name")
    check_replaceable(path, kind, overwrite)
    _check_writable(path)


def _check_writable(path: Path) -> None:
    probe = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{path}: cannot write there ({exc.strerror}); choose another output path") from None


@contextlib.contextmanager
def atomic_text_output(path: Path) -> Iterator[IO[str]]:
    """A text stream for `path`, streamed to a temporary sibling, fsynced and renamed on success (removed on
    any error: fsio.atomic_path); `-` is stdout. Never holds the whole output in memory. Commands check
    `path` first (check_output: one write probe per output)."""
    if str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        yield handle


def table_format(path: Path, requested: str | None) -> TableFormat:
    if requested is None:
        suffix = Path(path).suffix.lower()
        requested = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "tsv")
    if requested == "parquet":
        if str(path) == "-":
            raise InputError("--format parquet needs an output file (-o FILE.parquet), not stdout")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(
                "--format parquet needs pyarrow: pip install pyarrow (or use tsv or csv)"
            ) from None
    return requested


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_table(path: Path, rows: Iterable[dict[str, object]], fmt: TableFormat) -> int:
    """Write rows (dicts with the same keys) as a table; returns the row count. Rows stream for TSV/CSV."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        materialized = list(rows)
        columns = list(materialized[0]) if materialized else []
        table = pa.table({c: [r[c] for r in materialized] for c in columns})
        with atomic_path(Path(path)) as tmp:
            pq.write_table(table, tmp)
        return len(materialized)
    count = 0
    with atomic_text_output(path) as handle:
        writer = csv.writer(handle, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        for row in rows:
            if count == 0:
                writer.writerow(list(row))
            writer.writerow([_cell(v) for v in row.values()])
            count += 1
    return count


def fasta_lines(header: str, sequence: str, width: int = 80) -> str:
    body = "\n".join(sequence[i : i + width] for i in range(0, len(sequence), width))
    return f">{header}\n{body}\n"


def embeddings_index(path: Path) -> Path:
    """The id index written beside an embeddings file: OUT.ids.tsv."""
    return path.with_name(path.name + ".ids.tsv")


def check_embeddings_output(path: Path, overwrite: bool = False) -> None:
    """InputError unless `path` is a .safetensors or .npy name that check_output allows, and so is its
    index."""
    kind = NPY if _embeddings_suffix(path) == ".npy" else EMBEDDINGS_SAFETENSORS
    check_output(path, kind, overwrite)
    check_output(
        embeddings_index(Path(path)), table_kind("an embeddings index", INDEX_COLUMNS, "tsv"), overwrite
    )


def _embeddings_suffix(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".safetensors", ".npy"):
        raise InputError(f"{path}: embeddings are written as .safetensors or .npy; change the suffix")
    return suffix


def _safetensors_header(rows: int, width: int, offsets: np.ndarray | None, metadata: dict[str, str]) -> bytes:
    """The safetensors header (u64 length + JSON, space-padded so the data starts 8-byte aligned) of
    `embeddings` (rows, width) float32 followed by `offsets` int64, in that order in the data."""
    size = rows * width * 4
    header: dict[str, object] = {
        "__metadata__": metadata,
        "embeddings": {"dtype": "F32", "shape": [rows, width], "data_offsets": [0, size]},
    }
    if offsets is not None:
        header["offsets"] = {
            "dtype": "I64",
            "shape": [len(offsets)],
            "data_offsets": [size, size + 8 * len(offsets)],
        }
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


@contextlib.contextmanager
def embeddings_file(
    path: Path, rows: int, width: int, offsets: np.ndarray | None, metadata: dict[str, str]
) -> Iterator[Callable[[np.ndarray], None]]:
    """Stream `rows` x `width` float32 vectors into `path` (.npy or .safetensors, by suffix): the header is
    written first (the shape is known), then each block given to `write(block (n, width))`, in order. The
    file is renamed into place only when exactly `rows` rows came (fsio's rule); commands check it first."""
    path = Path(path)
    _embeddings_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0

    def write(block: np.ndarray) -> None:
        nonlocal written
        block = np.ascontiguousarray(block, dtype="<f4")
        if block.ndim != 2 or block.shape[1] != width or written + len(block) > rows:
            raise ValueError(
                f"{path}: block {block.shape} does not fit ({written} of {rows} x {width} written)"
            )
        handle.write(memoryview(block).cast("B"))
        written += len(block)

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        if path.suffix.lower() == ".npy":
            header = {"descr": "<f4", "fortran_order": False, "shape": (rows, width)}
            np.lib.format.write_array_header_1_0(handle, header)
        else:
            handle.write(_safetensors_header(rows, width, offsets, metadata))
        yield write
        if written != rows:
            raise ValueError(f"{path}: {written} of {rows} rows written")
        if offsets is not None and path.suffix.lower() == ".safetensors":
            handle.write(np.ascontiguousarray(offsets, dtype="<i8").tobytes())


def write_embeddings_index(
    path: Path, ids: list[str], lengths: list[int], offsets: np.ndarray | None
) -> Path:
    """The index OUT.ids.tsv beside embeddings file `path` (index, id, length, offset); returns its path."""
    index = embeddings_index(Path(path))
    starts = offsets if offsets is not None else np.arange(len(ids))
    rows = (
        dict(zip(INDEX_COLUMNS, (i, name, length, int(starts[i])), strict=True))
        for i, (name, length) in enumerate(zip(ids, lengths, strict=True))
    )
    write_table(index, rows, "tsv")
    return index


def write_embeddings(
    path: Path,
    vectors: np.ndarray,
    ids: list[str],
    lengths: list[int],
    offsets: np.ndarray | None,
    metadata: dict[str, str],
) -> Path:
    """Write `vectors` (rows, width) in one block (`embeddings_file`) and the index; returns its path."""
    with embeddings_file(path, len(vectors), vectors.shape[1], offsets, metadata) as write:
        write(vectors)
    return write_embeddings_index(path, ids, lengths, offsets)
