"""The product's event log: every change clusterctl makes, in order, never lost.

An append-only JSON-lines file under the state dir (``events.jsonl``). Each
event has a unique ``id``, ``event_type``, an ISO-8601 UTC ``timestamp``,
``instance_id``, a ``reason`` and its details, flat, in the hibernation
shape the control plane reads. Appends take an exclusive lock on the file and fsync, so the
timer, a manual command and the agent can write at once; a writer that waited
while another rotated the file writes to the new one. An event is written
whole or not at all: a full disk gives a HostError and the file is cut back to
its last complete line. The log is never written through a symlink, nor when it
is not a regular file. The agent sends the events to the control plane
(``POST /api/agent/events``) from here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from clusterctl.errors import HostError
from clusterctl.system import open_regular
from clusterctl.units import iso_utc

log = logging.getLogger("clusterctl")
FILE_NAME = "events.jsonl"
ROTATE_BYTES = 8 * 2**20  # then renamed events.jsonl.<UTC time>; monitor removes old ones
_NO_ROOM = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EIO: "I/O error", errno.EFBIG: "file too large"}


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
        fd = self._open_locked()
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a crash cut the last line: start a fresh one
            self._append(fd, line, size, event_type)
            if size + len(line) >= self.rotate_bytes:  # still under the lock
                self._rotate(now)
        finally:
            os.close(fd)
        return event

    def _open_locked(self) -> int:
        """The live file, open and locked; reopened if it was rotated while we waited."""
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT,
                                  what="the event log")
            except OSError as err:
                raise HostError(f"cannot open the event log {self.path}: {err.strerror}") from err
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now_there = self.path.lstat()
            except FileNotFoundError:
                now_there = None
            if now_there is not None and (now_there.st_dev, now_there.st_ino) == \
                    (mine.st_dev, mine.st_ino):
                return fd
            os.close(fd)  # rotated away while we waited for the lock: the new one

    def _append(self, fd: int, line: bytes, size: int, event_type: str) -> None:
        """Write ``line`` whole and fsync, or cut the file back to ``size`` and raise."""
        try:
            written = 0
            while written < len(line):  # a write may take fewer bytes than asked
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no half event stays behind
            problem = _NO_ROOM.get(err.errno or 0)
            if problem is not None:
                raise HostError(f"{problem}: cannot record event {event_type} in {self.path}",
                                fix=f"free space on the filesystem of {self.path.parent}"
                                ) from err
            raise HostError(f"cannot record event {event_type} in {self.path}: "
                            f"{err.strerror}") from err

    def _rotate(self, now: float) -> None:
        """Rename the live file to a free ``events.jsonl.<UTC time>`` (under its lock).

        Rotated files are read in name order, so the name comes after every rotated file
        already there, even when the clock went back (a node woken before NTP set it
        right): the name is a sequence that looks like a time, not a promise of one."""
        moment = datetime.fromtimestamp(now, tz=timezone.utc)
        newest = _newest_rotation(self.path)
        if newest is not None and moment <= newest:
            moment = newest + timedelta(microseconds=1)
        while True:
            stamp = moment.strftime("%Y%m%dT%H%M%S.%fZ")  # sorts in time order
            target = self.path.with_name(f"{FILE_NAME}.{stamp}")
            if not os.path.lexists(target):
                break
            moment += timedelta(microseconds=1)  # never over an older rotated file
        try:
            self.path.replace(target)
        except OSError as err:  # the event is recorded; the next one tries again
            log.warning("cannot rotate the event log %s: %s", self.path, err.strerror)

    def read(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Events oldest first (the last ``limit`` when given); lines that are not events
        (cut by a crash, not JSON objects, not UTF-8) skipped."""
        try:
            fd = open_regular(self.path, os.O_RDONLY, what="the event log")
        except FileNotFoundError:
            return []
        except OSError as err:
            raise HostError(f"cannot read the event log {self.path}: {err.strerror}") from err
        with os.fdopen(fd, "rb") as handle:
            lines = handle.read().splitlines()
        events = [e for e in map(parse_event, lines) if e is not None]
        return events[-limit:] if limit else events


ROTATED_FORMATS = ("%Y%m%dT%H%M%S.%fZ", "%Y%m%dT%H%M%SZ")


def _newest_rotation(path: Path) -> datetime | None:
    """The latest time among the names of ``path``'s rotated files; None when none."""
    newest = None
    for rotated in path.parent.glob(f"{path.name}.*Z"):
        stamp = rotated.name[len(path.name) + 1:]
        for layout in ROTATED_FORMATS:
            try:
                moment = datetime.strptime(stamp, layout).replace(tzinfo=timezone.utc)
            except ValueError:
                continue
            newest = moment if newest is None or moment > newest else newest
            break
    return newest


def parse_event(line: bytes) -> dict[str, Any] | None:
    """The event on ``line``: a JSON object with a string ``id`` and ``event_type``; else
    None (a line cut by a crash, junk, not UTF-8)."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):  # also a UnicodeDecodeError
        return None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or \
            not isinstance(event.get("event_type"), str):
        return None
    return event
