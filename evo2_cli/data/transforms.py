"""What preprocessing does to one record's sequence: pure functions on bytes, no I/O.

Order (fixed, so a config means one thing): letters mapped (RNA <-> DNA, ambiguity codes to N, upper case, one
combined lookup table) -> cut or drop at long N runs -> length filters per piece -> windows with overlap ->
reverse-complement copy after each window -> phylogenetic tag prepended and re-inserted every `tag_every`
bases -> EOD. A stored document is a list of byte parts written back to back (no concatenation copies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from evo2_cli.data.alphabet import AMBIGUITY_TO_N, COMPLEMENT, DNA_TO_RNA, EOD_ID, RNA_TO_DNA, UPPERCASE


def letter_table(rna: str, iupac: str, uppercase: bool) -> bytes | None:
    """One 256-byte table doing every letter mapping the options ask for, or None when none is asked."""
    steps = [
        {"transcribe": DNA_TO_RNA, "back_transcribe": RNA_TO_DNA}.get(rna),
        AMBIGUITY_TO_N if iupac == "to_n" else None,
        UPPERCASE if uppercase else None,
    ]
    identity = np.arange(256, dtype=np.uint8)
    table = identity
    for step in steps:
        if step is not None:
            table = step[table]
    return None if np.array_equal(table, identity) else table.tobytes()


def windows(length: int, size: int | None, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of `size` that overlap by `overlap` and cover `length`; the last may be short.
    One window (possibly empty) when `size` is None or the sequence fits."""
    if size is None or length <= size:
        return [(0, length)]
    stride = size - overlap
    return [(start, min(start + size, length)) for start in range(0, length - overlap, stride)]


def tagged(sequence: memoryview, tag: bytes | None, every: int | None) -> list[memoryview | bytes]:
    """The parts of one document: the tag before the sequence and again before every `every` bases."""
    if tag is None:
        return [sequence]
    if every is None:
        return [tag, sequence]
    parts: list[memoryview | bytes] = []
    for start in range(0, max(len(sequence), 1), every):
        parts += [tag, sequence[start : start + every]]
    return parts


_COUNT_SLICE = 1 << 18
_BATCH_BYTES = 1 << 20  # pieces smaller than a slice wait in a batch: numpy calls cost microseconds each


@dataclass
class BaseCounts:
    """Letter statistics of stored sequence bases (tags and EOD excluded). Small pieces (short reads) are
    batched and counted a megabyte at a time; `flush()` counts what waits (merge and pickling flush)."""

    bases: int = 0
    gc: int = 0
    n: int = 0
    lowercase: int = 0
    _waiting: dict[int, bytearray] = field(default_factory=dict, repr=False, compare=False)

    def add(self, sequence: bytes | memoryview, copies: int = 1) -> None:
        if len(sequence) >= _COUNT_SLICE:
            self._count(sequence, copies)
            return
        waiting = self._waiting.get(copies)
        if waiting is None:
            waiting = self._waiting[copies] = bytearray()
        waiting += sequence
        if len(waiting) >= _BATCH_BYTES:
            self._count(waiting, copies)
            waiting.clear()

    def flush(self) -> BaseCounts:
        for copies, waiting in self._waiting.items():
            self._count(waiting, copies)
        self._waiting.clear()
        return self

    def _count(self, sequence: bytes | bytearray | memoryview, copies: int) -> None:
        letters = np.frombuffer(sequence, dtype=np.uint8)
        gc = n = lowercase = 0
        # Cache-sized slices: the temporaries stay in L2 instead of paging in fresh memory (4x faster).
        for start in range(0, len(letters), _COUNT_SLICE):
            part = letters[start : start + _COUNT_SLICE]
            # Of all IUPAC letters only G, C, g and c give 0x43 once bits 0x04 (G vs C) and 0x20 (case) are
            # cleared; only N and n give 0x4E once the case bit is cleared.
            gc += np.count_nonzero((part & 0xDB) == 0x43)
            n += np.count_nonzero((part & 0xDF) == 0x4E)
            lowercase += np.count_nonzero(part >= ord("a"))
        self.bases += copies * len(letters)
        self.gc += copies * int(gc)
        self.n += copies * int(n)
        self.lowercase += copies * int(lowercase)

    def merge(self, other: BaseCounts) -> None:
        self.flush()
        other.flush()
        self.bases += other.bases
        self.gc += other.gc
        self.n += other.n
        self.lowercase += other.lowercase

    def __getstate__(self) -> dict:
        self.flush()  # what a worker process sends back holds no uncounted bytes
        return self.__dict__


