"""Held-out bits per base against training tokens, from a run directory's metrics.jsonl: a PNG and a
Markdown table (step, tokens, val bits/base). Needs matplotlib (`pip install 'evo2-cli[plot]'`).

    python examples/ecoli/plot.py runs/ecoli/train docs/images/ecoli_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_at = {r["step"]: r["tokens_seen"] for r in records if r["kind"] == "train"}
    tokens_per_step = next(iter(tokens_at.values())) // next(iter(tokens_at))
    val = [
        (r["step"], r["step"] * tokens_per_step, r["val_bits_per_base"])
        for r in records
        if r["kind"] == "val"
    ]

    print("| step | tokens | val bits/base |\n| ---: | ---: | ---: |")
    for step, tokens, bits in val:
        print(f"| {step} | {tokens:,} | {bits:.3f} |")

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([t / 1e6 for _, t, _ in val], [b for _, _, b in val], marker="o", label="held-out (last 5%)")
    ax.axhline(2.0, color="grey", linestyle="--", label="uniform baseline (2 bits)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("bits per base")
    ax.set_title("small preset on E. coli K-12 (CPU, 2 cores)")
    ax.legend()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)


if __name__ == "__main__":
    main()
