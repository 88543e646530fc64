"""What every command shares: options, the error edge, output helpers."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from clusterctl import log
from clusterctl.errors import EXIT_FAILED, ClusterctlError

P = ParamSpec("P")
R = TypeVar("R")

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Machine-readable JSON on stdout.")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="PATH",
        help="Config file (default /etc/clusterctl/clusterctl.toml, or $CLUSTERCTL_CONFIG).",
        show_default=False,
    ),
]
VerboseOpt = Annotated[
    int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
]


def start(verbose: int, quiet: bool) -> None:
    """Per-command set-up: logging at the chosen verbosity."""
    log.setup(-1 if quiet else verbose)


def cli_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """The one place where clusterctl errors become a stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ClusterctlError as err:
            logging.getLogger("clusterctl").debug("error detail", exc_info=True)
            fail(err.one_line(), err.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one line on stderr and leave with ``code``."""
    print(f"clusterctl: {message}", file=sys.stderr)
    raise typer.Exit(code)


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
