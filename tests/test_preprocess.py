"""`evo2 preprocess` end to end: outputs, determinism, options, bad inputs, atomicity, the CLI."""

from __future__ import annotations

import contextlib
import functools
import gzip
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.config import FieldError, load_config
from evo2_cli.data import fasta, preprocess
from evo2_cli.data.indexed import IndexedDataset
from evo2_cli.data.preprocess import (
    Limits,
    PreprocessConfig,
    assemble,
    plan,
    run_preprocess,
    worker,
)
from evo2_cli.data.preprocess import config as preprocess_config
from evo2_cli.data.preprocess.config import PreprocessJob
from evo2_cli.data.splits import SPLITS, position_cuts, split_of
from evo2_cli.errors import ConfigError, Evo2Error, InputError
from evo2_cli.fsio import sha256_file

SAMPLES = Path(__file__).parent.parent / "data" / "samples"
runner = CliRunner()


def random_records(count: int, seed: int = 0, length=(0, 400), prefix="rec") -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [
        (f"{prefix}{i}", bytes(rng.choice(b"ACGTacgtN") for _ in range(rng.randint(*length))))
        for i in range(count)
    ]


def fasta_text(records, width: int = 60, newline: bytes = b"\n") -> bytes:
    return b"".join(
        f">{name} some description".encode()
        + newline
        + b"".join(seq[i : i + width] + newline for i in range(0, len(seq), width))
        for name, seq in records
    )


def write_fasta(path: Path, records, width: int = 60) -> Path:
    text = fasta_text(records, width)
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


def bgzf(pieces: list[bytes], other_subfield: bytes = b"") -> bytes:
    """A BGZF file (as bgzip writes) with a block per piece, then the empty block that ends one: gzip members
    whose header's extra field says the member's size, less 1 ('BC'), after `other_subfield` if given."""
    blocks = []
    for piece in [*pieces, b""]:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate
        data = deflater.compress(piece) + deflater.flush()
        extra_size = len(other_subfield) + 6
        size = 12 + extra_size + len(data) + 8  # header, deflate data, CRC32 and length
        extra = other_subfield + b"BC\x02\0" + (size - 1).to_bytes(2, "little")
        header = b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + extra_size.to_bytes(2, "little") + extra
        blocks += [header, data, zlib.crc32(piece).to_bytes(4, "little"), len(piece).to_bytes(4, "little")]
    return b"".join(blocks)


def bgzf_pieces(text: bytes, block: int, starts=()) -> list[bytes]:
    """`text` cut every `block` bytes and at each offset of `starts` (small blocks: a small file has many)."""
    bounds = sorted({0, *range(block, len(text), block), *starts, len(text)})
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def run(tmp_path: Path, inputs, name: str = "out", limits=Limits(), **options) -> tuple[Path, dict]:
    cfg = PreprocessConfig(inputs=[str(p) for p in inputs], output_dir=tmp_path / name, **options)
    return tmp_path / name, run_preprocess(cfg, limits=limits)


def split_contents(out: Path) -> dict[str, list[bytes]]:
    """Every split's documents; a split the manifest lists as empty has no files."""
    empty = (
        json.loads((out / "manifest.json").read_text())["empty_splits"]
        if any(not (out / f"data_{split}.bin").exists() for split in SPLITS)
        else []
    )
    return {split: [] if split in empty else [ds[i].tobytes() for i in range(len(ds))]
            for split in SPLITS
            for ds in [None if split in empty else IndexedDataset(out / f"data_{split}")]}  # fmt: skip


def file_bytes(out: Path) -> dict:
    """Every file's bytes; the manifest without the input names (tests move and rename inputs)."""
    files: dict = {path.name: path.read_bytes() for path in sorted(out.iterdir())}
    manifest = json.loads(files.pop("manifest.json"))
    del manifest["inputs"], manifest["config"]["inputs"]
    return {**files, "manifest.json": manifest}


def test_outputs_load_in_megatron_and_hold_every_record(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    records = [*random_records(40), ("empty", b"")]
    out, manifest = run(tmp_path, [write_fasta(tmp_path / "in.fa", records)], split=(0.6, 0.2, 0.2))
    stored = split_contents(out)
    expected = {seq + b"\x00" for _, seq in records if seq}
    assert {doc for docs in stored.values() for doc in docs} == expected
    for index, split in enumerate(SPLITS):
        in_split = sorted(
            name for name, seq in records if seq and split_of(name.encode(), 1234, (0.6, 0.2, 0.2)) == index
        )
        assert manifest["splits"][split]["records"] == len(in_split)
        # canonical order: sorted by record id inside the split
        by_seq = {seq + b"\x00": name for name, seq in records}
        assert [by_seq[doc] for doc in stored[split]] == in_split
        theirs = MegatronDataset(str(out / f"data_{split}"))
        assert [theirs[i].tobytes() for i in range(len(theirs))] == stored[split]
    assert manifest["dropped"] == {"empty": 1}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (out / name).stat().st_size
        assert entry["sha256"] == sha256_file(out / name)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "manifest.json"])


def test_manifest_statistics(tmp_path):
    source = write_fasta(tmp_path / "in.fa", [("a", b"GGccNNAT"), ("b", b"acgt")])
    _, manifest = run(tmp_path, [source], split=(1, 0, 0))
    train = manifest["splits"]["train"]
    assert (train["records"], train["documents"], train["tokens"], train["bases"]) == (2, 2, 14, 12)
    assert train["gc_fraction"] == pytest.approx(6 / 12)
    assert train["n_fraction"] == pytest.approx(2 / 12, abs=1e-6)
    assert train["lowercase_fraction"] == pytest.approx(6 / 12)
    assert train["length"]["min"] == 4 and train["length"]["max"] == 8
    assert train["length"]["histogram_log2"] == {"2^2": 1, "2^3": 1}
    assert manifest["splits"]["val"]["records"] == 0
    assert manifest["version"] and "workers" not in manifest["config"]


def test_byte_identical_for_any_record_order_sharding_and_workers(tmp_path):
    records = random_records(60, seed=1, length=(1, 3000))
    shuffled = records[:]
    random.Random(5).shuffle(shuffled)
    first = write_fasta(tmp_path / "a.fa", records)
    second = write_fasta(tmp_path / "b.fa.gz", random_records(10, seed=2, prefix="other"))
    (tmp_path / "reordered").mkdir()
    reordered = write_fasta(tmp_path / "reordered" / "a.fa", shuffled, width=17)
    base = file_bytes(run(tmp_path, [first, second], "one")[0])
    assert file_bytes(run(tmp_path, [reordered, second], "shuffled")[0]) == base
    # Records read in many small blocks (stored from several parts): the same bytes and statistics.
    small_blocks = Limits(read_block=1000)
    assert file_bytes(run(tmp_path, [first, second], "small_blocks", small_blocks)[0]) == base
    # Long stretches copied by the kernel between gathered short ones: the same bytes and hashes.
    copied = Limits(write_batch=2000)
    assert file_bytes(run(tmp_path, [reordered, second], "copied_and_gathered", copied)[0]) == base
    # Record metadata written, sorted and merged in many small pieces: the same bytes and manifest.
    small_groups = Limits(flush_documents=7, group_records=5, merge_records=3)
    assert file_bytes(run(tmp_path, [reordered, second], "small_groups", small_groups)[0]) == base
    # Two byte ranges per process read by two processes: still the same bytes.
    assert len(plan._file_tasks(0, first, 2, 20_000)) == 4
    two = Limits(shard_bytes=20_000)
    assert file_bytes(run(tmp_path, [first, second], "two", two, workers=2)[0]) == base


def line_of(path: Path, text: bytes) -> int:
    """The line of a file where `text` (its last occurrence) starts."""
    content = path.read_bytes()
    return content.count(b"\n", 0, content.rindex(text)) + 1


def test_one_large_file_cut_into_many_ranges_gives_the_same_bytes_for_any_worker_count(tmp_path):
    records = random_records(80, seed=11, length=(1, 4000))
    records[70] = ("bad", b"ACGT*ACGT")  # in the last range: its message names the line of the whole file
    source = write_fasta(tmp_path / "one.fa", records, width=61)
    base = file_bytes(run(tmp_path, [source], "one", workers=1, on_bad_record="skip")[0])
    assert base["manifest.json"]["dropped_examples"][0].startswith(f"{source}:{line_of(source, b'ACGT*')}:")
    repeated = write_fasta(tmp_path / "repeated.fa", [*records, ("rec3", b"ACGT")])
    limits = Limits(shard_bytes=10_000)
    for workers in (2, 3, 5):
        assert len(plan.plan_tasks(PreprocessConfig(inputs=[str(source)]), workers, limits)[1]) == 2 * workers
        out = run(tmp_path, [source], f"w{workers}", limits, workers=workers, on_bad_record="skip")[0]
        assert file_bytes(out) == base
        with pytest.raises(InputError) as error:
            run(tmp_path, [repeated], f"r{workers}", limits, workers=workers, on_bad_record="skip")
        last = line_of(repeated, b">rec3 some description\nACGT\n")
        assert f"{repeated}:{last}: duplicate record id 'rec3'" in str(error.value)
    limits = Limits(shard_bytes=10_000, auto_bytes_per_worker=10_000)
    with mock.patch.object(plan, "available_cores", return_value=3):
        assert plan.plan_workers(PreprocessConfig(inputs=[str(source)]), limits)[2] == 3
        assert file_bytes(run(tmp_path, [source], "auto", limits, on_bad_record="skip")[0]) == base


