"""What every command shares: its common options, set-up, config and error edge (the
`command` decorator), output helpers."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from clusterctl import config as cfg
from clusterctl import log
from clusterctl.errors import EXIT_FAILED, ClusterctlError

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


@dataclass(frozen=True)
class Run:
    """What a command was started with beyond its own options: --config (the file is
    read the first time a command asks for it, and once), --json."""

    config_path: Path | None = None
    json: bool = False

    @functools.cached_property
    def loaded(self) -> cfg.LoadedConfig:
        """The config in effect and where it came from (read now, on first use)."""
        return cfg.load(self.config_path)

    @property
    def config(self) -> cfg.Config:
        return self.loaded.config


Command = TypeVar("Command", bound=Callable[..., None])

# The options every command takes, after its own; --json only where the command has it.
_JSON = inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=JsonOpt)
_COMMON = (
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=ConfigOpt),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=0,
                      annotation=VerboseOpt),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=QuietOpt),
)


def command(app: typer.Typer, name: str, *, json: bool = False) -> Callable[[Command], Command]:
    """Register ``fn(run: Run, <its own options>)`` as command ``name`` of ``app``.

    The command line gets the function's own options followed by [--json,] --config,
    --verbose and --quiet; the command runs with logging set up and a :class:`Run`, and
    this is the one place where clusterctl errors (and Ctrl-C) become a stderr line and
    an exit code. The function is returned as it is.
    """

    def register(fn: Command) -> Command:
        own = list(inspect.signature(fn).parameters.values())
        if not own or own[0].name != "run":
            raise TypeError(f"{fn.__qualname__}: the first parameter must be `run: Run`")
        # typer reads the signature of what it registers; under `from __future__ import
        # annotations` the command's annotations are strings in its own module: evaluate
        # them there, once, and hand typer the wrapper's signature with the results
        hints = typing.get_type_hints(fn, localns={"Run": Run}, include_extras=True)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
                  for p in own[1:]]
        params += [_JSON, *_COMMON] if json else _COMMON
        taken = [p.name for p in params]
        if len(set(taken)) != len(taken):
            raise TypeError(f"{fn.__qualname__}: an option named like a common one: {taken}")

        @functools.wraps(fn)
        def wrapper(*, config: Path | None, verbose: int, quiet: bool, json_out: bool = False,
                    **options: Any) -> None:
            try:
                start(verbose, quiet)
                fn(Run(config, json_out), **options)
            except ClusterctlError as err:
                logging.getLogger("clusterctl").debug("error detail", exc_info=True)
                fail(err.one_line(), err.exit_code)
            except KeyboardInterrupt:
                fail("interrupted", 130)

        signature = inspect.Signature(params, return_annotation=None)
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        app.command(name)(wrapper)
        return fn

    return register


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one line on stderr and leave with ``code``."""
    print(f"clusterctl: {message}", file=sys.stderr)
    raise typer.Exit(code)


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
