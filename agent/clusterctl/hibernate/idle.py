"""Idle detection: running -> idle -> hibernating -> hibernated, and back (pure).

A node is idle while every GPU's utilization is under ``gpu_usage_threshold`` and the
optional extra conditions hold (CPU under a threshold, no SSH session, none of the
listed processes running). Anything that cannot be read counts as activity: a node
is never put to sleep on a guess. After ``pause_after_minutes`` of idleness, and only
when ``enabled`` and nothing inhibits it, the tracker asks for the action.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Status = Literal["running", "idle", "hibernating", "hibernated"]


@dataclass(frozen=True)
class Observation:
    """One look at the node."""

    at: float
    gpu_utilization: tuple[float | None, ...]  # per GPU; None: could not be read
    cpu_percent: float | None = None
    ssh_sessions: int | None = None
    busy_processes: tuple[str, ...] = ()  # listed processes found running
    inhibited_by: str | None = None  # why sleep is held off now (inhibit, a systemd lock)


@dataclass(frozen=True)
class IdleRules:
    enabled: bool
    gpu_usage_threshold_percent: float
    pause_after_minutes: float
    cpu_threshold_percent: float | None = None  # None: CPU is not a condition
    require_no_ssh: bool = False


@dataclass(frozen=True)
class IdleState:
    status: Status = "running"
    idle_since: float | None = None
    last_activity: float | None = None
    last_utilization: float | None = None


@dataclass(frozen=True)
class IdleEvent:
    event_type: str  # idle_detected, active_again, hibernate_started, ...
    reason: str
    gpu_utilization: float | None


def mean_utilization(obs: Observation) -> float | None:
    values = [u for u in obs.gpu_utilization if u is not None]
    return round(sum(values) / len(values), 1) if values else None


def activity(obs: Observation, rules: IdleRules) -> str | None:
    """Why the node counts as busy now, or None when it is idle."""
    if not obs.gpu_utilization:
        return "no GPU utilization to judge by"
    for index, value in enumerate(obs.gpu_utilization):
        if value is None:
            return f"GPU {index} utilization could not be read"
        if value >= rules.gpu_usage_threshold_percent:
            return f"GPU {index} at {value:g}% (idle below {rules.gpu_usage_threshold_percent:g}%)"
    if rules.cpu_threshold_percent is not None:
        if obs.cpu_percent is None:
            return "CPU use could not be read"
        if obs.cpu_percent >= rules.cpu_threshold_percent:
            return f"CPU at {obs.cpu_percent:.0f}%"
    if rules.require_no_ssh:
        if obs.ssh_sessions is None:
            return "SSH sessions could not be counted"
        if obs.ssh_sessions:
            return f"{obs.ssh_sessions} SSH session(s) open"
    if obs.busy_processes:
        return f"{', '.join(obs.busy_processes)} running"
    return None


def step(state: IdleState, obs: Observation, rules: IdleRules
         ) -> tuple[IdleState, tuple[IdleEvent, ...], bool]:
    """The next state, its events, and whether the action should run now."""
    util = mean_utilization(obs)
    busy = activity(obs, rules)
    events: list[IdleEvent] = []
    if state.status == "hibernating":  # the action is running
        return replace(state, last_utilization=util), (), False
    if state.status == "hibernated":
        if busy is None:
            return replace(state, last_utilization=util), (), False
        return (IdleState("running", None, obs.at, util),
                (IdleEvent("woke", f"active after hibernation: {busy}", util),), False)
    if busy is not None:
        if state.status == "idle":
            events.append(IdleEvent("active_again", busy, util))
        return IdleState("running", None, obs.at, util), tuple(events), False
    if state.status == "running":
        state = IdleState("idle", obs.at, state.last_activity, util)
        events.append(IdleEvent(
            "idle_detected", f"GPU utilization < {rules.gpu_usage_threshold_percent:g}%", util))
    else:
        state = replace(state, last_utilization=util)
    idle_for = obs.at - state.idle_since if state.idle_since is not None else 0.0
    due = rules.enabled and idle_for >= rules.pause_after_minutes * 60
    if due and obs.inhibited_by is not None:
        return state, tuple(events), False
    if due:
        state = replace(state, status="hibernating")
        events.append(IdleEvent(
            "hibernate_started", f"GPU idle for {idle_for / 60:.1f} minutes", util))
    return state, tuple(events), due


def finished(state: IdleState, ok: bool, at: float) -> IdleState:
    """After the action: hibernated, or back to running (the idle clock starts again)."""
    if ok:
        return replace(state, status="hibernated")
    return IdleState("running", None, at, state.last_utilization)
