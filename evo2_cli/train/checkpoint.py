"""Run directories and training checkpoints (the names of the layout are the model package's, which reads it).

    RUN_DIR/config.yaml                 the resolved config of the run (its identity is checked on resume)
    RUN_DIR/metrics.jsonl               one JSON object per logged step and per evaluation
    RUN_DIR/checkpoints/step_00000100/  one directory per save:
        model.safetensors, config.yaml,   the model package's checkpoint (`load_model` reads the directory);
        meta.json                         config.yaml is the full resolved run config, `model:` included;
                                          meta.json: step, tokens seen, metrics, sha256 of every file
                                          (a LoRA / frozen finetune: only the trained tensors, and `base`)
        train_state.pt                    optimizer (parameter names as keys), step, data position, guard,
                                          RNG; plain tensors and numbers, `torch.load(weights_only=True)`
    RUN_DIR/checkpoints/latest, best    symlinks to a step directory, replaced atomically

A checkpoint is written under a temporary name and renamed when complete, so a crash, a full disk or a signal
never leaves a half-written directory under a final name, and the previous checkpoint survives.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evo2_cli.config import load_config
from evo2_cli.errors import ConfigError, Evo2Error, InputError
from evo2_cli.fsio import (
    DiskFullError,
    HashingWriter,
    atomic_output_dir,
    atomic_write_text,
    check_replaceable,
    directory_kind,
    exclusive,
    remove_path,
    remove_stale_temporaries,
    temporary_sibling,
)
from evo2_cli.model.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    CHECKPOINTS,
    CONFIG_FILE,
    LATEST,
    META_FILE,
    WEIGHTS_FILE,
    check_base,
    check_file,
    latest_checkpoint,
    load_tensor_file,
    read_meta,
    recorded_hashes,
    step_dirs,
    step_name,
)

TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"


def _point(link: Path, target_name: str) -> None:
    """Make `link` a relative symlink to `target_name`, atomically (a new link renamed over the old)."""
    tmp = temporary_sibling(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def write_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path, dict[str, Any]], None],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    is_best: bool = False,
) -> Path:
    """Write checkpoint `step`: train_state.pt, then the model files and meta.json by
    `write_model(directory, meta)` (the model package's `write_model_files`, which adds its files' sha256 to
    `meta["files"]`). Point `latest` (and `best`) at it and delete old ones beyond `keep_last`, never the
    best. An OSError (disk full, permissions) leaves the previous checkpoints as they were and is reported as
    an Evo2Error."""
    root = Path(run_dir) / CHECKPOINTS
    name = step_name(step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(root / name, CHECKPOINT_DIR, overwrite=True) as tmp:
            with open(tmp / TRAIN_STATE, "wb") as handle:  # a handle: a full disk then raises an OSError
                torch.save(train_state, writer := HashingWriter(handle))
            write_model(tmp, {**meta, "step": step, "files": {TRAIN_STATE: writer.digest.hexdigest()}})
        _point(root / LATEST, name)
        if is_best:
            _point(root / BEST, name)
    except (OSError, DiskFullError) as exc:
        previous = step_dirs(run_dir)
        kept = (
            f"the previous checkpoint {previous[-1]} is intact" if previous else "no checkpoint was written"
        )
        problem = exc.reason if isinstance(exc, DiskFullError) else exc.strerror or exc
        raise Evo2Error(f"{root / name}: cannot save checkpoint: {problem}; {kept}") from None
    _rotate(root, keep_last)
    return root / name


def _rotate(root: Path, keep_last: int) -> None:
    best = root / BEST
    best_name = os.readlink(best) if best.is_symlink() else None
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[:-keep_last]:
        if old.name != best_name:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(directory: Path, verify: bool = True) -> dict[str, Any]:
    """Check every file a resume reads against the sha256 in meta.json (the model package's verification;
    `verify=False`: only that they exist); returns the meta. InputError names what is wrong."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise InputError(f"{directory}: not a training checkpoint (no {META_FILE})")
    meta = read_meta(directory)  # a JSON object, or CheckpointError (exit 2) naming the file
    hashes = recorded_hashes(directory, verify)
    for name in dict.fromkeys([*(hashes or {}), WEIGHTS_FILE, CONFIG_FILE, TRAIN_STATE]):
        path = directory / name
        if not path.is_file():
            raise InputError(f"{path}: missing; the checkpoint is incomplete, resume from another one")
        check_file(path, hashes)
    check_base(directory, verify)  # a finetune checkpoint of trained tensors only: its base too
    return meta


def read_train_state(directory: Path) -> dict[str, Any]:
    """The train state of a checkpoint directory (tensor-only; a pickle payload is refused, never run)."""
    return load_tensor_file(Path(directory) / TRAIN_STATE)


RUN_DIR = directory_kind(
    "a training run directory",
    CONFIG_FILE,
    lambda directory: {CONFIG_FILE, METRICS, CHECKPOINTS, "tensorboard"},
)