@dataclass(slots=True)
class RecordOutput:
    documents: list[list[memoryview | bytes]]  # byte parts of each stored document, EOD included
    base_lengths: list[int]  # sequence bases of each document (tags and EOD excluded)
    dropped: dict[str, int]  # pieces dropped, by reason


@dataclass(frozen=True)
class Recipe:
    """The per-record transformation a preprocess config asks for."""

    letters: bytes | None = None  # from letter_table()
    n_run_length: int | None = None
    n_run_action: str = "split"  # "split" at runs of >= n_run_length N, or "drop" the record
    drop_empty: bool = True
    min_length: int = 0
    max_length: int | None = None
    chunk_length: int | None = None
    chunk_overlap: int = 0
    reverse_complement: bool = False
    tag_every: int | None = None
    append_eod: bool = True

    def apply(self, parts: list[bytes], counts: BaseCounts, tag: bytes | None = None) -> RecordOutput:
        """`parts`: the record's sequence in the pieces it was read in (FastaRecord.parts). They are stored
        as they are unless a step must cut the sequence, which joins them into one buffer first. The letters
        of the stored documents are added to `counts` (the split's)."""
        out = RecordOutput([], [], {})
        if self.letters is not None:
            parts = [part.translate(self.letters) for part in parts]
        if len(parts) != 1 and self.cuts_sequence:
            parts = [b"".join(parts)]
        for piece, length in self._pieces(parts, out.dropped):
            if self.cuts_sequence:
                self._cut(piece[0], tag, out, counts)
            else:  # one document, stored in the parts it was read in
                out.documents.append([tag, *piece, *self._eod] if tag is not None else [*piece, *self._eod])
                out.base_lengths.append(length)
                for part in piece:
                    counts.add(part)
        return out

    @cached_property
    def cuts_sequence(self) -> bool:
        """N-run cuts, windows, reverse complements and repeated tags slice one contiguous sequence."""
        return (
            self.n_run_length is not None
            or self.chunk_length is not None
            or self.reverse_complement
            or self.tag_every is not None
        )

    @cached_property
    def _eod(self) -> tuple[bytes, ...]:
        return (bytes([EOD_ID]),) if self.append_eod else ()

    def _pieces(self, parts: list[bytes], dropped: dict[str, int]) -> list[tuple[list[bytes], int]]:
        """The pieces to store, each with its length in bases; what is dropped is counted in `dropped`."""
        length = sum(map(len, parts))
        if not length:
            if self.drop_empty:
                dropped["empty"] = dropped.get("empty", 0) + 1
                return []
            return [(parts, 0)]
        pieces = [(parts, length)]
        if self.n_run_length is not None:  # parts is one buffer here (cuts_sequence)
            (sequence,) = parts
            n_run = re.compile(rb"[Nn]{%d,}" % self.n_run_length)
            if self.n_run_action == "drop":
                if n_run.search(sequence):
                    dropped["n_run"] = dropped.get("n_run", 0) + 1
                    return []
            else:  # pieces between the runs; runs at the ends leave nothing to keep
                pieces = [([piece], len(piece)) for piece in n_run.split(sequence) if piece]
        kept = []
        for piece, length in pieces:
            if length < self.min_length:
                dropped["too_short"] = dropped.get("too_short", 0) + 1
            elif self.max_length is not None and length > self.max_length:
                dropped["too_long"] = dropped.get("too_long", 0) + 1
            else:
                kept.append((piece, length))
        return kept

    def _cut(self, sequence: bytes, tag: bytes | None, out: RecordOutput, counts: BaseCounts) -> None:
        """Windows of one piece, each followed by its reverse complement when asked, tags inserted."""
        forward = memoryview(sequence)
        reverse = memoryview(sequence.translate(COMPLEMENT)[::-1]) if self.reverse_complement else None
        length = len(forward)
        for start, end in windows(length, self.chunk_length, self.chunk_overlap):
            out.documents.append([*tagged(forward[start:end], tag, self.tag_every), *self._eod])
            copies = 1
            if reverse is not None:  # the reverse strand of the same window, right after it
                window = reverse[length - end : length - start]
                out.documents.append([*tagged(window, tag, self.tag_every), *self._eod])
                copies = 2
            out.base_lengths += [end - start] * copies
            counts.add(forward[start:end], copies)  # a reverse complement has the same GC, N, case
