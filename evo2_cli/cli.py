"""The `evo2` command: one Typer app, one thin module per command (evo2_cli/commands/)."""

from __future__ import annotations

import signal
from typing import Annotated

import typer
from typer.core import TyperGroup

from evo2_cli import __version__
from evo2_cli.commands import config_cmd, convert, finetune, infer
from evo2_cli.commands.diagnose import diagnose_grads as diagnose_grads_command
from evo2_cli.commands.doctor import doctor as doctor_command
from evo2_cli.commands.preprocess import preprocess as preprocess_command
from evo2_cli.commands.train import train as train_command
from evo2_cli.errors import Evo2Error


class _Evo2Group(TyperGroup):
    """Turns an Evo2Error raised anywhere below into a message on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Evo2Error as exc:
            from evo2_cli.commands.common import console

            console.print("[bold red]error:[/] ", end="")
            console.print(str(exc), highlight=False, markup=False)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="evo2",
    cls=_Evo2Group,
    help="FASTA to a trained Evo 2 (StripedHyena 2) checkpoint and back.",
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


app.add_typer(config_cmd.app, name="config")
app.command("preprocess")(preprocess_command)
app.command("train")(train_command)
app.add_typer(convert.app, name="convert")
app.add_typer(finetune.app, name="finetune")
app.add_typer(infer.app, name="infer")
app.command("diagnose-grads")(diagnose_grads_command)
app.command("doctor")(doctor_command)


def _raise_interrupt(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so every atomic writer removes its temporary output.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    app()
