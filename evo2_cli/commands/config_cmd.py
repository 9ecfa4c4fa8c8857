"""`evo2 config`: show and validate config files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evo2_cli.commands.common import SetOption, console
from evo2_cli.console import make_console

app = typer.Typer(help="Inspect and check config files.", no_args_is_help=True)

KindOption = Annotated[
    str | None,
    typer.Option("--kind", help="Config kind (preprocess, train, ...); inferred from sections."),
]


def _resolve(path: Path, kind: str | None, sets: list[str] | None):
    from evo2_cli.config import build_config, read_yaml
    from evo2_cli.schemas import infer_kind, schema_for

    raw, lines = read_yaml(path)
    kind = kind or infer_kind(raw, path)
    return kind, build_config(schema_for(kind), raw, sets or [], str(path), lines)


@app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="Config file.", dir_okay=False)],
    kind: KindOption = None,
    set_: SetOption = None,
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from evo2_cli.config import to_yaml

    _, cfg = _resolve(path, kind, set_)
    typer.echo(to_yaml(cfg), nl=False)


@app.command("validate")
def validate(
    paths: Annotated[list[Path], typer.Argument(help="Config files.", dir_okay=False)],
    kind: KindOption = None,
) -> None:
    """Check config files; exit 2 with the file, line and key of the first problem."""
    for path in paths:
        resolved_kind, _ = _resolve(path, kind, None)
        console.print(f"[green]ok[/] {path} ({resolved_kind})")


@app.command("presets")
def presets() -> None:
    """List the model presets (`model.preset: NAME`) with their shapes and parameter counts."""
    import torch
    from rich.table import Table

    from evo2_cli.model import PRESETS, StripedHyena, preset_config

    table = Table(title="model presets (layout: S hcs, D hcm, H hcl, * attention)")
    table.add_column("name")
    for column in ("width", "layers", "heads"):
        table.add_column(column, justify="right")
    table.add_column("layout", overflow="fold")
    table.add_column("parameters", justify="right")
    for name in PRESETS:
        cfg = preset_config(name)
        with torch.device("meta"):
            count = StripedHyena(cfg).num_parameters()
        table.add_row(
            name,
            str(cfg.hidden_size),
            str(cfg.num_layers),
            str(cfg.num_attention_heads),
            cfg.layout,
            f"{count:,}",
        )
    make_console(stderr=False).print(table)
