"""Heartbeats and event delivery to ``[heartbeat] control_url``.

``POST {control_url}/api/agent/status`` every ``interval`` seconds with the payload
below (``schema_version`` 1), and the outbox's events as ``POST
{control_url}/api/agent/events`` (a JSON list, oldest first, each with its ``id``).
A 2xx answer acknowledges; anything else is retried with backoff, events in order.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterctl import __version__, system
from clusterctl.agent.control import Backoff, ControlClient
from clusterctl.agent.outbox import Outbox
from clusterctl.errors import ClusterctlError
from clusterctl.events import iso_utc

log = logging.getLogger("clusterctl.agent")
SCHEMA_VERSION = 1
SEQUENCE_FILE = "heartbeat.json"


def status_payload(*, instance_id: str, boot_id: str | None, sequence: int, now: float,
                   monotonic_s: float, status: str, idle_since: float | None,
                   gpus: list[dict[str, Any]], memory: dict[str, Any], swap: dict[str, Any],
                   schedule: dict[str, Any] | None = None) -> dict[str, Any]:
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
    }


@dataclass
class DeliveryState:
    last_heartbeat_at: float | None = None
    last_heartbeat_ok: bool | None = None
    last_error: str | None = None
    events_sent: int = 0


class Delivery:
    """Sends heartbeats and drains the outbox; never raises into the agent's loop."""

    def __init__(self, client: ControlClient, outbox: Outbox, state_dir: Path) -> None:
        self.client = client
        self.outbox = outbox
        self.state_dir = state_dir
        self.backoff = Backoff()
        self.state = DeliveryState()

    def next_sequence(self) -> int:
        path = self.state_dir / SEQUENCE_FILE
        try:
            sequence = int(json.loads(path.read_text())["sequence"]) + 1
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            sequence = 1
        self.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        system.atomic_write_text(path, json.dumps({"sequence": sequence}) + "\n", mode=0o600)
        return sequence

    def heartbeat(self, payload: dict[str, Any]) -> bool:
        try:
            self.client.post("/api/agent/status", payload)
        except ClusterctlError as err:
            self._failed(f"heartbeat: {err.one_line()}", heartbeat=True)
            return False
        self.state.last_heartbeat_at = time.time()
        self.state.last_heartbeat_ok = True
        self.state.last_error = None
        self.backoff.succeeded()
        return True

    def flush(self, *, max_batches: int = 50) -> bool:
        """Send pending events in order, batch by batch; False if something failed."""
        for _ in range(max_batches):
            batch = self.outbox.pending()
            if not batch.events or batch.cursor is None:
                return True
            try:
                self.client.post("/api/agent/events", list(batch.events))
            except ClusterctlError as err:
                self._failed(f"events: {err.one_line()}")
                return False
            self.outbox.ack(batch.cursor)
            self.state.events_sent += len(batch.events)
            self.backoff.succeeded()
        return True

    def _failed(self, message: str, *, heartbeat: bool = False) -> None:
        if self.state.last_error != message:
            log.warning("%s", message)  # once per distinct failure, not every retry
        self.state.last_error = message
        if heartbeat:
            self.state.last_heartbeat_ok = False
