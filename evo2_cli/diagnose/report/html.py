"""report.html: one self-contained page (the summary, where each explosion started, the charts as inline
SVG, the config); the page and table helpers the post-hoc review's page uses too."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from evo2_cli.config import to_dict
from evo2_cli.diagnose.report.chart import variant_charts
from evo2_cli.diagnose.report.findings import Findings, explosion_text, fmt, nanmax, nonneg_text
from evo2_cli.diagnose.report.jsonfile import finite_or_text

_STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    ".ok{color:#2a7a2a;font-weight:bold}.bad{color:#b22;font-weight:bold}svg{margin:4px}"
    "pre{background:#f6f6f6;padding:8px;overflow:auto}"
)


def html_page(body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>evo2 diagnose-grads</title>"
        f"<style>{_STYLE}</style></head><body><h1>evo2 diagnose-grads</h1>{body}</body></html>"
    )


def table_html(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(found: Findings) -> str:
    diagnosis, overflow = found.diagnosis, found.overflow
    exploded = [f.name for f in found.variants if not f.result.healthy]
    verdict = (
        '<p class="ok">Every variant stayed healthy (exit code 0).</p>'
        if diagnosis.healthy
        else f'<p class="bad">Explosion in: {html.escape(", ".join(exploded))} (exit code 3).</p>'
    )
    rows = []
    for f in found.variants:
        s = f.summary
        hcl = s["hcl"].values()
        rows.append(
            (
                f.name,
                explosion_text(f.result),
                s["steps_run"],
                f"{fmt(s['first_loss'], 4)} → {fmt(s['final_loss'], 4)}",
                fmt(s["max_grad_norm"]),
                fmt(nanmax(h["max_lambda"] for h in hcl)),
                nonneg_text(hcl),
            )
        )
    details = "".join(
        f"<li><b>{html.escape(v.variant.name)}</b>: {html.escape(v.explosion.detail)}</li>"
        for v in diagnosis.variants
        if v.explosion is not None
    )
    config = finite_or_text(to_dict(diagnosis.job))
    charts = zip(*variant_charts(found).values(), strict=True)  # every variant has the same layers
    header = ("variant", "verdict", "steps", "loss", "max grad norm", "hcl max λ", "λ≥0")
    return html_page(
        f"<p>{html.escape(diagnosis.source)}; sequence length {diagnosis.seq_len}; "
        f"{html.escape(diagnosis.device)}; "
        f"fp32 overflow of exp(λt) once λ &gt; {overflow:.4g}.</p>{verdict}"
        + table_html(header, rows)
        + (f"<h2>Where it started</h2><ul>{details}</ul>" if details else "")
        + f"<h2>Charts</h2><div>{''.join(svg for per_variant in charts for svg in per_variant)}</div>"
        "<h2>Config</h2><pre>" + html.escape(json.dumps(config, indent=1)) + "</pre>"
    )
