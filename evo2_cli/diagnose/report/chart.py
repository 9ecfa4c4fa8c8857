"""The charts: one renderer of small line charts as SVG (no dependency) for report.html, and the PNG files
drawn with matplotlib when it is installed (the `plot` extra)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from evo2_cli.diagnose.posthoc import RunReview
from evo2_cli.diagnose.report.findings import Findings, VariantFindings
from evo2_cli.diagnose.run import VariantResult


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


def explosion_marks(result: VariantResult) -> list[tuple[float, str]]:
    return (
        []
        if result.explosion is None
        else [(result.explosion.step, f"explosion (step {result.explosion.step})")]
    )


def variant_charts(found: Findings) -> list[str]:
    """Per variant: gradient norm per block type, and max lambda per hcl layer (when it has hcl layers)."""
    charts = []
    for f in found.variants:
        marks = explosion_marks(f.result)
        charts.append(
            svg_chart(f.by_block, f"{f.name}: gradient norm per block type", "log10", marks, log=True)
        )
        lam = {f"layer {layer}": s["max_lambda"] for layer, s in f.hcl.items()}
        if lam:
            charts.append(
                svg_chart(
                    lam,
                    f"{f.name}: max lambda per hcl layer",
                    "lambda",
                    marks,
                    hlines=[(0.0, "0"), (found.overflow, "fp32 overflow 88.7/(L-1)")],
                )
            )
    return charts


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


def _panels(plt, variants: Sequence[VariantFindings], path: Path, y_label: str, draw) -> None:
    """One panel per variant side by side, sharing the y axis; `draw(ax, variant)` plots a panel's lines."""
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.8), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], variants, strict=True):
        draw(ax, v)
        ax.set_title(v.name)
        _step_axis(ax)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(y_label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(found: Findings, directory: Path) -> list[str]:
    """grad_norms.png and hcl_lambda.png; [] when matplotlib is not installed (the `plot` extra)."""
    plt = pyplot()
    if plt is None:
        return []
    variants = found.variants

    def grad_norms(ax, f: VariantFindings) -> None:
        lines, v = f.by_block, f.result
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

    def hcl_lambda(ax, f: VariantFindings) -> None:
        for layer, series in f.hcl.items():
            ax.plot(range(len(series["max_lambda"])), series["max_lambda"], label=f"layer {layer} max λ")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.axhline(
            found.overflow, color="red", linestyle="--", linewidth=0.8, label="fp32 overflow 88.7/(L-1)"
        )
        ax.set_yscale("symlog", linthresh=1e-4)

    _panels(plt, variants, directory / "grad_norms.png", "gradient norm (before clipping)", grad_norms)
    if not any(f.hcl for f in found.variants):
        return ["grad_norms.png"]
    _panels(plt, variants, directory / "hcl_lambda.png", "max λ over modes", hcl_lambda)
    return ["grad_norms.png", "hcl_lambda.png"]


def write_review_plot(review: RunReview, path: Path) -> bool:
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
