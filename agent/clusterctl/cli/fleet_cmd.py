"""`clusterctl fleet`: the control plane (serve) and the operator's commands against it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from clusterctl.cli.common import Run, command, emit_json
from clusterctl.errors import HostError, UsageError

app = typer.Typer(help="The fleet control plane: serve it, and see and steer its nodes.",
                  no_args_is_help=True)
ServerOpt = Annotated[str | None, typer.Option(
    "--server", metavar="URL", help="The control plane (default: this host's [fleet] listen).")]
TokenOpt = Annotated[Path | None, typer.Option(
    "--token-file", metavar="PATH", help="The admin token (default [fleet] admin_token_file).")]
NodeArg = Annotated[str, typer.Argument(metavar="INSTANCE", help="The node's instance id.")]


@command(app, "serve")
def serve_cmd(run: Run) -> None:
    """Run the control plane in the foreground (what clusterctl-fleet.service starts).

    Migrates the database first; READY=1 once it listens; SIGHUP re-reads [fleet]
    tuning (max_heartbeats_per_s, resume_timeout, wake)."""
    from clusterctl import config as cfg
    from clusterctl.errors import ClusterctlError
    from clusterctl.fleet import server

    def reload() -> cfg.FleetConfig | None:
        try:
            return cfg.load(run.config_path).config.fleet
        except ClusterctlError as err:
            import logging

            logging.getLogger("clusterctl.fleet").error(
                "the new config is refused, the old one stays: %s", err.one_line())
            return None

    raise typer.Exit(server.run(run.config.fleet, reload))


def _client(run: Run, server: str | None, token_file: Path | None) -> Any:
    from clusterctl.fleet.client import FleetClient, default_server

    fleet = run.config.fleet
    return FleetClient(server or default_server(fleet.listen),
                       token_file or fleet.admin_token_file)


def _shown(value: object) -> str:
    """A value a node reported, safe for a terminal: no escape or control characters."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def _unexpected(path: str, what: str) -> HostError:
    return HostError(f"the control plane's answer to {path} is not {what}",
                     fix="is --server a clusterctl fleet control plane of this version?")


