"""The summary a diagnosis prints: the verdict per variant, the largest gradient norm per block type and
where each explosion started, as rich tables."""

from __future__ import annotations

import math

from rich.table import Table

from evo2_cli.diagnose.report.findings import Findings, fmt, nanmax, nonneg_text


def summary_tables(found: Findings) -> list[Table]:
    diagnosis = found.diagnosis
    table = Table(title=f"diagnose-grads: {diagnosis.source}, L = {diagnosis.seq_len}, {diagnosis.device}")
    for column in ("variant", "verdict", "steps", "loss", "max grad", "hcl max λ", "λ>=0", "max |h|"):
        table.add_column(column, overflow="fold")  # wrap, never cut, on a narrow terminal
    for f in found.variants:
        v, s = f.result, f.summary
        hcl = s["hcl"].values()
        verdict = "[green]healthy[/]" if v.explosion is None else f"[bold red]EXPLODED[/] @{v.explosion.step}"
        table.add_row(
            f.name,
            verdict,
            f"{s['steps_run']}" + ("*" if v.stop_reason == "non-finite" else ""),
            f"{fmt(s['first_loss'], 3)}→{fmt(s['final_loss'], 3)}",
            fmt(s["max_grad_norm"], 2),
            fmt(nanmax(h["max_lambda"] for h in hcl), 2),
            nonneg_text(hcl),
            fmt(nanmax(h["max_abs_h"] for h in hcl), 2),
        )
    if any(v.stop_reason == "non-finite" for v in diagnosis.variants):
        table.caption = "* stopped early: the loss or the weights went non-finite"
    blocks = Table(title="largest gradient norm per block type (before clipping)")
    blocks.add_column("variant", overflow="fold")
    for b in found.blocks:
        blocks.add_column(b, justify="right")
    for f in found.variants:
        largest = f.summary["max_grad_norm_by_block"]
        blocks.add_row(f.name, *(fmt(largest.get(b, math.nan), 2) for b in found.blocks))
    tables = [table, blocks]
    exploded = [v for v in diagnosis.variants if v.explosion is not None]
    if exploded:
        why = Table(title="where each explosion started", show_lines=True)
        for column in ("variant", "step", "layer", "parameter", "why"):
            why.add_column(column, overflow="fold")
        for v in exploded:
            e = v.explosion
            layer = f"{e.layer} ({e.block})" if e.layer is not None else e.block or "-"
            why.add_row(v.variant.name, str(e.step), layer, e.parameter or e.site or "-", e.detail)
        tables.append(why)
    return tables
