"""Options every command shares, and the one way a command turns `-c FILE --set k=v` into its config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from evo2_cli.config import load_config

T = TypeVar("T")

console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (see configs/).", dir_okay=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable).", metavar="KEY=VALUE"),
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]


def resolve_config(schema: type[T], config: Path | None, sets: list[str] | None, flags: list[str] = ()) -> T:
    """Load `config`, then apply command-line flags (as `--set` assignments), then explicit `--set`s."""
    return load_config(schema, config, [*flags, *(sets or [])])
