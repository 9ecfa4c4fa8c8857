"""Streaming FASTA reader: plain, gzip or bgzip (sniffed from the bytes, not the name), CRLF, any line width.

Speed comes from doing no per-line Python work: the file is read in big blocks (read and decompressed in a
background thread; ISA-L takes the GIL back for every output buffer, so that thread overlaps the caller's
I/O rather than its parsing), headers are found with `bytes.find` (memchr), line ends are removed with
`bytes.replace` and the alphabet is checked with one `bytes.translate` per block. A record keeps the pieces
of the blocks it was read from (`parts`). Memory holds one record plus a few blocks, whatever the file size.
A byte range of a plain or bgzip file, cut at record starts, can be read on its own (by parallel workers).

Problems of one record (a character outside IUPAC, an empty header) do not raise: the record carries
`problem` and the caller decides whether to stop or skip it. Problems of the whole file (empty, no header,
sequence before the first header, FASTQ, truncated gzip, another compression) raise InputError naming the
file and line.
"""

from __future__ import annotations

import array
import bisect
import functools
import io
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evo2_cli.data.alphabet import IUPAC_BYTES
from evo2_cli.errors import InputError, shorten

try:  # ISA-L inflates gzip about 3x faster than zlib, to the same bytes; zlib is the fallback
    from isal import isal_zlib as inflate_lib
except ImportError:  # pragma: no cover - depends on the environment
    inflate_lib = zlib

