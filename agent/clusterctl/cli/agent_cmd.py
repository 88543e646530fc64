"""`clusterctl agent run`: the long-running service (clusterctl-agent.service)."""

from __future__ import annotations

import typer

from clusterctl.cli.common import Run, command

app = typer.Typer(help="The long-running service: GPU monitor, swap policy, "
                  "local API and metrics, heartbeats.", no_args_is_help=True)


@command(app, "run")
def run_cmd(run: Run) -> None:
    """Run in the foreground until SIGTERM (what clusterctl-agent.service starts).

    Tells systemd READY=1 after the first GPU sample, keeps STATUS= current, pings the
    watchdog while its loops progress; SIGHUP reloads the config (a bad one is refused).
    """
    from clusterctl.agent.service import Agent

    raise typer.Exit(Agent(run.config_path).run())
