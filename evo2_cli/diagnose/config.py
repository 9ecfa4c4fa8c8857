"""The `evo2 diagnose-grads` config: root `DiagnoseJob` (kind `diagnose`).

    model:     the model to diagnose (`preset: test` plus overrides); leave it out when starting from a
               checkpoint (`diagnose.checkpoint`), whose own config is used
    data:      the training windows, as in `evo2 train` (`data.val_windows` is not used here)
    optim:     AdamW and its schedule, as in `evo2 train`; `optim.lr` and `optim.grad_clip` are the defaults
               of every variant that does not set its own
    diagnose:  steps, seed, the variants compared side by side, the explosion detector, the slow-mode init,
               the output directory; or `run_dir`, an `evo2 train` run to judge post hoc (then only the
               detector and the output directory are used)

Variants. `diagnose.variants` is a list of specs; a spec is terms joined by `+`:

    vortex | modal      hcl pole form (free lambda, or lambda = -exp(p) exp(gamma))
    fp32 | bf16         precision (bf16 = autocast; filters and FFTs stay fp32, as in training)
    lr=X                peak learning rate of this variant
    clip=X | noclip     gradient clipping at global norm X (0 or `noclip`: off)

The axis lists `diagnose.lr`, `diagnose.precision` and `diagnose.grad_clip` cross every spec (a spec may not
set an axis that is also given as a list). So `variants: [vortex, modal]` with `lr: [1e-2, 3e-3]` is four
variants. On the command line: `--variants vortex,modal --lr 1e-2,3e-3 --precision fp32,bf16 --clip 1,0`.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from evo2_cli.config import check
from evo2_cli.model import ModelConfig
from evo2_cli.train.config import DataSection, GuardSection, OptimSection, require_datasets

HCL_FORMS = ("vortex", "modal")
PRECISIONS = ("fp32", "bf16")
_TERM_HELP = "vortex|modal, fp32|bf16, lr=X, clip=X or noclip, joined by '+' (e.g. vortex+bf16+lr=3e-3)"


@dataclass(frozen=True)
class Variant:
    """One training setup compared against the others on the same seed, data and initial weights."""

    name: str
    hcl_form: str  # "vortex" or "modal"
    precision: str  # "fp32" or "bf16"
    lr: float
    grad_clip: float  # 0 = off

    def settings(self) -> dict[str, object]:
        return {
            "hcl_form": self.hcl_form,
            "precision": self.precision,
            "lr": self.lr,
            "grad_clip": self.grad_clip,
        }


def _number(text: str, term: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{term}': '{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"'{term}': expected a finite number >= 0")
    return value


def parse_spec(spec: str) -> dict[str, object]:
    """One variant spec -> the axes it sets ({'hcl_form', 'precision', 'lr', 'grad_clip'} subset).

    Raises ValueError naming the bad term (the caller turns it into a config error)."""
    settings: dict[str, object] = {}

    def put(axis: str, value: object, term: str) -> None:
        if axis in settings:
            raise ValueError(f"'{spec}' sets {axis} twice ('{term}')")
        settings[axis] = value

    terms = [t.strip() for t in spec.split("+")]
    if not spec.strip() or any(not t for t in terms):
        raise ValueError(f"empty term in variant '{spec}'; terms are {_TERM_HELP}")
    for term in terms:
        key, sep, value = term.partition("=")
        key = key.strip().lower()
        if not sep and key in HCL_FORMS:
            put("hcl_form", key, term)
        elif not sep and key in PRECISIONS:
            put("precision", key, term)
        elif not sep and key == "noclip":
            put("grad_clip", 0.0, term)
        elif sep and key == "lr":
            lr = _number(value, term)
            if lr <= 0:
                raise ValueError(f"'{term}': the learning rate must be > 0")
            put("lr", lr, term)
        elif sep and key == "clip":
            put("grad_clip", _number(value, term), term)
        else:
            words = [*HCL_FORMS, *PRECISIONS, "noclip", "lr", "clip"]
            close = difflib.get_close_matches(key, words, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown variant term '{term}'{hint}; terms are {_TERM_HELP}")
    return settings


def _format_number(value: float) -> str:
    return f"{value:g}"


def expand_variants(
    specs: list[str],
    lrs: list[float],
    precisions: list[str],
    clips: list[float],
    default_lr: float,
    default_clip: float,
    default_form: str = "modal",
) -> list[Variant]:
    """Every spec crossed with the axis lists; names show only the axes that differ between variants."""
    axes = {"lr": lrs, "precision": precisions, "grad_clip": clips}
    rows: list[dict[str, object]] = []
    for spec in specs:
        base = parse_spec(spec)
        for axis, values in axes.items():
            if values and axis in base:
                raise ValueError(f"variant '{spec}' sets {axis} and diagnose.{axis} lists it too")
        lists = [values if values else [base.get(axis)] for axis, values in axes.items()]
        for combo in itertools.product(*lists):
            row = {
                **base,
                **{axis: value for axis, value in zip(axes, combo, strict=True) if value is not None},
            }
            row.setdefault("hcl_form", default_form)
            row.setdefault("precision", "fp32")
            row.setdefault("lr", default_lr)
            row.setdefault("grad_clip", default_clip)
            rows.append(row)
    varying = [a for a in ("hcl_form", "precision", "lr", "grad_clip") if len({r[a] for r in rows}) > 1]
    shown = varying or ["hcl_form", "precision", "lr", "grad_clip"]
    variants = []
    for row in rows:
        parts = []
        for axis in shown:
            value = row[axis]
            if axis == "lr":
                parts.append(f"lr={_format_number(float(value))}")
            elif axis == "grad_clip":
                parts.append(f"clip={_format_number(float(value))}" if value else "noclip")
            else:
                parts.append(str(value))
        variants.append(
            Variant(
                name="+".join(parts),
                hcl_form=str(row["hcl_form"]),
                precision=str(row["precision"]),
                lr=float(row["lr"]),
                grad_clip=float(row["grad_clip"]),
            )
        )
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant(s) {', '.join(duplicates)} listed more than once")
    return variants


@dataclass
class DiagnoseSection:
    steps: int = 200  # training steps per variant (a variant stops early once its loss is non-finite)
    seed: int = 0  # initial weights and data windows; the same for every variant
    micro_batch: int = 1  # windows per forward pass (optim.global_batch windows per step)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Start from this checkpoint instead of `model:`: one of ours (a checkpoint or run directory), or a
    # Vortex / Evo 2 .pt together with its model YAML in `vortex_config`.
    checkpoint: Path | None = None
    vortex_config: Path | None = None
    # Post-hoc mode: judge this `evo2 train` run directory (metrics.jsonl, checkpoints) instead of training.
    run_dir: Path | None = None
    variants: list[str] = field(default_factory=lambda: ["vortex", "modal"])
    lr: list[float] = field(default_factory=list)  # axis: every variant at each lr (default optim.lr)
    precision: list[Literal["fp32", "bf16"]] = field(default_factory=list)  # axis (default fp32)
    grad_clip: list[float] = field(default_factory=list)  # axis, 0 = off (default optim.grad_clip)
    # The explosion detector (the training guard's rule): non-finite, or above spike_factor x the running
    # median of the previous good values once spike_warmup good values are known.
    spike_factor: float = 10.0
    median_window: int = 50
    spike_warmup: int = 3
    # Slow-mode init: in every hcl channel the `slow_modes` slowest poles start at `slow_mode_lambda`
    # (trained Evo 2 checkpoints hold modes this close to zero). 0 keeps the model's own init.
    slow_modes: int = 0
    slow_mode_lambda: float = -1e-4
    output_dir: Path = Path("runs/diagnose")

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")
        check(len(self.variants) > 0, "variants", f"list at least one variant: {_TERM_HELP}")
        for spec in self.variants:
            try:
                parse_spec(spec)
            except ValueError as exc:
                check(False, "variants", str(exc))
        check(all(lr > 0 and math.isfinite(lr) for lr in self.lr), "lr", "every lr must be > 0")
        check(all(c >= 0 and math.isfinite(c) for c in self.grad_clip), "grad_clip", "must be >= 0 (0: off)")
        check(self.spike_factor > 1, "spike_factor", f"must be > 1, got {self.spike_factor}")
        check(self.median_window >= 1, "median_window", "must be >= 1")
        check(self.spike_warmup >= 1, "spike_warmup", "must be >= 1")
        check(self.slow_modes >= 0, "slow_modes", "must be >= 0")
        check(
            self.slow_mode_lambda < 0,
            "slow_mode_lambda",
            f"must be < 0 (a pole at or above zero is not a slow mode but a growing one), got "
            f"{self.slow_mode_lambda}",
        )

    def detector(self) -> GuardSection:
        """The detector's settings as the training guard's, whose rule it applies."""
        return GuardSection(
            spike_factor=self.spike_factor, median_window=self.median_window, warmup_steps=self.spike_warmup
        )


@dataclass
class DiagnoseJob:
    model: ModelConfig | None = None
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    diagnose: DiagnoseSection = field(default_factory=DiagnoseSection)

    def __post_init__(self) -> None:
        d = self.diagnose
        if d.run_dir is not None:
            check(
                self.model is None and d.checkpoint is None,
                "diagnose.run_dir",
                "post-hoc mode reads a finished run; leave out the model section and diagnose.checkpoint",
            )
            return
        require_datasets(self.data)
        check(
            (self.model is None) != (d.checkpoint is None),
            "model" if self.model is not None else "diagnose.checkpoint",
            "give either a model section (e.g. --set model.preset=test) or diagnose.checkpoint, not both"
            if self.model is not None
            else "no model to diagnose: give a model section (e.g. --set model.preset=test) or "
            "diagnose.checkpoint (a checkpoint directory)",
        )
        check(
            self.optim.global_batch % d.micro_batch == 0,
            "optim.global_batch",
            f"{self.optim.global_batch} is not a multiple of diagnose.micro_batch={d.micro_batch}",
        )
        if self.model is not None:
            check(
                d.slow_modes <= self.model.state_size,
                "diagnose.slow_modes",
                f"{d.slow_modes} is more than model.state_size={self.model.state_size} poles per channel",
            )
        try:
            self.variant_list()
        except ValueError as exc:
            check(False, "diagnose.variants", str(exc))

    def variant_list(self, default_form: str | None = None) -> list[Variant]:
        """The variants; a spec without a form term takes `default_form` (the model's own form)."""
        d = self.diagnose
        if default_form is None:
            default_form = self.model.hcl_form if self.model is not None else "modal"
        return expand_variants(
            d.variants,
            d.lr,
            list(d.precision),
            d.grad_clip,
            self.optim.lr,
            self.optim.grad_clip,
            default_form,
        )

    def optim_for(self, variant: Variant) -> OptimSection:
        """optim with the variant's lr and clip; min_lr scales with lr so the schedule keeps its shape."""
        o = self.optim
        return dataclasses.replace(
            o, lr=variant.lr, min_lr=o.min_lr * variant.lr / o.lr, grad_clip=variant.grad_clip
        )
