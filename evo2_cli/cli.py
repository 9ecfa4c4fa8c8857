"""The `evo2` command: one Typer app, one thin module per command (evo2_cli/commands/).

Command modules are imported only when their command runs (or when the root help lists them): `evo2
preprocess` and `evo2 --version` do not pay for the imports of the model, training and inference commands.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer.core import TyperGroup

from evo2_cli import __version__
from evo2_cli.errors import Evo2Error

# Command name -> "module:attribute" of a command function or a Typer sub-app, in the order `evo2 -h` lists.
COMMANDS = {
    "preprocess": "evo2_cli.commands.preprocess:preprocess",
    "train": "evo2_cli.commands.train:train",
    "diagnose-grads": "evo2_cli.commands.diagnose:diagnose_grads",
    "doctor": "evo2_cli.commands.doctor:doctor",
    "config": "evo2_cli.commands.config_cmd:app",
    "convert": "evo2_cli.commands.convert:app",
    "finetune": "evo2_cli.commands.finetune:app",
    "infer": "evo2_cli.commands.infer:app",
}


def _load_command(name: str):
    """Build one command exactly as registering it on the root app would."""
    module, attribute = COMMANDS[name].split(":")
    target = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(add_completion=False)
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
        return _reflow_help(typer.main.get_command(holder).commands[name])
    holder.command(name)(target)
    return _reflow_help(typer.main.get_command(holder))  # one command and no callback: the command itself


def _reflow_help(command):
    """Join the line breaks inside each paragraph of a command's docstring (wrapped at 110 for the source),
    so `-h` wraps at the terminal's width instead of keeping ragged source lines."""
    if command.help:
        paragraphs = inspect.cleandoc(command.help).split("\n\n")
        command.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)
    for subcommand in getattr(command, "commands", {}).values():
        _reflow_help(subcommand)
    return command


class _Evo2Group(TyperGroup):
    """Loads commands on first use, and turns an Evo2Error raised anywhere below into a message on stderr and
    its exit code."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name):
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            self.commands[cmd_name] = _load_command(cmd_name)
        return self.commands.get(cmd_name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Evo2Error as exc:
            _fail(exc)
        except Exception as exc:
            # A full disk met outside the atomic writers (which report it themselves): a message, not a
            # traceback. Any other unexpected error keeps its traceback for the bug report.
            from evo2_cli.fsio import full_disk_errno, full_disk_reason

            code = full_disk_errno(exc)
            if code is None:
                raise
            name = getattr(exc, "filename", None)
            name = os.fsdecode(name) if name is not None else None  # OSError may carry bytes
            what = f"cannot write {name}: {full_disk_reason(code, Path(name))}" if name else os.strerror(code)
            _fail(Evo2Error(f"{what}; free some space and run again"))


def _fail(exc: Evo2Error) -> NoReturn:
    from evo2_cli.commands.common import console

    console.print("[bold red]error:[/] ", end="")
    console.print(str(exc), highlight=False, markup=False)
    raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="evo2",
    cls=_Evo2Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evo2-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """FASTA to a trained Evo 2 (StripedHyena 2) checkpoint and back.

    Exit codes: 0 ok, 1 failure, 2 bad input or usage, 3 a diagnosis that found a problem.
    """


def _raise_interrupt(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so every atomic writer removes its temporary output.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    app()
