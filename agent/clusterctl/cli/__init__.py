"""The `clusterctl` command line: thin typer commands over the core packages."""

from __future__ import annotations

import logging
import sys

import typer

from clusterctl import __version__
from clusterctl.cli import (
    agent_cmd,
    check_cmd,
    config_cmd,
    fleet_cmd,
    gpu_cmd,
    hibernate_cmd,
    optimize_cmd,
    swap_cmd,
)
from clusterctl.cli.common import command

app = typer.Typer(
    name="clusterctl",
    help="Host agent for AI cluster nodes: swap, tuning, GPUs and idle hibernation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
command(app, "check", json=True)(check_cmd.check)
app.add_typer(config_cmd.app, name="config")
app.add_typer(swap_cmd.app, name="swap")
app.add_typer(optimize_cmd.app, name="optimize")
app.add_typer(gpu_cmd.app, name="gpu")
app.add_typer(hibernate_cmd.app, name="hibernate")
app.add_typer(agent_cmd.app, name="agent")
app.add_typer(fleet_cmd.app, name="fleet")


def _version(value: bool) -> None:
    if value:
        print(f"clusterctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Host agent for AI cluster nodes: swap, tuning, GPUs and idle hibernation."""


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="clusterctl")
    except Exception as err:  # the very top: a bug, not an operator's mistake
        logging.getLogger("clusterctl").debug("internal error", exc_info=True)
        print(
            f"clusterctl: internal error: {type(err).__name__}: {err} "
            "(please report it; -vv shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
