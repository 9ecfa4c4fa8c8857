"""Split a genome FASTA by position into a training dataset: the first 95% of every record trains, the last 5%
is held out (validation). Writes OUT_DIR/genome_train.{bin,idx}, OUT_DIR/genome_val.{bin,idx} and a
manifest.json: `evo2 preprocess` with `split_by: position`, the same as

    evo2 preprocess GENOME.fa.gz -o OUT_DIR --split 0.95,0.05,0 \
        --set preprocess.split_by=position --set preprocess.prefix=genome

A single-record genome such as E. coli needs a split by position rather than by record, so that no held-out
base was ever seen in training.

    python examples/ecoli/prepare.py ecoli_k12_mg1655.fa.gz runs/ecoli/dataset
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evo2_cli.data.preprocess import PreprocessConfig, run_preprocess
from evo2_cli.errors import Evo2Error


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("fasta", type=Path, help="genome FASTA (.fa/.fa.gz)")
    parser.add_argument("out_dir", type=Path, help="dataset directory to write")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of each record")
    args = parser.parse_args()

    cfg = PreprocessConfig(
        inputs=[str(args.fasta)],
        output_dir=args.out_dir,
        prefix="genome",
        split=(1 - args.val_fraction, args.val_fraction, 0.0),
        split_by="position",
    )
    try:
        splits = run_preprocess(cfg, overwrite=True)["splits"]
    except Evo2Error as exc:
        raise SystemExit(f"error: {exc}") from None
    train, val = splits["train"]["bases"], splits["val"]["bases"]
    print(f"{args.out_dir}: {train:,} training bases, {val:,} held-out bases")


if __name__ == "__main__":
    main()
