"""The `kdpipe` command line: one thin command per stage.

Each command parses its flags, resolves its config (defaults < `--config FILE` < flags) and
calls one library function. User mistakes surface as one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kdpipe.schemas.errors import KdpipeError

app = typer.Typer(
    name="kdpipe",
    help=(
        "Offline distillation for language models. Run the teacher once (cache-teacher), "
        "store importance-sampled sparse logits and FFN snapshots, then train any number of "
        "Low-Rank-Clone students from that cache (train-student)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

ConfigOption = typer.Option(None, "--config", help="YAML or TOML file with any of this command's options; flags override it.")


def main() -> None:
    """Console entry point: run the app, turning user mistakes into one line and exit code 2."""
    try:
        app()
    except KdpipeError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; complete outputs are kept and a re-run resumes")
        sys.exit(130)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the kdpipe version and exit.", is_eager=True),
) -> None:
    if version:
        from kdpipe import __version__

        print(f"kdpipe {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit()
