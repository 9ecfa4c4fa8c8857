"""Megatron-core indexed datasets (`PREFIX.bin` + `PREFIX.idx`): a validating reader and a streaming writer.

Format (megatron.core.datasets.indexed_dataset, also what BioNeMo's `preprocess_evo2` writes):

    .idx  b"MMIDIDX\\x00\\x00"   9-byte magic
          <Q  version (1)
          <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
          <Q  sequence count S
          <Q  document index count D (= documents + 1)
          int32[S]  sequence lengths (in tokens)
          int64[S]  byte offsets of each sequence in .bin
          int64[D]  document indices: 0, then the sequence index that ends each document (last = S)
          int8[S]   sequence modes, only in "multimodal" datasets (accepted and ignored here)
    .bin  the tokens of every sequence back to back, in the dtype above

Usage:

    ds = IndexedDataset("runs/demo/dataset/data_train")
    len(ds), ds[0]            # sequence count; tokens of sequence 0 (a read-only view, no copy)
    ds.tokens                 # the whole .bin as one 1-D memmap (training windows cut across documents)

    with IndexedDatasetWriter("out/data_train") as writer:   # files removed again if the block raises
        writer.add_document(np.frombuffer(b"ACGT\\x00", dtype=np.uint8))
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from evo2_cli.errors import InputError
from evo2_cli.fsio import temporary_sibling

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document index count
_LENGTHS_HELD = 1 << 20  # document lengths a writer holds in memory (and writes the .idx arrays by)

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def paths_of(prefix: str | Path) -> tuple[Path, Path]:
    """The (.bin, .idx) paths of a dataset prefix."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDataset:
    """Read-only, memory-mapped view of one Megatron indexed dataset. Every structural problem is an
    InputError naming the file, so a corrupt or foreign dataset fails at open, not mid-training."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = paths_of(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise InputError(f"{path}: not found; expected an indexed dataset PREFIX.bin + PREFIX.idx")
        self._read_index()
        self._map_tokens()

    def _read_index(self) -> None:
        path = self.idx_path
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise InputError(f"{path}: truncated index ({size} bytes, the header alone is {_HEADER.size})")
        magic, version, code, sequences, doc_indices = _HEADER.unpack(head)
        if magic != MAGIC:
            raise InputError(f"{path}: not a Megatron indexed dataset (bad magic {magic!r})")
        if version != VERSION:
            raise InputError(f"{path}: unsupported index version {version}; only version 1 exists")
        if code not in DTYPE_CODES:
            raise InputError(f"{path}: unknown dtype code {code}; known: {sorted(DTYPE_CODES)}")
        self.dtype = DTYPE_CODES[code]
        body = 4 * sequences + 8 * sequences + 8 * doc_indices
        # A multimodal dataset appends one int8 mode per sequence; the tokens are read the same way.
        if size not in (_HEADER.size + body, _HEADER.size + body + sequences):
            raise InputError(
                f"{path}: index is {size} bytes but its header announces {sequences} sequences and "
                f"{doc_indices} document indices ({_HEADER.size + body} bytes); the file is truncated or "
                "corrupt, regenerate it"
            )
        index = np.memmap(path, dtype=np.uint8, mode="r") if size else np.empty(0, np.uint8)
        offset = _HEADER.size
        self.sequence_lengths = index[offset : offset + 4 * sequences].view(np.int32)
        offset += 4 * sequences
        self.sequence_pointers = index[offset : offset + 8 * sequences].view(np.int64)
        offset += 8 * sequences
        self.document_indices = index[offset : offset + 8 * doc_indices].view(np.int64)

        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != sequences or np.any(np.diff(docs) < 0):
            raise InputError(
                f"{path}: document indices must start at 0, never decrease and end at the sequence "
                f"count {sequences}; the index is corrupt"
            )
        if np.any(self.sequence_lengths < 0):
            raise InputError(f"{path}: negative sequence length; the index is corrupt")

    def _map_tokens(self) -> None:
        path, itemsize = self.bin_path, self.dtype.itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise InputError(f"{path}: {size} bytes is not a whole number of {self.dtype} tokens")
        pointers = self.sequence_pointers
        ends = pointers + self.sequence_lengths.astype(np.int64) * itemsize
        if len(pointers) and (np.any(pointers < 0) or np.any(pointers % itemsize) or ends.max() > size):
            worst = int(np.argmax(ends))
            raise InputError(
                f"{path}: sequence {worst} spans bytes {int(pointers[worst])}..{int(ends[worst])} but "
                f"the file has {size} bytes (or is misaligned); .bin and .idx do not belong together"
            )
        # np.memmap refuses empty files; an empty dataset is still a valid dataset.
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r") if size else np.empty(0, self.dtype)
        self._starts = pointers // itemsize

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sequence `i` (a view into the memmap)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        i %= n
        start = int(self._starts[i])
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def _copy_range(source_fd: int, target_fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes from `offset` of one file to the current position of another."""
    copy_file_range = getattr(os, "copy_file_range", None)  # Linux only
    while count:
        try:
            copied = copy_file_range(source_fd, target_fd, count, offset) if copy_file_range else 0
        except OSError:  # a filesystem or kernel without it
            copied, copy_file_range = 0, None
        if not copied:
            copied = os.write(target_fd, os.pread(source_fd, min(count, 1 << 24), offset))
            if not copied:
                raise ValueError("source file ends before the documents do")
        offset, count = offset + copied, count - copied


