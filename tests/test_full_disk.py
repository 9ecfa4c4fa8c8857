"""A full disk (or quota) while any command writes: one message naming what was written, the bytes free and
what is intact; exit 1, no traceback, no temporary left. Simulated by making a write fail with ENOSPC the way
each layer reports it: an OSError, torch's RuntimeError raised while handling one, safetensors' text."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
from safetensors import SafetensorError
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.fsio import DiskFullError, atomic_output_dir, atomic_path, directory_kind, full_disk_errno
from evo2_cli.model.checkpoint import step_dirs
from evo2_cli.train.checkpoint import verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "yersinia_pestis_pPCP1_NC_005816.fa"
runner = CliRunner()


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def said(result) -> str:
    return " ".join(result.output.split())


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def torch_like() -> RuntimeError:
    try:
        raise enospc()
    except OSError:
        try:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            ) from None
        except RuntimeError as exc:  # what torch.save raises: the OSError only as its context
            return exc


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (enospc(), errno.ENOSPC),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
        (torch_like(), errno.ENOSPC),
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), 28),
        (OSError(errno.EACCES, "Permission denied"), None),
        (RuntimeError("unexpected pos 704 vs 598"), None),
        (ValueError("(os error 2)"), None),
    ],
)
def test_a_full_disk_is_recognized_however_a_library_reports_it(error, code):
    assert full_disk_errno(error) == code


def test_atomic_writers_report_the_target_the_free_bytes_and_what_is_intact(tmp_path):
    target = tmp_path / "out.tsv"
    with pytest.raises(DiskFullError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise enospc()
    text = str(info.value)
    assert text.startswith(f"cannot write {target}: no space left on device (")
    assert "bytes free on that filesystem); nothing was left behind" in text
    assert entries(tmp_path) == []
    # An existing output stays as it was, and a file inside an output directory is reported as the directory.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    ours = directory_kind("an output", "old.txt", lambda directory: {"old.txt"})
    with (
        pytest.raises(DiskFullError) as info,
        atomic_output_dir(tmp_path / "out", ours, overwrite=True) as tmp,
        atomic_path(tmp / "new.bin") as inner,
    ):
        inner.write_bytes(b"x")
        raise torch_like()
    assert str(info.value).endswith(f"the existing {tmp_path / 'out'} is untouched")
    assert entries(tmp_path) == ["out"] and entries(tmp_path / "out") == ["old.txt"]
    # Other errors pass through as they are.
    with pytest.raises(ValueError, match="not a disk problem"), atomic_path(target):
        raise ValueError("not a disk problem")


@pytest.fixture
def fsync_fails(monkeypatch):
    """Every atomic file write fails at its fsync, where delayed allocation reports a full disk."""

    def fail(fd):
        raise enospc()

    monkeypatch.setattr(os, "fsync", fail)


@pytest.mark.parametrize(
    ("command", "output"),
    [
        (["preprocess", str(SAMPLE), "--split", "1,0,0", "-o", "{out}"], "dataset"),
        (["infer", "score", "{base}", str(SAMPLE), "-o", "{out}"], "scores.tsv"),
        (["convert", "to-vortex", "{base}", "--out", "{out}"], "model.pt"),
        (["finetune", "merge", "{base}", "-o", "{out}"], "merged"),
    ],
)
def test_every_writer_reports_a_full_disk_in_one_message(tmp_path, base, fsync_fails, command, output):
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / output
    args = [part.format(out=out, base=base) for part in command]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert f"error: cannot write {out}: no space left on device (" in said(result)
    assert "bytes free on that filesystem); nothing was left behind" in said(result)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert entries(parent) == []  # no temporary file or directory left


def test_a_full_disk_elsewhere_is_a_message_too(tmp_path, monkeypatch):
    """A write outside the atomic writers (here: the dataset reader's files) still ends in a message."""
    from evo2_cli.data import preprocess

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "spool"))

    monkeypatch.setattr(preprocess, "run_preprocess", fail)
    result = runner.invoke(app, ["preprocess", str(SAMPLE), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: cannot write {tmp_path / 'spool'}: no space left on device (" in said(result)


def test_train_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    dataset = tmp_path / "dataset"
    assert (
        runner.invoke(app, ["preprocess", str(SAMPLE), "--split", "0.5,0.5,0", "-o", str(dataset)]).exit_code
        == 0
    )
    settings = [
        "model.preset=test",
        f"data.datasets=[{{path: {dataset}}}]",
        "data.seq_len=32",
        "data.val_windows=0",
        "optim.global_batch=2",
        "optim.warmup_steps=1",
        "train.max_steps=4",
        "train.micro_batch=2",
        "train.log_interval=1",
        "train.eval_interval=0",
        "train.save_interval=2",
        "train.device=cpu",
    ]

    def run(run_dir: Path):
        args = ["train", *(part for s in [*settings, f"train.run_dir={run_dir}"] for part in ("--set", s))]
        return runner.invoke(app, args)

    def losses(run_dir: Path) -> list[float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    assert run(tmp_path / "straight").exit_code == 0
    real_save_file, saves = safetensors.torch.save_file, []

    def fills_the_disk(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 2:  # step 0 is saved; the disk is full when step 2 is
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    run_dir = tmp_path / "run"
    result = run(run_dir)
    assert result.exit_code == 1 and "Traceback" not in result.output
    checkpoints = run_dir / "checkpoints"
    assert (
        f"error: {checkpoints / 'step_00000002'}: cannot save checkpoint: no space left on device ("
        in said(result)
    )
    assert f"the previous checkpoint {checkpoints / 'step_00000000'} is intact" in said(result)
    assert entries(checkpoints) == ["latest", "step_00000000"]  # no temporary directory left
    verify_checkpoint(checkpoints / "step_00000000")

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    result = run(run_dir)
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and [p.name for p in step_dirs(run_dir)][-1] == "step_00000004"
    assert losses(run_dir) == losses(tmp_path / "straight")
