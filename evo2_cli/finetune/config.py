"""The `evo2 finetune` config: the `evo2 train` sections plus `finetune:`; root `FinetuneJob` (kind finetune).

    model:     optional; taken from the starting checkpoint. When given it must match the checkpoint (a
               mismatch is refused, exit 2), so a resolved run config can be fed back as is.
    data, optim, train, guard:   as in `evo2 train` (evo2_cli/train/config.py); finetuning defaults in
               configs/finetune/*.yaml (lr 1e-5..1e-4, short warmup)
    finetune:  the starting point, the method (full, partial freeze, LoRA), the task (language modelling,
               or a classification / regression head on labeled FASTA) and the memory check

The identity of a finetune run (what must match to resume it) is the train identity plus the whole
`finetune:` section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from evo2_cli.config import FieldError, check, to_dict
from evo2_cli.model import ModelConfig
from evo2_cli.train.config import TrainJob

# LoRA target names: the leaf name of a linear layer in StripedHyena ("mlp" = l1, l2 and l3).
LORA_TARGETS = ("projections", "out_filter_dense", "Wqkv", "out_proj", "l1", "l2", "l3")
LORA_ALIASES = {"mlp": ("l1", "l2", "l3")}


@dataclass
class LoraSection:
    """Low-rank adapters W + (alpha / rank) B A on the chosen linear layers; everything else is frozen."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["projections", "out_filter_dense", "Wqkv", "out_proj"]
    )

    def __post_init__(self):
        check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.targets) > 0, "targets", "list at least one linear layer name")
        known = (*LORA_TARGETS, *LORA_ALIASES)
        for name in self.targets:
            check(name in known, "targets", f"unknown target {name!r}; known: {', '.join(known)}")

    def target_leaves(self) -> tuple[str, ...]:
        """The targets with aliases expanded, in LORA_TARGETS order."""
        wanted = {leaf for name in self.targets for leaf in LORA_ALIASES.get(name, (name,))}
        return tuple(leaf for leaf in LORA_TARGETS if leaf in wanted)


@dataclass
class LabelsSection:
    """Labeled FASTA for `task: classify | regress`: the label of a record comes from its header (a regex
    with one group) or from a CSV of id,label (id = first word of the header)."""

    fasta: list[Path] = field(default_factory=list)
    header_regex: str | None = None  # e.g. 'label=(\S+)'; searched in the whole header line
    csv: Path | None = None  # two columns id,label; a header row `id,label` is skipped
    val_fraction: float = 0.2  # records go to val by a stable hash of their id (seed: train.seed)

    def __post_init__(self):
        check(0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.header_regex is not None:
            try:
                groups = re.compile(self.header_regex).groups
            except re.error as exc:
                raise FieldError("header_regex", f"not a valid regex: {exc}") from None
            check(groups == 1, "header_regex", f"needs exactly one capture group, got {groups}")
        check(
            self.header_regex is None or self.csv is None,
            "csv",
            "give either labels.header_regex or labels.csv, not both",
        )


@dataclass
class FinetuneSection:
    init_from: Path | None = None  # our checkpoint dir (or a run dir: its latest) or a Vortex-layout .pt
    init_config: Path | None = None  # release config YAML of a .pt [default: the .pt's sibling .yml/.yaml]
    method: Literal["full", "lora"] = "full"
    freeze: list[str] = field(default_factory=list)  # selectors, full method only (see freeze.py)
    lora: LoraSection = field(default_factory=LoraSection)
    task: Literal["lm", "classify", "regress"] = "lm"
    labels: LabelsSection = field(default_factory=LabelsSection)
    clamp_poles: float | None = None  # Vortex import: set poles with lambda >= 0 to this negative value

    def __post_init__(self):
        check(
            not (self.method == "lora" and self.freeze),
            "freeze",
            "LoRA already freezes every base weight; leave freeze empty with method: lora",
        )
        check(self.clamp_poles is None or self.clamp_poles < 0, "clamp_poles", "must be negative")
        if self.task != "lm":
            check(len(self.labels.fasta) > 0, "labels.fasta", f"task {self.task} needs labeled FASTA files")
            check(
                self.labels.header_regex is not None or self.labels.csv is not None,
                "labels",
                "set labels.header_regex (label in the header) or labels.csv (id,label)",
            )


@dataclass
class FinetuneJob(TrainJob):
    model: ModelConfig | None = None  # type: ignore[assignment]  # from the starting checkpoint
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def needs_datasets(self) -> bool:
        return self.finetune.task == "lm"  # classify and regress read labeled FASTA (finetune.labels)

    def identity(self) -> dict:
        return {**super().identity(), "finetune": to_dict(self.finetune)}
