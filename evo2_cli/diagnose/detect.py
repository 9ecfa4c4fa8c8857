"""The explosion detector and where an explosion started.

A value is bad when it is non-finite, or when it is above `spike_factor` x the running median of the
previous good values (at most `median_window` of them) once `warmup_steps` good values are known. This is
the training guard's rule (evo2_cli/train/guard.py, with its GuardSection as settings), applied to any
series: a variant's loss and total gradient norm (which decide its first bad step), each parameter's
gradient norm (which locate the origin), or a finished run's logged grad_norm.

Where it started, at the first bad step s of a variant:
1. Forward first. If an activation was non-finite at step s, the explosion is a forward overflow: it started
   at the first watched module, in forward execution order, whose output was non-finite (everything after it,
   the loss and every gradient inherit the NaN, so the gradients say nothing about the origin). For an hcl
   filter whose h overflowed, the parameter is its pole parameter.
2. Otherwise backward order. Among the parameters whose own gradient-norm series is bad at step s, the one
   whose gradient autograd finished first (recorded by post-accumulate-grad hooks): the one closest to the
   loss. Backward runs from the loss towards the input and every gradient is computed from the gradient
   flowing in from the output side, so a NaN or a spike born in layer j reaches every parameter autograd
   handles after j, while the parameters it handled before j were computed from a still healthy signal.
   The first bad one in that order is where the bad gradient was born. (The tied embedding finishes last:
   its gradient is complete only after the input side adds its share.)
3. If no single parameter is bad at step s (a broad rise that only the sum shows), the parameter with the
   largest jump over its own running median is named instead, marked as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from evo2_cli.diagnose.record import StepRecord, group_norm
from evo2_cli.train.config import GuardSection
from evo2_cli.train.guard import GradientGuard
from evo2_cli.train.origin import BLOCK_TYPES, POLE_KINDS, ParamInfo, SiteInfo, hcl_overflow_detail


@dataclass(frozen=True)
class Flag:
    """A bad value in a series: its index (step), value, the threshold in force (None before warmup or when
    the value is non-finite with no history) and the problem."""

    step: int
    value: float
    threshold: float | None
    problem: str  # "non-finite" or "spike"

    @property
    def ratio(self) -> float:
        """value / threshold (factor x running median): above 1 is a spike; NaN when unknown."""
        if self.threshold is None or not math.isfinite(self.value):
            return math.nan
        return self.value / self.threshold


class SeriesDetector:
    """Judges one series value by value (the training guard's rule, without its skip/rollback policy)."""

    def __init__(self, settings: GuardSection):
        self._guard = GradientGuard(settings)  # only its spike_factor, median_window and warmup_steps matter
        self.last_threshold: float | None = None

    def judge(self, step: int, value: float) -> Flag | None:
        verdict = self._guard.assess(0.0, value)
        self.last_threshold = verdict.threshold
        if verdict.problem is None:
            return None
        return Flag(step, value, verdict.threshold, verdict.problem)


@dataclass(frozen=True)
class Explosion:
    """The first bad step of a variant and where it started."""

    step: int
    problem: str  # "non-finite" or "spike"
    series: str  # what flagged it: "loss" (non-finite) or "grad_norm" (the total)
    value: float
    threshold: float | None
    origin: str  # "forward", "backward" or "largest jump" (see the module docstring)
    layer: int | None
    block: str
    parameter: str | None
    kind: str | None
    site: str | None  # the watched module, for a forward origin
    detail: str  # one sentence for people


def block_series(steps: Sequence[StepRecord], params: Sequence[ParamInfo]) -> dict[str, list[float]]:
    """Total gradient norm and the gradient norm of every block type present, per step."""
    out = {"grad_norm": [s.grad_norm for s in steps]}
    for block in BLOCK_TYPES:
        members = [i for i, p in enumerate(params) if p.block == block]
        if members:
            out[f"grad_norm[{block}]"] = [group_norm(s.grad, members) for s in steps]
    return out


def _first_bad_step(steps: Sequence[StepRecord], settings: GuardSection) -> tuple[int, str, Flag] | None:
    """(step, series, flag) of the earliest bad loss or total gradient norm: the quantities the training
    guard judges. Smaller groups (a block type, a parameter) only locate the origin: their norms are noisy
    enough at small batch sizes that a 10x jump of a tiny group is no explosion."""
    detector = SeriesDetector(settings)
    for s in steps:
        if not math.isfinite(s.loss):
            return s.step, "loss", Flag(s.step, s.loss, None, "non-finite")
        flag = detector.judge(s.step, s.grad_norm)
        if flag is not None:
            return s.step, "grad_norm", flag
    return None


def locate_explosion(
    steps: Sequence[StepRecord],
    params: Sequence[ParamInfo],
    sites: Sequence[SiteInfo],
    seq_len: int,
    settings: GuardSection,
) -> Explosion | None:
    """The first bad step of a recorded variant and where it started (module docstring); None if healthy."""
    first = _first_bad_step(steps, settings)
    if first is None:
        return None
    step, series, flag = first
    index = next(i for i, s in enumerate(steps) if s.step == step)
    record = steps[index]
    head = dict(step=step, problem=flag.problem, series=series, value=flag.value, threshold=flag.threshold)

    # 1. forward: the first watched module, in execution order, with a non-finite output
    bad_sites = [i for i in record.forward_order if record.activations[i][2] > 0]
    if bad_sites:
        site = sites[bad_sites[0]]
        parameter = kind = None
        detail = f"forward overflow: {site.name} produced non-finite values"
        if site.block == "hcl" and site.role == "mixer":
            stats = record.hcl.get(site.layer)
            pole = next((p for p in params if p.layer == site.layer and p.kind in POLE_KINDS), None)
            if stats is not None and pole is not None and stats.overflows(seq_len):
                parameter, kind = pole.name, pole.kind
                detail = hcl_overflow_detail(site.layer, stats, seq_len)
        if parameter is None:
            broken = [
                p
                for i, p in enumerate(params)
                if p.name.startswith(site.name + ".") and _nonfinite_param(steps, index, i)
            ]
            if broken:
                parameter, kind = broken[0].name, broken[0].kind
                detail += f"; parameter {parameter} is itself non-finite"
        return Explosion(
            **head,
            origin="forward",
            layer=site.layer,
            block=site.block,
            parameter=parameter,
            kind=kind,
            site=site.name,
            detail=detail,
        )

    # 2. backward: the first parameter, in the order autograd finished them, whose own series is bad
    flags: dict[int, Flag] = {}
    jumps: dict[int, float] = {}
    for i in range(len(params)):
        detector = SeriesDetector(settings)
        for s in steps[: index + 1]:
            result = detector.judge(s.step, s.grad[i])
        if result is not None and result.step == step:
            flags[i] = result
        elif detector.last_threshold:
            jumps[i] = record.grad[i] * settings.spike_factor / detector.last_threshold
    order = record.backward_order + [i for i in range(len(params)) if i not in record.backward_order]
    bad = [i for i in order if i in flags]
    if bad:
        i, origin = bad[0], "backward"
        why = flags[i]
        what = (
            "non-finite gradient"
            if why.problem == "non-finite"
            else f"gradient norm {why.value:.3g}, {why.ratio * settings.spike_factor:.0f}x its running median"
        )
        detail = (
            f"{params[i].name}: {what}; the first bad gradient in backward order "
            f"({len(bad)} parameter(s) bad at this step)"
        )
    else:
        if not jumps:
            return Explosion(
                **head,
                origin="largest jump",
                layer=None,
                block="",
                parameter=None,
                kind=None,
                site=None,
                detail=f"{series} went bad at step {step}; no parameter history to compare",
            )
        i, origin = max(jumps, key=lambda k: jumps[k]), "largest jump"
        detail = (
            f"no single parameter is bad on its own; {params[i].name} rose most: "
            f"{jumps[i]:.1f}x its running median"
        )
    p = params[i]
    return Explosion(
        **head,
        origin=origin,
        layer=p.layer,
        block=p.block,
        parameter=p.name,
        kind=p.kind,
        site=None,
        detail=detail,
    )


def _nonfinite_param(steps: Sequence[StepRecord], index: int, param: int) -> bool:
    """Parameter `param` was non-finite when step `index` ran its forward (after the previous update)."""
    return index > 0 and steps[index - 1].param_nonfinite[param] > 0
