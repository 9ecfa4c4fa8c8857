"""Options every command shares, and the one way a command turns `-c FILE --set k=v` into its config."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from evo2_cli.config import load_config, parse_yaml_value
from evo2_cli.console import make_console

T = TypeVar("T")

console = make_console()

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (see configs/).", dir_okay=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable).", metavar="KEY=VALUE"),
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
AllowDataChangeOption = Annotated[
    bool,
    typer.Option(
        "--allow-data-change",
        help="Resume even though a dataset's content changed since the checkpoint (not an exact resume).",
    ),
]
NoVerifyOption = Annotated[
    bool,
    typer.Option(
        "--no-verify",
        help="Read checkpoints of ours without checking their files against the sha256 in meta.json "
        "(only for files changed on purpose).",
    ),
]


def resolve_config(
    schema: type[T],
    config: Path | None,
    sets: list[str] | None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> T:
    """Load `config`, then apply command-line flags ({'section.key': ('--flag', value)}; value None = flag
    not given) as assignments an error names by their flag, then explicit `--set`s. Flag values go in as
    JSON, which YAML reads back unchanged, so `-o 2024` or `--from yes` stays a path and every value meets
    the same validator as a config file."""
    assignments = [
        (f"{key}={json.dumps(value, default=str)}", flag)  # default=str: paths as strings
        for key, (flag, value) in (flags or {}).items()
        if value is not None
    ]
    return load_config(schema, config, [*assignments, *(sets or [])])


def comma_list(text: str | None) -> list[Any] | None:
    """'vortex, 1e-3' -> ['vortex', 0.001]: each item read as it would be in a YAML list of a config file."""
    return None if text is None else [parse_yaml_value(item.strip()) for item in text.split(",")]