def test_a_bgzip_file_is_cut_into_ranges_that_give_the_same_bytes_for_any_worker_count(tmp_path):
    """A bgzip file is cut at virtual offsets (block, offset inside it) of record starts, like a plain file:
    records over many blocks, a header at a block's start, a record longer than a range, CRLF; the data files
    are those of the same FASTA uncompressed, and a bad record in a late range names the file's line."""
    records = random_records(60, seed=13, length=(1, 2000))
    records[5] = ("long", random_records(1, seed=14, length=(30_000, 30_000))[0][1])  # several ranges long
    records[50] = ("bad", b"ACGT*ACGT")
    limits = Limits(shard_bytes=3000)
    at_block_start = set()
    for newline in (b"\n", b"\r\n"):
        text = fasta_text(records, 61, newline)
        plain = tmp_path / f"{len(newline)}.fa"
        plain.write_bytes(text)
        packed = tmp_path / f"{len(newline)}.fa.bgz"
        headers = [at for at in range(len(text)) if text[at] == ord(">")]
        packed.write_bytes(bgzf(bgzf_pieces(text, 500, headers[::3])))  # every third header starts a block
        skip = {"on_bad_record": "skip"}
        base = file_bytes(run(tmp_path, [packed], f"one{len(newline)}", **skip)[0])
        data_files = {name: content for name, content in base.items() if name != "manifest.json"}
        plain_out = file_bytes(run(tmp_path, [plain], f"plain{len(newline)}", **skip)[0])
        assert data_files == {name: content for name, content in plain_out.items() if name != "manifest.json"}
        bad_line = f"{packed}:{line_of(plain, b'ACGT*')}: record 'bad' has '*'"
        assert base["manifest.json"]["dropped_examples"][0].startswith(bad_line)
        for workers in (2, 3):
            tasks = plan.plan_tasks(PreprocessConfig(inputs=[str(packed)]), workers, limits)[1]
            assert 3 <= len(tasks) <= 2 * workers and tasks[-1].end == packed.stat().st_size << 16
            assert workers == 2 or len(tasks) < 2 * workers  # two cuts in the long record: one range
            assert sum(task.size for task in tasks) == packed.stat().st_size
            at_block_start |= {task.start & 0xFFFF == 0 for task in tasks[1:]}
            reads_bad = [any(r.id == b"bad" for r in fasta.read_fasta(packed, t.start, t.end)) for t in tasks]
            assert reads_bad.index(True) > 0
            out = run(tmp_path, [packed], f"w{workers}{len(newline)}", limits, workers=workers, **skip)[0]
            assert file_bytes(out) == base
        with pytest.raises(InputError) as error:
            run(tmp_path, [packed], f"error{len(newline)}", limits, workers=3)
        assert bad_line in str(error.value)
    assert at_block_start == {True, False}  # ranges that start at a block's first byte and inside one


@pytest.mark.parametrize("inflater", ["zlib", "isal"])
def test_a_bgzip_range_starts_at_the_first_header_line_at_or_after_its_block(tmp_path, monkeypatch, inflater):
    monkeypatch.setattr(
        fasta, "inflate_lib", zlib if inflater == "zlib" else pytest.importorskip("isal.isal_zlib")
    )
    path = tmp_path / "a.fa.bgz"
    # Block 1's '>' continues a line (sequence, a bad letter); block 2 is empty; block 3 begins with a header
    # line: only the last byte of block 1 says so.
    pieces = [b">a\nAC", b">x\nGT\n", b"", b">b\nTT\n", b"GG\n>c\nA\n"]
    for other_subfield in (b"", b"XY\x03\0abc"):  # BGZF allows other subfields beside 'BC'
        path.write_bytes(bgzf(pieces, other_subfield))
        blocks = fasta.bgzf_blocks(path)
        assert len(blocks) == 7 and blocks[-1] == path.stat().st_size  # 5 blocks, the end block, the size

        def virtual(block: int, at: int, blocks=blocks) -> int:
            return blocks[block] << 16 | at

        start_after = functools.partial(fasta.bgzf_record_start_after, path, blocks)
        assert start_after(1) == start_after(blocks[3]) == virtual(3, 0)
        assert start_after(blocks[3] + 1) == virtual(4, 3)
        assert start_after(blocks[4] + 1) == blocks[-1] << 16  # no header after: the file's end
        records, consumed = [], []
        ranges = [(0, virtual(3, 0)), (virtual(3, 0), virtual(4, 3)), (virtual(4, 3), blocks[-1] << 16)]
        for start, end in ranges:
            records += [
                (r.id, r.line, bytes(r.sequence)) for r in fasta.read_fasta(path, start, end, consumed.append)
            ]
        assert records == [(b"a", 1, b""), (b"b", 1, b"TTGG"), (b"c", 1, b"A")]  # lines count from the range
        assert sum(consumed) == path.stat().st_size  # compressed bytes, each once
        assert fasta.count_lines(path, 0, virtual(4, 3)) == 6
    # What bgzip writes is recognised; gzip streams, concatenated ones included, are not BGZF.
    assert len(fasta.bgzf_blocks(SAMPLES / "arabidopsis_chloroplast_NC_000932.fa.bgz")) > 3
    text = fasta_text(random_records(40, seed=2, length=(500, 1000)))
    half = text.index(b">", len(text) // 2)
    odd = bytearray(bgzf(bgzf_pieces(text, 500)))
    odd[16] ^= 1  # the first block's size, one byte off: no block starts where the second should
    for name, data in {
        "stream": gzip.compress(text),
        "members": gzip.compress(text[:half]) + gzip.compress(text[half:]),
        "odd": bytes(odd),
        "truncated": bgzf(bgzf_pieces(text, 500))[:-100],
    }.items():
        path = tmp_path / f"{name}.fa.gz"
        path.write_bytes(data)
        assert fasta.bgzf_blocks(path) is None
        assert len(plan._file_tasks(0, path, 3, 1000)) == 1
    with pytest.raises(InputError, match=r"truncated\.fa\.gz: truncated gzip"):
        run(tmp_path, [path], "truncated", Limits(shard_bytes=1000), workers=3)
    # A range of a file truncated or rewritten after the plan says so.
    with pytest.raises(InputError, match=r"truncated\.fa\.gz: truncated gzip file \(ends mid-block\)"):
        list(fasta.read_fasta(path, 0, path.stat().st_size << 16))
    with pytest.raises(InputError, match=r"stream\.fa\.gz: no BGZF block at byte 0 \(was the file changed"):
        list(fasta.read_fasta(tmp_path / "stream.fa.gz", 0, 1 << 16))


def test_auto_workers_one_for_small_inputs_the_cores_for_large_ones(tmp_path):
    small = write_fasta(tmp_path / "small.fa", random_records(5, seed=1))
    large = write_fasta(tmp_path / "large.fa", random_records(40, seed=2, length=(500, 1000)))
    packed = write_fasta(tmp_path / "large.fa.gz", random_records(40, seed=3, length=(500, 1000)))
    size = large.stat().st_size

    def chosen(*paths: Path, cores: int = 4, limits=Limits(shard_bytes=1000, auto_bytes_per_worker=2000)):
        with mock.patch.object(plan, "available_cores", return_value=cores):
            cfg = PreprocessConfig(inputs=[str(p) for p in paths])
            _, tasks, workers, note = plan.plan_workers(cfg, limits)
        assert len(tasks) >= workers
        return workers, note

    assert PreprocessConfig(inputs=["x.fa"]).workers == "auto"
    assert chosen(small)[0] == 1  # under auto_bytes_per_worker
    workers, note = chosen(large)
    assert workers == 4 and "workers: 4 (chosen automatically" in note and "4 core(s)" in note
    assert chosen(large, cores=2)[0] == 2
    assert chosen(packed)[0] == 1  # one gzip stream is read by one worker
    bgzipped = tmp_path / "large.fa.bgz"
    bgzipped.write_bytes(bgzf(bgzf_pieces(fasta_text(random_records(40, seed=3, length=(500, 1000))), 500)))
    assert chosen(bgzipped)[0] == 4  # bgzip is cut into byte ranges like a plain file
    assert chosen(packed, small)[0] == 2  # two files: a worker each
    # too small to cut into shard_bytes ranges
    assert chosen(large, limits=Limits(auto_bytes_per_worker=size // 2))[0] == 1
    # A count given is used as it is, without a note.
    assert plan.plan_workers(PreprocessConfig(inputs=[str(small)], workers=3), Limits())[2:] == (3, None)


def test_cli_says_which_worker_count_it_chose(tmp_path):
    source = write_fasta(tmp_path / "in.fa", random_records(5, seed=1, length=(10, 50)))
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    assert "workers: 1 (chosen automatically" in " ".join(result.output.split())
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(tmp_path / "two"), "--workers", "2"])
    assert result.exit_code == 0 and "chosen automatically" not in result.output
    assert file_bytes(tmp_path / "two") == file_bytes(tmp_path / "auto")
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(tmp_path / "x"), "--workers", "many"])
    assert result.exit_code == 2 and "--workers" in result.output and "auto" in result.output


