"""`clusterctl config show|validate|path|set|dropins`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from clusterctl import config as cfg
from clusterctl.cli.common import DryRunOpt, Run, command, emit_json
from clusterctl.errors import EXIT_USAGE
from clusterctl.system import systemd

app = typer.Typer(help="The effective config and where it comes from.", no_args_is_help=True)


def _source_line(path: str, source: str, exists: bool) -> str:
    origin = {
        "--config": "named by --config",
        "CLUSTERCTL_CONFIG": "named by $CLUSTERCTL_CONFIG",
        "default": "default location",
    }[source]
    state = "" if exists else "; does not exist, built-in defaults in effect"
    return f"{path} ({origin}{state})"


@command(app, "path", json=True)
def path_cmd(run: Run) -> None:
    """Which config file is in effect, and why."""
    path, source = cfg.resolve_path(run.config_path)
    exists = path.exists()
    if run.json:
        emit_json({"path": str(path), "source": source, "exists": exists})
    else:
        print(_source_line(str(path), source, exists))


@command(app, "show", json=True)
def show_cmd(run: Run) -> None:
    """The effective config: built-in defaults overlaid with the file."""
    loaded = run.loaded
    values = cfg.as_toml_dict(loaded.config)
    if run.json:
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


@command(app, "validate", json=True)
def validate_cmd(run: Run) -> None:
    """Check the config file; every problem on its own line, exit 2 if any."""
    path, source, exists, errors = cfg.validate_file(run.config_path)
    if run.json:
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


@command(app, "set", json=True)
def set_cmd(
    run: Run,
    key: Annotated[str, typer.Argument(help="section.key, for example swap.max_size")],
    value: Annotated[str, typer.Argument(help='the new value, for example 32G')],
    dry_run: DryRunOpt = False,
) -> None:
    """Change one key in the config file, keeping its comments."""
    import tomlkit

    path, _source = cfg.resolve_path(run.config_path)
    new = cfg.set_values(path, {key: value}, dry_run=dry_run)
    section, _, name = key.partition(".")
    shown = cfg.as_toml_dict(new)[section][name]
    # the file the units read: their drop-ins follow it ([swap] dir, watch_cgroups outside
    # their sandbox)
    synced = (_sync_units(new, Path("/"), dry_run)
              if path == systemd.UNITS_CONFIG else systemd.DropinSync(()))
    if run.json:
        emit_json({"path": str(path), "key": key, "value": shown, "dry_run": dry_run,
                   **_sync_json(synced)})
    else:
        verb = "would set" if dry_run else "set"
        print(f"{verb} {key} = {tomlkit.item(shown).as_string()} in {path}")
        _print_sync(synced, dry_run)


def _sync_units(config: cfg.Config, root: Path, dry_run: bool) -> systemd.DropinSync:
    """The units' drop-ins for ``config`` ([swap] dir, watch_cgroups); on this machine,
    a missing swap dir outside their sandbox is made too (0700, as `swap auto` makes
    it), since under ProtectSystem=strict they cannot make it there themselves."""
    swap_dir = config.swap.dir
    synced = systemd.sync_dropins(systemd.unit_dropins(swap_dir, config.swap.watch_cgroups),
                                  root=root, dry_run=dry_run)
    if (not dry_run and root == Path("/") and systemd.swap_dir_dropin(swap_dir) is not None
            and (root / systemd.UNIT_DIR.lstrip("/")).is_dir() and not swap_dir.exists()):
        from clusterctl.system import swapfiles

        os.close(swapfiles.open_dir(swap_dir, create=True))
        print(f"made {swap_dir}", file=sys.stderr)
    return synced


def _sync_json(synced: systemd.DropinSync) -> dict[str, object]:
    return {"dropins": [{"action": c.action, "path": c.path} for c in synced.changes],
            "restarted": list(synced.restarted)}


def _print_sync(synced: systemd.DropinSync, dry_run: bool) -> None:
    for change in synced.changes:
        verb = {"write": "wrote", "remove": "removed"}[change.action]
        print(f"{'would ' + change.action if dry_run else verb} {change.path}")
    for unit in synced.restarted:
        print(f"restarted {unit} (its sandbox takes the new drop-ins at start)")


@command(app, "dropins", json=True)
def dropins_cmd(
    run: Run,
    root: Annotated[
        Path, typer.Option("--root", hidden=True, help="The units under this directory.")
    ] = Path("/"),
    dry_run: DryRunOpt = False,
) -> None:
    """Write or remove the drop-ins clusterctl's units need for this config (run by
    install.sh and `config set`): ReadWritePaths= for a swap dir outside
    /var/lib/clusterctl and for watched cgroups outside the agent's default slices;
    systemd reloaded when one changed."""
    config = run.config
    synced = _sync_units(config, root, dry_run)
    if run.json:
        emit_json({"swap_dir": str(config.swap.dir),
                   "watch_cgroups": list(config.swap.watch_cgroups), "dry_run": dry_run,
                   **_sync_json(synced)})
    else:
        _print_sync(synced, dry_run)
