"""What a diagnosis found, the one model every output format reads: per variant its per-step series (total
and per-block-type gradient norm, hcl poles per layer), per-layer gradient norms and the summary numbers
report.json holds; plus the short texts the terminal and the HTML share."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from evo2_cli.config import to_dict
from evo2_cli.diagnose.detect import block_series
from evo2_cli.diagnose.record import StepRecord, group_norm
from evo2_cli.diagnose.run import Diagnosis, VariantResult
from evo2_cli.train.origin import BLOCK_TYPES, FP32_EXP_LIMIT, ParamInfo


def nanmax(values: Iterable[float]) -> float:
    """Largest value, inf if any is inf, NaN only when all are NaN (or none)."""
    best = math.nan
    for v in values:
        if math.isinf(v) and v > 0:
            return v
        if not math.isnan(v) and (math.isnan(best) or v > best):
            best = v
    return best


def overflow_lambda(seq_len: int) -> float:
    """The largest hcl pole lambda whose exp(lambda t) stays finite in fp32 over a sequence of seq_len."""
    return FP32_EXP_LIMIT / max(seq_len - 1, 1)


def hcl_series(steps: Sequence[StepRecord]) -> dict[int, dict[str, list[float]]]:
    """Per hcl layer, per step: max lambda, fraction of modes with lambda >= 0, max |h[t]|."""
    layers = sorted({layer for s in steps for layer in s.hcl})
    return {
        layer: {
            "max_lambda": [s.hcl[layer].max_lambda for s in steps],
            "frac_nonneg": [s.hcl[layer].frac_nonneg for s in steps],
            "max_abs_h": [s.hcl[layer].max_abs_h for s in steps],
        }
        for layer in layers
    }


def layer_series(steps: Sequence[StepRecord], params: Sequence[ParamInfo]) -> dict[int | None, list[float]]:
    """Gradient norm of each layer (None: the embedding and final norm), per step."""
    layers: dict[int | None, list[int]] = {}
    for i, p in enumerate(params):
        layers.setdefault(p.layer, []).append(i)
    return {layer: [group_norm(s.grad, members) for s in steps] for layer, members in layers.items()}


@dataclass(frozen=True)
class VariantFindings:
    result: VariantResult
    grad_norms: dict[str, list[float]]  # "grad_norm" (total), then "grad_norm[<block type>]", per step
    by_block: dict[str, list[float]]  # the same per block type without the total: {"hcl": [...], ...}
    hcl: dict[int, dict[str, list[float]]]  # hcl_series
    summary: dict[str, Any]  # this variant's entry of report.json (numbers, not yet text)

    @property
    def name(self) -> str:
        return self.result.variant.name


@dataclass(frozen=True)
class Findings:
    diagnosis: Diagnosis
    variants: list[VariantFindings]
    blocks: list[str]  # the block types any variant's model has, in BLOCK_TYPES order
    overflow: float  # overflow_lambda at the diagnosis's sequence length


def variant_findings(result: VariantResult) -> VariantFindings:
    steps = result.steps
    blocks = block_series(steps, result.params)
    by_block = {
        name.removeprefix("grad_norm[").removesuffix("]"): values
        for name, values in blocks.items()
        if name != "grad_norm"
    }
    hcl = hcl_series(steps)
    explosion = result.explosion
    summary = {
        "name": result.variant.name,
        "settings": result.variant.settings(),
        "healthy": result.healthy,
        "explosion": None if explosion is None else to_dict(explosion),
        "steps_run": len(steps),
        "stop_reason": result.stop_reason,
        "seconds": round(result.seconds, 3),
        "first_loss": steps[0].loss if steps else math.nan,
        "final_loss": steps[-1].loss if steps else math.nan,
        "max_grad_norm": nanmax(blocks["grad_norm"]),
        "max_grad_norm_by_block": {name: nanmax(values) for name, values in by_block.items()},
        "max_grad_norm_by_layer": {
            "embedding" if layer is None else str(layer): nanmax(values)
            for layer, values in layer_series(steps, result.params).items()
        },
        "max_abs_activation_by_module": {
            site.name: nanmax(s.activations[i][0] for s in steps) for i, site in enumerate(result.sites)
        },
        "hcl": {
            str(layer): {
                "first_step_lambda_nonneg": next(
                    (s.step for s, frac in zip(steps, series["frac_nonneg"], strict=True) if frac > 0), None
                ),
                "max_lambda": nanmax(series["max_lambda"]),
                "max_frac_nonneg": nanmax(series["frac_nonneg"]),
                "max_abs_h": nanmax(series["max_abs_h"]),
            }
            for layer, series in hcl.items()
        },
        "series": {
            "loss": [s.loss for s in steps],
            "lr": [s.lr for s in steps],
            **blocks,
            **{
                f"hcl[{layer}].{key}": values
                for layer, series in hcl.items()
                for key, values in series.items()
            },
        },
    }
    return VariantFindings(result, blocks, by_block, hcl, summary)


def findings(diagnosis: Diagnosis) -> Findings:
    blocks = [b for b in BLOCK_TYPES if any(p.block == b for v in diagnosis.variants for p in v.params)]
    variants = [variant_findings(v) for v in diagnosis.variants]
    return Findings(diagnosis, variants, blocks, overflow_lambda(diagnosis.seq_len))


# ---------------------------------------------------------------- short texts (terminal and HTML)


def fmt(value: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def explosion_text(result: VariantResult) -> str:
    e = result.explosion
    if e is None:
        return "healthy"
    where = f"layer {e.layer} ({e.block})" if e.layer is not None else e.block
    return f"step {e.step}: {e.problem} in {e.series}; started {where}, {e.parameter or e.site} [{e.origin}]"


def nonneg_text(hcl: Iterable[dict[str, Any]]) -> str:
    """Largest fraction of hcl modes with lambda >= 0, and the first step any was."""
    hcl = list(hcl)
    if not hcl:
        return "-"
    firsts = [h["first_step_lambda_nonneg"] for h in hcl if h["first_step_lambda_nonneg"] is not None]
    text = f"{100 * nanmax(h['max_frac_nonneg'] for h in hcl):.0f}%"
    return f"{text} from step {min(firsts)}" if firsts else text