def test_workers_do_not_run_the_main_script_again(tmp_path):
    """The `evo2` command is the main script: multiprocessing would import the whole CLI again in every
    worker. A script that logs each run of its top level, then preprocesses with two workers, runs once."""
    sources = [
        write_fasta(tmp_path / f"{i}.fa", random_records(5, seed=i, prefix=f"f{i}_")) for i in range(2)
    ]
    script = tmp_path / "main_script.py"
    script.write_text(
        "import os, sys\n"
        "from evo2_cli.data.preprocess import PreprocessConfig, run_preprocess\n"
        "with open(sys.argv[1] + '.log', 'a') as log:\n"
        "    log.write(f'{os.getpid()}\\n')\n"
        "if __name__ == '__main__':\n"
        "    inputs = sys.argv[2:]\n"
        "    run_preprocess(PreprocessConfig(inputs=inputs, output_dir=sys.argv[1], workers=2))\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(worker.__file__).parents[3])}
    subprocess.run([sys.executable, str(script), str(out), *map(str, sources)], check=True, env=env)
    assert len(Path(f"{out}.log").read_text().split()) == 1
    assert (out / "manifest.json").exists()


def test_a_worker_error_reaches_the_caller(tmp_path):
    good = write_fasta(tmp_path / "a.fa", random_records(40, seed=3, length=(100, 2000)))
    bad = tmp_path / "b.fa"
    bad.write_bytes(b">ok\nACGT\n>bad\nAC*GT\n")
    with pytest.raises(InputError, match=r"b\.fa:4: record 'bad' has '\*'"):
        run(tmp_path, [good, bad], workers=2)


def test_workers_are_forked_on_linux_while_one_thread_runs(monkeypatch):
    # A forked worker starts with everything imported; with another thread running a fork could copy a held
    # lock, and macOS's libraries are unsafe after a fork: spawn there.
    monkeypatch.setattr(worker.sys, "platform", "linux")
    assert worker._start_method() == "fork"
    monkeypatch.setattr(worker.threading, "active_count", lambda: 2)
    assert worker._start_method() == "spawn"
    monkeypatch.setattr(worker.threading, "active_count", lambda: 1)
    monkeypatch.setattr(worker.sys, "platform", "darwin")
    assert worker._start_method() == "spawn"


def test_a_forked_worker_ends_quietly_on_sigterm(tmp_path):
    """The CLI turns SIGTERM into Ctrl-C; a forked worker inherits that handler and, stopped by its parent,
    would print a KeyboardInterrupt traceback: it takes the default (end at once) back."""
    parent, child = worker.multiprocessing.Pipe()
    job = worker.Job(PreprocessConfig(inputs=["x"]), (), tmp_path, tmp_path)
    with parent, child, mock.patch.object(worker.signal, "signal") as set_handler:
        parent.send(None)
        worker._worker(child, job, [])
    assert mock.call(signal.SIGTERM, signal.SIG_DFL) in set_handler.call_args_list


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers and /proc: Linux")
def test_a_forked_worker_holds_no_pipe_of_another(tmp_path):
    """Each worker must hold only its own pipe end: one holding a copy of another's main-process end would
    keep that worker waiting for tasks after the main process died, killed."""
    job = worker.Job(PreprocessConfig(inputs=["x"]), (), tmp_path, tmp_path)
    with (
        mock.patch.object(worker, "_start_method", return_value="fork"),
        worker.started_workers(job, 3) as pool,
    ):
        main_ends = {os.fstat(connection.fileno()).st_ino for _, connection in pool}
        for process, _ in pool:
            deadline = time.monotonic() + 10
            while True:  # until the worker has closed what it inherited
                held = set()
                for fd in os.listdir(f"/proc/{process.pid}/fd"):
                    with contextlib.suppress(OSError):
                        held.add(os.readlink(f"/proc/{process.pid}/fd/{fd}"))
                if not held & {f"socket:[{inode}]" for inode in main_ends} or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert not held & {f"socket:[{inode}]" for inode in main_ends}


@contextlib.contextmanager
def started_workers(kill_at_start: bool = False) -> Iterator[list]:
    """Records the worker processes worker.started_workers starts (and SIGKILLs each as it starts)."""
    process_class = worker.multiprocessing.get_context(worker._start_method()).Process
    original_start, started = process_class.start, []

    def start(self):
        original_start(self)
        started.append(self)
        if kill_at_start:
            os.kill(self.pid, signal.SIGKILL)

    with mock.patch.object(process_class, "start", start):
        yield started


@pytest.mark.parametrize("when", ["at start", "while reading"])
def test_a_worker_that_dies_stops_the_run_with_a_message(tmp_path, when):
    """A worker killed (the kernel's OOM killer, a scheduler) ends the run with a message, never a hang: each
    worker has its own pipe, so no lock dies with it."""
    sources = [write_fasta(tmp_path / f"{i}.fa", random_records(30, seed=i)) for i in range(4)]

    def advance(count, records):  # the first progress report: a worker is reading
        for process in started:
            os.kill(process.pid, signal.SIGKILL)

    tasks = plan.plan_tasks(PreprocessConfig(inputs=[str(path) for path in sources]), 1, Limits())[1]
    job = worker.Job(PreprocessConfig(inputs=["x"]), (), tmp_path, tmp_path)
    with (
        started_workers(kill_at_start=when == "at start") as started,
        pytest.raises(
            Evo2Error, match=r"a preprocess worker stopped \(exit code -9: killed, or out of memory"
        ),
        worker.started_workers(job, 2) as pool,
    ):
        worker._run_in_workers(tasks, pool, advance)
    assert all(not process.is_alive() for process in started)


def test_ctrl_c_stops_every_worker(tmp_path):
    """Ctrl-C (or SIGTERM, which the CLI turns into it) in the main process while workers read: both are
    stopped, not left to finish or to hang on their pipes."""
    sources = [write_fasta(tmp_path / f"{i}.fa", random_records(30, seed=i)) for i in range(4)]

    def advance(count, records):  # the first progress report: the workers hold a task each
        raise KeyboardInterrupt

    tasks = plan.plan_tasks(PreprocessConfig(inputs=[str(path) for path in sources]), 1, Limits())[1]
    job = worker.Job(PreprocessConfig(inputs=["x"]), (), tmp_path, tmp_path)
    with (
        started_workers() as started,
        pytest.raises(KeyboardInterrupt),
        worker.started_workers(job, 2) as pool,
    ):
        worker._run_in_workers(tasks, pool, advance)
    assert [process.exitcode for process in started] == [-signal.SIGTERM] * 2


def test_a_worker_gone_after_its_last_result_does_not_fail_the_run(tmp_path):
    """Killed between sending its last result and being told to end: every result is in, the run goes on."""
    source = write_fasta(tmp_path / "a.fa", random_records(30))
    (tmp_path / "spool").mkdir()
    (tmp_path / "records").mkdir()
    job = worker.Job(PreprocessConfig(inputs=[str(source)]), (), tmp_path / "spool", tmp_path / "records")
    connection_class = worker.multiprocessing.connection.Connection
    original_send = connection_class.send

    def send(self, message):
        if message is None:  # the end, sent to a worker that is already gone
            for process in started:
                os.kill(process.pid, signal.SIGKILL)
                process.join()
        original_send(self, message)

    tasks = plan.plan_tasks(PreprocessConfig(inputs=[str(source)]), 1, Limits())[1]
    with (
        started_workers() as started,
        mock.patch.object(connection_class, "send", send),
        worker.started_workers(job, 1) as pool,
    ):
        results = worker._run_in_workers(tasks, pool, lambda count, records: None)
    assert [stats.records for stats in results[0].splits] == [28, 1, 1]
    assert [process.exitcode for process in started] == [-signal.SIGKILL]


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("holds a lambda")
        self.callback = lambda: None


@pytest.mark.parametrize(
    ("error", "received"),
    [
        (InputError("a.fa:3: bad record"), "InputError('a.fa:3: bad record')"),
        # Pickles, but its __init__ needs two arguments: the parent could not rebuild it.
        (
            FieldError("key", "too big"),
            "Evo2Error(\"a preprocess worker failed: FieldError('key: too big')\")",
        ),
        (Unpicklable(), "Evo2Error(\"a preprocess worker failed: Unpicklable('holds a lambda')\")"),
    ],
    ids=["pickles", "does_not_rebuild", "does_not_pickle"],
)
def test_a_worker_sends_every_error_in_a_form_the_parent_can_read(tmp_path, error, received):
    parent, child = worker.multiprocessing.Pipe()
    job = worker.Job(PreprocessConfig(inputs=["x"]), (), tmp_path, tmp_path)
    # The worker's loop run here, in the test's process (the signal handler left as it is).
    with (
        parent,
        child,
        mock.patch.object(worker, "run_task", side_effect=error),
        mock.patch.object(worker.signal, "signal"),
    ):
        parent.send(plan.Task(0, tmp_path / "a.fa"))
        worker._worker(child, job, [])
        kind, sent = parent.recv()
    assert (kind, repr(sent)) == ("error", received)


def test_group_regex_keeps_a_group_together(tmp_path):
    records = [(f"genome{g}_contig{c}", b"ACGT" * (4 * g + c + 1)) for g in range(12) for c in range(4)]
    out, _ = run(
        tmp_path,
        [write_fasta(tmp_path / "in.fa", records)],
        group_regex=r"^(genome\d+)_",
        split=(0.5, 0.25, 0.25),
    )
    splits_of_group: dict[str, set[str]] = {}
    for split, docs in split_contents(out).items():
        for doc in docs:
            for name, seq in records:
                if seq + b"\x00" == doc:
                    splits_of_group.setdefault(name.split("_")[0], set()).add(split)
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert len(set.union(*splits_of_group.values())) > 1


@pytest.fixture(params=[Limits(), Limits(read_block=7)], ids=["one_block", "7_byte_blocks"])
def read_blocks(request) -> Limits:
    """Records read in one block, or in many (a record then reaches the recipe in several parts)."""
    return request.param


def test_options_shape_the_documents(tmp_path, read_blocks):
    source = write_fasta(tmp_path / "in.fa", [("r", b"acgtRNNNNNACGTAC"), ("e", b"")])
    tags = tmp_path / "tags.tsv"
    tags.write_text("# comment\nr\t|d__X;s__Y|\n")

    def docs(name: str, **options) -> list[bytes]:
        out, _ = run(tmp_path, [source], name, read_blocks, split=(1, 0, 0), **options)
        return split_contents(out)["train"]

    assert docs("plain") == [b"acgtRNNNNNACGTAC\x00"]
    assert docs("upper", uppercase=True, iupac="to_n", append_eod=False) == [b"ACGTNNNNNNACGTAC"]
    assert docs("rna", rna="transcribe") == [b"acguRNNNNNACGUAC\x00"]
    assert docs("rc", reverse_complement=True) == [b"acgtRNNNNNACGTAC\x00", b"GTACGTNNNNNYacgt\x00"]
    assert docs("keep_empty", drop_empty=False) == [b"\x00", b"acgtRNNNNNACGTAC\x00"]
    assert docs("nsplit", n_run_length=5) == [b"acgtR\x00", b"ACGTAC\x00"]
    with pytest.raises(InputError, match=r"none kept \(dropped: empty 1, n_run 1\); raise preprocess\.n_run"):
        docs("ndrop", n_run_length=5, n_run_action="drop")
    assert docs("nshort", n_run_length=6) == [b"acgtRNNNNNACGTAC\x00"]
    assert docs("minmax", n_run_length=5, min_length=6) == [b"ACGTAC\x00"]
    with pytest.raises(
        InputError, match=r"none kept \(dropped: empty 1, too_long 1\); raise preprocess\.max_len"
    ):
        docs("max", max_length=10)
    assert docs("chunks", chunk_length=8, chunk_overlap=2) == [
        b"acgtRNNN\x00",
        b"NNNNACGT\x00",
        b"GTAC\x00",
    ]
    assert docs("tag_once", tags_file=tags) == [b"|d__X;s__Y|acgtRNNNNNACGTAC\x00"]
    assert docs("tags", tags_file=tags, tag_every=6) == [
        b"|d__X;s__Y|acgtRN|d__X;s__Y|NNNNAC|d__X;s__Y|GTAC\x00"
    ]


def test_regions_from_bed_and_intervals(tmp_path):
    fa = shutil.copy(SAMPLES / "hiv1_NC_001802.fa", tmp_path / "hiv.fa")
    bed = shutil.copy(SAMPLES / "hiv1_genes.bed", tmp_path / "genes.bed")
    ltr = "gi|9629357|ref|NC_001802.1|:1-10"
    cfg = load_config(
        PreprocessJob,
        None,
        [
            f"preprocess.regions=[{{fasta: '{fa}', bed: '{bed}', intervals: ['{ltr}']}}]",
            f"preprocess.output_dir={tmp_path / 'out'}",
            "preprocess.split=[1, 0, 0]",
        ],
    ).preprocess
    manifest = run_preprocess(cfg)
    genome = b"".join(line.strip() for line in Path(fa).read_bytes().splitlines()[1:])
    docs = split_contents(tmp_path / "out")["train"]
    assert sorted(docs) == sorted(
        [
            genome[789:2292] + b"\x00",
            genome[5770:6045] + b"\x00",
            genome[6224:8795] + b"\x00",
            genome[:10] + b"\x00",
        ]
    )
    assert manifest["splits"]["train"]["records"] == 4
    bad = tmp_path / "bad.bed"
    bad.write_text("chrX\t0\t10\n")
    cfg.regions[0].bed = bad
    with pytest.raises(InputError, match=r"bad\.bed:1: sequence 'chrX' is not in"):
        run_preprocess(cfg)


def test_messages_about_region_records_name_where_the_region_was_given(tmp_path):
    fa = shutil.copy(SAMPLES / "hiv1_NC_001802.fa", tmp_path / "hiv.fa")
    bed = shutil.copy(SAMPLES / "hiv1_genes.bed", tmp_path / "genes.bed")
    ltr = "gi|9629357|ref|NC_001802.1|:1-10"

    def config(*sets):
        regions = f"preprocess.regions=[{{fasta: '{fa}', bed: '{bed}', intervals: ['{ltr}', '{ltr}']}}]"
        return load_config(PreprocessJob, None, [regions, f"preprocess.output_dir={tmp_path / 'out'}", *sets])

    region = r"\(region gi\|9629357\|ref\|NC_001802\.1\|:1-10 of .*hiv\.fa\)"
    with pytest.raises(
        InputError, match=rf"^preprocess\.regions\.0\.intervals:1 {region}: duplicate record id"
    ):
        run_preprocess(config().preprocess)
    with pytest.raises(InputError, match=rf"\(also at preprocess\.regions\.0\.intervals:0 {region}\)"):
        run_preprocess(config().preprocess)
    # The first BED line with a region: 'genes.bed:N (region ...)', not the FASTA's name and a region number.
    with pytest.raises(
        InputError, match=r"^.*genes\.bed:\d+ \(region .* of .*hiv\.fa\): header does not match"
    ):
        run_preprocess(config("preprocess.group_regex=nomatch").preprocess)
    assert not (tmp_path / "out").exists()


def test_duplicate_ids(tmp_path):
    first = write_fasta(tmp_path / "a.fa", [("x", b"ACGT"), ("y", b"GG")])
    second = write_fasta(tmp_path / "b.fa", [("z", b"CC"), ("x", b"TTTT")])
    with pytest.raises(InputError, match=r"b\.fa:3: duplicate record id 'x' \(also at .*a\.fa:1\)"):
        run(tmp_path, [first, second])
    # The earliest repeat is named whichever group of records finds it.
    many = write_fasta(tmp_path / "many.fa", [(f"r{i % 40}", b"ACGT") for i in range(100)])
    for group_records in (1000, 1):
        expected = r"many\.fa:81: duplicate record id 'r0' \(also at .*many\.fa:1\)"
        with pytest.raises(InputError, match=expected):
            run(tmp_path, [many], limits=Limits(group_records=group_records))
    assert not (tmp_path / "out").exists()
    same_file = write_fasta(tmp_path / "c.fa", [("x", b"AAAA"), ("x", b"CCCC")])
    flipped = write_fasta(tmp_path / "d.fa", [("x", b"CCCC"), ("x", b"AAAA")])
    kept = file_bytes(run(tmp_path, [same_file], "k1", duplicate_ids="keep", split=(1, 0, 0))[0])
    assert file_bytes(run(tmp_path, [flipped], "k2", duplicate_ids="keep", split=(1, 0, 0))[0]) == kept


def test_an_id_repeated_across_splits(tmp_path):
    """group_regex sends two records of one id to two splits: still a repeat; kept, one lands in each."""
    assert [split_of(key, 1234, (0.5, 0.5, 0)) for key in (b"a", b"c")] == [1, 0]
    records = [("x g=a", b"AAAA"), ("y g=c", b"GG"), ("x g=c", b"TT"), ("x g=c", b"CCCC")]
    source = write_fasta(tmp_path / "a.fa", records)
    options = {"group_regex": r"g=(\w)", "split": (0.5, 0.5, 0)}
    with pytest.raises(InputError, match=r"a\.fa:5: duplicate record id 'x' \(also at .*a\.fa:1\)"):
        run(tmp_path, [source], **options)
    out, manifest = run(tmp_path, [source], duplicate_ids="keep", **options)
    # Train in id order; the two x of one split and input by the blake2b of their bytes (63ec.. < 80dd..).
    assert split_contents(out) == {"train": [b"CCCC\0", b"TT\0", b"GG\0"], "val": [b"AAAA\0"], "test": []}
    assert [manifest["splits"][name]["records"] for name in SPLITS] == [3, 1, 0]


def test_kept_duplicates_are_ordered_by_content_across_byte_ranges(tmp_path):
    records = [(f"r{i % 7}", seq) for i, (_, seq) in enumerate(random_records(80, seed=4, length=(200, 800)))]
    shuffled = records[:]
    random.Random(2).shuffle(shuffled)
    source = write_fasta(tmp_path / "a.fa", records)
    (tmp_path / "s").mkdir()
    reordered = write_fasta(tmp_path / "s" / "a.fa", shuffled)
    base = file_bytes(run(tmp_path, [source], "one", duplicate_ids="keep")[0])
    assert len(plan._file_tasks(0, reordered, 2, 10_000)) == 4
    two = Limits(shard_bytes=10_000)
    assert file_bytes(run(tmp_path, [reordered], "two", two, duplicate_ids="keep", workers=2)[0]) == base
    small = Limits(flush_documents=5, group_records=3, merge_records=2)
    assert file_bytes(run(tmp_path, [reordered], "small", small, duplicate_ids="keep")[0]) == base


def test_bad_records_error_or_skip(tmp_path):
    source = tmp_path / "in.fa"
    source.write_bytes(b">ok\nACGT\n>bad\nAC\nA*T\n>ok2\nGG\n")
    with pytest.raises(InputError, match=r"in\.fa:5: record 'bad' has '\*'"):
        run(tmp_path, [source])
    assert list(tmp_path.iterdir()) == [source]  # no output, no temporary directory
    _, manifest = run(tmp_path, [source], on_bad_record="skip")
    assert manifest["dropped"] == {"bad_record": 1}
    assert "in.fa:5" in manifest["dropped_examples"][0]
    assert sum(s["records"] for s in manifest["splits"].values()) == 2


def test_existing_output_and_interrupts_leave_nothing_half_written(tmp_path):
    source = write_fasta(tmp_path / "in.fa", random_records(5, length=(1, 50)))
    out, _ = run(tmp_path, [source])
    before = file_bytes(out)
    with pytest.raises(InputError, match="already exists"):
        run(tmp_path, [source])
    with (
        mock.patch.object(assemble, "_write_split", side_effect=KeyboardInterrupt),
        pytest.raises(KeyboardInterrupt),
    ):
        run_preprocess(PreprocessConfig(inputs=[str(source)], output_dir=out, seed=9), overwrite=True)
    assert file_bytes(out) == before  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa", "out"]


def test_sigterm_removes_the_temporary_output(tmp_path):
    source = write_fasta(tmp_path / "in.fa", random_records(3, length=(1, 50)))
    # The real CLI in a child process whose tasks stall, so the signal surely lands mid-run.
    stall = (
        "import time, evo2_cli.data.preprocess.worker as p; run = p.run_task; "
        "p.run_task = lambda *args: (time.sleep(60), run(*args))[1]; "
        "from evo2_cli.cli import main; main()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", stall, "preprocess", str(source), "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)  # also closes its pipes
    assert process.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]


def test_config_validation():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(PreprocessJob, None, ["preprocess.inputs=[a.fa]", "preprocess.split=[0.5, 0.2, 0.2]"])
    with pytest.raises(ConfigError, match="no inputs"):
        load_config(PreprocessJob, None, ["preprocess.seed=1"])
    with pytest.raises(ConfigError, match="chunk_overlap"):
        load_config(
            PreprocessJob,
            None,
            ["preprocess.inputs=[a]", "preprocess.chunk_length=4", "preprocess.chunk_overlap=4"],
        )
    with pytest.raises(ConfigError, match="group_regex"):
        load_config(PreprocessJob, None, ["preprocess.inputs=[a]", "preprocess.group_regex=(unclosed"])
    with pytest.raises(ConfigError, match="intervals"):
        load_config(PreprocessJob, None, ["preprocess.regions=[{fasta: x.fa, intervals: ['chr1:5-2']}]"])


def test_inputs_must_exist(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        run(tmp_path, [tmp_path / "*.fasta"])
    with pytest.raises(InputError, match="input file not found"):
        run(tmp_path, [tmp_path / "missing.fa"])
    source = write_fasta(tmp_path / "in.fa", [("a", b"AC")])
    with pytest.raises(InputError, match="listed twice"):
        run(tmp_path, [source, tmp_path / "*.fa"])


# ---------------------------------------------------------------- CLI


def test_a_directory_input_gives_its_fasta_files(tmp_path):
    assert [path.name for path in plan.expand_inputs([str(SAMPLES)])] == [
        "arabidopsis_chloroplast_NC_000932.fa.bgz",
        "ecoli_k12_mg1655_slice.fa.gz",
        "handmade.fa",
        "hiv1_NC_001802.fa",
        "yersinia_pestis_pPCP1_NC_005816.fa",
    ]  # not README.md, the .fai index, the BED or the tags file
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"a directory without FASTA files .* 'preprocess.inputs.0'"):
        plan.expand_inputs([str(tmp_path)])


def test_cli_quick_form(tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples)
    out = tmp_path / "ds"
    args = [
        "preprocess",
        str(samples / "*.fa"),
        str(samples / "*.gz"),
        "-o",
        str(out),
        "--split",
        "0.8,0.1,0.1",
    ]
    result = runner.invoke(app, [*args, "--seed", "3", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "dataset written to" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 3 and manifest["config"]["split"] == [0.8, 0.1, 0.1]
    assert sum(s["records"] for s in manifest["splits"].values()) == 6  # the empty record is dropped
    assert runner.invoke(app, args).exit_code == 2  # exists, no --overwrite
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0


def test_cli_start_up_imports_only_what_preprocess_needs(tmp_path):
    """Command modules load on first use: `evo2 preprocess` imports no model, training or inference code,
    and no pydantic (typer 0.29 validates options through it: 0.1 s more start-up; pyproject keeps < 0.29)."""
    source = write_fasta(tmp_path / "in.fa", random_records(2, length=(1, 9)))
    listing = tmp_path / "modules.txt"
    probe = (
        "import pathlib, sys; from evo2_cli.cli import main\n"
        "try:\n    main()\n"
        f"finally:\n    pathlib.Path({str(listing)!r}).write_text(' '.join(sys.modules))"
    )
    for args in (["--version"], ["preprocess", str(source), "-o", str(tmp_path / "out")]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        loaded = set(listing.read_text().split())
        heavy = (
            "torch",
            "pydantic",
            "evo2_cli.model",
            "evo2_cli.train",
            "evo2_cli.infer",
            "evo2_cli.finetune",
        )
        assert not {name for name in loaded if name.startswith(heavy)}
        commands = {name for name in loaded if name.startswith("evo2_cli.commands.")}
        assert commands == (
            {"evo2_cli.commands.common", "evo2_cli.commands.preprocess"} if len(args) > 1 else set()
        )


def test_cli_config_form_with_set(tmp_path):
    out = tmp_path / "demo"
    config = Path(__file__).parent.parent / "configs" / "preprocess" / "samples.yaml"
    result = runner.invoke(
        app,
        [
            "preprocess",
            "-c",
            str(config),
            "--set",
            f"preprocess.output_dir={out}",
            "--set",
            "preprocess.uppercase=true",
        ],
    )
    assert result.exit_code == 0, result.output
    tokens = np.concatenate([IndexedDataset(out / f"data_{s}").tokens for s in SPLITS])
    assert not np.any((tokens >= ord("a")) & (tokens <= ord("z")))


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (b"", [], "empty file"),
        (b"ACGT\n", [], "in.fa:1: sequence data before"),
        (b">a\nAC9T\n", [], "in.fa:2: record 'a' has '9'"),
        (b">a\nACGT\n", ["--split", "0.9,0.2,0.1"], "sum to 1"),
        (b">a\nACGT\n", ["--workers", "0"], "workers"),
        (b">a\nACGT\n", ["--set", "preprocess.chunk_lenght=3"], "did you mean 'chunk_length'"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, content, args, message):
    source = tmp_path / "in.fa"
    source.write_bytes(content)
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["in.fa"]


def test_base_counts_batch_short_pieces_and_count_long_ones_at_once():
    import pickle

    from evo2_cli.data import transforms
    from evo2_cli.data.transforms import BaseCounts

    rng = np.random.default_rng(3)
    letters = np.frombuffer(b"ACGTNacgtnRY", dtype=np.uint8)
    pieces = [letters[rng.integers(0, 12, size)].tobytes() for size in (0, 5, 300, 70_000, 300_000, 9)]
    counts = BaseCounts()
    with mock.patch.object(transforms, "_BATCH_BYTES", 1000):  # some batches fill up, some wait
        for k, piece in enumerate(pieces):
            counts.add(memoryview(piece) if k % 2 else piece, copies=1 + k % 2)
    counts = pickle.loads(pickle.dumps(counts))  # a worker's counts, sent back: nothing left uncounted
    expected = BaseCounts(
        bases=sum((1 + k % 2) * len(p) for k, p in enumerate(pieces)),
        gc=sum((1 + k % 2) * sum(p.count(c) for c in b"GCgc") for k, p in enumerate(pieces)),
        n=sum((1 + k % 2) * sum(p.count(c) for c in b"Nn") for k, p in enumerate(pieces)),
        lowercase=sum((1 + k % 2) * sum(p.count(c) for c in b"acgtn") for k, p in enumerate(pieces)),
    )
    assert (counts.bases, counts.gc, counts.n, counts.lowercase) == (
        expected.bases, expected.gc, expected.n, expected.lowercase
    )  # fmt: skip


def test_malloc_tuning_is_skipped_where_it_does_not_apply(monkeypatch):
    import evo2_cli.memory as memory

    with (
        mock.patch.object(memory.sys, "platform", "darwin"),
        mock.patch.object(memory.ctypes, "CDLL") as cdll,
    ):
        worker.keep_freed_memory()
    cdll.assert_not_called()
    with mock.patch.object(memory.ctypes, "CDLL", return_value=object()):  # a libc without mallopt (musl)
        worker.keep_freed_memory()


def test_spawned_workers_write_the_same_bytes(tmp_path):
    first = write_fasta(tmp_path / "a.fa", random_records(20, seed=6, length=(1, 500)))
    second = write_fasta(tmp_path / "b.fa", random_records(20, seed=7, prefix="other"))
    base = file_bytes(run(tmp_path, [first, second], "one")[0])
    with mock.patch.object(worker, "_start_method", return_value="spawn"):
        assert file_bytes(run(tmp_path, [first, second], "spawned", workers=2)[0]) == base


def test_split_hash_is_golden():
    # Fixed forever: a change here reshuffles every user's train/val/test split.
    assert "".join(str(split_of(b"rec%d" % i, 1234, (0.5, 0.25, 0.25))) for i in range(30)) == (
        "102010200100012001021020201200"
    )
    assert "".join(str(split_of(b"rec%d" % i, 7, (0.5, 0.25, 0.25))) for i in range(30)) == (
        "020000012222000022220001010011"
    )


def test_more_options(tmp_path, read_blocks):
    source = write_fasta(tmp_path / "in.fa", [("r", b"acguACGUAC")])

    def docs(name: str, **options) -> list[bytes]:
        out, _ = run(tmp_path, [source], name, read_blocks, split=(1, 0, 0), **options)
        return split_contents(out)["train"]

    assert docs("back", rna="back_transcribe") == [b"acgtACGTAC\x00"]
    # Each window is followed by its own reverse complement.
    assert docs(
        "rc_chunks", rna="back_transcribe", chunk_length=6, chunk_overlap=2, reverse_complement=True
    ) == [
        b"acgtAC\x00",
        b"GTacgt\x00",
        b"ACGTAC\x00",
        b"GTACGT\x00",
    ]
    out, manifest = run(tmp_path, [source], "prefixed", prefix="genome", split=(1, 0, 0))
    assert sorted(manifest["files"]) == ["genome_train.bin", "genome_train.idx"]  # val and test are empty
    assert IndexedDataset(out / "genome_train")[0].tobytes() == b"acguACGUAC\x00"


def test_group_regex_that_does_not_match_is_a_bad_record(tmp_path):
    source = write_fasta(tmp_path / "in.fa", [("genome1_a", b"ACGT"), ("stray", b"GG")])
    with pytest.raises(InputError, match=r"in\.fa:3: header does not match group_regex"):
        run(tmp_path, [source], group_regex=r"^(genome\d+)_")
    _, manifest = run(tmp_path, [source], "skip", group_regex=r"^(genome\d+)_", on_bad_record="skip")
    assert manifest["dropped"] == {"bad_record": 1}
    assert sum(s["records"] for s in manifest["splits"].values()) == 1


def regions_config(tmp_path: Path, fasta: Path, bed: Path | None = None, intervals=()) -> PreprocessConfig:
    return PreprocessConfig(
        regions=[preprocess_config.RegionSource(fasta, bed, list(intervals))],
        output_dir=tmp_path / f"out_{fasta.name}",
        split=(1, 0, 0),
    )


@pytest.mark.parametrize(
    ("bed_text", "message"),
    [
        ("chr1\t5\n", r"bad\.bed:1: a BED line needs chrom, start and end"),
        ("# header\nchr1\tx\t9\n", r"bad\.bed:2: a BED line needs chrom, start and end"),
        ("chr1\t9\t9\n", r"bad\.bed:1: need 0 <= start < end"),
        ("track name=x\n", r"bad\.bed: no regions"),
        ("chr1\t0\t5\nchr1\t10\t99\n", r"bad\.bed:2: region ends at 99 but 'chr1' has 20 bases"),
        ("chrX\t0\t5\n", r"bad\.bed:1: sequence 'chrX' is not in .*g\.fa \(it has chr1, chr2\)"),
    ],
)
def test_bad_regions_name_the_bed_line(tmp_path, bed_text, message):
    fasta = write_fasta(tmp_path / "g.fa", [("chr1", b"ACGT" * 5), ("chr2", b"GG")])
    bed = tmp_path / "bad.bed"
    bed.write_text(bed_text)
    with pytest.raises(InputError, match=message):
        run_preprocess(regions_config(tmp_path, fasta, bed))
    assert not (tmp_path / "out_g.fa").exists()


def test_regions_of_bgzip_and_refusals(tmp_path):
    bgz = shutil.copy(SAMPLES / "arabidopsis_chloroplast_NC_000932.fa.bgz", tmp_path / "cp.fa.bgz")
    run_preprocess(regions_config(tmp_path, Path(bgz), intervals=["NC_000932.1:1-12"]))
    assert split_contents(tmp_path / "out_cp.fa.bgz")["train"] == [b"ATGGGCGAACGA\x00"]
    plain_gzip = tmp_path / "g.fa.gz"
    plain_gzip.write_bytes(gzip.compress(b">chr1\nACGT\n"))
    with pytest.raises(InputError, match=r"g\.fa\.gz: cannot index for region access.*BGZF"):
        run_preprocess(regions_config(tmp_path, plain_gzip, intervals=["chr1"]))
    # A region's letters are checked like a parsed record's; the message names where the region was given.
    bad = write_fasta(tmp_path / "bad.fa", [("chr1", b"ACGT*ACGT")])
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t0\t3\nchr1\t2\t6\n")
    with pytest.raises(InputError, match=r"r\.bed:2: record 'chr1:3-6' has '\*'"):
        run_preprocess(regions_config(tmp_path, bad, bed))


def test_progress_bar_shows_bytes_and_records():
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with preprocess._progress_bar(console, 2_000_000, "reading", "records") as advance:
        advance(1_000_000, 7)
        advance(1_000_000, 5)
    text = console.file.getvalue()
    assert "12 records" in text and "2.0/2.0 MB" in text


def test_progress_shows_reading_sorting_then_writing(tmp_path):
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    source = write_fasta(tmp_path / "in.fa", random_records(30, length=(10, 200)))
    run_preprocess(PreprocessConfig(inputs=[str(source)], output_dir=tmp_path / "out"), console=console)
    text = console.file.getvalue()
    assert text.index("reading") < text.index("sorting") < text.index("writing")
    assert text.count("30 records") >= 2 and "30 documents" in text  # read, then sorted


def test_cli_prints_the_summary_table_and_handles_non_utf8(tmp_path):
    source = tmp_path / "in.fa"
    source.write_bytes(b">caf\xe9 x\nACGT\n>ok\nAC*G\n>b\xff\nGGCC\n")
    out = tmp_path / "out"
    args = ["preprocess", str(source), "-o", str(out), "--split", "1,0,0"]
    result = runner.invoke(app, [*args, "--set", "preprocess.on_bad_record=skip"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "evo2 preprocess" in text and "train │ 2 │ 2 │ 10" in text and "dropped: bad_record 1" in text
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["dropped_examples"] == [
        f"{source}:4: record 'ok' has '*' (a stop codon or mask: protein or masked alignment input?); "
        "fix the record, or skip bad records with --set preprocess.on_bad_record=skip"
    ]
    assert split_contents(out)["train"] == [b"GGCC\x00", b"ACGT\x00"]  # ids b"b\xff" < b"caf\xe9"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"@r1\nACGT\n+\nIIII\n", "in.fa:1: FASTQ"),
        (b"\x00\x01\x02garbage\n", "in.fa:1: binary data"),
        (b">a\nAC\n>b\nGG\n>a\nTT\n", "in.fa:5: duplicate record id 'a'"),
        (b">\xff\xfe\nAC\n>\xff\xfe\nTT\n", "in.fa:3: duplicate record id '\\xff\\xfe'"),
        (gzip.compress(b">a\n" + b"ACGT" * 30_000, mtime=0)[:-100], "in.fa: truncated gzip"),
    ],
    ids=["fastq", "binary", "duplicate-id", "duplicate-non-utf8-id", "truncated-gzip"],
)
def test_cli_more_bad_inputs_exit_2(tmp_path, content, message):
    source = tmp_path / "in.fa"
    source.write_bytes(content)
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["in.fa"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("r\n", r"tags\.tsv:1: expected ID_REGEX<TAB>\|lineage\|"),
        ("# c\nr(\t|d__X|\n", r"tags\.tsv:2: bad regex"),
        ("r\td__X\n", r"tags\.tsv:1: a lineage is ASCII between two '\|'"),
        ("r\t|d__Bactéria|\n", r"tags\.tsv:1: a lineage is ASCII"),
        ("r\t|Bacteria|\n", r"tags\.tsv:1: a lineage needs rank prefixes"),
        ("r\t|d__" + "x" * 600 + "|\n", r"tags\.tsv:1: lineage is 605 bytes; at most 512"),
        ("# only a comment\n", r"tags\.tsv: no tag rules"),
    ],
)
def test_bad_tags_file_names_the_line(tmp_path, text, message):
    tags = tmp_path / "tags.tsv"
    tags.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        preprocess_config.load_tags(tags)


def test_tags_and_bed_files_skip_blank_and_comment_lines_and_name_an_unreadable_file(tmp_path):
    from evo2_cli.data.regions import read_bed

    tags = tmp_path / "tags.tsv"
    tags.write_text("# comment\n\n  \nr.*\t|d__X;s__Y|\n", encoding="utf-8")
    assert [rule.lineage for rule in preprocess_config.load_tags(tags)] == [b"|d__X;s__Y|"]
    bed = tmp_path / "a.bed"
    bed.write_text("track name=x\nbrowser position chr1\n# c\n\nchr1\t5\t9\n", encoding="utf-8")
    assert [(r.chrom, r.start, r.end, r.line) for r in read_bed(bed)] == [("chr1", 5, 9, 5)]
    tags.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match=r"tags\.tsv: cannot read tags file: 'utf-8' codec"):
        preprocess_config.load_tags(tags)
    with pytest.raises(InputError, match=r"missing\.bed: cannot read BED file: "):
        read_bed(tmp_path / "missing.bed")


def test_a_document_too_long_for_the_index_names_the_record(tmp_path):
    source = write_fasta(tmp_path / "a.fa", [("short", b"ACGT"), ("long", b"ACGT" * 5)])
    limits = Limits(max_document_tokens=20)
    with pytest.raises(InputError) as error:
        run(tmp_path, [source], limits=limits)
    assert "a.fa:3: record 'long' makes a document of 21 tokens" in str(error.value)
    assert "at most 20 per document" in str(error.value) and "chunk_length" in str(error.value)
    splits = run(tmp_path, [source], "chunked", limits, chunk_length=10)[1]["splits"].values()
    assert sum(split["documents"] for split in splits) == 3  # short; long cut into 10 + 10 bases
    assert not (tmp_path / "out").exists()


def test_progress_counts_every_record_read(tmp_path):
    """The reader's thread reports bytes while the task counts records: no record may be lost between them."""
    source = write_fasta(tmp_path / "a.fa", random_records(5000, length=(0, 40)))
    totals = [0, 0]

    def advance(count, records):  # slow, like a pipe to the parent: records go on being counted meanwhile
        time.sleep(0.002)
        totals[0] += count
        totals[1] += records

    (tmp_path / "spool").mkdir()
    (tmp_path / "records").mkdir()
    cfg, spool, records = PreprocessConfig(inputs=[str(source)]), tmp_path / "spool", tmp_path / "records"
    job = worker.Job(cfg, (), spool, records, Limits(read_block=512))
    worker.run_task(plan.Task(0, source, size=source.stat().st_size), job, advance)
    assert totals == [source.stat().st_size, 5000]


def test_limits_reach_every_stage(tmp_path):
    """Each field of Limits bounds the stage it names (tests rely on small ones to cut the work up)."""
    from evo2_cli.data import record_store

    source = write_fasta(tmp_path / "a.fa", random_records(300, length=(1, 300)))
    limits = Limits(read_block=1000, flush_documents=7, group_records=5, group_documents=50, merge_records=3)
    limits = replace(limits, write_batch=2000, shard_bytes=10_000)
    with (
        mock.patch.object(worker, "read_fasta", wraps=worker.read_fasta) as reader,
        mock.patch.object(record_store, "RecordBuffer", wraps=record_store.RecordBuffer) as buffers,
        mock.patch.object(record_store, "plan_groups", wraps=record_store.plan_groups) as groups,
        mock.patch.object(record_store, "merged", wraps=record_store.merged) as merged,
        mock.patch.object(assemble, "_write_split", wraps=assemble._write_split) as writes,
    ):
        run(tmp_path, [source], limits=limits, workers=1)
    assert reader.call_args.args[-1] == 1000
    assert {call.args[-1] for call in buffers.call_args_list} == {7}
    assert groups.call_args.args[1:] == (5, 50)
    assert {call.args[-1] for call in merged.call_args_list} == {3}
    assert {call.args[-1] for call in writes.call_args_list} == {2000}
    # Two ranges per worker would be 6; the file holds only 5 of shard_bytes.
    assert len(plan.plan_tasks(PreprocessConfig(inputs=[str(source)]), 3, limits)[1]) == 5


def test_lines_are_counted_only_for_messages(tmp_path):
    """Workers number lines from their byte range and the assembly adds the ranges before: no process counts
    the lines before a range (a serial pass over the file) unless a message about a record needs them."""
    records = random_records(80, seed=3, length=(200, 800))
    records[3] = ("rec70", records[3][1])  # its id again in the last range
    source = write_fasta(tmp_path / "a.fa", records)
    two = Limits(shard_bytes=10_000)
    assert len(plan._file_tasks(0, source, 2, 10_000)) == 4

    def no_counting(path, start, end):
        raise AssertionError(f"counted the lines of {path}[{start}:{end}]")

    with contextlib.ExitStack() as patches:
        for module in (fasta, plan, worker):
            patches.enter_context(mock.patch.object(module, "count_lines", no_counting, create=True))
        out = run(tmp_path, [source], "kept", two, workers=2, duplicate_ids="keep")[0]
        with pytest.raises(InputError) as error:
            run(tmp_path, [source], "refused", two, workers=2)
    assert file_bytes(out) == file_bytes(run(tmp_path, [source], "one", duplicate_ids="keep")[0])
    text = source.read_bytes()
    first = text.count(b"\n", 0, text.index(b">rec70 ")) + 1
    message = " ".join(str(error.value).split())
    last = line_of(source, b">rec70 ")
    assert f"{source}:{last}: duplicate record id 'rec70' (also at {source}:{first})" in message
    # A bad record, a header that group_regex misses, a document too long: each names the file's line.
    bad = [*records[:70], ("bad", b"ACGT*ACGT"), ("nogroup", b"ACGT"), ("long", b"A" * 900)]
    source = write_fasta(tmp_path / "b.fa", bad)
    bad_message = f"{source}:{line_of(source, b'ACGT*')}: record 'bad' has '*'"
    with pytest.raises(InputError) as error:
        run(tmp_path, [source], "error", two, workers=2)
    assert bad_message in str(error.value)
    skip = {"workers": 2, "on_bad_record": "skip"}
    examples = run(tmp_path, [source], "skip", two, group_regex="^(rec|long)", **skip)[1]["dropped_examples"]
    assert examples[0].startswith(bad_message)
    assert examples[1].startswith(f"{source}:{line_of(source, b'>nogroup')}: header does not match")
    with pytest.raises(InputError) as error:
        run(tmp_path, [source], "long", replace(two, max_document_tokens=850), **skip)
    long_message = f"{source}:{line_of(source, b'>long')}: record 'long' makes a document of 901 tokens"
    assert long_message in " ".join(str(error.value).split())


def test_progress_from_workers_adds_up(tmp_path):
    """Every worker's reports reach the parent through its pipe: the bytes of every file, every record."""
    sources = [write_fasta(tmp_path / f"{n}.fa", random_records(n, n, (1, 400))) for n in (300, 600, 900)]
    totals = [0, 0]

    def advance(count, records):
        totals[0] += count
        totals[1] += records

    (tmp_path / "spool").mkdir()
    (tmp_path / "records").mkdir()
    cfg = PreprocessConfig(inputs=[str(path) for path in sources])
    job = worker.Job(cfg, (), tmp_path / "spool", tmp_path / "records")
    with worker.started_workers(job, 2) as pool:
        results = worker._run_in_workers(plan.plan_tasks(cfg, 1, Limits())[1], pool, advance)
    assert totals == [sum(path.stat().st_size for path in sources), 1800]
    assert sum(stats.records for result in results for stats in result.splits) == 1800


# ---------------------------------------------------------------- inputs that give nothing


@pytest.mark.parametrize("keep_empty", [[], ["--set", "preprocess.drop_empty=false"]], ids=["drop", "keep"])
def test_cli_headers_only_exits_2_and_writes_nothing(tmp_path, keep_empty):
    source = tmp_path / "in.fa"
    source.write_bytes(b">a\n>b desc\n\n>c\n")
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(tmp_path / "out"), *keep_empty])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "no sequence in the input (3 records, all empty)" in text and "Traceback" not in text
    assert sorted(os.listdir(tmp_path)) == ["in.fa"]


