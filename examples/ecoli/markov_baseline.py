"""The yardstick for the E. coli curve: order-k Markov models (counts of the next base after each k-mer,
Krichevsky-Trofimov smoothing) fitted on the training split and scored on the held-out split, in bits/base.

    python examples/ecoli/markov_baseline.py runs/ecoli/dataset
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from evo2_cli.data.indexed import IndexedDataset

ORDERS = (0, 2, 4, 6, 8, 10, 12)


def base_codes(prefix: Path) -> np.ndarray:
    """A=0 C=1 G=2 T=3 (either case: soft-masked bases count as the model sees them) over all documents of a
    split (EOD and anything else dropped)."""
    tokens = np.asarray(IndexedDataset(prefix).tokens, dtype=np.uint8)
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[np.frombuffer(b"ACGT", np.uint8)] = np.arange(4)
    lookup[np.frombuffer(b"acgt", np.uint8)] = np.arange(4)
    codes = lookup[tokens]
    return codes[codes >= 0]


def contexts(codes: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(k-mer index before each position, base at that position) for positions order.."""
    context = np.zeros(len(codes) - order, dtype=np.int64)
    for i in range(order):
        context = context * 4 + codes[i : len(codes) - order + i]
    return context, codes[order:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path, help="directory written by prepare.py")
    args = parser.parse_args()
    train, held_out = base_codes(args.dataset / "genome_train"), base_codes(args.dataset / "genome_val")
    print("| Markov order k | held-out bits/base |\n| ---: | ---: |")
    for order in ORDERS:
        context, base = contexts(train, order)
        counts = np.bincount(context * 4 + base, minlength=4 ** (order + 1)).reshape(-1, 4).astype(np.float64)
        context, base = contexts(held_out, order)
        probability = (counts[context, base] + 0.5) / (counts[context].sum(axis=1) + 2.0)
        print(f"| {order} | {-np.log2(probability).mean():.3f} |")


if __name__ == "__main__":
    main()
