"""Megatron indexed datasets: our writer and reader against megatron-core's, and every corruption."""

from __future__ import annotations

import os
import struct
from unittest import mock

import numpy as np
import pytest

from evo2_cli.data import indexed
from evo2_cli.data.indexed import DTYPE_CODES, IndexedDataset, IndexedDatasetWriter
from evo2_cli.errors import InputError

DOCS = [b"ACGTacgtNN\x00", b"", b"GATTACA\x00", b"n" * 1000 + b"\x00"]


def write_ours(prefix, docs=DOCS):
    with IndexedDatasetWriter(prefix) as writer:
        for doc in docs:
            writer.add_document(np.frombuffer(doc, dtype=np.uint8))


def test_round_trip_ours(tmp_path):
    prefix = tmp_path / "d"
    write_ours(prefix)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(DOCS) and ds.num_documents == len(DOCS)
    assert [ds[i].tobytes() for i in range(len(ds))] == DOCS
    assert ds[-1].tobytes() == DOCS[-1]
    assert ds.tokens.tobytes() == b"".join(DOCS) and ds.dtype == np.uint8
    assert ds.num_tokens == sum(map(len, DOCS))
    with pytest.raises(IndexError):
        ds[len(DOCS)]


def test_empty_dataset(tmp_path):
    write_ours(tmp_path / "e", [])
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and len(ds.tokens) == 0


def test_ours_loads_in_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    prefix = tmp_path / "d"
    write_ours(prefix)
    theirs = MegatronDataset(str(prefix))
    assert len(theirs) == len(DOCS)
    assert list(theirs.document_indices) == list(range(len(DOCS) + 1))
    assert [theirs[i].tobytes() for i in range(len(DOCS))] == DOCS
    assert theirs.index.dtype == np.uint8


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint16, np.int64])
def test_megatron_output_loads_in_ours(tmp_path, dtype):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "m")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    # preprocess_evo2 style: one item per record, then end_document.
    for doc in DOCS:
        builder.add_item(torch.tensor(list(doc), dtype=torch.int64))
        builder.end_document()
    # and a multi-sequence document through add_document
    builder.add_document(torch.tensor([65, 67, 71, 84, 0]), lengths=[2, 3])
    builder.finalize(prefix + ".idx")

    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(DOCS) + 2 and ds.num_documents == len(DOCS) + 1
    assert [ds[i].tolist() for i in range(len(DOCS))] == [list(d) for d in DOCS]
    assert ds[len(DOCS)].tolist() == [65, 67] and ds[len(DOCS) + 1].tolist() == [71, 84, 0]


def test_multimodal_index_is_accepted(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "mm")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint8, multimodal=True)
    builder.add_item(torch.tensor([65, 67]), mode=1)
    builder.end_document()
    builder.finalize(prefix + ".idx")
    assert IndexedDataset(prefix)[0].tolist() == [65, 67]


def test_every_megatron_dtype_code_is_known():
    from megatron.core.datasets.indexed_dataset import DType

    assert {d.value: np.dtype(d.name) for d in DType} == DTYPE_CODES


def test_writer_removes_files_on_error(tmp_path):
    prefix = tmp_path / "x"
    with pytest.raises(RuntimeError), IndexedDatasetWriter(prefix) as writer:
        writer.add_document(np.zeros(3, np.uint8))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def corrupt(tmp_path, edit):
    prefix = tmp_path / "c"
    write_ours(prefix)
    idx = bytearray((tmp_path / "c.idx").read_bytes())
    binary = bytearray((tmp_path / "c.bin").read_bytes())
    idx, binary = edit(idx, binary)
    (tmp_path / "c.idx").write_bytes(bytes(idx))
    (tmp_path / "c.bin").write_bytes(bytes(binary))
    return prefix


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i, b: (b"XXIDIDX\x00\x00" + i[9:], b), "bad magic"),
        (lambda i, b: (i[:20], b), "truncated index"),
        (lambda i, b: (i[:-3], b), "truncated or corrupt"),
        (lambda i, b: (i[:9] + struct.pack("<Q", 2) + i[17:], b), "version"),
        (lambda i, b: (i[:17] + b"\x09" + i[18:], b), "dtype code"),
        (lambda i, b: (i, b[:-5]), "do not belong together"),
        (lambda i, b: (i[: len(i) - 8] + struct.pack("<q", 99), b), "document indices"),
    ],
)
def test_corrupt_inputs_name_the_file(tmp_path, edit, message):
    prefix = corrupt(tmp_path, edit)
    with pytest.raises(InputError, match=message) as info:
        IndexedDataset(prefix)
    assert str(tmp_path / "c.") in str(info.value)