def _instances(answer: object) -> list[dict[str, Any]]:
    """The node list of a GET /api/instances answer; HostError for any other shape."""
    nodes = answer.get("instances") if isinstance(answer, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
        raise _unexpected("/api/instances", "a list of nodes")
    return nodes


def _object(answer: object, what: str) -> dict[str, Any]:
    """A JSON object answer; HostError for any other shape."""
    if not isinstance(answer, dict):
        raise _unexpected(what, "a JSON object")
    return answer


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max([len(c), *(len(_shown(r.get(c))) for r in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(_shown(r.get(c)).ljust(widths[c]) for c in columns).rstrip())


@command(app, "nodes", json=True)
def nodes_cmd(run: Run, server: ServerOpt = None, token_file: TokenOpt = None) -> None:
    """Every node the control plane knows, with its state."""
    rows = _instances(_client(run, server, token_file).call("GET", "/api/instances"))
    if run.json:
        emit_json(rows)
    elif not rows:
        print("no nodes have enrolled yet")
    else:
        _table(rows, ["instance_id", "state", "status", "gpus", "gpu_utilization",
                      "last_seen", "agent_version"])


@command(app, "show", json=True)
def show_cmd(run: Run, instance: NodeArg, server: ServerOpt = None,
             token_file: TokenOpt = None) -> None:
    """One node: its state, last heartbeat and pending commands."""
    from clusterctl.fleet.client import node_path

    answer = _client(run, server, token_file).call("GET", node_path(instance, "/status"))
    if not isinstance(answer, dict):
        raise _unexpected(f"{instance}'s status", "a JSON object")
    if run.json:
        emit_json(answer)
        return
    for key, value in answer.items():
        if key not in ("heartbeat", "pending_commands", "gpu_list"):
            print(f"{key}: {_shown(value)}")
    for gpu in _dicts(answer.get("gpu_list")):
        print(f"gpu {_shown(gpu.get('index'))}: {_shown(gpu.get('name'))}, "
              f"{_shown(gpu.get('utilization'))} %, {_shown(gpu.get('temperature'))} C, "
              f"{_shown(gpu.get('memory_used_mib'))}/{_shown(gpu.get('memory_total_mib'))} "
              f"MiB, {_shown(gpu.get('state'))}")
    for cmd in _dicts(answer.get("pending_commands")):
        print(f"pending: {_shown(cmd.get('id'))} {_shown(cmd.get('type'))} "
              f"{_shown(cmd.get('args'))}")


@command(app, "events", json=True)
def events_cmd(run: Run, instance: NodeArg,
               limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
               server: ServerOpt = None, token_file: TokenOpt = None) -> None:
    """A node's newest events (its own and the control plane's), newest first."""
    from clusterctl.fleet.client import node_path

    answer = _object(_client(run, server, token_file).call(
        "GET", node_path(instance, f"/events?limit={limit}")), f"{instance}'s events")
    found = _dicts(answer.get("events"))
    if run.json:
        emit_json(found)
        return
    for event in found:
        print(f"{_shown(event.get('timestamp'))}  {_shown(event.get('event_type')):<20} "
              f"{_shown(event.get('reason', ''))}")
    if not found:
        print("no events")


@command(app, "hibernate", json=True)
def hibernate_cmd(run: Run, instance: NodeArg, server: ServerOpt = None,
                  token_file: TokenOpt = None) -> None:
    """Queue a command for the node to hibernate now (its next heartbeat picks it up)."""
    from clusterctl.fleet.client import node_path

    answer = _client(run, server, token_file).call("POST", node_path(instance, "/hibernate"))
    _queued(run, answer)


def _queued(run: Run, answer: object) -> None:
    answer = _object(answer, "a queued command")
    if run.json:
        emit_json(answer)
        return
    cmd = _object(answer.get("command"), "a queued command")
    print(f"queued {_shown(cmd.get('type'))} for {_shown(cmd.get('instance_id'))} "
          f"({_shown(cmd.get('id'))}); it is sent with the answer to the node's next heartbeat")
    if answer.get("note"):
        print(f"note: {_shown(answer['note'])}")


@command(app, "wake", json=True)
def wake_cmd(run: Run, instance: NodeArg, server: ServerOpt = None,
             token_file: TokenOpt = None) -> None:
    """Wake a hibernated or lost node ([fleet] wake: wol, ipmi or command)."""
    from clusterctl.fleet.client import node_path

    answer = _object(_client(run, server, token_file).call(
        "POST", node_path(instance, "/wake")), f"{instance}'s wake")
    if run.json:
        emit_json(answer)
    else:
        print(f"{instance}: waking ({_shown(answer.get('done'))}); `clusterctl fleet show "
              f"{instance}` says when it is back")


@command(app, "stats", json=True)
def stats_cmd(run: Run, server: ServerOpt = None, token_file: TokenOpt = None) -> None:
    """Nodes by state, hours hibernated and GPU-hours not spent idle."""
    answer = _object(_client(run, server, token_file).call("GET", "/api/hibernation/stats"),
                     "/api/hibernation/stats")
    if run.json:
        emit_json(answer)
    else:
        for key, value in answer.items():
            print(f"{key}: {_shown(value)}")


@command(app, "revoke", json=True)
def revoke_cmd(run: Run, instance: NodeArg,
               forget: Annotated[bool, typer.Option(
                   "--forget", help="Also remove the node, so that it can enrol again.")
               ] = False,
               server: ServerOpt = None, token_file: TokenOpt = None) -> None:
    """Revoke a node's token: its heartbeats and events are refused from now on."""
    from clusterctl.fleet.client import node_path

    if not instance:
        raise UsageError("name the node to revoke")
    answer = _client(run, server, token_file).call(
        "POST", node_path(instance, "/revoke"), {"forget": forget})
    if run.json:
        emit_json(answer)
    else:
        print(f"{instance}: revoked" + (" and forgotten" if forget else ""))


def _head(path: Path, limit: int = 16 << 20) -> str | None:
    """The start of a file, enough to tell a targets file; None when it is bigger."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    return None if len(data) > limit else data.decode()


@command(app, "targets", json=True)
def targets_cmd(run: Run,
                output: Annotated[Path | None, typer.Option(
                    "--output", metavar="PATH", help="Write the file here (atomically) "
                    "instead of printing it; only a file_sd JSON file is replaced.")] = None,
                port: Annotated[int, typer.Option(
                    "--port", help="The agents' [api] listen port.")] = 9408,
                use: Annotated[str, typer.Option(
                    "--use", metavar="hostname|address", help="Scrape each node by its "
                    "host name, or by the address its heartbeats come from.")] = "hostname",
                server: ServerOpt = None, token_file: TokenOpt = None) -> None:
    """Prometheus file_sd targets for the agents: the nodes that should answer a scrape,
    labelled instance_id and hostname (run it from a timer; Prometheus re-reads the file)."""
    from clusterctl import system
    from clusterctl.errors import HostError
    from clusterctl.fleet import targets

    if use not in ("hostname", "address"):
        raise UsageError(f"--use {use!r} is not hostname or address")
    nodes = _instances(_client(run, server, token_file).call("GET", "/api/instances"))
    groups, skipped = targets.targets(nodes, port=port,
                                      use="address" if use == "address" else "hostname")
    text = targets.render(groups)
    if output is None:
        if run.json:
            emit_json(groups)
        else:
            print(text, end="")
    else:
        try:
            old = _head(output) if output.is_file() else None
        except (OSError, UnicodeDecodeError) as err:
            raise HostError(f"cannot read {output}: {err}") from err
        if output.exists() and (old is None or not targets.is_targets_file(old)):
            raise UsageError(f"{output} exists and is not a targets file; clusterctl "
                             "replaces only a file_sd JSON list",
                             fix="give --output a new path, or the file Prometheus's "
                             "file_sd_configs reads")
        if not output.parent.is_dir():
            raise UsageError(f"{output.parent} is not a directory",
                             fix="create it first, or give --output another path")
        system.atomic_write_text(output, text, mode=0o644, keep_owner=False)
        if not run.json:
            print(f"{output}: {len(groups)} targets")
    for instance_id in skipped:
        import sys

        print(f"left out {_shown(instance_id)}: no usable {use} for it", file=sys.stderr)
