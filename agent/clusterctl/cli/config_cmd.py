"""`clusterctl config show|validate|path|set`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from clusterctl import config as cfg
from clusterctl.cli.common import (
    ConfigOpt,
    DryRunOpt,
    JsonOpt,
    QuietOpt,
    VerboseOpt,
    cli_errors,
    emit_json,
    start,
)
from clusterctl.errors import EXIT_USAGE

app = typer.Typer(help="The effective config and where it comes from.", no_args_is_help=True)


def _source_line(path: str, source: str, exists: bool) -> str:
    origin = {
        "--config": "named by --config",
        "CLUSTERCTL_CONFIG": "named by $CLUSTERCTL_CONFIG",
        "default": "default location",
    }[source]
    state = "" if exists else "; does not exist, built-in defaults in effect"
    return f"{path} ({origin}{state})"


@app.command("path")
@cli_errors
def path_cmd(
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Which config file is in effect, and why."""
    start(verbose, quiet)
    path, source = cfg.resolve_path(config)
    exists = path.exists()
    if json_out:
        emit_json({"path": str(path), "source": source, "exists": exists})
    else:
        print(_source_line(str(path), source, exists))


@app.command("show")
@cli_errors
def show_cmd(
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """The effective config: built-in defaults overlaid with the file."""
    start(verbose, quiet)
    loaded = cfg.load(config)
    values = cfg.as_toml_dict(loaded.config)
    if json_out:
        emit_json(
            {
                "path": str(loaded.path),
                "source": loaded.source,
                "exists": loaded.file_exists,
                "config": values,
            }
        )
        return
    import tomlkit

    origin = _source_line(str(loaded.path), loaded.source, loaded.file_exists)
    print(f"# effective config: {origin}")
    print(tomlkit.dumps(values), end="")


@app.command("validate")
@cli_errors
def validate_cmd(
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Check the config file; every problem on its own line, exit 2 if any."""
    start(verbose, quiet)
    path, source, exists, errors = cfg.validate_file(config)
    if json_out:
        emit_json(
            {
                "path": str(path),
                "source": source,
                "exists": exists,
                "valid": not errors,
                "errors": [
                    {"message": e.one_line(), "line": e.line, "key": e.key} for e in errors
                ],
            }
        )
    elif not errors:
        print(f"{_source_line(str(path), source, exists)}: valid")
    for err in errors:
        print(f"clusterctl: {err.one_line()}", file=sys.stderr)
    if errors:
        raise typer.Exit(EXIT_USAGE)


@app.command("set")
@cli_errors
def set_cmd(
    key: Annotated[str, typer.Argument(help="section.key, for example swap.max_size")],
    value: Annotated[str, typer.Argument(help='the new value, for example 32G')],
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Change one key in the config file, keeping its comments."""
    import tomlkit

    start(verbose, quiet)
    path, _source = cfg.resolve_path(config)
    new = cfg.set_values(path, {key: value}, dry_run=dry_run)
    section, _, name = key.partition(".")
    shown = cfg.as_toml_dict(new)[section][name]
    if json_out:
        emit_json({"path": str(path), "key": key, "value": shown, "dry_run": dry_run})
    else:
        verb = "would set" if dry_run else "set"
        print(f"{verb} {key} = {tomlkit.item(shown).as_string()} in {path}")