def test_missing_files(tmp_path):
    with pytest.raises(InputError, match=r"nope\.idx: not found"):
        IndexedDataset(tmp_path / "nope")
    write_ours(tmp_path / "d")
    (tmp_path / "d.bin").unlink()
    with pytest.raises(InputError, match=r"d\.bin: not found"):
        IndexedDataset(tmp_path / "d")


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_documents_copied_from_another_file(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:  # filesystems or systems without copy_file_range take the pread/write path
        monkeypatch.delattr("os.copy_file_range", raising=False)
    spool = tmp_path / "spool"
    spool.write_bytes(b"xxACGT\x00GG\x00yy")
    fd = os.open(spool, os.O_RDONLY)
    try:
        with IndexedDatasetWriter(tmp_path / "d") as writer:
            writer.add_document(np.frombuffer(b"T\x00", dtype=np.uint8))
            writer.add_documents_from(fd, 2, [5, 3])
            writer.add_document(np.frombuffer(b"C\x00", dtype=np.uint8))
    finally:
        os.close(fd)
    ds = IndexedDataset(tmp_path / "d")
    assert [ds[i].tobytes() for i in range(len(ds))] == [b"T\x00", b"ACGT\x00", b"GG\x00", b"C\x00"]


def test_documents_added_as_bytes(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d") as writer:
        writer.add_document(np.frombuffer(b"T\x00", dtype=np.uint8))
        writer.add_documents_bytes(b"ACGT\x00GG\x00", [5, 3])
        writer.add_document(np.frombuffer(b"C\x00", dtype=np.uint8))
        with pytest.raises(ValueError, match="7 bytes do not hold documents of 8 tokens"):
            writer.add_documents_bytes(b"ACGT\x00GG", [5, 3])
    ds = IndexedDataset(tmp_path / "d")
    assert [ds[i].tobytes() for i in range(len(ds))] == [b"T\x00", b"ACGT\x00", b"GG\x00", b"C\x00"]


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_lengths_spilled_to_a_side_file_give_the_same_index(tmp_path, dtype):
    """Lengths held a few at a time (the rest in a side file, as for millions of documents): the same .idx."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=int(n), dtype=dtype) for n in rng.integers(0, 9, size=23)]

    def write(prefix):
        with IndexedDatasetWriter(prefix, dtype) as writer:
            for doc in docs[:10]:
                writer.add_document(doc)
            writer.add_documents_bytes(
                b"".join(doc.tobytes() for doc in docs[10:]), [len(d) for d in docs[10:]]
            )
            assert writer.num_documents == len(docs)
        return prefix.with_suffix(".idx").read_bytes()

    held = write(tmp_path / "held")
    with mock.patch.object(indexed, "_LENGTHS_HELD", 3):
        assert write(tmp_path / "spilled") == held
    ds = IndexedDataset(tmp_path / "spilled")
    assert [ds[i].tolist() for i in range(len(ds))] == [doc.tolist() for doc in docs]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "held.bin", "held.idx", "spilled.bin", "spilled.idx"
    ]  # fmt: skip


def test_a_failed_write_leaves_no_side_file(tmp_path):
    with (
        mock.patch.object(indexed, "_LENGTHS_HELD", 2),
        pytest.raises(RuntimeError),
        IndexedDatasetWriter(tmp_path / "d") as writer,
    ):
        for _ in range(5):
            writer.add_document(np.zeros(3, dtype=np.uint8))
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_a_failed_finalize_leaves_no_files(tmp_path):
    """finalize() failing at the end of the block (here a length past int32; a full disk likewise) removes the
    .bin, the half-written .idx and the side file."""
    with (
        mock.patch.object(indexed, "_LENGTHS_HELD", 2),
        mock.patch.object(indexed, "_copy_range"),  # lengths without 2 GiB of tokens
        pytest.raises(ValueError, match="a document of 2147483648 tokens does not fit"),
        IndexedDatasetWriter(tmp_path / "d") as writer,
    ):
        writer.add_documents_from(0, 0, [1, 2, 3, 2**31])
    assert list(tmp_path.iterdir()) == []


def test_a_side_file_left_by_a_killed_writer_is_not_read(tmp_path):
    """A writer killed mid-run leaves its side file; a later one with the same pid starts it afresh."""
    with mock.patch.object(indexed, "_LENGTHS_HELD", 2):
        stale = IndexedDatasetWriter(tmp_path / "d")
        for _ in range(3):
            stale.add_document(np.zeros(7, dtype=np.uint8))
        stale._bin.close()  # killed: no finalize, no abort
        with IndexedDatasetWriter(tmp_path / "d") as writer:
            for length in (1, 2, 3):
                writer.add_document(np.zeros(length, dtype=np.uint8))
    ds = IndexedDataset(tmp_path / "d")
    assert ds.sequence_lengths.tolist() == [1, 2, 3]
    assert ds.sequence_pointers.tolist() == [0, 1, 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d.bin", "d.idx"]
