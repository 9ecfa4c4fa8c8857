"""Split a genome FASTA by position into a training dataset: the first 95% of every record trains, the last 5%
is held out (validation). Writes OUT_DIR/genome_train.{bin,idx} and OUT_DIR/genome_val.{bin,idx}, Megatron
indexed datasets that `evo2 train` reads like an `evo2 preprocess` output.

`evo2 preprocess` splits by record; a single-record genome such as E. coli needs a split by position instead,
so that no held-out base was ever seen in training.

    python examples/ecoli/prepare.py ecoli_k12_mg1655.fa.gz runs/ecoli/dataset
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from evo2_cli.data.alphabet import EOD_ID
from evo2_cli.data.fasta import read_fasta
from evo2_cli.data.indexed import IndexedDatasetWriter
from evo2_cli.fsio import atomic_output_dir, directory_kind

SPLIT_FILES = {f"genome_{split}.{suffix}" for split in ("train", "val") for suffix in ("bin", "idx")}
# What this script replaces: a directory of its own four files, nothing else.
EXAMPLE_DATASET = directory_kind("an example dataset", "genome_train.idx", lambda directory: SPLIT_FILES)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("fasta", type=Path, help="genome FASTA (.fa/.fa.gz)")
    parser.add_argument("out_dir", type=Path, help="dataset directory to write")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of each record")
    args = parser.parse_args()

    with atomic_output_dir(args.out_dir, EXAMPLE_DATASET, overwrite=True) as tmp:
        train = IndexedDatasetWriter(tmp / "genome_train")
        val = IndexedDatasetWriter(tmp / "genome_val")
        bases = {"train": 0, "val": 0}
        for record in read_fasta(args.fasta):
            if record.problem:
                raise SystemExit(record.problem)
            sequence = np.frombuffer(bytes(record.sequence), dtype=np.uint8)
            cut = int(len(sequence) * (1 - args.val_fraction))
            for writer, split, part in ((train, "train", sequence[:cut]), (val, "val", sequence[cut:])):
                writer.add_document(np.append(part, np.uint8(EOD_ID)))
                bases[split] += len(part)
        train.finalize()
        val.finalize()
    print(f"{args.out_dir}: {bases['train']:,} training bases, {bases['val']:,} held-out bases")


if __name__ == "__main__":
    main()
