"""`evo2 finetune`: continue training from a checkpoint or released Evo 2 weights (full, frozen, LoRA;
LM or a classify / regress head); `evo2 finetune merge` folds LoRA adapters into a plain checkpoint.

    evo2 finetune -c configs/finetune/lora.yaml --from CHECKPOINT_OR_PT [--freeze ...] [--task ...]
    evo2 finetune merge RUN_OR_CHECKPOINT -o OUT_DIR [--vortex OUT.pt]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evo2_cli.commands.common import (
    AllowDataChangeOption,
    ConfigOption,
    NoVerifyOption,
    OverwriteOption,
    SetOption,
    console,
    resolve_config,
)

app = typer.Typer(
    help="Finetune from a checkpoint or Evo 2 / Vortex weights (run without a subcommand), or merge LoRA.",
    invoke_without_command=True,
)


@app.callback()
def finetune(
    ctx: typer.Context,
    config: ConfigOption = None,
    set_: SetOption = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--from", help="Starting point: checkpoint dir, run dir, or Vortex .pt (finetune.init_from)."
        ),
    ] = None,
    init_config: Annotated[
        Path | None,
        typer.Option("--init-config", help="Release config YAML of a Vortex .pt (finetune.init_config)."),
    ] = None,
    clamp_poles: Annotated[
        float | None,
        typer.Option(
            "--clamp-poles",
            help="Vortex .pt: clamp hcl poles with lambda >= 0 to this value (finetune.clamp_poles).",
        ),
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help="full or lora (finetune.method).")] = None,
    freeze: Annotated[
        str | None,
        typer.Option("--freeze", help="Comma-separated selectors, e.g. embedding,blocks.0-11,filters."),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="lm, classify or regress (finetune.task).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda (train.device).")] = None,
    resume: Annotated[
        str,
        typer.Option("--resume", help="'auto' (the run directory's latest checkpoint) or a checkpoint dir."),
    ] = "auto",
    overwrite: OverwriteOption = False,
    allow_data_change: AllowDataChangeOption = False,
    no_verify: NoVerifyOption = False,
) -> None:
    """Finetune: the training loop of `evo2 train`, started from --from, with finetuning defaults."""
    if ctx.invoked_subcommand is not None:
        return
    from evo2_cli.finetune.config import FinetuneJob
    from evo2_cli.finetune.freeze import parse_selectors
    from evo2_cli.finetune.run import finetune as run_finetune

    flags = {
        "finetune.init_from": ("--from", init_from),
        "finetune.init_config": ("--init-config", init_config),
        "finetune.clamp_poles": ("--clamp-poles", clamp_poles),
        "finetune.method": ("--method", method),
        "finetune.freeze": ("--freeze", None if freeze is None else parse_selectors(freeze)),
        "finetune.task": ("--task", task),
        "train.device": ("--device", device),
    }
    job = resolve_config(FinetuneJob, config, set_, flags)
    result = run_finetune(
        job,
        resume=resume,
        overwrite=overwrite,
        allow_data_change=allow_data_change,
        verify=not no_verify,
        console=console,
    )
    if result.is_main:  # under torchrun, rank 0 reports
        console.print(f"[green]checkpoint:[/] {result.checkpoint}")
        if result.best_checkpoint is not None:
            console.print(f"[green]best:[/] {result.best_checkpoint}")


@app.command("merge")
def merge(
    checkpoint: Annotated[Path, typer.Argument(help="A finetune checkpoint dir or run dir (its latest).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Plain checkpoint directory to write.")],
    vortex: Annotated[
        Path | None,
        typer.Option(
            "--vortex", help="Also export a Vortex .pt (and a release YAML beside it).", dir_okay=False
        ),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Vortex export dtype: fp32, bf16 or fp16.")] = "fp32",
    overwrite: OverwriteOption = False,
    no_verify: NoVerifyOption = False,
) -> None:
    """Fold LoRA adapters into the weights: a plain checkpoint for infer, convert and the official engine."""
    from evo2_cli.commands.convert import check_vortex_outputs
    from evo2_cli.finetune.run import merge as run_merge
    from evo2_cli.fsio import check_replaceable
    from evo2_cli.model.checkpoint import CHECKPOINT_DIR
    from evo2_cli.runtime import precision_dtype

    torch_dtype = precision_dtype(dtype, "convert")
    check_replaceable(out, CHECKPOINT_DIR, overwrite)  # before loading; save_model checks again as it writes
    if vortex is not None:
        check_vortex_outputs(vortex, vortex.with_suffix(".yml"), overwrite)
    model, merged = run_merge(
        checkpoint, out, vortex=vortex, dtype=torch_dtype, overwrite=overwrite, verify=not no_verify
    )
    console.print(
        f"[green]merged[/] {merged} LoRA layer(s); wrote {out} ({model.num_parameters():,} parameters)"
    )
    if vortex is not None:
        console.print(f"[green]wrote[/] {vortex} and {vortex.with_suffix('.yml')}")
