"""The `evo2 diagnose-grads` config: root `DiagnoseJob` (kind `diagnose`).

    model:     the model to diagnose (`preset: test` plus overrides); leave it out when starting from a
               checkpoint (`diagnose.checkpoint`), whose own config is used
    data:      the training windows, as in `evo2 train` (`data.val_windows` is not used here)
    optim:     AdamW and its schedule, as in `evo2 train`; `optim.lr` and `optim.grad_clip` are the defaults
               of every variant that does not set its own
    diagnose:  steps, seed, the variants compared side by side, the explosion detector, the slow-mode init,
               the output directory; or `run_dir`, an `evo2 train` run to judge post hoc (then only the
               detector and the output directory are used)

Variants. `diagnose.variants` is a list of mappings, each key optional:

    hcl_form: vortex | modal   hcl pole form (free lambda, or lambda = -exp(p) exp(gamma)); default the
                               model's own
    precision: fp32 | bf16     bf16 = autocast (filters and FFTs stay fp32, as in training); default fp32
    lr: X                      peak learning rate of this variant; default optim.lr
    grad_clip: X               gradient clipping at global norm X, 0 = off; default optim.grad_clip

The axis lists `diagnose.lr`, `diagnose.precision` and `diagnose.grad_clip` cross every variant (which may
then not set that axis itself): `variants: [{hcl_form: vortex}, {hcl_form: modal}]` with `lr: [1e-2, 3e-3]`
is four variants. On the command line: `--variants vortex,modal+bf16+noclip --lr 1e-2,3e-3` (parse_spec).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from evo2_cli.config import check, to_dict
from evo2_cli.errors import ConfigError
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
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "name"}


def _number(text: str, term: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"'{term}': '{text}' is not a number") from None


@dataclass
class VariantSpec:
    """One entry of diagnose.variants; an axis left out comes from the axis lists or the defaults."""

    hcl_form: Literal["vortex", "modal"] | None = None
    precision: Literal["fp32", "bf16"] | None = None
    lr: float | None = None
    grad_clip: float | None = None  # 0 = off

    def __post_init__(self) -> None:
        check(self.lr is None or 0 < self.lr < math.inf, "lr", f"must be finite and > 0, got {self.lr}")
        check(self.grad_clip is None or 0 <= self.grad_clip < math.inf, "grad_clip", "must be >= 0 (0: off)")


def parse_spec(spec: str) -> dict[str, object]:
    """The command-line shorthand of one variant ('vortex+bf16+lr=3e-3') -> its VariantSpec keys.

    Raises ValueError naming the bad term."""
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
            put("lr", _number(value, term), term)
        elif sep and key == "clip":
            put("grad_clip", _number(value, term), term)
        else:
            words = [*HCL_FORMS, *PRECISIONS, "noclip", "lr", "clip"]
            close = difflib.get_close_matches(key, words, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown variant term '{term}'{hint}; terms are {_TERM_HELP}")
    return settings


def variants_flag(text: str | None) -> list[dict[str, object]] | None:
    """--variants: comma-separated shorthand specs -> diagnose.variants (None: the flag was not given)."""
    if text is None:
        return None
    try:
        return [parse_spec(spec) for spec in text.split(",")]
    except ValueError as exc:
        raise ConfigError("diagnose.variants", str(exc), "--variants") from None


def expand_variants(
    specs: list[VariantSpec],
    lrs: list[float],
    precisions: list[str],
    clips: list[float],
    default_lr: float,
    default_clip: float,
    default_form: str = "modal",
) -> list[Variant]:
    """Every spec crossed with the axis lists; names show only the axes that differ between variants."""
    defaults = {"hcl_form": default_form, "precision": "fp32", "lr": default_lr, "grad_clip": default_clip}
    axes = {"lr": lrs, "precision": precisions, "grad_clip": clips}
    rows: list[dict] = []
    for spec in specs:
        row = {**defaults, **{axis: value for axis, value in to_dict(spec).items() if value is not None}}
        lists = [values or [row[axis]] for axis, values in axes.items()]
        rows += [{**row, **dict(zip(axes, combo, strict=True))} for combo in itertools.product(*lists)]
    shown = [axis for axis in defaults if len({r[axis] for r in rows}) > 1] or list(defaults)

    def term(axis: str, value) -> str:
        if axis == "lr":
            return f"lr={value:g}"
        if axis == "grad_clip":
            return f"clip={value:g}" if value else "noclip"
        return str(value)

    variants = [Variant("+".join(term(axis, row[axis]) for axis in shown), **row) for row in rows]
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
    variants: list[VariantSpec] = field(default_factory=lambda: [VariantSpec("vortex"), VariantSpec("modal")])
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

    @classmethod
    def expand_config(cls, raw: dict) -> dict:
        """Say what the shorthand means in a file rather than only 'expected a mapping'."""
        items = raw.get("variants")
        items = [items] if isinstance(items, str) else items if isinstance(items, list) else []
        for item in items:
            check(
                not isinstance(item, str),
                "variants",
                f"each variant is a mapping such as {{hcl_form: vortex, precision: bf16}}; the shorthand "
                f"'{item}' is for the --variants flag",
            )
        return raw

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")
        check(len(self.variants) > 0, "variants", "list at least one variant, e.g. [{hcl_form: vortex}]")
        for i, spec in enumerate(self.variants):
            for axis in ("lr", "precision", "grad_clip"):
                listed = getattr(self, axis) and getattr(spec, axis) is not None
                check(
                    not listed, f"variants.{i}.{axis}", f"set here and listed in diagnose.{axis}; set it once"
                )
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
