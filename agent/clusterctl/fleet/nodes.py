"""What the control plane knows of each node, in memory, and how it changes (pure).

A node's state is one of ``STATES``. Heartbeats move it (the node says running, idle,
hibernating or hibernated); silence moves it too: after ``LOST_AFTER_INTERVALS`` of its
intervals plus ``GRACE_S`` a node is ``lost``, unless its last word was that it was
going to sleep, in which case it is ``hibernated``. A wake makes it ``waking`` until
its next heartbeat, or ``wake_failed`` after ``[fleet] resume_timeout``. Only
transitions are written to the database; ``last_seen`` lives here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from clusterctl.units import iso_utc

STATES = ("running", "idle", "hibernating", "hibernated", "waking", "lost", "wake_failed",
          "revoked")
REPORTED = ("running", "idle", "hibernating", "hibernated")
ASLEEP = ("hibernated", "waking", "wake_failed")  # the node is off, as far as we know
LOST_AFTER_INTERVALS = 3
GRACE_S = 5.0
MIN_INTERVAL_S = 10


@dataclass
class Node:
    instance_id: str
    hostname: str
    enrolled_at: float
    state: str
    state_since: float  # wall clock
    token_hash: str | None
    interval_s: int = 30  # what the node asks for ([heartbeat] interval)
    assigned_s: int = 30  # what we told it last (next_interval_s)
    last_seen: float | None = None  # wall clock of the last heartbeat
    seen_mono: float | None = None  # time.monotonic() of the last heartbeat (or of our start)
    reported: str | None = None  # the status of its last heartbeat
    boot_id: str | None = None
    mac: str | None = None
    interface: str | None = None
    agent_version: str | None = None
    gpus: int = 0
    gpu_utilization: float | None = None
    heartbeat: dict[str, Any] | None = None
    hibernate: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    wake_started_at: float | None = None  # wall clock
    wake_started_mono: float | None = None
    hibernated_s: float = 0.0  # closed periods asleep
    idle_gpu_s_avoided: float = 0.0
    accept_commands: bool | None = None
    address: str | None = None  # the IP its last heartbeat came from (memory only)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict[str, Any], now_mono: float) -> Node:
        """A node as stored; what a hand-edited or damaged row holds that the server cannot
        use is taken as unknown (a state not in STATES as ``lost``, JSON of the wrong shape
        as none) rather than failing every pass of the liveness loop."""
        def mapping(value: Any) -> dict[str, Any] | None:
            return value if isinstance(value, dict) else None

        beat = mapping(row.get("heartbeat"))
        interval = row["interval_s"]
        node = cls(instance_id=row["instance_id"], hostname=row["hostname"] or "",
                   enrolled_at=row["enrolled_at"],
                   state=row["state"] if row["state"] in STATES else "lost",
                   state_since=row["state_since"], token_hash=row["token_hash"],
                   interval_s=interval if isinstance(interval, int) and interval > 0 else 30,
                   last_seen=row["last_seen"],
                   seen_mono=now_mono, boot_id=row["boot_id"], mac=row["mac"],
                   interface=row["interface"], agent_version=row["agent_version"],
                   gpus=max(row["gpus"] or 0, 0), heartbeat=beat,
                   hibernate=mapping(row["hibernate"]), schedule=mapping(row["schedule"]),
                   wake_started_at=row["wake_started_at"],
                   hibernated_s=row["hibernated_s"] or 0.0,
                   idle_gpu_s_avoided=row["idle_gpu_s_avoided"] or 0.0)
        node.assigned_s = max(MIN_INTERVAL_S, node.interval_s)
        if node.heartbeat and node.heartbeat.get("status") in REPORTED:
            node.reported = node.heartbeat["status"]
        if node.state == "waking":  # the resume timeout counts from our start at most
            node.wake_started_mono = now_mono
        return node

    def summary(self, now: float) -> dict[str, Any]:
        """What the operator API, the CLI and the page show of the node at ``now``: the
        server's own facts, and the last heartbeat's numbers taken as the node sent them
        (a number that is not one is shown as unknown)."""
        beat = self.heartbeat or {}
        swap = _mapping(beat.get("swap"))
        memory = _mapping(beat.get("memory"))
        return {
            "instance_id": self.instance_id, "hostname": self.hostname, "state": self.state,
            "state_since": iso_utc(self.state_since),
            "status": self.reported,
            "last_seen": None if self.last_seen is None else iso_utc(self.last_seen),
            "last_seen_age_s": None if self.last_seen is None
            else round(max(0.0, now - self.last_seen), 1),
            "boot_id": self.boot_id, "agent_version": self.agent_version,
            "gpu_utilization": self.gpu_utilization, "gpus": self.gpus,
            "enrolled_at": iso_utc(self.enrolled_at), "revoked": self.state == "revoked",
            "interval_s": self.interval_s, "next_interval_s": self.assigned_s,
            "mac": self.mac, "interface": self.interface, "address": self.address,
            "accept_commands": self.accept_commands,
            "idle_since": text(beat.get("idle_since"), 64),
            "memory_used_percent": _number(memory.get("used_percent")),
            "swap": {"used_bytes": _number(swap.get("used_bytes")),
                     "total_bytes": _number(swap.get("total_bytes"))} if swap else None,
            "gpu_list": [_gpu_brief(g) for g in itertools.islice(
                (g for g in _list(beat.get("gpus")) if isinstance(g, dict)), MAX_GPUS_LISTED)],
            "schedule": self.schedule, "hibernate": self.hibernate,
        }


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: object) -> float | int | None:
    """A number the node sent, else None (the server already turned NaN/inf into null)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def text(value: object, limit: int) -> str | None:
    """A short printable string from a node, else None: NUL, lone surrogates and control
    characters can be neither stored (PostgreSQL, UTF-8) nor shown on a terminal."""
    if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable():
        return value
    return None


