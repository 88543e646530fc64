"""`clusterctl swap status|expand|shrink|auto|clean`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clusterctl.cli.common import DryRunOpt, Run, command, emit_json
from clusterctl.errors import UsageError
from clusterctl.log import stderr_is_journal
from clusterctl.units import format_size, parse_size

if TYPE_CHECKING:

    from clusterctl.config import Config
    from clusterctl.swap.executor import Operation, RunResult
    from clusterctl.swap.policy import Action, Plan, SwapFacts

app = typer.Typer(help="Auto-expanding swap files in [swap] dir.", no_args_is_help=True)
log = logging.getLogger("clusterctl.swap")

SizeOpt = Annotated[
    str | None, typer.Option("--size", metavar="SIZE", help='How much, e.g. "2G" '
                             "(default: one increment / one file).")
]
WaitOpt = Annotated[
    float, typer.Option("--wait", metavar="SECONDS",
                        help="How long to wait for another swap command to finish.")
]

_VERBS = {"create": "created", "activate": "activated", "remove": "removed",
          "discard": "removed", "adopt": "adopted"}


@command(app, "status", json=True)
def status_cmd(run: Run) -> None:
    """Managed swap files, memory use, and what the next `swap auto` would do and why."""
    from clusterctl.swap import executor as swap

    config = run.config
    facts, plan = swap.status(config)
    if run.json:
        emit_json(status_dict(facts, plan, config))
    else:
        _print_status(facts, plan, config)


def _changing(run: Run, operation: Operation, size: str | None, dry_run: bool, wait: float
              ) -> None:
    from clusterctl.swap import executor as swap

    config = run.config
    size_bytes = None
    if size is not None:
        try:
            size_bytes = parse_size(size)
        except ValueError as err:
            raise UsageError(f"--size: {err}") from err
    result = swap.run(config, operation, size_bytes=size_bytes, dry_run=dry_run,
                      lock_wait_s=wait, progress=_progress_factory())
    if run.json:
        emit_json(_result_dict(operation, dry_run, result))
    else:
        _print_result(dry_run, result)


@command(app, "auto", json=True)
def auto_cmd(run: Run, dry_run: DryRunOpt = False, wait: WaitOpt = 10.0) -> None:
    """One policy step: keep min_size, grow under memory pressure, shrink when calm."""
    _changing(run, "auto", None, dry_run, wait)


@command(app, "expand", json=True)
def expand_cmd(run: Run, size: SizeOpt = None, dry_run: DryRunOpt = False,
               wait: WaitOpt = 10.0) -> None:
    """Add a swap file now (default: one increment), within max_size."""
    _changing(run, "expand", size, dry_run, wait)


@command(app, "shrink", json=True)
def shrink_cmd(run: Run, size: SizeOpt = None, dry_run: DryRunOpt = False,
               wait: WaitOpt = 10.0) -> None:
    """Remove the newest swap file(s), never below min_size, only if their pages fit in RAM."""
    _changing(run, "shrink", size, dry_run, wait)


@command(app, "clean", json=True)
def clean_cmd(run: Run, dry_run: DryRunOpt = False, wait: WaitOpt = 10.0) -> None:
    """Swap off and remove every managed file (refusing any whose pages do not fit in RAM).

    The timer recreates min_size at its next run: stop it first
    (systemctl stop clusterctl-swap.timer) to keep the node without managed swap.
    """
    _changing(run, "clean", None, dry_run, wait)


# ---------------------------------------------------------------------------
# progress: a bar at a terminal, milestones in the journal


def _progress_factory() -> Callable[[str, int], Callable[[int, int], None] | None] | None:
    if sys.stderr.isatty():
        return _terminal_progress
    if stderr_is_journal(sys.stderr, os.environ):
        return _journal_progress
    return None


def _terminal_progress(label: str, total: int) -> Callable[[int, int], None]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress("{task.description}", BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task(label, total=total)
    bar.start()

    def update(done: int, whole: int) -> None:
        bar.update(task, completed=done, total=whole)
        if done >= whole:
            bar.stop()

    return update


def _journal_progress(label: str, total: int) -> Callable[[int, int], None]:
    reported = [-1]

    def update(done: int, whole: int) -> None:
        quarter = int(4 * done / whole) if whole else 4
        if quarter > reported[0]:
            reported[0] = quarter
            log.info("%s: %d%% (%s of %s)", label, 25 * quarter, format_size(done),
                     format_size(whole))

    return update


# ---------------------------------------------------------------------------
# rendering


def _action_dict(action: Action) -> dict[str, Any]:
    return {"action": action.kind, "name": action.name, "size": action.size_bytes,
            "used": action.used_bytes, "reason": action.reason}


def status_dict(facts: SwapFacts, plan: Plan, config: Config) -> dict[str, Any]:
    directory = str(config.swap.dir).rstrip("/")
    managed = {f.path for f in plan.files}
    return {
        "files": [
            {"path": f.path, "size": f.size_bytes, "used": f.used_bytes,
             "priority": f.priority, "active": f.active,
             "state": "active" if f.active else (
                 "off (swapped off by someone else)" if f.off_by_operator else "inactive")}
            for f in plan.files
        ],
        "total": plan.total_bytes,
        "min_size": config.swap.min_size_bytes,
        "max_size": config.swap.max_size_bytes,
        "increment": config.swap.increment_bytes,
        "memory_used_percent": _round(facts.memory.used_percent),
        "memory_available": facts.memory.available_bytes,
        "pressure_some_avg60": (facts.pressure.memory.some.avg60
                                if facts.pressure.memory else None),
        "node_swap": {"total": facts.swap_total_bytes, "free": facts.swap_free_bytes},
        "free_threshold_percent": config.swap.free_threshold_percent,
        "watch_cgroups": list(config.swap.watch_cgroups),
        "next_action": {"summary": plan.summary,
                        "actions": [_action_dict(a) for a in plan.actions]},
        "blocked": plan.ledger.blocked,
        "swap_dir": {"path": directory, "exists": facts.listing.exists,
                     "problem": facts.listing.problem, "fstype": facts.fs.fstype,
                     "mountpoint": facts.fs.mountpoint,
                     "available_bytes": facts.fs.available_bytes},
        "foreign_files": list(plan.foreign),
        "other_swap": [{"path": a.path, "size": a.size_bytes, "used": a.used_bytes,
                        "priority": a.priority} for a in facts.areas if a.path not in managed],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _print_status(facts: SwapFacts, plan: Plan, config: Config) -> None:
    swap = config.swap
    used = facts.memory.used_percent or 0.0
    print(f"managed swap {format_size(plan.total_bytes)} "
          f"(min {format_size(swap.min_size_bytes)}, max {format_size(swap.max_size_bytes)}, "
          f"step {format_size(swap.increment_bytes)}) in {swap.dir}")
    print(f"memory {used:.0f}% in use (grow at {swap.memory_threshold_percent}%), "
          f"{format_size(facts.memory.available_bytes or 0)} available")
    total, free = facts.swap_total_bytes, facts.swap_free_bytes
    share = f" ({100.0 * free / total:.0f}%)" if total else ""
    print(f"node swap {format_size(total)}, {format_size(free)} free{share}; grow under "
          f"{swap.free_threshold_percent}% free, or sooner when the agent sees it running out")
    for f in plan.files:
        state = "active" if f.active else ("off (by someone else)" if f.off_by_operator
                                           else "inactive")
        prio = f"prio {f.priority}" if f.priority is not None else ""
        print(f"  {f.path}  {format_size(f.size_bytes):>6}  used {format_size(f.used_bytes):>6}"
              f"  {prio:9} {state}")
    managed = {f.path for f in plan.files}
    for area in facts.areas:
        if area.path not in managed:
            print(f"  {area.path}  {format_size(area.size_bytes):>6}  used "
                  f"{format_size(area.used_bytes):>6}  prio {area.priority:<4} not clusterctl's")
    for name in plan.foreign:
        print(f"  {swap.dir}/{name}: not clusterctl's, left alone")
    if facts.listing.problem:
        print(f"swap dir problem: {facts.listing.path} is {facts.listing.problem}")
    print(f"next: {plan.summary}")


def _result_dict(operation: str, dry_run: bool, result: RunResult) -> dict[str, Any]:
    return {
        "operation": operation,
        "dry_run": dry_run,
        "summary": result.plan.summary,
        "plan": [_action_dict(a) for a in result.plan.actions],
        "applied": [_action_dict(a) for a in result.applied],
        "events": list(result.events),
    }


def _print_result(dry_run: bool, result: RunResult) -> None:
    plan = result.plan
    if dry_run:
        if not plan.actions:
            print(plan.summary)
        for action in plan.actions:
            print(f"would {action.kind} {action.name} ({format_size(action.size_bytes)}): "
                  f"{action.reason}")
        return
    for action in result.applied:
        print(f"{_VERBS[action.kind]} {action.name} ({format_size(action.size_bytes)}): "
              f"{action.reason}")
    if not result.applied:
        print(plan.summary)
