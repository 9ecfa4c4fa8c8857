"""`evo2 doctor`: a table of what this environment has, and a model self-test per device."""

from __future__ import annotations

import typer
from rich.table import Table

from evo2_cli.commands.common import console


def doctor() -> None:
    """Check the environment: versions, CUDA devices, optional extras, and a numerics self-test per device.

    Exits 1 when a required piece is missing or the self-test fails; optional extras only inform.
    """
    from evo2_cli.doctor import run_checks

    checks = run_checks()
    table = Table(title="evo2 doctor", show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    for check in checks:
        status = "[green]ok[/]" if check.ok else "[red]FAIL[/]" if check.required else "[yellow]optional[/]"
        table.add_row(check.name, status, check.detail)
    console.print(table)
    if any(check.required and not check.ok for check in checks):
        raise typer.Exit(1)