class RunDirectory:
    """The run directory of a train or finetune, from start-up to the first checkpoint:

        with RunDirectory(run_dir, overwrite, say) as run:   # locked; temporaries of killed runs removed
            start = run.starting_checkpoint(resume, job)     # checks only: nothing is written
            ... load the model, the starting checkpoint's weights and train state
            run.claim(job_yaml)                               # config.yaml; --overwrite: old run aside
            ... train; after the first checkpoint is written:
            run.committed()                                   # the old run is deleted

    On leaving the block before `committed` (any error, a signal), a run directory this run created is
    removed, one that was empty is emptied again, and an old run moved aside is put back as it was. Enter it
    on one process only (rank 0)."""

    def __init__(self, run_dir: Path, overwrite: bool, say: Callable[[str], None]):
        self.path, self.overwrite, self.say = Path(run_dir), overwrite, say
        self.replacing = False  # `check` found an old run that --overwrite replaces
        self.aside: Path | None = None  # the old run, moved aside by --overwrite
        self.created = False  # this run created the directory
        self.was_empty = False  # the directory existed, empty: all it holds now is this run's
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunDirectory:
        self._stack.enter_context(exclusive(self.path, self.say))
        try:
            # Killed runs (kill -9) leave half-written checkpoints and an old run moved aside by --overwrite;
            # the lock says none of them belongs to a live run of this directory.
            remove_stale_temporaries(
                self.path.parent, self.path.name, complete=lambda path: bool(step_dirs(path)), say=self.say
            )
            for directory in (self.path, self.path / CHECKPOINTS):
                remove_stale_temporaries(directory, say=self.say)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self.aside is not None or self.created or self.was_empty:
                self._roll_back()
        finally:
            self._stack.close()

    def check(self, job: Any) -> None:
        """Refuse a run directory this run may not use: another run's without --overwrite (naming the
        differing keys), or a non-empty directory evo2 did not write (never replaced, not even with
        --overwrite). Sets `replacing`."""
        self.replacing = self.overwrite and check_replaceable(self.path, RUN_DIR, self.overwrite)
        if self.replacing or not self.path.exists():
            return
        if not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a directory; choose another train.run_dir")
        if not any(self.path.iterdir()):
            return
        problem = RUN_DIR.recognize(self.path)
        if problem is not None:
            raise InputError(
                f"{self.path}: exists and is not a training run directory written by evo2 ({problem}); it is "
                "left as it is: choose another train.run_dir"
            )
        try:
            previous = load_config(type(job), self.path / CONFIG_FILE).identity()
        except ConfigError as exc:
            raise InputError(
                f"{self.path}: holds a run whose config no longer validates ({exc}); pass --overwrite to "
                "start over or choose another train.run_dir"
            ) from None
        current = job.identity()
        if previous != current:
            keys = _differences(previous, current)
            raise InputError(
                f"{self.path}: belongs to a run with a different config ({', '.join(keys[:5])} differ); "
                "pass --overwrite to replace it or choose another train.run_dir"
            )

    def starting_checkpoint(self, resume: str, job: Any, verify: bool = True) -> Path | None:
        """The verified checkpoint the run starts from (`verify=False`: --no-verify), after `check`: with
        `resume` "auto", the run directory's latest one (None for a fresh run or one --overwrite replaces);
        else the checkpoint directory `resume`. Writes nothing."""
        self.check(job)
        if resume != "auto":
            source = Path(resume)
            if self.overwrite and self.path.exists() and source.resolve().is_relative_to(self.path.resolve()):
                raise InputError(
                    f"--resume {resume} lies inside {self.path}, which --overwrite replaces; copy the "
                    "checkpoint elsewhere first, or resume without --overwrite"
                )
            verify_checkpoint(source, verify)
            return source
        if self.overwrite:
            return None
        start = latest_checkpoint(self.path)
        if start is not None:
            verify_checkpoint(start, verify)
        return start

    def claim(self, job_yaml: str) -> None:
        """Make the directory this run's: move an old run aside (--overwrite), create it, write
        config.yaml."""
        try:
            if self.replacing:
                aside = temporary_sibling(self.path, "old")
                os.replace(self.path, aside)
                self.aside = aside
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self.created = True
            else:
                self.was_empty = not any(self.path.iterdir())
            atomic_write_text(self.path / CONFIG_FILE, job_yaml)
        except OSError as exc:
            self._roll_back()
            raise InputError(f"{self.path}: cannot write the run directory: {exc.strerror or exc}") from None

    def committed(self) -> None:
        """The new run wrote its first checkpoint: delete the old run (--overwrite); nothing is rolled back
        from now on."""
        aside, self.aside, self.created, self.was_empty = self.aside, None, False, False
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _roll_back(self) -> None:
        if self.created or self.aside is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.was_empty:  # the directory itself stays (it may be a mount point, or have set permissions)
            for entry in list(self.path.iterdir()):
                with contextlib.suppress(OSError):
                    remove_path(entry)
        if self.aside is not None:
            os.replace(self.aside, self.path)
            self.say(
                f"put back the previous run in {self.path}: the new one stopped before its first checkpoint"
            )
        self.aside, self.created, self.was_empty = None, False, False


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines logged after `step` (a resume from `step` logs them again)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step a metrics line was logged at; infinity (dropped) for a line a killed run left half-written."""
    try:
        record = json.loads(line)
        return float(record["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
