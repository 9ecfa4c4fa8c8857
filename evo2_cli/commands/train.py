"""`evo2 train`: train a StripedHyena 2 model from scratch on `evo2 preprocess` datasets.

Works alone (CPU or one GPU) and under `torchrun --nproc_per_node N -m evo2_cli train ...` (DDP or FSDP2).
"""

from __future__ import annotations

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

DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="auto (CUDA when present), cpu or cuda; overrides train.device."),
]
ResumeOption = Annotated[
    str,
    typer.Option(
        "--resume",
        help="'auto': continue from the run directory's latest checkpoint when it has one; or a checkpoint "
        "directory to continue from.",
    ),
]


def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    device: DeviceOption = None,
    resume: ResumeOption = "auto",
    overwrite: OverwriteOption = False,
    allow_data_change: AllowDataChangeOption = False,
    no_verify: NoVerifyOption = False,
) -> None:
    """Train from scratch; checkpoints go to train.run_dir/checkpoints (latest, best)."""
    from evo2_cli.train.config import TrainJob
    from evo2_cli.train.loop import train as run_training

    job = resolve_config(TrainJob, config, set_, {"train.device": ("--device", device)})
    result = run_training(
        job,
        resume=resume,
        overwrite=overwrite,
        allow_data_change=allow_data_change,
        verify=not no_verify,
        console=console,
    )
    if result.is_main:
        console.print(f"[green]checkpoint:[/] {result.checkpoint}")
        if result.best_checkpoint is not None:
            console.print(f"[green]best:[/] {result.best_checkpoint}")