class IndexedDatasetWriter:
    """Streams documents (one sequence each, as `preprocess_evo2` does) into PREFIX.bin; `finalize()` writes
    PREFIX.idx. Used as a context manager, a block that raises removes both files."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint8):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no Megatron code; use one of {list(_CODE_OF_DTYPE)}")
        self.bin_path, self.idx_path = paths_of(prefix)
        self._bin = open(self.bin_path, "wb")  # noqa: SIM115 - closed in finalize() or abort()
        # Document lengths: the latest in memory, earlier ones in a side file (int64), so memory does not
        # grow with the document count (the .idx takes 20 bytes a document).
        self._lengths = array("q")
        self._spill_path = temporary_sibling(self.idx_path, "lengths")
        self._spilled = 0
        self._finalized = False

    def add_document(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"a document must be a 1-D array, got shape {tokens.shape}")
        if len(tokens) > np.iinfo(np.int32).max:
            raise ValueError(f"a sequence of {len(tokens)} tokens does not fit the int32 length field")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self._add_lengths((len(tokens),))

    def add_documents_from(self, source_fd: int, offset: int, lengths: Sequence[int]) -> None:
        """Append documents lying back to back at byte `offset` of another file (a spool). The kernel copies
        the bytes (copy_file_range) where it can: they never pass through Python."""
        self._bin.flush()  # the copy goes through the raw descriptor, after everything buffered
        _copy_range(source_fd, self._bin.fileno(), offset, sum(lengths) * self.dtype.itemsize)
        self._add_lengths(lengths)

    def add_documents_bytes(self, data: bytes, lengths: Sequence[int]) -> None:
        """Append documents given as their tokens' bytes back to back (`lengths` in tokens): one write for
        many short documents."""
        if sum(lengths) * self.dtype.itemsize != len(data):
            tokens = sum(lengths)
            raise ValueError(f"{len(data)} bytes do not hold documents of {tokens} tokens of {self.dtype}")
        self._bin.write(data)
        self._add_lengths(lengths)

    def _add_lengths(self, lengths: Sequence[int]) -> None:
        self._lengths.extend(lengths)
        if len(self._lengths) >= _LENGTHS_HELD:
            # The first spill truncates: a file left by a killed writer of the same pid is not ours.
            with open(self._spill_path, "ab" if self._spilled else "wb") as handle:
                handle.write(self._lengths)
            self._spilled += len(self._lengths)
            self._lengths = array("q")

    def _length_chunks(self) -> Iterator[np.ndarray]:
        """Every document length in order, a chunk at a time (int64)."""
        if self._spilled:
            with open(self._spill_path, "rb") as handle:
                while chunk := handle.read(8 * _LENGTHS_HELD):
                    yield np.frombuffer(chunk, dtype=np.int64)
        if self._lengths:
            yield np.frombuffer(self._lengths, dtype=np.int64)

    @property
    def num_documents(self) -> int:
        return self._spilled + len(self._lengths)

    def finalize(self) -> None:
        """Writes the .idx, its arrays a chunk at a time: lengths (int32), byte offsets, document indices."""
        self._bin.close()
        count, itemsize = self.num_documents, self.dtype.itemsize
        header = _HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], count, count + 1)
        with open(self.idx_path, "wb") as handle:
            handle.write(header)
            for lengths in self._length_chunks():
                if lengths.max() > np.iinfo(np.int32).max:
                    raise ValueError(f"a document of {lengths.max()} tokens does not fit the int32 lengths")
                handle.write(lengths.astype(np.int32))
            offset = 0
            for lengths in self._length_chunks():
                ends = offset + np.cumsum(lengths * itemsize)
                handle.write(ends - lengths * itemsize)
                offset = int(ends[-1])
            for start in range(0, count + 1, _LENGTHS_HELD):
                handle.write(np.arange(start, min(start + _LENGTHS_HELD, count + 1), dtype=np.int64))
        self._spill_path.unlink(missing_ok=True)
        self._finalized = True

    def abort(self) -> None:
        self._bin.close()
        for path in (self.bin_path, self.idx_path, self._spill_path):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self._finalized:
                self.finalize()
        finally:
            if exc_type is not None or not self._finalized:  # the block or finalize() failed (a full disk)
                self.abort()
