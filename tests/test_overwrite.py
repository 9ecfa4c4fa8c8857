"""--overwrite replaces only evo2's own outputs, never the current directory, and only once the new run
validated; one run per run directory (the lock); temporaries of killed processes are cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_dataset
from filelock import FileLock
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.errors import InputError
from evo2_cli.fsio import HOST, atomic_output_dir, check_replaceable, directory_kind, exclusive


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("data") / "toy"
    return random_dataset(prefix, 0, {"train": 500, "val": 500}, documents=3, terminated=False)


def train_args(dataset: Path, run_dir: Path | str, *more: str) -> list[str]:
    return [
        "train",
        "--set=model.preset=test",
        f"--set=train.run_dir={run_dir}",
        "--set=data.seq_len=32",
        f"--set=data.datasets=[{{path: {dataset}}}]",
        "--set=train.max_steps=2",
        "--set=train.micro_batch=2",
        "--set=optim.global_batch=2",
        "--device=cpu",
        *more,
    ]


RESULT = directory_kind("a result directory", "result.txt", lambda directory: {"result.txt"})


def flat(text: str) -> str:
    return " ".join(text.split())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_result(final: Path, text: str, overwrite: bool = True, say=print) -> None:
    with atomic_output_dir(final, RESULT, overwrite=overwrite, say=say) as tmp:
        (tmp / "result.txt").write_text(text)


def test_only_an_output_evo2_wrote_is_replaced_and_no_flag_is_offered_for_others(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a result directory written by evo2") as caught:
            write_result(foreign, "new", overwrite=overwrite)
        assert "--overwrite" not in str(caught.value)
    ours = tmp_path / "ours"
    write_result(ours, "old")
    (ours / "notes.txt").write_text("added by hand")  # no longer only ours: refused
    with pytest.raises(InputError, match=r"it also holds notes\.txt"):
        write_result(ours, "new")
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert (ours / "result.txt").read_text() == "old"
    (tmp_path / "empty").mkdir()  # nothing in it to lose
    write_result(tmp_path / "empty", "new")


def test_the_current_directory_its_parents_and_home_are_never_replaced(tmp_path, monkeypatch):
    work = tmp_path / "home" / "work"
    write_result(work, "ours")  # even an output evo2 wrote
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    link = tmp_path / "link"
    link.symlink_to(work)
    for path, why in (
        (Path("."), "the current directory"),
        (link, "the current directory"),  # symlinks resolved
        (Path(".."), "the home directory"),
        (tmp_path, "a parent of the current directory"),
        (Path("/"), "the root directory"),
    ):
        with pytest.raises(InputError, match=why) as caught:
            check_replaceable(path, RESULT, overwrite=True)
        assert "--overwrite" not in str(caught.value)
    assert (work / "result.txt").read_text() == "ours"


def test_train_overwrite_of_the_current_directory_deletes_nothing(dataset, tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, train_args(dataset, ".", "--overwrite"))
    assert result.exit_code == 2
    assert "the current directory, which evo2 never replaces" in flat(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    final = tmp_path / "out"
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f".out.tmp-{dead}@{HOST}", tmp_path / f".out.tmp-{dead}"]  # and the older spelling
    kept = [tmp_path / f".out.tmp-{alive}@{HOST}", tmp_path / f".out.tmp-{dead}@another-host"]
    for path in stale + kept:
        path.mkdir()
        (path / "result.txt").write_text("half")
    said = []
    write_result(final, "new", overwrite=False, say=said.append)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert len(said) == 2 and all(f"left by process {dead} (no longer running)" in s for s in said)


def test_an_overwrite_killed_between_its_renames_is_undone_by_the_next_run(tmp_path):
    final = tmp_path / "out"
    aside = tmp_path / f".out.old-{dead_pid()}@{HOST}"  # the old output, moved aside; then kill -9
    aside.mkdir()
    (aside / "result.txt").write_text("old")
    said = []
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        write_result(final, "new", overwrite=False, say=said.append)
    assert (final / "result.txt").read_text() == "old" and not aside.exists()
    assert "restored" in said[0]


def test_a_second_run_on_a_locked_directory_stops_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = FileLock(str(tmp_path / ".run.lock"), timeout=0)
    holder.acquire()  # another process's lock, simulated: a second lock object conflicts like a process
    record = {"host": "node7", "pid": 4242, "started": "2026-01-02 03:04:05 +0000"}
    (tmp_path / ".run.lock.json").write_text(json.dumps(record))
    try:
        with pytest.raises(InputError) as caught, exclusive(run_dir):
            pass
    finally:
        holder.release()
    assert "in use by process 4242 on node7 (started 2026-01-02 03:04:05 +0000)" in str(caught.value)
    # Its process died (kill -9: the kernel dropped its lock, its record stayed): taken over, with a message.
    record.update(host=HOST, pid=dead_pid())
    (tmp_path / ".run.lock.json").write_text(json.dumps(record))
    said = []
    with exclusive(run_dir, said.append):
        mine = json.loads((tmp_path / ".run.lock.json").read_text())
        assert mine["pid"] == os.getpid() and mine["host"] == HOST
    assert said == [
        f"took over the lock of {run_dir}: process {record['pid']} on {HOST} (started "
        f"{record['started']}) is no longer running"
    ]
    assert not (tmp_path / ".run.lock.json").exists()


def test_two_train_processes_on_one_run_dir(dataset, tmp_path):
    """A real second process: the lock holder runs `exclusive` and waits; `evo2 train` exits 2 at once."""
    run_dir = tmp_path / "run"
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from evo2_cli.fsio import exclusive\n"
            "with exclusive(Path(sys.argv[1])):\n"
            "    Path(sys.argv[2]).touch(); time.sleep(60)",
            str(run_dir),
            str(ready),
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        while not ready.exists():
            assert holder.poll() is None
        result = CliRunner().invoke(app, train_args(dataset, run_dir))
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2
    assert f"in use by process {holder.pid} on {HOST}" in flat(result.output)
    assert not run_dir.exists()


def checkpoint_bytes(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted((run_dir / "checkpoints").rglob("*"))
        if p.is_file()
    }


def test_overwrite_with_a_bad_resume_keeps_the_old_run_and_writes_nothing(dataset, tmp_path):
    run_dir, runner = tmp_path / "run", CliRunner()
    assert runner.invoke(app, train_args(dataset, run_dir)).exit_code == 0
    before, config = checkpoint_bytes(run_dir), (run_dir / "config.yaml").read_bytes()
    bad = tmp_path / "bad"
    (bad).mkdir()
    (bad / "meta.json").write_text("{}")  # verifies (no hashes) but holds no weights
    for resume in (tmp_path / "missing", bad):
        result = runner.invoke(app, train_args(dataset, run_dir, f"--resume={resume}", "--overwrite"))
        assert result.exit_code == 2, result.output
        assert checkpoint_bytes(run_dir) == before and (run_dir / "config.yaml").read_bytes() == config
    # A new run directory stays uncreated when the --resume source fails to load.
    fresh = tmp_path / "fresh"
    result = runner.invoke(app, train_args(dataset, fresh, f"--resume={bad}"))
    assert result.exit_code == 2 and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["bad", "run"]
    # A good --overwrite replaces it: the old run is gone once the new one wrote its first checkpoint.
    result = runner.invoke(app, train_args(dataset, run_dir, "--overwrite", "--set=optim.lr=1e-2"))
    assert result.exit_code == 0, result.output
    assert checkpoint_bytes(run_dir) != before
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_an_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(
    dataset, tmp_path, monkeypatch
):
    from evo2_cli.train import loop

    run_dir, runner = tmp_path / "run", CliRunner()
    assert runner.invoke(app, train_args(dataset, run_dir)).exit_code == 0
    before = checkpoint_bytes(run_dir)

    def full_disk(*args, **kwargs):
        raise InputError("disk full (simulated)")

    monkeypatch.setattr(loop, "write_checkpoint", full_disk)
    result = runner.invoke(app, train_args(dataset, run_dir, "--overwrite", "--set=optim.lr=1e-2"))
    assert result.exit_code == 2 and "disk full (simulated)" in result.output
    assert checkpoint_bytes(run_dir) == before and "lr: 0.0003" in (run_dir / "config.yaml").read_text()
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_stale_checkpoint_temporaries_are_removed_by_the_next_run(dataset, tmp_path):
    run_dir, runner = tmp_path / "run", CliRunner()
    assert runner.invoke(app, train_args(dataset, run_dir)).exit_code == 0
    stale = run_dir / "checkpoints" / f".step_00000003.tmp-{dead_pid()}@{HOST}"  # kill -9 mid-save
    stale.mkdir()
    (stale / "train_state.pt").write_bytes(b"half")
    result = runner.invoke(app, train_args(dataset, run_dir, "--set=train.max_steps=3"))
    assert result.exit_code == 0, result.output
    assert not stale.exists() and "no longer running" in flat(result.output)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_an_empty_run_dir_empty(
    dataset, tmp_path, monkeypatch, overwrite
):
    from evo2_cli.train import loop

    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def full_disk(*args, **kwargs):
        raise InputError("disk full (simulated)")

    monkeypatch.setattr(loop, "write_checkpoint", full_disk)
    result = CliRunner().invoke(app, train_args(dataset, run_dir, *overwrite))
    assert result.exit_code == 2 and "disk full (simulated)" in result.output
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