GPU_STATES = ("optimal", "normal", "throttled", "critical")
# GPUs listed per node: a node has a few (16 at most today), but a heartbeat of 256 KiB can
# list 85,000 empty ones, each 165 bytes in every node list the page reads every 5 s
MAX_GPUS_LISTED = 64


def _gpu_brief(gpu: dict[str, Any]) -> dict[str, Any]:
    """One GPU of a heartbeat, as the fleet list shows it."""
    memory = _mapping(gpu.get("memory"))
    state = gpu.get("state")
    return {"index": _number(gpu.get("index")), "name": text(gpu.get("name"), 128),
            "uuid": text(gpu.get("uuid"), 128),
            "utilization": _number(gpu.get("utilization")),
            "temperature": _number(gpu.get("temperature")),
            "memory_used_mib": _number(memory.get("used")),
            "memory_total_mib": _number(memory.get("total")),
            "state": state if state in GPU_STATES else None,
            "lost": gpu.get("lost") is True}


def next_interval(node_interval_s: int, live_nodes: int, max_per_s: int) -> int:
    """Seconds until a node's next heartbeat: its own interval, stretched so that the
    fleet sends at most ``max_per_s`` a second, never under MIN_INTERVAL_S."""
    spread = math.ceil(max(live_nodes, 1) / max(max_per_s, 1))
    return max(MIN_INTERVAL_S, node_interval_s, spread)


def silent_limit_s(node: Node) -> float:
    return LOST_AFTER_INTERVALS * node.assigned_s + GRACE_S


def asleep_s(node: Node, now: float) -> float:
    """Seconds asleep, closed periods and the current one."""
    return node.hibernated_s + (max(0.0, now - node.state_since) if node.state in ASLEEP
                                else 0.0)


def idle_gpu_s(node: Node, now: float) -> float:
    """GPU-seconds not spent idle: each period asleep times the node's GPUs."""
    return node.idle_gpu_s_avoided + (node.gpus * max(0.0, now - node.state_since)
                                      if node.state in ASLEEP else 0.0)


@dataclass(frozen=True)
class Change:
    state: str
    event: str | None  # the fleet event it is worth, if any
    reason: str


def on_heartbeat(node: Node, reported: str, boot_id: str | None) -> Change | None:
    """The state after a heartbeat that says ``reported``; None when it stays."""
    if node.state == "revoked":
        return None
    new = reported if reported in REPORTED else "running"
    if node.state in ("waking", "wake_failed"):
        rebooted = boot_id is not None and boot_id != node.boot_id
        return Change(new, "woke", "the node heartbeats again"
                      + (" after a new boot" if rebooted else ""))
    if node.state == "lost":
        return Change(new, "node_back", f"heartbeats again, {new}")
    if node.state == "hibernated" and new not in ("hibernated", "hibernating"):
        return Change(new, "woke", "the node heartbeats again without a wake from here")
    if new != node.state:
        return Change(new, None, f"the node says {new}")
    return None


def on_silence(node: Node, now_mono: float, resume_timeout_s: float) -> Change | None:
    """What silence means now: lost, hibernated (it said it was going), wake_failed."""
    if node.state == "waking":
        started = node.wake_started_mono
        if started is not None and now_mono - started > resume_timeout_s:
            return Change("wake_failed", "wake_failed",
                          f"no heartbeat within {resume_timeout_s:g} s of the wake")
        return None
    if node.state not in ("running", "idle", "hibernating") or node.seen_mono is None:
        return None
    silent = now_mono - node.seen_mono
    if silent <= silent_limit_s(node):
        return None
    if node.state == "hibernating" or node.reported == "hibernating":
        return Change("hibernated", "node_hibernated",
                      f"silent for {silent:.0f} s after saying it was going to sleep")
    return Change("lost", "node_lost",
                  f"no heartbeat for {silent:.0f} s ({LOST_AFTER_INTERVALS} intervals of "
                  f"{node.assigned_s} s and {GRACE_S:g} s grace)")
