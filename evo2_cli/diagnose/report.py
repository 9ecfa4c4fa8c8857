"""What a diagnosis writes: report.json, per-step CSVs, PNG plots (when matplotlib is installed), report.html
(self-contained, charts as inline SVG), and the rich summary tables printed in the terminal.

    report.json       verdict, config, model, per-variant explosion (step, layer, parameter, why),
                      summaries and the main per-step series (non-finite numbers written as the strings
                      "nan", "inf", "-inf")
    steps.csv         one row per variant and step: loss, lr, total and per-block-type gradient norms,
                      largest update ratio, non-finite counts, hcl pole summary, largest activation
    parameters.csv    one row per variant, step and parameter: layer, block type, kind, gradient norm,
                      parameter norm, update-to-parameter ratio, non-finite gradient / parameter entries
    activations.csv   one row per variant, step and watched module: max |x|, rms, non-finite entries
    hcl.csv           one row per variant, step and hcl layer: max lambda, fraction of modes with lambda >= 0,
                      max |h[t]|
    grad_norms.png    gradient norm per block type over steps, log scale, one panel per variant
    hcl_lambda.png    max lambda of each hcl layer over steps, with the fp32 overflow line 88.72 / (L - 1)
    report.html       all of the above in one file
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from evo2_cli import __version__
from evo2_cli.config import to_dict
from evo2_cli.diagnose.detect import block_series
from evo2_cli.diagnose.posthoc import RunReview
from evo2_cli.diagnose.record import StepRecord, group_norm
from evo2_cli.diagnose.run import Diagnosis, VariantResult
from evo2_cli.errors import InputError
from evo2_cli.fsio import atomic_output_dir, check_replaceable, directory_kind, json_listing
from evo2_cli.train.origin import BLOCK_TYPES, FP32_EXP_LIMIT, ParamInfo

REPORT_FILES = ("report.json", "steps.csv", "parameters.csv", "activations.csv", "hcl.csv", "report.html")


# ---------------------------------------------------------------- plain data


def finite_or_text(value: Any) -> Any:
    """JSON-safe: non-finite floats become "nan", "inf" or "-inf"; containers are converted recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(v) for v in value]
    return value


def _nanmax(values: Iterable[float]) -> float:
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


def present_blocks(diagnosis: Diagnosis) -> list[str]:
    """The block types any variant's model has, in BLOCK_TYPES order."""
    return [b for b in BLOCK_TYPES if any(p.block == b for v in diagnosis.variants for p in v.params)]


def by_block(blocks: dict[str, list[float]]) -> dict[str, list[float]]:
    """block_series without the total: {"hcl": [...], "mlp": [...]}."""
    return {
        name.removeprefix("grad_norm[").removesuffix("]"): values
        for name, values in blocks.items()
        if name != "grad_norm"
    }


def hcl_series(result: VariantResult) -> dict[int, dict[str, list[float]]]:
    layers = sorted({layer for s in result.steps for layer in s.hcl})
    return {
        layer: {
            "max_lambda": [s.hcl[layer].max_lambda for s in result.steps],
            "frac_nonneg": [s.hcl[layer].frac_nonneg for s in result.steps],
            "max_abs_h": [s.hcl[layer].max_abs_h for s in result.steps],
        }
        for layer in layers
    }


def layer_series(steps: Sequence[StepRecord], params: Sequence[ParamInfo]) -> dict[int | None, list[float]]:
    """Gradient norm of each layer (None: the embedding and final norm), per step."""
    layers: dict[int | None, list[int]] = {}
    for i, p in enumerate(params):
        layers.setdefault(p.layer, []).append(i)
    return {layer: [group_norm(s.grad, members) for s in steps] for layer, members in layers.items()}


