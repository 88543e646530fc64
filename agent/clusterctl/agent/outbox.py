"""The event outbox: the event log itself, plus how far the control plane has acknowledged.

Every event is appended to ``events.jsonl`` (fsync'd) by whoever records it, before
anything tries to send it; the log rotates into ``events.jsonl.<UTC time>`` files. The
outbox keeps one small cursor file, ``outbox.json``: the file, byte offset and id of
the last event the control plane acknowledged. Sending reads on from there, in order;
an acknowledgement moves the cursor (atomically). A crash between sending and moving
the cursor resends a batch: each event has a unique ``id``, so the control plane can
drop what it already has. Unsent events are bounded (``max_unsent_bytes``): past that,
the oldest rotated files are dropped whole, and how many events went is logged (the
agent records it as an ``outbox_overflow`` event).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clusterctl import system
from clusterctl.events import FILE_NAME as EVENTS_FILE

log = logging.getLogger("clusterctl.agent")
CURSOR_FILE = "outbox.json"
MAX_UNSENT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Cursor:
    file: str  # "events.jsonl" or a rotated "events.jsonl.<stamp>"
    offset: int  # just past the acknowledged event's line
    last_id: str


@dataclass(frozen=True)
class Batch:
    events: tuple[dict[str, Any], ...]
    cursor: Cursor | None  # where the cursor goes once the batch is acknowledged


class Outbox:
    def __init__(self, state_dir: Path, *, max_unsent_bytes: int = MAX_UNSENT_BYTES) -> None:
        self.state_dir = state_dir
        self.max_unsent_bytes = max_unsent_bytes

    # -- the cursor ------------------------------------------------------------------

    def cursor(self) -> Cursor | None:
        try:
            return Cursor(**json.loads((self.state_dir / CURSOR_FILE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def ack(self, cursor: Cursor) -> None:
        system.atomic_write_text(self.state_dir / CURSOR_FILE, json.dumps(asdict(cursor)) + "\n",
                                 mode=0o600)

    # -- reading ---------------------------------------------------------------------

    def files(self) -> list[str]:
        """Event files oldest first: the rotated ones by name (UTC stamps), then the live one."""
        rotated = sorted(p.name for p in self.state_dir.glob(f"{EVENTS_FILE}.*")
                         if p.name[len(EVENTS_FILE) + 1:].endswith("Z"))
        return [*rotated, EVENTS_FILE]

    def _start(self, files: list[str]) -> tuple[int, int]:
        """(file index, offset) of the first unsent event."""
        cursor = self.cursor()
        if cursor is None:
            return 0, 0
        if cursor.offset == 0 and cursor.file in files:  # the start of a file (after a drop)
            return files.index(cursor.file), 0
        # where it was; else, rotated since: the live file became one of the rotated ones
        candidates = [cursor.file] if cursor.file != EVENTS_FILE else []
        candidates += [cursor.file, *reversed(files[:-1])]
        for name in dict.fromkeys(candidates):
            if name in files and _id_ending_at(self.state_dir / name, cursor.offset) == \
                    cursor.last_id:
                return files.index(name), cursor.offset
        for index, name in enumerate(files):  # last resort: look for the id anywhere
            offset = _find(self.state_dir / name, cursor.last_id)
            if offset is not None:
                return index, offset
        log.warning("outbox: the last acknowledged event %s is gone; sending from the oldest "
                    "event kept (the control plane drops duplicates by id)", cursor.last_id)
        return 0, 0

    def pending(self, *, limit: int = 200, max_bytes: int = 1 << 20) -> Batch:
        """The next unsent events, in order."""
        files = self.files()
        index, offset = self._start(files)
        events: list[dict[str, Any]] = []
        size = 0
        cursor: Cursor | None = None
        for name in files[index:]:
            path = self.state_dir / name
            try:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    for line in handle:
                        offset += len(line)
                        if not line.endswith(b"\n"):
                            break  # being written right now: next time
                        try:
                            event = json.loads(line)
                        except ValueError:
                            continue  # a line cut by a crash; the next one is whole
                        events.append(event)
                        size += len(line)
                        cursor = Cursor(name, offset, str(event.get("id")))
                        if len(events) >= limit or size >= max_bytes:
                            return Batch(tuple(events), cursor)
            except FileNotFoundError:
                pass
            offset = 0
        return Batch(tuple(events), cursor)

    def unsent_bytes(self) -> int:
        files = self.files()
        index, offset = self._start(files)
        total = 0
        for i, name in enumerate(files[index:]):
            try:
                size = (self.state_dir / name).stat().st_size
            except FileNotFoundError:
                continue
            total += size - (offset if i == 0 else 0)
        return total

    def unsent_files(self) -> set[str]:
        files = self.files()
        index, _ = self._start(files)
        return set(files[index:])

    def bound(self) -> int:
        """Drop the oldest rotated files while too much is unsent; how many events went."""
        dropped = 0
        while self.unsent_bytes() > self.max_unsent_bytes:
            files = self.files()
            index, _ = self._start(files)
            if files[index] == EVENTS_FILE:
                break  # only the live file is left: never dropped
            path = self.state_dir / files[index]
            with path.open("rb") as handle:
                dropped += sum(1 for _ in handle)
            path.unlink()
            self.ack(Cursor(files[index + 1], 0, ""))
        if dropped:
            log.error("outbox: %d unsent events dropped (over %d MiB unsent)", dropped,
                      self.max_unsent_bytes // 2**20)
        return dropped


def _id_ending_at(path: Path, offset: int) -> str | None:
    """The id of the line that ends exactly at ``offset``."""
    if offset <= 0:
        return None
    try:
        with path.open("rb") as handle:
            start = max(0, offset - 65536)
            handle.seek(start)
            chunk = handle.read(offset - start)
    except FileNotFoundError:
        return None
    if not chunk.endswith(b"\n"):
        return None
    line = chunk[:-1].rsplit(b"\n", 1)[-1]
    try:
        return str(json.loads(line).get("id"))
    except ValueError:
        return None


def _find(path: Path, event_id: str) -> int | None:
    needle = f'"id":"{event_id}"'.encode()
    offset = 0
    try:
        with path.open("rb") as handle:
            for line in handle:
                offset += len(line)
                if needle in line:
                    return offset
    except FileNotFoundError:
        return None
    return None