def test_records_all_dropped_say_how_many_were_read_and_why(tmp_path):
    source = write_fasta(tmp_path / "in.fa", [("a", b"ACGT"), ("b", b""), ("c", b"ACGTACGT")])
    with pytest.raises(InputError) as error:
        run(tmp_path, [source], min_length=20)
    assert str(error.value) == (
        f"{source}: no sequence in the input: 3 records read, none kept (dropped: empty 1, too_short 2); "
        "lower preprocess.min_length"
    )
    bad = tmp_path / "bad.fa"
    bad.write_bytes(b">x\nAC*T\n>y\nAC-T\n")
    with pytest.raises(InputError, match=r"2 records read, none kept \(dropped: bad_record 2\); first bad "
                       r"record: .*bad\.fa:2: record 'x' has '\*'"):  # fmt: skip
        run(tmp_path, [bad], on_bad_record="skip")
    assert sorted(os.listdir(tmp_path)) == ["bad.fa", "in.fa"]


def test_an_empty_split_gets_no_files_and_every_file_opens_in_megatron(tmp_path):
    """5 genomes at 0.9/0.05/0.05 (seed 1234 puts them all in train): no 0-byte val/test files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    records = random_records(5, length=(10, 50))
    assert [split_of(name.encode(), 1234, (0.9, 0.05, 0.05)) for name, _ in records] == [0] * 5
    source = write_fasta(tmp_path / "in.fa", records)
    out = tmp_path / "out"
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(out), "--split", "0.9,0.05,0.05"])
    assert result.exit_code == 0, result.output
    assert "no files for the empty split(s): val, test" in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["empty_splits"] == ["val", "test"]
    assert manifest["splits"]["val"]["records"] == manifest["splits"]["test"]["records"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["data_train.bin", "data_train.idx", "manifest.json"]
    assert sorted(manifest["files"]) == ["data_train.bin", "data_train.idx"]
    assert len(MegatronDataset(str(out / "data_train"))) == 5
    # A split with records but not a token (empty records kept, no EOD) is empty too.
    kept = write_fasta(tmp_path / "kept.fa", [("rec0", b"ACGT"), ("rec1", b"")])
    options = {"split": (0.5, 0.5, 0), "seed": 3, "drop_empty": False, "append_eod": False}
    assert [split_of(key, 3, options["split"]) for key in (b"rec0", b"rec1")] == [0, 1]
    kept_out, manifest = run(tmp_path, [kept], "kept", **options)
    assert manifest["empty_splits"] == ["val", "test"] and manifest["splits"]["val"]["records"] == 1
    assert sorted(manifest["files"]) == ["data_train.bin", "data_train.idx"]
    for name in manifest["files"]:
        if name.endswith(".bin"):
            assert len(MegatronDataset(str(kept_out / name[:-4]))) == 1


def test_a_split_with_documents_has_no_empty_splits_entry(tmp_path):
    records = random_records(40, length=(1, 50))
    _, manifest = run(tmp_path, [write_fasta(tmp_path / "in.fa", records)], split=(0.6, 0.2, 0.2))
    assert "empty_splits" not in manifest and len(manifest["files"]) == 6


# ---------------------------------------------------------------- split_by: position


def test_position_cuts_are_golden():
    assert position_cuts(1000, (0.9, 0.05, 0.05)) == (900, 950)
    assert position_cuts(19, (0.9, 0.05, 0.05)) == (17, 19)  # val takes the rounding; test gets none
    assert position_cuts(4_639_675, (0.95, 0.05, 0.0)) == (4_407_691, 4_639_675)  # E. coli, as before
    assert position_cuts(10, (0.0, 0.5, 0.5)) == (0, 5)
    # Fractions may sum to 1 + 1e-6: train and test never overlap.
    assert position_cuts(10**7, (0.5, 0.0, 0.5000001)) == (5 * 10**6, 5 * 10**6)
    assert position_cuts(0, (0.9, 0.05, 0.05)) == (0, 0)


def test_split_by_position_holds_out_the_tail_of_every_record(tmp_path):
    genome = bytes(random.Random(3).choice(b"ACGTacgt") for _ in range(1000))
    records = [("genome", genome), ("short", b"ACGTACGTACGTACGTACG"), ("tiny", b"A"), ("empty", b"")]
    source = write_fasta(tmp_path / "in.fa", records)
    tags = tmp_path / "tags.tsv"
    tags.write_text("genome\t|d__X;s__Y|\n")
    options = {"split": (0.9, 0.05, 0.05), "split_by": "position", "tags_file": tags}
    out, manifest = run(tmp_path, [source], **options)
    tag = b"|d__X;s__Y|"
    expected = {
        "train": [tag + genome[:900] + b"\0", b"ACGTACGTACGTACGTA\0"],  # ids in order: genome, short
        "val": [tag + genome[900:950] + b"\0", b"CG\0", b"A\0"],  # 1 base: floor(0.9) = 0 train, 0 test
        "test": [tag + genome[950:] + b"\0"],
    }
    assert split_contents(out) == expected
    assert [manifest["splits"][name]["records"] for name in SPLITS] == [2, 3, 1]
    assert manifest["splits"]["val"]["bases"] == 50 + 2 + 1 and manifest["dropped"] == {"empty": 1}
    assert manifest["config"]["split_by"] == "position"
    # Any worker count and byte ranges: the same bytes.
    assert len(plan._file_tasks(0, source, 2, 300)) == 2
    two = Limits(shard_bytes=300)
    assert file_bytes(run(tmp_path, [source], "two", two, workers=2, **options)[0]) == file_bytes(out)
    # Windows and reverse complements are cut from each part, in its split; filters apply to each part.
    source = write_fasta(tmp_path / "windows.fa", [("s", b"AAAACCCCGGGGTT"), ("t", b"ACGTAC")])
    options = {"split": (0.5, 0.5, 0), "split_by": "position", "chunk_length": 4, "reverse_complement": True}
    out, manifest = run(tmp_path, [source], "windows", min_length=4, **options)
    assert split_contents(out) == {
        "train": [b"AAAA\0", b"TTTT\0", b"CCC\0", b"GGG\0"],
        "val": [b"CGGG\0", b"CCCG\0", b"GTT\0", b"AAC\0"],
        "test": [],
    }
    assert manifest["dropped"] == {"too_short": 2} and manifest["empty_splits"] == ["test"]


def test_split_by_position_still_finds_repeated_ids_and_refuses_group_regex(tmp_path):
    source = write_fasta(tmp_path / "in.fa", [("x", b"ACGTACGTAC"), ("y", b"GGGG"), ("x", b"TTTTTTTT")])
    with pytest.raises(InputError, match=r"in\.fa:5: duplicate record id 'x' \(also at .*in\.fa:1\)"):
        run(tmp_path, [source], split_by="position")
    with pytest.raises(ConfigError, match=r"group_regex.*needs split_by: record"):
        load_config(
            PreprocessJob,
            None,
            ["preprocess.inputs=[a]", "preprocess.group_regex=(x)", "preprocess.split_by=position"],
        )


@pytest.mark.parametrize(
    ("body", "problem"),
    [(b"%s\nAC*GT\n", "has '*'"), (b"%s\nACGT\n%s\nACGT\n", "duplicate record id")],
)
def test_a_huge_record_id_is_quoted_short(tmp_path, body, problem):
    header = b">r" + b"x" * (1 << 20)
    source = tmp_path / "in.fa"
    source.write_bytes(body.replace(b"%s", header))
    result = runner.invoke(app, ["preprocess", str(source), "-o", str(tmp_path / "out"), "--split", "1,0,0"])
    assert result.exit_code == 2 and problem in result.stderr
    assert len(result.stderr) < 2000 and "(1,048,577 characters)" in result.stderr