def variant_summary(result: VariantResult) -> dict[str, Any]:
    steps = result.steps
    blocks = block_series(steps, result.params)
    hcl = hcl_series(result)
    explosion = result.explosion
    return {
        "name": result.variant.name,
        "settings": result.variant.settings(),
        "healthy": result.healthy,
        "explosion": None if explosion is None else to_dict(explosion),
        "steps_run": len(steps),
        "stop_reason": result.stop_reason,
        "seconds": round(result.seconds, 3),
        "first_loss": steps[0].loss if steps else math.nan,
        "final_loss": steps[-1].loss if steps else math.nan,
        "max_grad_norm": _nanmax(blocks["grad_norm"]),
        "max_grad_norm_by_block": {name: _nanmax(values) for name, values in by_block(blocks).items()},
        "max_grad_norm_by_layer": {
            "embedding" if layer is None else str(layer): _nanmax(values)
            for layer, values in layer_series(steps, result.params).items()
        },
        "max_abs_activation_by_module": {
            site.name: _nanmax(s.activations[i][0] for s in steps) for i, site in enumerate(result.sites)
        },
        "hcl": {
            str(layer): {
                "first_step_lambda_nonneg": next(
                    (s.step for s, frac in zip(steps, series["frac_nonneg"], strict=True) if frac > 0), None
                ),
                "max_lambda": _nanmax(series["max_lambda"]),
                "max_frac_nonneg": _nanmax(series["frac_nonneg"]),
                "max_abs_h": _nanmax(series["max_abs_h"]),
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


# The first fields of both modes' report.json.
_HEADER = {"tool": "evo2-cli", "version": __version__, "command": "diagnose-grads"}


def report_data(diagnosis: Diagnosis, summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """report.json; `summaries` are the variants' variant_summary, in order."""
    seq_len = diagnosis.seq_len
    return finite_or_text(
        {
            **_HEADER,
            "healthy": diagnosis.healthy,
            "exploded": [v.variant.name for v in diagnosis.variants if not v.healthy],
            "device": diagnosis.device,
            "source": diagnosis.source,
            "seq_len": seq_len,
            "overflow_lambda": overflow_lambda(seq_len),
            "model": to_dict(diagnosis.model_config),
            "config": to_dict(diagnosis.job),
            "variants": list(summaries),
        }
    )


# ---------------------------------------------------------------- CSV


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_csvs(diagnosis: Diagnosis, directory: Path) -> None:
    blocks = present_blocks(diagnosis)

    def step_rows():
        for v in diagnosis.variants:
            series = block_series(v.steps, v.params)
            for n, s in enumerate(v.steps):
                hcl = list(s.hcl.values())
                yield [
                    v.variant.name,
                    s.step,
                    s.lr,
                    s.loss,
                    s.grad_norm,
                    *(series.get(f"grad_norm[{b}]", [math.nan] * len(v.steps))[n] for b in blocks),
                    _nanmax(s.update_ratio),
                    sum(s.grad_nonfinite),
                    sum(s.param_nonfinite),
                    _nanmax(h.max_lambda for h in hcl),
                    _nanmax(h.frac_nonneg for h in hcl),
                    _nanmax(h.max_abs_h for h in hcl),
                    _nanmax(a[0] for a in s.activations),
                ]

    _write_csv(
        directory / "steps.csv",
        [
            "variant",
            "step",
            "lr",
            "loss",
            "grad_norm",
            *(f"grad_norm_{b}" for b in blocks),
            "max_update_ratio",
            "nonfinite_grads",
            "nonfinite_params",
            "hcl_max_lambda",
            "hcl_frac_nonneg",
            "hcl_max_abs_h",
            "max_abs_activation",
        ],
        step_rows(),
    )
    _write_csv(
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
            for v in diagnosis.variants
            for s in v.steps
            for i, p in enumerate(v.params)
        ),
    )
    _write_csv(
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
            for v in diagnosis.variants
            for s in v.steps
            for i, site in enumerate(v.sites)
        ),
    )
    _write_csv(
        directory / "hcl.csv",
        ["variant", "step", "layer", "max_lambda", "frac_nonneg", "max_abs_h"],
        (
            [v.variant.name, s.step, layer, h.max_lambda, h.frac_nonneg, h.max_abs_h]
            for v in diagnosis.variants
            for s in v.steps
            for layer, h in s.hcl.items()
        ),
    )


# ---------------------------------------------------------------- terminal


def _fmt(value: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def explosion_text(result: VariantResult) -> str:
    e = result.explosion
    if e is None:
        return "healthy"
    where = f"layer {e.layer} ({e.block})" if e.layer is not None else e.block
    return f"step {e.step}: {e.problem} in {e.series}; started {where}, {e.parameter or e.site} [{e.origin}]"


def _nonneg_text(hcl: Iterable[dict[str, Any]]) -> str:
    """Largest fraction of hcl modes with lambda >= 0, and the first step any was."""
    hcl = list(hcl)
    if not hcl:
        return "-"
    firsts = [h["first_step_lambda_nonneg"] for h in hcl if h["first_step_lambda_nonneg"] is not None]
    text = f"{100 * _nanmax(h['max_frac_nonneg'] for h in hcl):.0f}%"
    return f"{text} from step {min(firsts)}" if firsts else text


def summary_tables(diagnosis: Diagnosis) -> list[Table]:
    """The verdict per variant, the largest gradient norm per block type, and where each explosion started."""
    table = Table(title=f"diagnose-grads: {diagnosis.source}, L = {diagnosis.seq_len}, {diagnosis.device}")
    for column in ("variant", "verdict", "steps", "loss", "max grad", "hcl max λ", "λ>=0", "max |h|"):
        table.add_column(column, overflow="fold")  # wrap, never cut, on a narrow terminal
    summaries = [variant_summary(v) for v in diagnosis.variants]
    for v, s in zip(diagnosis.variants, summaries, strict=True):
        hcl = s["hcl"].values()
        verdict = "[green]healthy[/]" if v.explosion is None else f"[bold red]EXPLODED[/] @{v.explosion.step}"
        table.add_row(
            v.variant.name,
            verdict,
            f"{s['steps_run']}" + ("*" if v.stop_reason == "non-finite" else ""),
            f"{_fmt(s['first_loss'], 3)}→{_fmt(s['final_loss'], 3)}",
            _fmt(s["max_grad_norm"], 2),
            _fmt(_nanmax(h["max_lambda"] for h in hcl), 2),
            _nonneg_text(hcl),
            _fmt(_nanmax(h["max_abs_h"] for h in hcl), 2),
        )
    if any(v.stop_reason == "non-finite" for v in diagnosis.variants):
        table.caption = "* stopped early: the loss or the weights went non-finite"
    blocks = Table(title="largest gradient norm per block type (before clipping)")
    present = present_blocks(diagnosis)
    blocks.add_column("variant", overflow="fold")
    for b in present:
        blocks.add_column(b, justify="right")
    for v, s in zip(diagnosis.variants, summaries, strict=True):
        largest = s["max_grad_norm_by_block"]
        blocks.add_row(v.variant.name, *(_fmt(largest.get(b, math.nan), 2) for b in present))
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


# ---------------------------------------------------------------- charts


def _log_values(values: Sequence[float]) -> list[float | None]:
    return [math.log10(v) if math.isfinite(v) and v > 0 else None for v in values]


def _svg(tag: str, text: str | None = None, **attrs: object) -> str:
    """One SVG element; attribute names use '_' for '-' (stroke_width -> stroke-width)."""
    attributes = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    if text is None:
        return f"<{tag} {attributes}/>"
    return f"<{tag} {attributes}>{html.escape(text)}</{tag}>"


def svg_chart(
    lines: dict[str, Sequence[float | None]],
    title: str,
    y_label: str,
    marks: Sequence[tuple[float, str]] = (),
    hlines: Sequence[tuple[float, str]] = (),
    log: bool = False,
    width: int = 460,
    height: int = 260,
) -> str:
    """A small line chart as inline SVG (no dependency). `marks`: vertical lines at x; `hlines`: horizontal
    lines at y (in data units). None or non-finite points break a line."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    data = {
        k: (_log_values(v) if log else [x if x is not None and math.isfinite(x) else None for x in v])
        for k, v in lines.items()
    }
    hl = [((math.log10(y) if log and y > 0 else y), label) for y, label in hlines if not log or y > 0]
    ys = [y for v in data.values() for y in v if y is not None] + [y for y, _ in hl]
    n = max((len(v) for v in data.values()), default=1)
    left, right, top, bottom = 56, 10, 24, 34
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
        'font-family="sans-serif">',
        _svg("text", title, x=width / 2, y=14, text_anchor="middle", font_weight="bold"),
    ]
    if not ys:
        out.append(_svg("text", "no finite values", x=width / 2, y=height / 2, text_anchor="middle"))
        return "".join([*out, "</svg>"])
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def px(i: float) -> str:
        return f"{left + (width - left - right) * (i / max(n - 1, 1)):.1f}"

    def py(y: float) -> str:
        return f"{top + (height - top - bottom) * (1 - (y - lo) / (hi - lo)):.1f}"

    frame = dict(width=width - left - right, height=height - top - bottom)
    out.append(_svg("rect", x=left, y=top, **frame, fill="none", stroke="#999"))
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        label = f"1e{y:.1f}" if log else f"{y:.3g}"
        out.append(_svg("text", label, x=left - 4, y=f"{float(py(y)) + 4:.1f}", text_anchor="end"))
    out.append(_svg("text", "step 0", x=left, y=height - 6))
    out.append(_svg("text", f"step {n - 1}  ({y_label})", x=width - right, y=height - 6, text_anchor="end"))
    for y, label in hl:
        dash = dict(stroke="#888", stroke_dasharray="4 3")
        out.append(_svg("line", x1=left, x2=width - right, y1=py(y), y2=py(y), **dash))
        out.append(_svg("text", label, x=width - right - 2, y=py(y), text_anchor="end", fill="#666"))
    for x, label in marks:
        dash = dict(stroke="#d62728", stroke_dasharray="2 2")
        out.append(_svg("line", x1=px(x), x2=px(x), y1=top, y2=height - bottom, **dash))
        out.append(_svg("text", label, x=f"{float(px(x)) + 3:.1f}", y=top + 10, fill="#d62728"))
    for j, (name, values) in enumerate(data.items()):
        color = colors[j % len(colors)]
        segments: list[list[tuple[str, str]]] = [[]]
        for i, y in enumerate(values):
            if y is None:
                segments.append([])
            else:
                segments[-1].append((px(i), py(y)))
        for seg in segments:
            if len(seg) == 1:
                out.append(_svg("circle", cx=seg[0][0], cy=seg[0][1], r=2, fill=color))
            elif seg:
                points = " ".join(f"{x},{y}" for x, y in seg)
                out.append(_svg("polyline", fill="none", stroke=color, stroke_width=1.5, points=points))
        legend = dict(x=left + 6 + 80 * (j % 5), y=top + 14 + 12 * (j // 5), fill=color)
        out.append(_svg("text", name, **legend))
    out.append("</svg>")
    return "".join(out)


def _grad_lines(result: VariantResult) -> dict[str, list[float]]:
    return by_block(block_series(result.steps, result.params))


def _explosion_marks(result: VariantResult) -> list[tuple[float, str]]:
    return (
        []
        if result.explosion is None
        else [(result.explosion.step, f"explosion (step {result.explosion.step})")]
    )


def html_report(diagnosis: Diagnosis, data: dict[str, Any], summaries: Sequence[dict[str, Any]]) -> str:
    """report.html from report_data's `data` and the `summaries` it was made of (numbers not yet text)."""
    overflow = overflow_lambda(diagnosis.seq_len)
    verdict = (
        '<p class="ok">Every variant stayed healthy (exit code 0).</p>'
        if diagnosis.healthy
        else f'<p class="bad">Explosion in: {html.escape(", ".join(data["exploded"]))} (exit code 3).</p>'
    )
    rows = []
    for v, s in zip(diagnosis.variants, summaries, strict=True):
        hcl = s["hcl"].values()
        rows.append(
            (
                v.variant.name,
                explosion_text(v),
                s["steps_run"],
                f"{_fmt(s['first_loss'], 4)} → {_fmt(s['final_loss'], 4)}",
                _fmt(s["max_grad_norm"]),
                _fmt(_nanmax(h["max_lambda"] for h in hcl)),
                _nonneg_text(hcl),
            )
        )
    details = "".join(
        f"<li><b>{html.escape(v.variant.name)}</b>: {html.escape(v.explosion.detail)}</li>"
        for v in diagnosis.variants
        if v.explosion is not None
    )
    charts = []
    for v in diagnosis.variants:
        charts.append(
            svg_chart(
                _grad_lines(v),
                f"{v.variant.name}: gradient norm per block type",
                "log10",
                _explosion_marks(v),
                log=True,
            )
        )
        lam = {f"layer {layer}": s["max_lambda"] for layer, s in hcl_series(v).items()}
        if lam:
            charts.append(
                svg_chart(
                    lam,
                    f"{v.variant.name}: max lambda per hcl layer",
                    "lambda",
                    _explosion_marks(v),
                    hlines=[(0.0, "0"), (overflow, "fp32 overflow 88.7/(L-1)")],
                )
            )
    header = ("variant", "verdict", "steps", "loss", "max grad norm", "hcl max λ", "λ≥0")
    return _html_page(
        f"<p>{html.escape(diagnosis.source)}; sequence length {diagnosis.seq_len}; "
        f"{html.escape(diagnosis.device)}; "
        f"fp32 overflow of exp(λt) once λ &gt; {overflow:.4g}.</p>{verdict}"
        + _table_html(header, rows)
        + (f"<h2>Where it started</h2><ul>{details}</ul>" if details else "")
        + f"<h2>Charts</h2><div>{''.join(charts)}</div>"
        "<h2>Config</h2><pre>" + html.escape(json.dumps(data["config"], indent=1)) + "</pre>"
    )


_STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    ".ok{color:#2a7a2a;font-weight:bold}.bad{color:#b22;font-weight:bold}svg{margin:4px}"
    "pre{background:#f6f6f6;padding:8px;overflow:auto}"
)


def _html_page(body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>evo2 diagnose-grads</title>"
        f"<style>{_STYLE}</style></head><body><h1>evo2 diagnose-grads</h1>{body}</body></html>"
    )


def _table_html(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pyplot():
    """matplotlib.pyplot with the file-only backend, or None when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _log_y(ax, values: Iterable[float]) -> None:
    """Log y scale, unless nothing positive and finite is plotted (matplotlib cannot log-scale that)."""
    if any(math.isfinite(x) and x > 0 for x in values):
        ax.set_yscale("log")


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers


def _panels(plt, variants: Sequence[VariantResult], path: Path, y_label: str, draw) -> None:
    """One panel per variant side by side, sharing the y axis; `draw(ax, variant)` plots a panel's lines."""
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.8), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], variants, strict=True):
        draw(ax, v)
        ax.set_title(v.variant.name)
        _step_axis(ax)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(y_label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(diagnosis: Diagnosis, directory: Path) -> list[str]:
    """grad_norms.png and hcl_lambda.png; [] when matplotlib is not installed (the `plot` extra)."""
    plt = pyplot()
    if plt is None:
        return []
    variants = diagnosis.variants
    overflow = overflow_lambda(diagnosis.seq_len)

    def grad_norms(ax, v: VariantResult) -> None:
        lines = _grad_lines(v)
        for name, values in lines.items():
            ax.plot(
                range(len(values)),
                [x if math.isfinite(x) and x > 0 else math.nan for x in values],
                label=name,
            )
        if v.explosion is not None:
            label = f"explosion (step {v.explosion.step})"
            ax.axvline(v.explosion.step, color="red", linestyle=":", label=label)
        _log_y(ax, (x for values in lines.values() for x in values))

    def hcl_lambda(ax, v: VariantResult) -> None:
        for layer, series in hcl_series(v).items():
            ax.plot(range(len(series["max_lambda"])), series["max_lambda"], label=f"layer {layer} max λ")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.axhline(overflow, color="red", linestyle="--", linewidth=0.8, label="fp32 overflow 88.7/(L-1)")
        ax.set_yscale("symlog", linthresh=1e-4)

    _panels(plt, variants, directory / "grad_norms.png", "gradient norm (before clipping)", grad_norms)
    if not any(hcl_series(v) for v in variants):
        return ["grad_norms.png"]
    _panels(plt, variants, directory / "hcl_lambda.png", "max λ over modes", hcl_lambda)
    return ["grad_norms.png", "hcl_lambda.png"]


# ---------------------------------------------------------------- all outputs


def check_output_dir(directory: Path, overwrite: bool) -> None:
    """Refuse an output that may not be replaced before any training rather than after it."""
    directory = Path(directory)
    check_replaceable(directory, REPORT_DIR, overwrite)
    parent = directory.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"{directory}: cannot be created under {parent} (not a writable directory); choose another "
            "(-o / diagnose.output_dir)"
        )


