"""Heartbeats and event delivery to ``[heartbeat] control_url``.

``POST {control_url}/api/agent/status`` every ``interval`` seconds with the payload
below (``schema_version`` 1), and the outbox's events as ``POST
{control_url}/api/agent/events`` (a JSON list, oldest first, each with its ``id``).
A 2xx answer acknowledges; anything else is retried with backoff, events in order.
Before a request, a node without a node token enrols (``enrol.py``); a node token
answered 401 makes it enrol again and send the request once more.
The sequence survives restarts in ``heartbeat.json``; a file there that cannot be read
or written is logged once and the count goes on in memory. Each distinct failure is
logged once, not every retry.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterctl import __version__
from clusterctl.agent.control import Answer, Backoff, ControlClient, Refused
from clusterctl.agent.enrol import Enrolment
from clusterctl.config import Config, instance_id
from clusterctl.errors import ClusterctlError
from clusterctl.events.outbox import Outbox
from clusterctl.hibernate import schedule
from clusterctl.host.net import read_net
from clusterctl.host.procfs import MemoryFacts, read_boot_id, read_memory
from clusterctl.system import statefile
from clusterctl.units import iso_utc

log = logging.getLogger("clusterctl.agent")
SCHEMA_VERSION = 1
SEQUENCE_FILE = "heartbeat.json"
SEQUENCE_SPEC = statefile.StateFile(SEQUENCE_FILE, "the heartbeat sequence file",
                                    statefile.Policy.START_OVER)
MAX_SEQUENCE = 2**53  # exact in any JSON reader


def _sequence_of(data: dict[str, Any]) -> int:
    sequence = data.get("sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or \
            not 0 <= sequence < MAX_SEQUENCE:
        raise ValueError(f"sequence {sequence!r} is not a whole number from 0")
    return sequence


def _why(err: Exception) -> str:
    if isinstance(err, ClusterctlError):
        return err.one_line()
    return getattr(err, "strerror", None) or str(err)


def status_payload(*, instance_id: str, boot_id: str | None, sequence: int, now: float,
                   monotonic_s: float, status: str, idle_since: float | None,
                   gpus: list[dict[str, Any]], memory: dict[str, Any], swap: dict[str, Any],
                   schedule: dict[str, Any] | None = None, interval_s: int | None = None,
                   accept_commands: bool = False,
                   net: dict[str, str | None] | None = None,
                   hibernate: dict[str, Any] | None = None) -> dict[str, Any]:
    """The heartbeat body (pure)."""
    utils = [g["utilization"] for g in gpus if g.get("utilization") is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "instance_id": instance_id,
        "hostname": socket.gethostname(),
        "timestamp": iso_utc(now),
        "boot_id": boot_id,
        "sequence": sequence,
        "monotonic_s": round(monotonic_s, 3),
        "status": status,
        "idle_since": None if idle_since is None else iso_utc(idle_since),
        "gpu_utilization": round(sum(utils) / len(utils), 1) if utils else None,
        "gpus": gpus,
        "memory": memory,
        "swap": swap,
        "schedule": schedule,  # the control plane wakes the node at wake_at
        "agent_version": __version__,
        "interval_s": interval_s,  # [heartbeat] interval
        "accept_commands": accept_commands,
        "net": net or {"interface": None, "mac": None},  # the default IPv4 route's
        "hibernate": hibernate,  # the effective [hibernate] settings a command may change
    }


def _number(value: float) -> float | int:
    """A whole number as an int (5.0 -> 5), else as it is."""
    return int(value) if float(value).is_integer() else value


def hibernate_settings(config: Config) -> dict[str, Any]:
    """The [hibernate] keys the control plane shows and set_hibernate changes."""
    h = config.hibernate
    return {"enabled": h.enabled,
            "gpu_usage_threshold": float(h.gpu_usage_threshold_percent),
            "pause_after_minutes": _number(h.pause_after_minutes)}


def memory_summaries(memory: MemoryFacts, *, last_swap_step: str | None = None,
                     swap_steps: int | None = None, growth_blocked: str | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(memory, swap) as heartbeats and metrics carry them, from one read of meminfo;
    ``growth_blocked``: why swap needs to grow and cannot (the swap ledger's word)."""
    return ({"total_bytes": memory.total_bytes, "available_bytes": memory.available_bytes,
             "used_percent": None if memory.used_percent is None
             else round(memory.used_percent, 1)},
            {"total_bytes": memory.swap_total_bytes, "used_bytes": memory.swap_used_bytes,
             "last_step": last_swap_step, "steps": swap_steps,
             "growth_blocked": growth_blocked})


