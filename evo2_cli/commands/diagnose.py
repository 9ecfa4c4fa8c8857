"""`evo2 diagnose-grads`: which layer's gradients explode, why, and whether the stable hcl form fixes it.

Two modes: train K steps per variant with recording hooks (the default), or judge an existing run directory
post hoc (`--run DIR`). Exit code 0 when healthy, 3 when an explosion or spike was found, 2 on bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evo2_cli.commands.common import (
    ConfigOption,
    NoVerifyOption,
    OverwriteOption,
    SetOption,
    comma_list,
    console,
    resolve_config,
)


def _list_option(name: str, help: str):
    return Annotated[str | None, typer.Option(name, help=help, metavar="A,B,...")]


VariantsOption = _list_option(
    "--variants",
    "Variants compared on the same seed, data and weights: specs joined by commas, each spec terms joined "
    "by '+': vortex|modal, fp32|bf16, lr=X, clip=X|noclip (e.g. vortex,modal or vortex+bf16,modal+bf16).",
)
LrOption = _list_option("--lr", "Cross every variant with these peak learning rates (e.g. 1e-2,3e-3).")
PrecisionOption = _list_option("--precision", "Cross every variant with these precisions: fp32,bf16.")
ClipOption = _list_option("--clip", "Cross every variant with these clipping norms (0: off), e.g. 1,0.")
StepsOption = Annotated[
    int | None, typer.Option("--steps", "-k", help="Training steps per variant (diagnose.steps).")
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="Start from this checkpoint or run directory, or a Vortex .pt (with --vortex-config), instead "
        "of a model: section.",
    ),
]
VortexConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--vortex-config", help="The model YAML of a Vortex .pt --checkpoint (release schema or ours)."
    ),
]
RunOption = Annotated[
    Path | None,
    typer.Option("--run", help="Post-hoc mode: judge this `evo2 train` run directory instead of training."),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="auto, cpu or cuda; overrides diagnose.device.")
]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Output directory (diagnose.output_dir).")
]


def diagnose_grads(
    config: ConfigOption = None,
    set_: SetOption = None,
    variants: VariantsOption = None,
    lr: LrOption = None,
    precision: PrecisionOption = None,
    clip: ClipOption = None,
    steps: StepsOption = None,
    checkpoint: CheckpointOption = None,
    vortex_config: VortexConfigOption = None,
    run: RunOption = None,
    device: DeviceOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
    no_verify: NoVerifyOption = False,
) -> None:
    """Per-layer gradient diagnostics: hcl forms, precisions, lrs and clipping side by side (exit 3 on an
    explosion), or spikes of an existing run (--run)."""
    from evo2_cli.diagnose.config import DiagnoseJob, variants_flag
    from evo2_cli.diagnose.report import check_output_dir
    from evo2_cli.errors import DiagnosisFailed

    flags = {
        "diagnose.variants": ("--variants", variants_flag(variants)),
        "diagnose.lr": ("--lr", comma_list(lr)),
        "diagnose.precision": ("--precision", comma_list(precision)),
        "diagnose.grad_clip": ("--clip", comma_list(clip)),
        "diagnose.steps": ("--steps", steps),
        "diagnose.checkpoint": ("--checkpoint", checkpoint),
        "diagnose.vortex_config": ("--vortex-config", vortex_config),
        "diagnose.run_dir": ("--run", run),
        "diagnose.device": ("--device", device),
        "diagnose.output_dir": ("--output", output),
    }
    job = resolve_config(DiagnoseJob, config, set_, flags)
    d = job.diagnose
    check_output_dir(d.output_dir, overwrite)
    if d.run_dir is not None:
        healthy, written = _review(d.run_dir, d.detector(), d.output_dir, overwrite, not no_verify)
        problem = f"grad-norm spikes in {d.run_dir}"
    else:
        healthy, written = _diagnose(job, overwrite, not no_verify)
        problem = "gradient explosion"
    console.print(f"[green]report:[/] {d.output_dir} ({', '.join(written)})")
    if not healthy:
        raise DiagnosisFailed(f"{problem} found; see {d.output_dir / 'report.json'}")


def _diagnose(job, overwrite: bool, verify: bool) -> tuple[bool, list[str]]:
    from evo2_cli.diagnose.report import write_report
    from evo2_cli.diagnose.report.findings import findings
    from evo2_cli.diagnose.report.terminal import summary_tables
    from evo2_cli.diagnose.run import run_diagnosis

    with console.status("diagnose-grads: starting") as status:
        found = findings(run_diagnosis(job, progress=status.update, verify=verify))
    for table in summary_tables(found):
        console.print(table)
    return found.diagnosis.healthy, write_report(found, job.diagnose.output_dir, overwrite)


def _review(
    run_dir: Path, settings, output_dir: Path, overwrite: bool, verify: bool
) -> tuple[bool, list[str]]:
    from evo2_cli.diagnose.posthoc import review_run
    from evo2_cli.diagnose.posthoc_report import review_tables, write_review

    review = review_run(run_dir, settings, verify)
    for table in review_tables(review):
        console.print(table)
    return review.healthy, write_review(review, output_dir, overwrite)
