"""The `evo2 train` config: typed sections under one root, `TrainJob` (kind "train").

    model:  the model package's ModelConfig (`preset: small` plus overrides)
    data:   datasets with blend weights, window length, loss weighting, augmentation, validation windows
    optim:  AdamW, schedule, clipping, global batch
    train:  the run: directory, steps, seed, device, precision, parallelism, intervals, logging
    guard:  non-finite / spike detection, rollback and give-up policy

`model`, `data`, `optim` and `train.seed` are the identity of a run: a run directory is refused for a config
that differs in them (unless --overwrite). Everything else may change between a run and its resume
(more steps, another device or process count, other intervals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from evo2_cli.config import check, to_dict
from evo2_cli.model import ModelConfig


@dataclass
class DatasetSource:
    """An `evo2 preprocess` output directory, or a prefix P of P_{train,val}.bin/.idx, with a blend weight."""

    path: Path
    weight: float = 1.0

    def __post_init__(self):
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


@dataclass
class DataSection:
    # Empty unless given, and then refused (require_datasets): never a path the user did not name.
    datasets: list[DatasetSource] = field(default_factory=list)
    seq_len: int = 1024
    lowercase_weight: float = 0.1  # loss weight of soft-masked (lowercase) labels
    reverse_complement_prob: float = 0.0  # chance to flip a training window at batch time
    val_windows: int = 64  # fixed windows of the val split scored at every evaluation

    def __post_init__(self):
        check(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        check(0 <= self.lowercase_weight <= 1, "lowercase_weight", "must be in [0, 1]")
        check(0 <= self.reverse_complement_prob <= 1, "reverse_complement_prob", "must be in [0, 1]")
        check(self.val_windows >= 0, "val_windows", "must be >= 0 (0 disables validation)")


def require_datasets(data: DataSection) -> None:
    """The check of every config that reads training windows: at least one dataset, named by the user."""
    check(
        len(data.datasets) > 0,
        "data.datasets",
        "is required: the `evo2 preprocess` output directories to read windows from; add "
        "`data: {datasets: [{path: DIR}]}` to the config or pass --set 'data.datasets=[{path: DIR}]'",
    )


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine floor
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    global_batch: int = 8  # windows per optimizer step, over all processes and accumulation steps

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", "each must be in [0, 1)")
        check(self.eps > 0, "eps", "must be > 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(self.global_batch >= 1, "global_batch", "must be >= 1")


@dataclass
class TrainSection:
    run_dir: Path = Path("runs/train")
    max_steps: int = 1000
    seed: int = 0
    micro_batch: int = 8  # windows per forward pass on one process
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    parallelism: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp = FSDP2 fully_shard per block
    activation_checkpointing: bool = False
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables validation
    save_interval: int = 500  # 0 saves only at the end (and on a signal)
    keep_last: int = 2  # checkpoints kept besides the best
    early_stopping_patience: int = 0  # evaluations without a better val loss before stopping; 0 = never
    tensorboard: bool = False  # write run_dir/tensorboard when tensorboard is installed
    peak_flops: float = 0.0  # per-device peak for MFU; 0 = table for GPUs, measured matmul peak on CPU
    memory_limit_gb: float = 0.0  # refuse a run whose memory estimate is above; 0 = the device's free memory

    def __post_init__(self):
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.micro_batch >= 1, "micro_batch", "must be >= 1")
        for name in ("log_interval",):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in (
            "eval_interval",
            "save_interval",
            "early_stopping_patience",
            "peak_flops",
            "memory_limit_gb",
        ):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass
class GuardSection:
    spike_factor: float = 10.0  # a gradient norm above factor x running median is a spike
    median_window: int = 50  # good steps in the running median
    warmup_steps: int = 10  # good steps seen before spikes are judged
    skip_spikes: bool = True  # skip the optimizer step on a spike (a non-finite step is always skipped)
    max_bad_steps: int = 5  # consecutive bad steps that trigger a rollback
    lr_backoff: float = 0.5  # lr factor applied at each rollback
    max_rollbacks: int = 3  # give up after this many rollbacks

    def __post_init__(self):
        check(self.spike_factor > 1, "spike_factor", f"must be > 1, got {self.spike_factor}")
        check(self.median_window >= 1, "median_window", "must be >= 1")
        check(self.warmup_steps >= 1, "warmup_steps", "must be >= 1")
        check(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        check(0 < self.lr_backoff < 1, "lr_backoff", f"must be in (0, 1), got {self.lr_backoff}")
        check(self.max_rollbacks >= 0, "max_rollbacks", "must be >= 0")


@dataclass
class TrainJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    guard: GuardSection = field(default_factory=GuardSection)

    def __post_init__(self):
        check(
            self.optim.global_batch % self.train.micro_batch == 0,
            "optim.global_batch",
            f"{self.optim.global_batch} is not a multiple of train.micro_batch={self.train.micro_batch}",
        )
        if self.needs_datasets():
            require_datasets(self.data)

    def needs_datasets(self) -> bool:
        """Whether the job reads training windows from data.datasets."""
        return True

    def identity(self) -> dict:
        """What must match for a run directory to be resumed with this config."""
        return {
            **to_dict({"model": self.model, "data": self.data, "optim": self.optim}),
            "seed": self.train.seed,
        }
