"""The per-step CSVs of a diagnosis: steps.csv, parameters.csv, activations.csv, hcl.csv."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from evo2_cli.diagnose.report.findings import Findings, nanmax


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _step_rows(found: Findings):
    for v in found.variants:
        steps = v.result.steps
        for n, s in enumerate(steps):
            hcl = list(s.hcl.values())
            yield [
                v.name,
                s.step,
                s.lr,
                s.loss,
                s.grad_norm,
                *(v.grad_norms.get(f"grad_norm[{b}]", [math.nan] * len(steps))[n] for b in found.blocks),
                nanmax(s.update_ratio),
                sum(s.grad_nonfinite),
                sum(s.param_nonfinite),
                nanmax(h.max_lambda for h in hcl),
                nanmax(h.frac_nonneg for h in hcl),
                nanmax(h.max_abs_h for h in hcl),
                nanmax(a[0] for a in s.activations),
            ]


def write_csvs(found: Findings, directory: Path) -> None:
    variants = [v.result for v in found.variants]
    write_csv(
        directory / "steps.csv",
        [
            "variant",
            "step",
            "lr",
            "loss",
            "grad_norm",
            *(f"grad_norm_{b}" for b in found.blocks),
            "max_update_ratio",
            "nonfinite_grads",
            "nonfinite_params",
            "hcl_max_lambda",
            "hcl_frac_nonneg",
            "hcl_max_abs_h",
            "max_abs_activation",
        ],
        _step_rows(found),
    )
    write_csv(
        directory / "parameters.csv",
        [
            "variant",
            "step",
            "parameter",
            "layer",
            "block",
            "kind",
            "grad_norm",
            "param_norm",
            "update_ratio",
            "nonfinite_grad",
            "nonfinite_param",
        ],
        (
            [
                v.variant.name,
                s.step,
                p.name,
                "" if p.layer is None else p.layer,
                p.block,
                p.kind,
                s.grad[i],
                s.param_norm[i],
                s.update_ratio[i],
                s.grad_nonfinite[i],
                s.param_nonfinite[i],
            ]
            for v in variants
            for s in v.steps
            for i, p in enumerate(v.params)
        ),
    )
    write_csv(
        directory / "activations.csv",
        ["variant", "step", "module", "layer", "block", "role", "max_abs", "rms", "nonfinite"],
        (
            [
                v.variant.name,
                s.step,
                site.name,
                "" if site.layer is None else site.layer,
                site.block,
                site.role,
                *s.activations[i],
            ]
            for v in variants
            for s in v.steps
            for i, site in enumerate(v.sites)
        ),
    )
    write_csv(
        directory / "hcl.csv",
        ["variant", "step", "layer", "max_lambda", "frac_nonneg", "max_abs_h"],
        (
            [v.variant.name, s.step, layer, h.max_lambda, h.frac_nonneg, h.max_abs_h]
            for v in variants
            for s in v.steps
            for layer, h in s.hcl.items()
        ),
    )
