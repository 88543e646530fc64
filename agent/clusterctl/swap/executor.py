"""Auto-expanding swap files that clusterctl owns in ``[swap] dir``.

``read_facts`` takes one snapshot of the host; the planners in
``clusterctl.swap.policy`` decide; ``execute`` carries a plan out under the
swap lock, saving the ledger after every step and recording every change in
the event log. ``run`` is what `clusterctl swap auto|expand|shrink|clean` and
the agent call.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

from clusterctl import locks
from clusterctl.config import Config, instance_id
from clusterctl.errors import HostError
from clusterctl.events.log import EventLog
from clusterctl.host.procfs import read_boot_id, read_memory, read_pressure, read_swaps
from clusterctl.host.storage import read_filesystem
from clusterctl.host.swapdir import attribute_areas, read_swap_dir
from clusterctl.swap import ledger as ledgers
from clusterctl.swap.policy import (
    Action,
    Plan,
    PolicyError,
    Signal,
    SwapFacts,
    SwapTrend,
    fix_for,
    plan_auto,
    plan_clean,
    plan_expand,
    plan_shrink,
)
from clusterctl.system import statefile, swapfiles
from clusterctl.units import format_size

log = logging.getLogger(__name__)

Operation = Literal["auto", "expand", "shrink", "clean"]
ProgressFactory = Callable[[str, int], Callable[[int, int], None] | None]
LOCK_NAME = "swap.lock"

__all__ = ["Operation", "PolicyError", "RunResult", "read_facts", "run", "status"]


def read_facts(config: Config, *, root: Path = Path("/")) -> SwapFacts:
    """One snapshot of what the swap policy decides on.

    What is advice degrades and is reported (the disk type under the swap dir, PSI);
    a swap dir entry that is there but cannot be read (EIO) stops here: whether it is
    one of ours, and active, is unknown, and no step may guess.
    """
    swap_dir = config.swap.dir
    listing = read_swap_dir(swap_dir)
    if listing.unreadable:
        raise HostError(f"cannot read {len(listing.unreadable)} entr"
                        f"{'y' if len(listing.unreadable) == 1 else 'ies'} in swap dir "
                        f"{swap_dir}: " + "; ".join(listing.unreadable),
                        fix="check the disk under the swap dir (dmesg, smartctl); swap is "
                        "left as it is until they can be read")
    return SwapFacts(
        memory=read_memory(root),
        pressure=read_pressure(root),
        areas=attribute_areas(read_swaps(root), listing),
        listing=listing,
        fs=read_filesystem(root, str(swap_dir)),
        boot_id=read_boot_id(root),
        ledger=ledgers.load(config.paths.state_dir, record=statefile.events_to(
            config.paths.state_dir, instance_id(config))),
    )


def status(config: Config, *, now: float | None = None) -> tuple[SwapFacts, Plan]:
    """The facts and the plan the next `swap auto` would carry out (changes nothing)."""
    facts = read_facts(config)
    return facts, plan_auto(facts, config.swap, time.time() if now is None else now)


@dataclass(frozen=True)
class RunResult:
    facts: SwapFacts
    plan: Plan
    applied: tuple[Action, ...]
    events: tuple[dict[str, Any], ...]


def run(
    config: Config,
    operation: Operation,
    *,
    size_bytes: int | None = None,
    dry_run: bool = False,
    lock_wait_s: float = 10.0,
    progress: ProgressFactory | None = None,
    now: Callable[[], float] = time.time,
    trend: SwapTrend | None = None,
    signals: tuple[Signal, ...] = (),
) -> RunResult:
    """Plan ``operation`` and, unless ``dry_run``, carry it out; one writer at a time.
    ``trend`` and ``signals`` are what the agent saw (how fast swap use grows, what fired)."""
    lock = config.paths.run_dir / LOCK_NAME
    with locks.exclusive(lock, what="clusterctl swap command", wait_s=lock_wait_s):
        facts = replace(read_facts(config), trend=trend, signals=signals)
        moment = now()
        if operation == "auto":
            plan = plan_auto(facts, config.swap, moment)
        elif operation == "expand":
            plan = plan_expand(facts, config.swap, moment, size_bytes)
        elif operation == "shrink":
            plan = plan_shrink(facts, config.swap, moment, size_bytes)
        else:
            plan = plan_clean(facts, config.swap, moment)
        if dry_run:
            return RunResult(facts, plan, (), ())
        applied, events = execute(plan, facts, config, progress=progress, now=now)
    if plan.refused:
        raise HostError(f"{len(plan.refused)} file(s) left in place: "
                        + "; ".join(plan.refused), fix="free memory, then run it again")
    if plan.failed:
        raise HostError(f"swap cannot grow: {plan.failed}", fix=fix_for(plan.failed))
    return RunResult(facts, plan, applied, events)


def execute(
    plan: Plan,
    facts: SwapFacts,
    config: Config,
    *,
    progress: ProgressFactory | None = None,
    now: Callable[[], float] = time.time,
) -> tuple[tuple[Action, ...], tuple[dict[str, Any], ...]]:
    """Carry out a plan; the ledger is saved after every step, every change is an event."""
    state_dir = config.paths.state_dir
    log_ = EventLog(state_dir, instance_id(config))
    events: list[dict[str, Any]] = []
    for notice in plan.notices:  # things an operator should know: warnings in the journal
        log.warning("%s", notice.reason)
        events.append(log_.record(notice.event_type, notice.reason, notice.details, now=now()))
    ledger = plan.ledger
    applied: list[Action] = []
    total = plan.total_bytes
    if plan.actions:
        dfd = swapfiles.open_dir(config.swap.dir,
                                 create=any(a.kind == "create" for a in plan.actions))
        try:
            for action in plan.actions:
                path = str(config.swap.dir / action.name)
                try:
                    ledger, event = _apply(action, dfd, facts, config, ledger, total, progress,
                                           now())
                except (OSError, HostError) as err:
                    message = err.message if isinstance(err, HostError) else str(err)
                    events.append(log_.record(
                        "swap_failed", message,
                        {"action": action.kind, "path": path, "size_bytes": action.size_bytes,
                         "planned_because": action.reason}, now=now()))
                    ledgers.save(state_dir, ledger)
                    if isinstance(err, HostError):
                        raise
                    raise HostError(f"{action.kind} {path}: {err}") from err
                applied.append(action)
                ledgers.save(state_dir, ledger)
                if event is not None:
                    total = event.get("total_bytes", total)
                    events.append(log_.record(event.pop("event_type"), action.reason, event,
                                              now=now()))
        finally:
            os.close(dfd)
    ledgers.save(state_dir, ledger)
    return tuple(applied), tuple(events)


def _apply(action: Action, dfd: int, facts: SwapFacts, config: Config, ledger: ledgers.Ledger,
           total: int, progress: ProgressFactory | None, moment: float
           ) -> tuple[ledgers.Ledger, dict[str, Any] | None]:
    directory = config.swap.dir
    path = str(directory / action.name)
    size = action.size_bytes
    if action.kind == "create":
        label = f"create {path} ({format_size(size)})"
        log.info("%s: %s", label, action.reason)
        method = swapfiles.create(
            dfd, directory, action.name, size,
            method=cast(swapfiles.Method, config.swap.allocation),  # validated by config
            btrfs=facts.fs.fstype == "btrfs",
            progress=progress(label, size) if progress else None)
        ledger = ledger.with_file(ledgers.LedgerFile(action.name, size, moment, method,
                                                     boot_id=facts.boot_id))
        return ledger, {"event_type": "swap_expanded", "path": path, "size_bytes": size,
                        "total_bytes": total + size, "method": method}
    if action.kind == "activate":
        log.info("activate %s: %s", path, action.reason)
        swapfiles.activate(dfd, directory, action.name, size)
        entry = ledger.file(action.name) or ledgers.LedgerFile(action.name, size, moment,
                                                               "adopted")
        ledger = ledger.with_file(replace(entry, boot_id=facts.boot_id, off_since=None))
        return ledger, {"event_type": "swap_reactivated", "path": path, "size_bytes": size,
                        "total_bytes": total + size}
    if action.kind == "remove":
        label = f"swapoff {path} ({format_size(action.used_bytes)} in use)"
        log.info("%s: %s", label, action.reason)
        swapfiles.deactivate(dfd, directory, action.name,
                             progress=progress(label, action.used_bytes)
                             if progress and action.used_bytes else None)
        swapfiles.remove(dfd, action.name)
        return ledger.without(action.name), {
            "event_type": "swap_shrunk", "path": path, "size_bytes": size,
            "used_bytes": action.used_bytes, "total_bytes": max(0, total - size)}
    if action.kind == "discard":
        log.info("remove %s: %s", path, action.reason)
        swapfiles.remove(dfd, action.name)
        return ledger.without(action.name), {"event_type": "swap_discarded", "path": path,
                                             "size_bytes": size}
    # adopt
    was_active = path in {a.path for a in facts.areas}
    ledger = ledger.with_file(ledgers.LedgerFile(
        action.name, size, moment, "adopted", boot_id=facts.boot_id if was_active else None))
    log.info("adopt %s: %s", path, action.reason)
    return ledger, {"event_type": "swap_adopted", "path": path, "size_bytes": size}
