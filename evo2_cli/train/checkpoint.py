"""Run directories and training checkpoints.

    RUN_DIR/config.yaml                 the resolved config of the run (its identity is checked on resume)
    RUN_DIR/metrics.jsonl               one JSON object per logged step and per evaluation
    RUN_DIR/checkpoints/step_00000100/  one directory per save:
        model.safetensors, config.yaml,   the model package's checkpoint (`load_model` reads the directory);
        meta.json                         config.yaml is the full resolved run config, `model:` included;
                                          meta.json: step, tokens seen, metrics, sha256 of every file
        train_state.pt                    optimizer (parameter names as keys), step, data position, guard,
                                          RNG; plain tensors and numbers, `torch.load(weights_only=True)`
    RUN_DIR/checkpoints/latest, best    symlinks to a step directory, replaced atomically

A checkpoint is written under a temporary name and renamed when complete, so a crash, a full disk or a signal
never leaves a half-written directory under a final name, and the previous checkpoint survives.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evo2_cli.config import load_config
from evo2_cli.errors import ConfigError, Evo2Error, InputError
from evo2_cli.fsio import DiskFullError, atomic_output_dir, atomic_write_text, sha256_file, temporary_sibling

TRAIN_STATE = "train_state.pt"
META = "meta.json"
CONFIG = "config.yaml"  # in a run directory: the run's resolved config
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / META).is_file())


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
        with atomic_output_dir(root / name, overwrite=True) as tmp:
            with open(tmp / TRAIN_STATE, "wb") as handle:  # a handle: a full disk then raises an OSError
                torch.save(train_state, handle)
            write_model(tmp, {**meta, "step": step, "files": {TRAIN_STATE: sha256_file(tmp / TRAIN_STATE)}})
        _point(root / "latest", name)
        if is_best:
            _point(root / "best", name)
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
    best = root / "best"
    best_name = os.readlink(best) if best.is_symlink() else None
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[:-keep_last]:
        if old.name != best_name:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Read meta.json and check every file's sha256; returns the meta. InputError names what is wrong."""
    directory = Path(directory)
    meta_path = directory / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{directory}: not a training checkpoint (no {META})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path}: unreadable: {exc}") from None
    for name, digest in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            raise InputError(
                f"{path}: missing or does not match the sha256 in {META}; the checkpoint is corrupt"
            )
    return meta


def read_train_state(directory: Path) -> dict[str, Any]:
    return torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    link = Path(run_dir) / CHECKPOINTS / "latest"
    if link.is_dir() and (link / META).is_file():
        return link.parent / os.readlink(link)  # the step directory, under run_dir as given
    complete = step_dirs(run_dir)
    return complete[-1] if complete else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The step directory `checkpoints/best` points to (under run_dir as given), or None before any eval."""
    link = Path(run_dir) / CHECKPOINTS / "best"
    return link.parent / os.readlink(link) if link.is_symlink() else None


def starting_checkpoint(run_dir: Path, resume: str, claim: Callable[[], object]) -> Path | None:
    """The verified checkpoint a run starts from. `resume` "auto": the run directory's latest checkpoint (None
    for a fresh run), looked up after `claim` made the directory this run's (an --overwrite empties it
    first). Otherwise the checkpoint directory `resume`, verified before `claim` so that a bad one writes
    nothing."""
    if resume != "auto":
        verify_checkpoint(Path(resume))
        claim()
        return Path(resume)
    claim()
    start = latest_checkpoint(run_dir)
    if start is not None:
        verify_checkpoint(start)
    return start


def claim_run_dir(run_dir: Path, job: Any, job_yaml: str, overwrite: bool) -> None:
    """Make `run_dir` this run's directory: create it, or accept it when it holds a run of the same identity
    (`job.identity()`), or wipe it with `overwrite`. Writes the resolved config to RUN_DIR/config.yaml."""
    run_dir = Path(run_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    existing = run_dir / CONFIG
    if existing.is_file():
        try:
            previous = load_config(type(job), existing).identity()
        except ConfigError as exc:
            raise InputError(
                f"{run_dir}: holds a run whose config no longer validates ({exc}); pass --overwrite to start "
                "over or choose another train.run_dir"
            ) from None
        current = job.identity()
        if previous != current:
            keys = _differences(previous, current)
            raise InputError(
                f"{run_dir}: belongs to a run with a different config ({', '.join(keys[:5])} differ); "
                "pass --overwrite to replace it or choose another train.run_dir"
            )
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise InputError(
            f"{run_dir}: exists, is not empty and holds no {CONFIG}; pass --overwrite or choose another "
            "train.run_dir"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(existing, job_yaml)
    except OSError as exc:
        raise InputError(f"{run_dir}: cannot write the run directory: {exc.strerror or exc}") from None


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
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