def node_payload(config: Config, *, sequence: int, now: float, status: str,
                 idle_since: float | None, gpus: list[dict[str, Any]],
                 summaries: tuple[dict[str, Any], dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """The heartbeat this node sends, whoever sends it (the agent, `hibernate heartbeat
    --once`): its id, boot, CLOCK_MONOTONIC, memory, swap and schedule read here."""
    memory, swap = summaries or memory_summaries(read_memory(Path("/")))
    net = read_net(Path("/"))
    return status_payload(
        instance_id=instance_id(config), boot_id=read_boot_id(Path("/")),
        sequence=sequence, now=now, monotonic_s=time.monotonic(), status=status,
        idle_since=idle_since, gpus=gpus, memory=memory, swap=swap,
        schedule=schedule.next_times(config.paths.state_dir, now),
        interval_s=config.heartbeat.interval_s,
        accept_commands=config.heartbeat.accept_commands,
        net={"interface": net.interface, "mac": net.mac},
        hibernate=hibernate_settings(config))


@dataclass
class DeliveryState:
    last_heartbeat_at: float | None = None
    last_heartbeat_ok: bool | None = None
    last_error: str | None = None
    events_sent: int = 0


class Delivery:
    """Sends heartbeats and drains the outbox; never raises into the agent's loop."""

    def __init__(self, client: ControlClient, outbox: Outbox, state_dir: Path, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._flushing = threading.Lock()
        self.more = False  # the last flush stopped with events left
        if client.state_dir is None:  # the node token lives in this node's state dir
            client.state_dir = state_dir
        self.client = client
        self.instance_id = outbox.instance_id or socket.gethostname()  # who enrols
        self._enrolment: Enrolment | None = None
        self.monotonic = monotonic  # when enrolment may be asked again
        self.outbox = outbox
        self.state_dir = state_dir
        self.backoff = Backoff()
        self.state = DeliveryState()
        self._sequence = 0  # the last one sent by this process
        self._told: set[str] = set()
        self._logged: dict[str, str] = {}  # heartbeat | events: the failure last logged

    def next_sequence(self) -> int:
        """One more than the last heartbeat's, kept in ``heartbeat.json`` across restarts.
        Never raises: a file that cannot be read or written is logged once and the count
        goes on in memory."""
        path = self.state_dir / SEQUENCE_FILE
        problems = []
        try:  # a damaged file is kept aside, with an event, and the count starts over
            stored = statefile.read(SEQUENCE_SPEC, self.state_dir, _sequence_of) or 0
        except ClusterctlError as err:
            problems.append(f"cannot read {path}: {_why(err)}")
            stored = 0
        self._sequence = max(stored, self._sequence) + 1
        try:
            statefile.write(SEQUENCE_SPEC, self.state_dir, {"sequence": self._sequence})
        except (OSError, ClusterctlError) as err:
            problems.append(f"cannot keep the heartbeat sequence in {path}: {_why(err)}")
        for problem in problems:
            if problem not in self._told:
                self._told.add(problem)
                log.warning("%s; heartbeats go on from sequence %d (fix or remove the file)",
                            problem, self._sequence)
        return self._sequence

    def heartbeat(self, payload: dict[str, Any]) -> bool:
        return self.beat(payload) is not None

    def beat(self, payload: dict[str, Any]) -> Answer | None:
        """Send a heartbeat; its answer (the control plane's directions), or None when it
        failed (logged once)."""
        if isinstance(payload.get("instance_id"), str):
            self.instance_id = payload["instance_id"]
        try:
            answer = self.post("/api/agent/status", payload)
        except ClusterctlError as err:
            self._failed(f"heartbeat: {err.one_line()}", heartbeat=True)
            return None
        self.state.last_heartbeat_at = time.time()
        self.state.last_heartbeat_ok = True
        self.state.last_error = None
        self._logged.pop("heartbeat", None)
        self.backoff.succeeded()
        return answer

    def post(self, path: str, payload: Any) -> Answer:
        """``client.post``, enrolled first when the node has no node token yet; a node
        token answered 401 makes the node enrol again and send once more."""
        enrolment = self._enrolment
        if enrolment is None or enrolment.client is not self.client:  # a reload: a new one
            enrolment = self._enrolment = Enrolment(self.client, self.instance_id,
                                                    monotonic=self.monotonic)
        enrolment.instance_id = self.instance_id
        enrolment.before()
        try:
            return self.client.post(path, payload)
        except Refused as err:
            if not (err.status == 401 and err.node_token and enrolment.again()):
                raise
        return self.client.post(path, payload)

    def flush(self, *, max_batches: int = 50, budget_s: float | None = None) -> bool:
        """Send pending events in order, batch by batch; False if something failed. A batch
        of lines that are not events only moves the cursor past them. Stops after
        ``budget_s`` (a long backlog to a slow control plane must not hold heartbeats or
        the watchdog back); ``more`` then says that events are left for the next pass."""
        with self._flushing:  # the delivery loop and a hibernation's drain, one at a time
            return self._flush(max_batches, budget_s)

    def _flush(self, max_batches: int, budget_s: float | None) -> bool:
        self.more = False
        deadline = None if budget_s is None else time.monotonic() + budget_s
        for _ in range(max_batches):
            if deadline is not None and time.monotonic() >= deadline:
                self.more = True
                return True
            try:
                batch = self.outbox.pending()
            except ClusterctlError as err:
                self._failed(f"events: {err.one_line()}")
                return False
            if batch.cursor is None:
                return True
            if batch.events:
                try:
                    self.post("/api/agent/events", list(batch.events))
                except ClusterctlError as err:
                    self._failed(f"events: {err.one_line()}")
                    return False
            self.outbox.ack(batch.cursor)  # kept in memory if it cannot be written
            self._logged.pop("events", None)
            self.state.events_sent += len(batch.events)
            self.backoff.succeeded()
        self.more = True  # max_batches sent: there may be more
        return True

    def _failed(self, message: str, *, heartbeat: bool = False) -> None:
        channel = "heartbeat" if heartbeat else "events"
        if self._logged.get(channel) != message:
            log.warning("%s", message)  # once per distinct failure, not every retry
        self._logged[channel] = message
        self.state.last_error = message
        if heartbeat:
            self.state.last_heartbeat_ok = False
