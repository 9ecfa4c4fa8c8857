"""What the post-hoc review of a run (posthoc.py) writes, in the formats of a diagnosis report:

report.json       the detector settings, every spike (step, problem, grad norm, running median, ratio),
                  every checkpoint's hcl pole statistics and the logged series
steps.csv         one row per logged step: loss, lr, grad norm, skipped by the guard, problem
checkpoints.csv   one row per checkpoint and hcl layer
grad_norm.svg     the logged gradient norm with the spikes marked
report.html       the verdict, the spikes and the same chart
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from evo2_cli.config import to_dict
from evo2_cli.diagnose.posthoc import RunReview
from evo2_cli.diagnose.report import REPORT_DIR, REVIEW_FILES
from evo2_cli.diagnose.report.chart import svg_chart, write_svg
from evo2_cli.diagnose.report.csvfiles import write_csv
from evo2_cli.diagnose.report.findings import fmt, nanmax
from evo2_cli.diagnose.report.html import html_page, table_html
from evo2_cli.diagnose.report.jsonfile import HEADER, finite_or_text, write_json
from evo2_cli.fsio import atomic_output_dir


def review_data(review: RunReview) -> dict[str, Any]:
    s = review.settings
    return finite_or_text(
        {
            **HEADER,
            "mode": "run",
            "run_dir": str(review.run_dir),
            "healthy": review.healthy,
            "seq_len": review.seq_len,
            "detector": {
                "spike_factor": s.spike_factor,
                "median_window": s.median_window,
                "spike_warmup": s.warmup_steps,
            },
            "logged_steps": len(review.steps),
            "spikes": [{**to_dict(spike), "ratio": spike.ratio} for spike in review.spikes],
            "checkpoints": [
                {
                    "step": c.step,
                    "path": str(c.path),
                    "param_norm": c.param_norm,
                    "nonfinite_params": c.nonfinite_params,
                    "hcl": {str(layer): to_dict(h) for layer, h in c.hcl.items()},
                }
                for c in review.checkpoints
            ],
            "series": {
                "step": [x.step for x in review.steps],
                "loss": [x.loss for x in review.steps],
                "grad_norm": [x.grad_norm for x in review.steps],
            },
        }
    )


def review_tables(review: RunReview) -> list[Table]:
    n = len(review.spikes)
    verdict = "[green]no spikes[/]" if review.healthy else f"[bold red]{n} spike(s)[/]"
    spikes = Table(title=f"{review.run_dir}: {len(review.steps)} logged steps, {verdict}")
    for column in ("step", "problem", "grad norm", "x running median", "loss", "skipped by the guard"):
        spikes.add_column(column, justify="right")
    for spike in review.spikes:
        spikes.add_row(
            str(spike.step),
            spike.problem,
            fmt(spike.grad_norm),
            fmt(spike.ratio, 2) if math.isfinite(spike.ratio) else "-",
            fmt(spike.loss, 4),
            "yes" if spike.skipped else "no",
        )
    if review.healthy:
        spikes.caption = (
            f"no logged step is non-finite or above {review.settings.spike_factor:g}x its running median"
        )
    tables = [spikes]
    if review.checkpoints:
        ckpts = Table(title="checkpoints (hcl poles at the run's sequence length)")
        for column in ("step", "param norm", "non-finite", "hcl max λ", "λ>=0", "max |h|"):
            ckpts.add_column(column, justify="right")
        for c in review.checkpoints:
            hcl = c.hcl.values()
            ckpts.add_row(
                str(c.step),
                fmt(c.param_norm),
                str(c.nonfinite_params),
                fmt(nanmax(h.max_lambda for h in hcl)),
                f"{100 * nanmax(h.frac_nonneg for h in hcl):.0f}%" if hcl else "-",
                fmt(nanmax(h.max_abs_h for h in hcl)),
            )
        tables.append(ckpts)
    return tables


def write_review(review: RunReview, directory: Path, overwrite: bool = False) -> list[str]:
    """Write the post-hoc outputs into `directory` atomically; returns the file names written."""
    flagged = {spike.step: spike for spike in review.spikes}
    with atomic_output_dir(Path(directory), REPORT_DIR, overwrite=overwrite) as tmp:
        write_json(tmp / "report.json", review_data(review))
        write_csv(
            tmp / "steps.csv",
            ["step", "loss", "lr", "grad_norm", "skipped", "problem"],
            (
                [
                    x.step,
                    x.loss,
                    x.lr,
                    x.grad_norm,
                    int(x.skipped),
                    getattr(flagged.get(x.step), "problem", ""),
                ]
                for x in review.steps
            ),
        )
        write_csv(
            tmp / "checkpoints.csv",
            ["step", "param_norm", "nonfinite_params", "layer", "max_lambda", "frac_nonneg", "max_abs_h"],
            (
                [c.step, c.param_norm, c.nonfinite_params, layer, h.max_lambda, h.frac_nonneg, h.max_abs_h]
                for c in review.checkpoints
                for layer, h in c.hcl.items()
            ),
        )
        chart = svg_chart(
            {"grad norm": [x.grad_norm for x in review.steps]},
            "gradient norm per logged step",
            "log10",
            [(i, "spike") for i, x in enumerate(review.steps) if x.step in flagged],
            log=True,
        )
        verdict = (
            '<p class="ok">No spikes (exit code 0).</p>'
            if review.healthy
            else f'<p class="bad">{len(review.spikes)} spike(s) (exit code 3).</p>'
        )
        spikes = table_html(
            ("step", "problem", "grad norm", "loss", "skipped"),
            ((s.step, s.problem, fmt(s.grad_norm), fmt(s.loss, 4), s.skipped) for s in review.spikes),
        )
        page = f"<p>run {html.escape(str(review.run_dir))}</p>{verdict}{spikes}<div>{chart}</div>"
        (tmp / "report.html").write_text(html_page(page), encoding="utf-8")
        write_svg(tmp / "grad_norm.svg", [chart])
    return [*REVIEW_FILES, "grad_norm.svg"]
