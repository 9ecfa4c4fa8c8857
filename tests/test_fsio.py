"""evo2_cli/fsio.py: an output directory is replaced whole or not at all, also on a signal mid-swap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evo2_cli.errors import InputError
from evo2_cli.fsio import atomic_output_dir, atomic_path, directory_kind, pread_exact

RESULT = directory_kind("a result directory", "result.txt", lambda directory: {"result.txt"})


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def write_output(final: Path, text: str, overwrite: bool = True) -> None:
    with atomic_output_dir(final, RESULT, overwrite=overwrite) as tmp:
        (tmp / "result.txt").write_text(text)


def test_overwrite_replaces_the_output_and_leaves_nothing_aside(tmp_path):
    final = tmp_path / "out"
    write_output(final, "old", overwrite=False)
    write_output(final, "new")
    assert (final / "result.txt").read_text() == "new"
    assert leftovers(tmp_path) == []
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        write_output(final, "newer", overwrite=False)


def test_an_interrupt_while_writing_keeps_the_old_output(tmp_path):
    final = tmp_path / "out"
    write_output(final, "old")
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(final, RESULT, overwrite=True) as tmp:
        (tmp / "result.txt").write_text("half")
        raise KeyboardInterrupt
    assert (final / "result.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_an_interrupt_between_the_two_renames_restores_the_old_output(tmp_path, monkeypatch):
    final = tmp_path / "out"
    write_output(final, "old")
    real_replace = os.replace

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        if Path(src) == final:  # the old output has just been moved aside; the new one is not in yet
            monkeypatch.setattr(os, "replace", real_replace)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(KeyboardInterrupt):
        write_output(final, "new")
    assert (final / "result.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_files_written_by_name_get_the_umask_permissions(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from evo2_cli import fsio

    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))  # creates its own files 0600
    (tmp_path / "plain.txt").write_text("")  # what the umask gives any other file
    modes = {(tmp_path / name).stat().st_mode & 0o777 for name in ("w.safetensors", "plain.txt")}
    assert len(modes) == 1
    # the common umask, where 0600 would show (under a umask of 077 the check above cannot fail)
    monkeypatch.setattr(fsio, "_UMASK", 0o022)
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert leftovers(tmp_path) == []


def test_pread_exact_reads_on_after_short_reads_and_refuses_a_short_file(tmp_path, monkeypatch):
    path = tmp_path / "data"
    path.write_bytes(bytes(range(10)))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_exact(fd, 4, 3) == bytes([3, 4, 5, 6])
        assert pread_exact(fd, 0, 10) == b""
        with pytest.raises(ValueError, match="ends before byte 12"):
            pread_exact(fd, 5, 7)
        # A kernel may return fewer bytes than asked (a pipe, a signal, past 2 GiB): the rest is read on.
        pread = os.pread
        monkeypatch.setattr(os, "pread", lambda fd, size, offset: pread(fd, min(size, 3), offset))
        assert pread_exact(fd, 8, 1) == bytes(range(1, 9))
    finally:
        os.close(fd)


@pytest.mark.parametrize("pid", ['"x"', "[1]", str(2**70), "-3"])
def test_a_damaged_lock_record_is_no_holder(tmp_path, pid):
    from evo2_cli.fsio import exclusive

    run = tmp_path / "run"
    (tmp_path / ".run.lock.json").write_text(f'{{"pid": {pid}, "host": "h", "started": "t"}}')
    said = []
    with exclusive(run, said.append):
        pass
