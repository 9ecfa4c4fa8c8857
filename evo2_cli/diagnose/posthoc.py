"""Post-hoc mode: judge a finished (or running) `evo2 train` / `evo2 finetune` run directory.

Reads RUN_DIR/metrics.jsonl (the `train` records: one per logged step) and runs the explosion detector
(detect.py, the training guard's rule) over the logged gradient norms; every flagged step is a spike. Each
checkpoint under RUN_DIR/checkpoints is loaded (safetensors, no unpickling) for its hcl pole statistics
(largest lambda, fraction of modes with lambda >= 0, largest |h[t]| at the run's sequence length) and its
non-finite weights, so a spike can be matched with the poles that caused it.

Only logged steps are seen: with `train.log_interval` > 1 a spike between two logged steps is missed (the
training guard itself judges every step and names its skipped steps in the log as `skipped`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from evo2_cli.config import read_yaml
from evo2_cli.diagnose.detect import Flag, SeriesDetector
from evo2_cli.errors import InputError
from evo2_cli.model.checkpoint import CONFIG_FILE, step_dirs
from evo2_cli.train.checkpoint import METRICS
from evo2_cli.train.config import GuardSection
from evo2_cli.train.origin import HclStats, hcl_stats


@dataclass(frozen=True)
class LoggedStep:
    step: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool  # the training guard skipped this step


@dataclass(frozen=True)
class Spike:
    step: int
    problem: str  # "non-finite" or "spike"
    grad_norm: float
    loss: float
    median: float | None  # running median of the good gradient norms before it (None before warmup)
    skipped: bool

    @property
    def ratio(self) -> float:
        """grad_norm / running median (a spike is above spike_factor); NaN when unknown."""
        if self.median is None or not math.isfinite(self.grad_norm):
            return math.nan
        return self.grad_norm / self.median


@dataclass(frozen=True)
class CheckpointStats:
    step: int
    path: Path
    param_norm: float
    nonfinite_params: int
    hcl: dict[int, HclStats]


@dataclass
class RunReview:
    run_dir: Path
    seq_len: int
    steps: list[LoggedStep]
    spikes: list[Spike]
    checkpoints: list[CheckpointStats]
    settings: GuardSection

    @property
    def healthy(self) -> bool:
        return not self.spikes


def _number(value: object) -> float:
    """A logged number: JSON has no inf/NaN literals, Python's json writes Infinity/NaN, which load back."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def read_metrics(run_dir: Path) -> list[LoggedStep]:
    """The `train` records of RUN_DIR/metrics.jsonl, in file order (a resumed run repeats no step)."""
    path = run_dir / METRICS
    if not path.is_file():
        raise InputError(
            f"{path}: no metrics log; point --run (diagnose.run_dir) at an `evo2 train` run directory"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason}); is this an evo2 run?") from None
    steps = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("kind", "train") != "train":
                continue
            steps.append(
                LoggedStep(
                    step=int(record["step"]),
                    loss=_number(record.get("loss")),
                    grad_norm=_number(record.get("grad_norm")),
                    lr=_number(record.get("lr")),
                    skipped=bool(record.get("skipped", False)),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}:{number}: not a metrics record ({exc}); is this an evo2 run?") from None
    if not steps:
        raise InputError(f"{path}: no train records yet; nothing to judge")
    return steps


def find_spikes(steps: list[LoggedStep], settings: GuardSection) -> list[Spike]:
    """Every logged step whose loss or gradient norm is non-finite or above factor x the running median."""
    detector = SeriesDetector(settings)
    spikes = []
    for s in steps:
        flag: Flag | None
        if math.isfinite(s.loss):
            flag = detector.judge(s.step, s.grad_norm)
        else:  # a non-finite loss is bad whatever its gradient norm; it joins no running median
            flag = Flag(s.step, s.grad_norm, detector.last_threshold, "non-finite")
        if flag is not None:
            median = None if flag.threshold is None else flag.threshold / settings.spike_factor
            spikes.append(Spike(s.step, flag.problem, s.grad_norm, s.loss, median, s.skipped))
    return spikes


def run_seq_len(run_dir: Path) -> int:
    """data.seq_len of the run's config.yaml (the length the hcl filters were used at)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; is {run_dir} an `evo2 train` run directory?")
    raw, _ = read_yaml(path)
    seq_len = raw.get("data", {}).get("seq_len") if isinstance(raw.get("data"), dict) else None
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"{path}: no valid data.seq_len; is this an `evo2 train` run config?")
    return seq_len


@torch.no_grad()
def checkpoint_stats(directory: Path, step: int, seq_len: int, verify: bool = True) -> CheckpointStats:
    from evo2_cli.model import load_model

    model = load_model(directory, verify=verify)
    params = [p.detach().float() for p in model.parameters()]
    return CheckpointStats(
        step=step,
        path=directory,
        param_norm=float(torch.linalg.vector_norm(torch.stack([p.norm() for p in params]))),
        nonfinite_params=int(sum((~torch.isfinite(p)).sum() for p in params)),
        hcl=hcl_stats(model, seq_len),
    )


def review_run(run_dir: Path, settings: GuardSection, verify: bool = True) -> RunReview:
    """Judge a run from its metrics and checkpoints (each checked against its sha256 unless `verify` is
    False)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory; give the train.run_dir of an `evo2 train` run")
    steps = read_metrics(run_dir)
    seq_len = run_seq_len(run_dir)
    checkpoints = [
        checkpoint_stats(d, int(d.name.removeprefix("step_")), seq_len, verify) for d in step_dirs(run_dir)
    ]
    return RunReview(run_dir, seq_len, steps, find_spikes(steps, settings), checkpoints, settings)
