"""`evo2 preprocess`: FASTA -> Megatron indexed dataset per split + manifest.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from evo2_cli.commands.common import (
    ConfigOption,
    OverwriteOption,
    SetOption,
    comma_list,
    console,
    resolve_config,
)
from evo2_cli.config import parse_yaml_value

InputsArgument = Annotated[
    list[str] | None,
    typer.Argument(
        help="FASTA files, globs or directories (plain, .gz, bgzip); set preprocess.inputs.",
        show_default=False,
    ),
]
OutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Output directory (preprocess.output_dir).", file_okay=False),
]
SplitOption = Annotated[
    str | None, typer.Option("--split", help="train,val,test fractions, e.g. 0.9,0.05,0.05.", metavar="T,V,T")
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Seed of the split hash.")]
WorkersOption = Annotated[
    str | None,
    typer.Option(
        "--workers", help="Worker processes, or auto (default: by input size and cores). Same output for any."
    ),
]


def preprocess(
    inputs: InputsArgument = None,
    output: OutputOption = None,
    split: SplitOption = None,
    seed: SeedOption = None,
    workers: WorkersOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Tokenize FASTA into PREFIX_{train,val,test}.bin/.idx (Megatron-core format) and a manifest.json.

    Either a config (evo2 preprocess -c configs/preprocess/samples.yaml) or the quick form
    (evo2 preprocess IN.fa IN2.fa.gz -o OUT_DIR). Quick flags are config overrides checked like --set.
    """
    from evo2_cli.data.preprocess import run_preprocess
    from evo2_cli.data.preprocess.config import PreprocessJob

    flags = {
        "preprocess.inputs": ("INPUTS", inputs or None),
        "preprocess.output_dir": ("--output", output),
        "preprocess.seed": ("--seed", seed),
        "preprocess.workers": ("--workers", None if workers is None else parse_yaml_value(workers)),
        "preprocess.split": ("--split", comma_list(split)),
    }
    cfg = resolve_config(PreprocessJob, config, set_, flags).preprocess
    manifest = run_preprocess(cfg, overwrite=overwrite, console=console)
    console.print(summary_table(manifest))
    console.print(
        f"dataset written to [bold]{cfg.output_dir}[/] (manifest.json lists every file and its sha256)"
    )


def summary_table(manifest: dict):
    """A rich table of the manifest's per-split figures."""
    table = Table(title="evo2 preprocess", title_justify="left")
    for column in ("split", "records", "docs", "tokens", "GC", "N", "lowercase", "median length"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in manifest["splits"].items():
        counts = [f"{split[key]:,}" for key in ("records", "documents", "tokens")]
        gc, n, lowercase = split["gc_fraction"], split["n_fraction"], split["lowercase_fraction"]
        median = split["length"].get("median", 0)
        table.add_row(name, *counts, f"{gc:.3f}", f"{n:.4f}", f"{lowercase:.3f}", f"{median:,}")
    notes = []
    if manifest["dropped"]:
        notes.append("dropped: " + ", ".join(f"{reason} {n:,}" for reason, n in manifest["dropped"].items()))
    if "empty_splits" in manifest:
        notes.append(f"no files for the empty split(s): {', '.join(manifest['empty_splits'])}")
    table.caption = "\n".join(notes) or None
    return table
