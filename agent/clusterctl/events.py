"""The product's event log: every change clusterctl makes, in order, never lost.

An append-only JSON-lines file under the state dir (``events.jsonl``). Each
event has a unique ``id``, ``event_type``, an ISO-8601 UTC ``timestamp``,
``instance_id``, a ``reason`` and its details, flat, in the hibernation
seed's shape. Appends take an exclusive lock on the file and fsync, so the
timer, a manual command and the agent can write at once. The agent sends
them to the control plane (``POST /api/agent/events``) from here.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clusterctl.errors import HostError

FILE_NAME = "events.jsonl"
ROTATE_BYTES = 8 * 2**20  # then renamed events.jsonl.<UTC time>; monitor removes old ones


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventLog:
    def __init__(self, state_dir: Path, instance_id: str, *,
                 rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = state_dir / FILE_NAME
        self.instance_id = instance_id
        self.rotate_bytes = rotate_bytes

    def record(self, event_type: str, reason: str, details: Mapping[str, Any], *,
               now: float) -> dict[str, Any]:
        event = {
            "id": str(uuid.uuid4()),
            "event_type": event_type,
            "timestamp": iso_utc(now),
            "instance_id": self.instance_id,
            "reason": reason,
            **details,
        }
        line = (json.dumps(event, separators=(",", ":"), sort_keys=False) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise HostError(f"cannot open the event log {self.path}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a crash cut the last line: start a fresh one
            os.write(fd, line)
            os.fsync(fd)
            if size + len(line) >= self.rotate_bytes:  # still under the lock
                moment = datetime.fromtimestamp(now, tz=timezone.utc)
                stamp = moment.strftime("%Y%m%dT%H%M%S.%fZ")  # sorts in time order
                self.path.replace(self.path.with_name(f"{FILE_NAME}.{stamp}"))
        finally:
            os.close(fd)
        return event

    def read(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Events oldest first (the last ``limit`` when given); unparsable lines skipped."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines[-limit:] if limit else lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write; the rest is intact
        return events