BLOCK_SIZE = 1 << 22  # plain-file read size; gzip reads a quarter of it (DNA inflates about 3.5x)
_PREFETCH_BLOCKS = 4
_BLANKS = b"\r\t "  # tolerated inside sequence lines (CRLF files, trailing spaces) and removed
_OTHER_COMPRESSION = {b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


@dataclass(slots=True)
class FastaRecord:
    header: bytes  # the header line without '>' and line end (raw bytes: need not be UTF-8)
    # The sequence letters, line ends removed, in the pieces they were read in (about one per block): a caller
    # that streams them never copies the record into one buffer. One growing buffer when read_fasta was asked
    # for `contiguous` records. Empty when `problem` is set.
    parts: list[bytes | bytearray]
    line: int  # 1-based line of the header, counted from where reading started (see read_fasta)
    problem: str | None = None  # why the record is unusable, with file and line

    @property
    def sequence(self) -> bytes | bytearray:
        """The whole sequence as one object (a copy when it was read in several pieces)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    @property
    def id(self) -> bytes:
        """The first word of the header, as Biopython and samtools take it."""
        words = self.header.split(None, 1)
        return words[0] if words else b""


def display(raw: bytes) -> str:
    """Header bytes for messages: UTF-8 where it decodes, escapes elsewhere (never crashes)."""
    return raw.decode("utf-8", "backslashreplace")


def describe_byte(value: int) -> str:
    char = chr(value)
    if value < 32 or value > 126:
        return f"byte 0x{value:02x} (binary data: is this really a FASTA text file?)"
    if char in "-.":
        return f"'{char}' (an alignment gap: remove gaps, this tool reads unaligned sequences)"
    if char == "*":
        return "'*' (a stop codon or mask: protein or masked alignment input?)"
    if char.isdigit():
        return f"'{char}' (a digit: GenBank-style numbered sequence lines are not FASTA)"
    return f"'{char}' (not an IUPAC nucleotide code)"


# ---------------------------------------------------------------- byte blocks


def _compression(path: Path, magic: bytes) -> str | None:
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"  # plain gzip and bgzip alike
    for prefix, name in _OTHER_COMPRESSION.items():
        if magic.startswith(prefix):
            raise InputError(f"{path}: {name}-compressed; decompress it or recompress with gzip or bgzip")
    return None


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return _compression(path, handle.read(8)) == "gzip"


def _gunzip_blocks(handle, path: Path, on_bytes: Callable[[int], None], block_size: int) -> Iterator[bytes]:
    inflater, fed = inflate_lib.decompressobj(31), False
    while chunk := handle.read(block_size // 4):
        on_bytes(len(chunk))
        while chunk:
            fed = True
            try:
                out = inflater.decompress(chunk)
            except inflate_lib.error as exc:
                raise _corrupt(path, exc) from None
            if out:
                yield out
            chunk = b""
            if inflater.eof:  # a member ends; bgzip and concatenated gzip files hold more
                chunk, inflater, fed = inflater.unused_data, inflate_lib.decompressobj(31), False
    if fed and not inflater.eof:
        raise _truncated(path, "mid-stream")


def _corrupt(path: Path, exc: Exception) -> InputError:
    return InputError(f"{path}: corrupt gzip data ({exc}); re-download or recompress it")


def _truncated(path: Path, where: str) -> InputError:
    return InputError(f"{path}: truncated gzip file (ends {where}); re-download or recompress it")


class _Counted(io.RawIOBase):
    """The next `size` bytes of a file (None: all the rest), reported to `on_bytes` as they are read."""

    def __init__(self, handle, size: int | None, on_bytes: Callable[[int], None]):
        self.handle, self.left, self.on_bytes = handle, size, on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)
        count = self.handle.readinto(view if self.left is None else view[: self.left])
        self.left = None if self.left is None else self.left - count
        self.on_bytes(count)
        return count


def _gzip_reader_blocks(raw: _Counted, path: Path, block_size: int) -> Iterator[bytes]:
    """The inflated bytes of the bgzip blocks in `raw`, by a gzip reader that goes from member to member
    itself: ISA-L's walks them in C, where an inflate call per 20 KB member from Python takes the GIL back
    from the parser each time (see BENCHMARKS.md, Preprocess); Python's gzip where isal is missing."""
    if inflate_lib is zlib:
        import gzip as reading
    else:
        from isal import igzip as reading

    reader = reading.GzipFile(fileobj=raw)
    try:
        while block := reader.read(block_size):
            yield block
    except EOFError:
        raise _truncated(path, "mid-block") from None
    except (zlib.error, inflate_lib.error, OSError) as exc:
        raise _corrupt(path, exc) from None


def _plain_blocks(handle, start: int, end: int | None, on_bytes, block_size: int) -> Iterator[bytes]:
    handle.seek(start)
    left = None if end is None else end - start
    while left is None or left > 0:
        block = handle.read(block_size if left is None else min(block_size, left))
        if not block:
            return
        on_bytes(len(block))
        if left is not None:
            left -= len(block)
        yield block


def _file_blocks(path: Path, start: int, end: int | None, on_bytes, block_size=BLOCK_SIZE) -> Iterator[bytes]:
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below, opened here for the message
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        if _compression(path, handle.read(8)) == "gzip":
            if start or end is not None:
                yield from _bgzf_range(handle, path, start, end, on_bytes, block_size)
            elif _bgzf_block_size(handle.fileno(), 0) is not None:
                handle.seek(0)
                yield from _gzip_reader_blocks(_Counted(handle, None, on_bytes), path, block_size)
            else:
                handle.seek(0)
                yield from _gunzip_blocks(handle, path, on_bytes, block_size)
        else:
            yield from _plain_blocks(handle, start, end, on_bytes, block_size)


# ---------------------------------------------------------------- BGZF (bgzip) blocks and virtual offsets
# A BGZF file is a series of gzip members ("blocks") of at most 64 KiB inflated, each giving its compressed
# size in a 'BC' subfield of its header's extra field, so a reader can start at any block. A place in it is a
# virtual offset: the compressed offset of a block << 16 | an offset inside that block's inflated bytes.


def _bgzf_size(data: bytes, pos: int = 0) -> int | None:
    """The compressed size of the BGZF block whose header starts at `pos`, or None where `data` holds no whole
    BGZF header there."""
    if data[pos : pos + 4] != b"\x1f\x8b\x08\x04" or len(data) < pos + 12:  # gzip, deflate, only FEXTRA set
        return None
    extra_end = pos + 12 + int.from_bytes(data[pos + 10 : pos + 12], "little")
    at = pos + 12
    while at + 4 <= min(extra_end, len(data)):  # the extra field's subfields: 2-byte id, 2-byte length
        length = int.from_bytes(data[at + 2 : at + 4], "little")
        if data[at : at + 2] == b"BC" and length == 2 and at + 6 <= min(extra_end, len(data)):
            size = int.from_bytes(data[at + 4 : at + 6], "little") + 1
            return size if size >= extra_end - pos + 8 else None  # header, deflate data, CRC32 and ISIZE
        at += 4 + length
    return None


def _bgzf_block_size(fd: int, offset: int) -> int | None:
    header = os.pread(fd, 18, offset)  # 12 bytes, then the extra field: 6 bytes when it holds only 'BC'
    if len(header) == 18 and header[10:12] != b"\x06\x00":
        header = os.pread(fd, 12 + int.from_bytes(header[10:12], "little"), offset)
    return _bgzf_size(header)


def bgzf_blocks(path: Path) -> array.array | None:
    """The compressed offsets where the blocks of a BGZF file start, then the file size; None where the file
    is not BGZF throughout (plain gzip, ordinary gzip members concatenated, a truncated or odd block): such a
    file is read whole, by one process. Reads each block's header only (8 bytes kept per 20 KB block)."""
    with open(path, "rb") as handle:
        fd, offsets, offset = handle.fileno(), array.array("q", [0]), 0
        size = os.fstat(fd).st_size
        while offset < size:
            block = _bgzf_block_size(fd, offset)
            if block is None:
                return None
            offset += block
            offsets.append(offset)
    return offsets if len(offsets) > 1 and offset == size else None


def _bgzf_inflate(path: Path, block: bytes | memoryview) -> bytes:
    try:
        return inflate_lib.decompress(block, 31)
    except inflate_lib.error as exc:
        raise _corrupt(path, exc) from None


def bgzf_record_start_after(path: Path, blocks: array.array, offset: int) -> int:
    """The virtual offset of the first '>' beginning a line in the blocks at or after compressed `offset` of a
    BGZF file (`blocks` from bgzf_blocks), or of the file's end if none: where a byte range may start."""
    with open(path, "rb") as handle:
        fd = handle.fileno()

        def inflated(i: int) -> bytes:
            return _bgzf_inflate(path, os.pread(fd, blocks[i + 1] - blocks[i], blocks[i]))

        first = bisect.bisect_left(blocks, offset)
        # A '>' at the very start of a block begins a line if the last byte of the blocks before ends one.
        previous = next((data[-1:] for i in range(first - 1, -1, -1) if (data := inflated(i))), b"\n")
        for i in range(first, len(blocks) - 1):
            data = inflated(i)
            at = _next_header(data, 0, previous == b"\n")
            if 0 <= at < 1 << 16:  # a block inflating past 64 KiB (not BGZF's) cannot name later bytes
                return blocks[i] << 16 | at
            previous = data[-1:] or previous
    return blocks[-1] << 16


def _not_bgzf(path: Path, offset: int) -> InputError:
    return InputError(f"{path}: no BGZF block at byte {offset} (was the file changed while it was read?)")


def _bgzf_range(handle, path: Path, start: int, end: int | None, on_bytes, block_size) -> Iterator[bytes]:
    """The inflated bytes of a BGZF file from virtual offset `start` to `end` (None: the file's end)."""
    first, skip = start >> 16, start & 0xFFFF
    last, keep = (os.fstat(handle.fileno()).st_size, 0) if end is None else (end >> 16, end & 0xFFFF)

    def pieces() -> Iterator[bytes]:
        handle.seek(first)
        if last > first:
            if _bgzf_block_size(handle.fileno(), first) is None:
                raise _not_bgzf(path, first)
            yield from _gzip_reader_blocks(_Counted(handle, last - first, on_bytes), path, block_size)
        if keep:  # the head of the block the next range starts in, whose bytes that range reports read
            tail = _bgzf_block_size(handle.fileno(), last)
            if tail is None:
                raise _not_bgzf(path, last)
            yield _bgzf_inflate(path, os.pread(handle.fileno(), tail, last))[:keep]

    for piece in pieces():
        if skip:
            dropped = min(skip, len(piece))
            piece, skip = piece[dropped:], skip - dropped
        if piece:
            yield piece


_END = object()


def _prefetched(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Run `blocks` in a background thread, a few blocks ahead; errors surface in the consumer."""
    pipe: queue.Queue = queue.Queue(_PREFETCH_BLOCKS)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                pipe.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not put(block):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=produce, name="fasta-reader", daemon=True)
    thread.start()
    try:
        while (item := pipe.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def count_lines(path: Path, start: int, end: int) -> int:
    """Line ends in bytes [start, end) of a plain file, or between virtual offsets of a BGZF file (the lines
    before a byte range, for messages)."""
    lines = 0
    for block in _file_blocks(path, start, end, lambda n: None):
        lines += block.count(b"\n")
    return lines


def record_start_after(path: Path, offset: int) -> int:
    """The first offset >= `offset` of a plain file where a header line begins (the file size if none)."""
    with open(path, "rb") as handle:
        if offset > 0:
            handle.seek(offset - 1)
            previous = handle.read(1)
        else:
            previous = b"\n"
        position = offset
        while block := handle.read(1 << 16):
            at = _next_header(block, 0, previous == b"\n")
            if at >= 0:
                return position + at
            position += len(block)
            previous = block[-1:]
    return position


# ---------------------------------------------------------------- parsing


def _next_header(block: bytes, pos: int, at_line_start: bool) -> int:
    """Index of the next '>' that begins a line, or -1; a '>' inside a line is sequence (flagged later)."""
    at = block.find(b">", pos)
    while at >= 0:
        if block[at - 1] == 10 if at > 0 else at_line_start:
            return at
        at = block.find(b">", at + 1)
    return -1


@dataclass
class _RecordBuilder:
    place: Callable[[int], str]  # line -> "FILE:LINE" for messages
    header: bytes
    line: int
    contiguous: bool = False  # grow one buffer (realloc/mremap: the record once in memory), not a list
    parts: list[bytes | bytearray] = field(default_factory=list)
    problem: str | None = None

    def add(self, body: bytes, first_line: int) -> int:
        """Append sequence lines (`body` starts on file line `first_line`); returns its line-end count."""
        piece = body.replace(b"\n", b"")
        newlines = len(body) - len(piece)  # counted for free: no second pass over the bytes
        if self.problem:
            return newlines
        bad = piece.translate(None, IUPAC_BYTES)
        if bad and not bad.translate(None, _BLANKS):
            piece, bad = piece.translate(None, _BLANKS), b""
        if bad:
            offenders = set(bad) - set(_BLANKS)
            at = min(body.find(bytes([value])) for value in offenders)
            line = first_line + body.count(b"\n", 0, at)
            self.problem = (
                f"{self.place(line)}: record '{shorten(display(self.header.split(None, 1)[0]))}' has "
                f"{describe_byte(body[at])}; fix the record, or skip bad records with "
                "--set preprocess.on_bad_record=skip"
            )
            self.parts = []
        elif self.contiguous and self.parts:
            self.parts[0] += piece
        elif piece:
            self.parts.append(bytearray(piece) if self.contiguous else piece)
        return newlines

    def finish(self) -> FastaRecord:
        if not self.header.strip() and not self.problem:
            self.problem = f"{self.place(self.line)}: empty header line (a record needs an id after '>')"
            self.parts = []
        return FastaRecord(self.header, self.parts, self.line, self.problem)


def make_record(path: Path, header: bytes, line: int, sequence: bytes) -> FastaRecord:
    """A record from a sequence read elsewhere (an indexed region), checked like a parsed one."""
    builder = _RecordBuilder(functools.partial(_file_line, path), header, line)
    builder.add(sequence, line)
    return builder.finish()


def _file_line(path: Path, line: int, lines_before: Callable[[], int] = lambda: 0) -> str:
    return f"{path}:{line + lines_before()}"


def _preamble_error(place: Callable[[int], str], body: bytes, line: int) -> InputError:
    text = body.lstrip()
    line += body.count(b"\n", 0, len(body) - len(text))
    if text.startswith(b"@"):
        return InputError(f"{place(line)}: FASTQ ('@' header), not FASTA; convert it first: seqtk seq -a")
    if any(value < 9 or 13 < value < 32 or value == 127 for value in text[:256]):
        return InputError(f"{place(line)}: binary data, not FASTA text")
    return InputError(f"{place(line)}: sequence data before the first '>' header line; add a header")


def read_fasta(
    path: Path | str,
    start: int = 0,
    end: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    contiguous: bool = False,
    block_size: int = BLOCK_SIZE,
    lines_before: Callable[[], int] | None = None,
    on_lines: Callable[[int], None] | None = None,
) -> Iterator[FastaRecord]:
    """Records of a FASTA file, in file order. `start`/`end` read only the records whose header starts in
    that byte range of a plain file (see `record_start_after`), or between those virtual offsets of a BGZF
    file (see `bgzf_record_start_after`); `on_bytes(n)` reports file bytes consumed (compressed bytes).
    `contiguous`: each record's sequence in one buffer (`parts` holds one bytearray), for callers that need
    it whole: joining pieces afterwards would hold the record twice. `block_size`: bytes read at a time.
    A record's `line` counts from `start` (line 1 is the one `start` is on), so that reading a range never
    needs a pass over the bytes before it; messages name the file's line, adding `lines_before()` (the line
    ends before `start`; by default counted when a message first needs it). `on_lines(n)`: called at the
    end with the line ends read."""
    path = Path(path)
    if lines_before is None:
        lines_before = functools.cache(lambda: count_lines(path, 0, start) if start else 0)
    place = functools.partial(_file_line, path, lines_before=lines_before)
    line = 1
    header_parts: list[bytes] | None = None  # set while a header line spans blocks
    header_line = 0
    record: _RecordBuilder | None = None
    at_line_start, seen_bytes, seen_records = True, False, False
    for block in _prefetched(_file_blocks(path, start, end, on_bytes or (lambda n: None), block_size)):
        seen_bytes = True
        pos, size = 0, len(block)
        while pos < size:
            if header_parts is not None:
                newline = block.find(b"\n", pos)
                header_parts.append(block[pos : size if newline < 0 else newline])
                if newline < 0:
                    break
                record = _RecordBuilder(place, b"".join(header_parts).rstrip(), header_line, contiguous)
                header_parts, pos, at_line_start, line = None, newline + 1, True, line + 1
                continue
            at = _next_header(block, pos, at_line_start)
            stop = size if at < 0 else at
            if stop > pos:
                body = block[pos:stop]
                if record is not None:
                    line += record.add(body, line)
                elif body.strip():
                    raise _preamble_error(place, body, line)
                else:
                    line += body.count(b"\n")
                at_line_start = body[-1] == 10
            if at < 0:
                break
            if record is not None:
                yield record.finish()
            record, header_parts, header_line, pos, seen_records = None, [], line, at + 1, True
    if header_parts is not None:  # the file ends inside a header line
        record = _RecordBuilder(place, b"".join(header_parts).rstrip(), header_line, contiguous)
    if record is not None:
        yield record.finish()
    if on_lines is not None:
        on_lines(line - 1)
    if not seen_bytes and start == 0:
        raise InputError(f"{path}: empty file; remove it from the inputs")
    if not seen_records and start == 0:
        raise InputError(f"{path}: no '>' header line: not a FASTA file")
