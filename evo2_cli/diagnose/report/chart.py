"""The charts: one renderer of small line charts as SVG (no dependency), drawn inline in report.html and
written as standalone .svg files (the charts of one kind side by side)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from evo2_cli.diagnose.report.findings import Findings


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


def variant_charts(found: Findings) -> dict[str, list[str]]:
    """Per chart file, one chart per variant: gradient norm per block type, and max lambda per hcl layer
    (only when some variant has hcl layers)."""
    charts: dict[str, list[str]] = {"grad_norms.svg": [], "hcl_lambda.svg": []}
    for f in found.variants:
        e = f.result.explosion
        marks = [] if e is None else [(e.step, f"explosion (step {e.step})")]
        title = f"{f.name}: gradient norm per block type"
        charts["grad_norms.svg"].append(svg_chart(f.by_block, title, "log10", marks, log=True))
        lam = {f"layer {layer}": s["max_lambda"] for layer, s in f.hcl.items()}
        if lam:
            hlines = [(0.0, "0"), (found.overflow, "fp32 overflow 88.7/(L-1)")]
            title = f"{f.name}: max lambda per hcl layer"
            charts["hcl_lambda.svg"].append(svg_chart(lam, title, "lambda", marks, hlines=hlines))
    return {name: drawn for name, drawn in charts.items() if drawn}


def write_svg(path: Path, charts: Sequence[str], width: int = 460, height: int = 260) -> None:
    """`charts` (svg_chart's, of that size) side by side in one standalone SVG file."""
    panels = "".join(f'<g transform="translate({width * i},0)">{c}</g>' for i, c in enumerate(charts))
    size = f'width="{width * len(charts)}" height="{height}"'
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" {size}>{panels}</svg>'
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n{svg}\n', encoding="utf-8")