def write_report(diagnosis: Diagnosis, directory: Path, overwrite: bool = False) -> list[str]:
    """Write every output into `directory` atomically; returns the file names written."""
    with atomic_output_dir(Path(directory), REPORT_DIR, overwrite=overwrite) as tmp:
        summaries = [variant_summary(v) for v in diagnosis.variants]
        data = report_data(diagnosis, summaries)
        (tmp / "report.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        write_csvs(diagnosis, tmp)
        (tmp / "report.html").write_text(html_report(diagnosis, data, summaries), encoding="utf-8")
        plots = write_plots(diagnosis, tmp) if diagnosis.job.diagnose.plots else []
    return [*REPORT_FILES, *plots]


# ---------------------------------------------------------------- post-hoc mode (an existing run)

REVIEW_FILES = ("report.json", "steps.csv", "checkpoints.csv", "report.html")
PLOT_FILES = ("grad_norms.png", "hcl_lambda.png", "grad_norm.png")
# What `--overwrite` may replace: a directory of our report.json and the files a report holds, nothing else.
REPORT_DIR = directory_kind(
    "a diagnose-grads report directory",
    "report.json",
    json_listing(
        "report.json",
        lambda data: data.get("tool") == _HEADER["tool"],
        {*REPORT_FILES, *REVIEW_FILES, *PLOT_FILES},
    ),
)


def review_data(review: RunReview) -> dict[str, Any]:
    s = review.settings
    return finite_or_text(
        {
            **_HEADER,
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
            _fmt(spike.grad_norm),
            _fmt(spike.ratio, 2) if math.isfinite(spike.ratio) else "-",
            _fmt(spike.loss, 4),
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
                _fmt(c.param_norm),
                str(c.nonfinite_params),
                _fmt(_nanmax(h.max_lambda for h in hcl)),
                f"{100 * _nanmax(h.frac_nonneg for h in hcl):.0f}%" if hcl else "-",
                _fmt(_nanmax(h.max_abs_h for h in hcl)),
            )
        tables.append(ckpts)
    return tables


def _write_review_plot(review: RunReview, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.8))
    steps = [x.step for x in review.steps]
    norms = [
        x.grad_norm if math.isfinite(x.grad_norm) and x.grad_norm > 0 else math.nan for x in review.steps
    ]
    ax.plot(steps, norms, label="grad norm (logged steps)")
    for spike in review.spikes:
        ax.axvline(spike.step, color="red", linestyle=":", linewidth=0.8)
    _log_y(ax, norms)
    _step_axis(ax)
    ax.set_ylabel("gradient norm (before clipping)")
    ax.set_title(f"{review.run_dir.name}: {len(review.spikes)} spike(s) (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_review(
    review: RunReview, directory: Path, overwrite: bool = False, plots: bool = True
) -> list[str]:
    """Write the post-hoc outputs into `directory` atomically; returns the file names written."""
    flagged = {spike.step: spike for spike in review.spikes}
    with atomic_output_dir(Path(directory), REPORT_DIR, overwrite=overwrite) as tmp:
        data = review_data(review)
        (tmp / "report.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        _write_csv(
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
        _write_csv(
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
        spikes = _table_html(
            ("step", "problem", "grad norm", "loss", "skipped"),
            ((s.step, s.problem, _fmt(s.grad_norm), _fmt(s.loss, 4), s.skipped) for s in review.spikes),
        )
        page = f"<p>run {html.escape(str(review.run_dir))}</p>{verdict}{spikes}<div>{chart}</div>"
        (tmp / "report.html").write_text(_html_page(page), encoding="utf-8")
        plotted = plots and _write_review_plot(review, tmp / "grad_norm.png")
    return [*REVIEW_FILES, *(["grad_norm.png"] if plotted else [])]
