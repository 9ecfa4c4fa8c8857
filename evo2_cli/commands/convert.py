"""`evo2 convert`: our checkpoint directory <-> an Evo 2 / Vortex `.pt` + release-style config YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evo2_cli.commands.common import NoVerifyOption, OverwriteOption, SetOption, console
from evo2_cli.errors import InputError

app = typer.Typer(
    help="Convert between our checkpoint directory and the Evo 2 / Vortex .pt layout.", no_args_is_help=True
)

DtypeOption = Annotated[
    str, typer.Option("--dtype", help="Dtype of the written weights: fp32, bf16 or fp16 (poles stay fp32).")
]


def check_vortex_outputs(weights: Path, config: Path, overwrite: bool) -> None:
    """Before any work: the .pt and the release YAML of an export may be written (or replaced)."""
    from evo2_cli.infer.outputs import check_output
    from evo2_cli.model.vortex import RELEASE_YAML, VORTEX_WEIGHTS

    if config == weights:
        raise InputError(f"--config-out must differ from --out ({weights})")
    for path, kind in ((weights, VORTEX_WEIGHTS), (config, RELEASE_YAML)):
        check_output(path, kind, overwrite)


@app.command("to-vortex")
def to_vortex(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Our checkpoint directory, or a training run directory (its latest checkpoint)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Vortex-layout .pt to write.", dir_okay=False)],
    config_out: Annotated[
        Path | None,
        typer.Option(
            "--config-out",
            help="Release-style YAML to write.",
            show_default="OUT with suffix .yml",
            dir_okay=False,
        ),
    ] = None,
    dtype: DtypeOption = "fp32",
    overwrite: OverwriteOption = False,
    no_verify: NoVerifyOption = False,
) -> None:
    """Export a checkpoint to an Evo 2 / Vortex .pt and a release-style config YAML.

    Modal hcl poles are written as lambda = -exp(p) * exp(gamma)."""
    from evo2_cli.model.checkpoint import load_model
    from evo2_cli.model.vortex import export_vortex
    from evo2_cli.runtime import precision_dtype

    config_out = config_out or out.with_suffix(".yml")
    check_vortex_outputs(out, config_out, overwrite)
    torch_dtype = precision_dtype(dtype, "convert")
    model = load_model(checkpoint, verify=not no_verify)
    export_vortex(model, out, config_out, dtype=torch_dtype)
    console.print(f"[green]wrote[/] {out} and {config_out} ({model.num_parameters():,} parameters)")


@app.command("from-vortex")
def from_vortex(
    weights: Annotated[Path, typer.Argument(help="Evo 2 / Vortex .pt file.", dir_okay=False, exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.", file_okay=False)],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Its model config YAML (default: WEIGHTS.yml or .yaml).", dir_okay=False
        ),
    ] = None,
    set_: SetOption = None,
    hcl_form: Annotated[
        str | None, typer.Option("--hcl-form", help="modal (stable, default) or vortex (free poles).")
    ] = None,
    clamp_poles: Annotated[
        float | None,
        typer.Option(
            "--clamp-poles", help="Clamp poles with lambda >= 0 to this negative value instead of refusing."
        ),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Import an Evo 2 / Vortex .pt into our checkpoint directory.

    hcl poles lambda < 0 map exactly to the modal form; lambda >= 0 is refused unless --clamp-poles."""
    import warnings

    from evo2_cli.fsio import check_replaceable
    from evo2_cli.model.checkpoint import CHECKPOINT_DIR, save_model, vortex_config_of
    from evo2_cli.model.config import load_model_config
    from evo2_cli.model.vortex import load_vortex

    check_replaceable(out, CHECKPOINT_DIR, overwrite)  # before the import's work; save_model checks again
    config = vortex_config_of(weights, config, "pass --config (-c) FILE")
    model_config = load_model_config(config, set_ or [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_vortex(model_config, weights, hcl_form=hcl_form, clamp_poles=clamp_poles)
    for warning in caught:
        console.print(f"[yellow]warning:[/] {warning.message}", highlight=False)
    meta = {"converted_from": {"format": "vortex", "weights": str(weights), "config": str(config)}}
    save_model(model, out, meta=meta, overwrite=overwrite)
    console.print(
        f"[green]wrote[/] {out} ({model.num_parameters():,} parameters, hcl_form {model.config.hcl_form})"
    )
