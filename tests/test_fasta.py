"""The streaming FASTA reader: random text round trips, block boundaries, compression, every bad input."""

from __future__ import annotations

import bz2
import gzip
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evo2_cli.data import fasta
from evo2_cli.data.alphabet import IUPAC_BYTES
from evo2_cli.data.fasta import read_fasta, record_start_after
from evo2_cli.errors import InputError

SAMPLES = Path(__file__).parent.parent / "data" / "samples"

records_strategy = st.lists(
    st.tuples(
        st.text("abcXYZ019_.|-", min_size=1, max_size=12),  # ids (unique-ified below)
        st.binary(max_size=300).map(lambda raw: bytes(IUPAC_BYTES[b % len(IUPAC_BYTES)] for b in raw)),
    ),
    min_size=1,
    max_size=8,
)


def render(records, width: int, newline: bytes, blank_lines: bool) -> bytes:
    out = []
    for i, (name, sequence) in enumerate(records):
        out.append(b">" + f"{name}_{i} desc".encode() + newline)
        for start in range(0, len(sequence), width):
            out.append(sequence[start : start + width] + newline)
        if blank_lines:
            out.append(newline)
    return b"".join(out)


@settings(max_examples=60, deadline=None)
@given(
    records=records_strategy,
    width=st.integers(1, 80),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    blank_lines=st.booleans(),
    block=st.sampled_from([1, 3, 7, 64, 1 << 22]),
)
def test_random_fasta_round_trips(tmp_path_factory, records, width, newline, blank_lines, block):
    path = tmp_path_factory.mktemp("fa") / "x.fa"
    path.write_bytes(render(records, width, newline, blank_lines))
    got = list(read_fasta(path, block_size=block))  # tiny blocks cut headers and line ends apart
    whole = list(read_fasta(path, contiguous=True, block_size=block))
    assert [(r.id, r.sequence, r.problem) for r in got] == [
        (f"{name}_{i}".encode(), sequence, None) for i, (name, sequence) in enumerate(records)
    ]
    # Contiguous records: the same sequences, each in one buffer however many blocks it was read from.
    assert [(r.id, r.sequence, r.line) for r in whole] == [(r.id, r.sequence, r.line) for r in got]
    assert all(len(r.parts) == (1 if r.sequence else 0) for r in whole)
    assert got[0].line == 1
    # Gzip gives the same records; byte ranges cut at record starts give them too.
    gz = path.with_suffix(".fa.gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [(r.id, r.sequence, r.line) for r in read_fasta(gz)] == [(r.id, r.sequence, r.line) for r in got]
    # A range numbers lines from its start and reports the line ends it read: the first range's count, added
    # to the second's lines, gives the file's lines.
    size = path.stat().st_size
    cut = record_start_after(path, size // 2)
    counted: list[int] = []
    first = [(r.id, r.line) for r in read_fasta(path, 0, cut, on_lines=counted.append)]
    second = [(r.id, r.line + counted[0]) for r in read_fasta(path, cut, size, on_lines=counted.append)]
    assert first + second == [(r.id, r.line) for r in got]
    assert counted == [path.read_bytes().count(b"\n", 0, cut), path.read_bytes().count(b"\n", cut)]


def test_matches_biopython_on_the_samples():
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    for path in (SAMPLES / "hiv1_NC_001802.fa", SAMPLES / "handmade.fa"):
        with open(path) as handle:
            expected = [(title.split()[0], sequence) for title, sequence in SimpleFastaParser(handle)]
        assert [(r.id.decode(), r.sequence.decode()) for r in read_fasta(path)] == expected


@pytest.fixture(params=["zlib", "isal"])
def inflater(request, monkeypatch):
    """Each gzip test runs on the zlib fallback and on ISA-L (the default where installed)."""
    if request.param == "isal":
        monkeypatch.setattr(fasta, "inflate_lib", pytest.importorskip("isal.isal_zlib"))
    else:
        monkeypatch.setattr(fasta, "inflate_lib", zlib)


def test_bgzip_and_concatenated_gzip(tmp_path, inflater):
    chloroplast = list(read_fasta(SAMPLES / "arabidopsis_chloroplast_NC_000932.fa.bgz"))
    assert len(chloroplast) == 1 and len(chloroplast[0].sequence) == 154_478
    path = tmp_path / "two.fa.gz"
    path.write_bytes(gzip.compress(b">a\nAC\n") + gzip.compress(b"GT\n>b\nTT\n"))
    assert [(r.id, r.sequence) for r in read_fasta(path)] == [(b"a", b"ACGT"), (b"b", b"TT")]


def test_line_numbers_and_headers(tmp_path):
    path = tmp_path / "x.fa"
    path.write_bytes(b"\n\n>r1 first\nAC\nGT\n\n>r2\n>r3\r\nA\r\n")
    records = list(read_fasta(path))
    assert [(r.id, r.header, r.line, r.sequence) for r in records] == [
        (b"r1", b"r1 first", 3, b"ACGT"),
        (b"r2", b"r2", 7, b""),
        (b"r3", b"r3", 8, b"A"),
    ]


def test_a_range_numbers_lines_from_its_start_and_messages_name_the_files_line(tmp_path):
    path = tmp_path / "x.fa"
    path.write_bytes(b">r1\nAC\nGT\n>r2\nA\n>r3\nAC*T\n>\nA\n")
    start = record_start_after(path, 10)  # at ">r2", on line 4
    counted: list[int] = []
    r2, r3, empty = read_fasta(path, start, on_lines=counted.append)
    assert [(r.id, r.line) for r in (r2, r3, empty)] == [(b"r2", 1), (b"r3", 3), (b"", 5)]
    assert counted == [6]
    assert r3.problem.startswith(f"{path}:7: record 'r3' has '*'")  # lines before the range counted for it
    assert empty.problem.startswith(f"{path}:8: empty header")
    (r3, empty) = read_fasta(path, record_start_after(path, 14), lines_before=lambda: 100)
    assert r3.problem.startswith(f"{path}:102: record 'r3'") and empty.problem.startswith(f"{path}:103:")


def test_non_utf8_header_is_kept_as_bytes(tmp_path):
    path = tmp_path / "x.fa"
    path.write_bytes(b">caf\xe9 \xff\xfe\nACGT\n")
    (record,) = read_fasta(path)
    assert record.id == b"caf\xe9" and record.problem is None
    assert fasta.display(record.id) == "caf\\xe9"


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        (b">a\nACGT\nAC1T\n", 3, "'1' (a digit"),
        (b">a\nAC*T\n", 2, "'*'"),
        (b">a\nACGT\nAC-T\n", 3, "alignment gap"),
        (b">a\nAC.T\n", 2, "alignment gap"),
        (b">a\nAC\x00\x01T\n", 2, "byte 0x00"),
        (b">a\nACGT\nxx>bad\n", 3, "'x'"),
        (b">a\nACGT\nAC>T\n", 3, "'>'"),
        (b">\nACGT\n", 1, "empty header"),
    ],
)
def test_bad_records_carry_a_problem_with_the_line(tmp_path, body, line, fragment):
    path = tmp_path / "bad.fa"
    path.write_bytes(body + b">good\nACGT\n")
    bad, good = read_fasta(path)
    assert bad.problem is not None and f"{path}:{line}:" in bad.problem and fragment in bad.problem
    assert bad.sequence == b""  # a bad record carries no bases
    assert good.problem is None and good.sequence == b"ACGT"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"\n  \n", "no '>' header"),
        (b"ACGT\nACGT\n", ":1: sequence data before the first '>'"),
        (b"\n\nACGT\n>a\nAC\n", ":3: sequence data before the first '>'"),
        (b"@read1\nACGT\n+\nIIII\n", "FASTQ"),
        (b"@read1\nACGT\n+\n>III\n", "FASTQ"),
        (bytes(range(256)) * 4, "binary data"),
        (bz2.compress(b">a\nACGT\n"), "bzip2-compressed"),
    ],
)
def test_bad_files_raise(tmp_path, content, message):
    path = tmp_path / "in.fa"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        list(read_fasta(path))
    assert str(path) in str(info.value)


def test_truncated_and_corrupt_gzip(tmp_path, inflater):
    data = gzip.compress(b">a\n" + b"ACGT" * 50_000 + b"\n")
    path = tmp_path / "cut.fa.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated gzip"):
        list(read_fasta(path))
    path.write_bytes(data[:20] + b"\xff" * 50 + data[70:])
    with pytest.raises(InputError, match="corrupt gzip"):
        list(read_fasta(path))
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(InputError, match="empty file"):
        list(read_fasta(path))
    # bgzip, read whole (by ISA-L's gzip reader where it is installed): the same checks.
    blocks = (SAMPLES / "arabidopsis_chloroplast_NC_000932.fa.bgz").read_bytes()
    path.write_bytes(blocks[: len(blocks) // 2])
    with pytest.raises(InputError, match="truncated gzip"):
        list(read_fasta(path))
    path.write_bytes(blocks[:5000] + bytes(value ^ 0x55 for value in blocks[5000:5100]) + blocks[5100:])
    with pytest.raises(InputError, match="corrupt gzip"):
        list(read_fasta(path))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        list(read_fasta(tmp_path / "nope.fa"))
