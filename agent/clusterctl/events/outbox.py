"""The event outbox: the event log itself, plus how far the control plane has acknowledged.

Every event is appended to ``events.jsonl`` (fsync'd) by whoever records it, before
anything tries to send it; the log rotates into ``events.jsonl.<UTC time>`` files. The
outbox keeps one small cursor file, ``outbox.json``: the file (by name, and by device and
inode so that it is found again after a rotation renamed it), the byte offset just past
what was acknowledged, and the id of the last event acknowledged. A file found by its
inode counts only when the acknowledged event is the last one before the offset there (a
deleted file's inode is soon another's); else the event is looked for by id, and when it
is gone sending starts again from the oldest event kept. Sending reads on from there, in
order; an acknowledgement moves the cursor (atomically; kept in memory while the file
cannot be written, e.g. on a full disk). A crash between sending and moving the cursor
resends a batch: each event has a unique ``id``, so the control plane can drop what it
already has. A writer may rotate the log at any moment: when a new rotated file appeared
since the files were listed, the live file is not read from that listing (nor named as
the file after a dropped one), and ``unsent_files`` counts the new file as unsent.

Nothing in these files can stop delivery: a line that is not an event (not a JSON object
with a string ``id`` and ``event_type``, not UTF-8, longer than ``MAX_LINE_BYTES``, or the
unfinished last line of a rotated file) is skipped, counted in ``skipped_lines`` and
logged once; a cursor that cannot be read or has the wrong shape is logged once and
sending starts again from the oldest event kept (duplicates, never a loss). Only a
symlink or other non-regular file in place of the live log stops reading, with a
HostError. Unsent events are bounded (``max_unsent_bytes``): past that, the oldest
rotated files are dropped whole, and how many events went is logged (the agent records
it as an ``outbox_overflow`` event); ``bound`` is the only thing here that deletes, and
only once the cursor past the file is on disk.

Cursors written before the device and inode were kept (``file``, ``offset``,
``last_id`` only) are still read; a version from before reads a new cursor as unusable
and sends again from the oldest event kept (duplicates only).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Hashable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

from clusterctl.errors import ClusterctlError, HostError
from clusterctl.events.log import FILE_NAME as EVENTS_FILE
from clusterctl.events.log import parse_event
from clusterctl.system import open_regular, statefile
from clusterctl.units import format_size

log = logging.getLogger("clusterctl.agent")
CURSOR_FILE = "outbox.json"
CURSOR_SPEC = statefile.StateFile(CURSOR_FILE, "the outbox cursor", statefile.Policy.START_OVER,
                                  pretty=False)
MAX_UNSENT_BYTES = 64 * 2**20
MAX_LINE_BYTES = 2**20  # a longer line is not an event: skipped
MAX_OFFSET = 2**62
_MAX_TOLD = 4096  # distinct problems remembered for "log once"
_MAX_LISTINGS = 3  # rotations met mid-read before pending()/bound() settle for less


@dataclass(frozen=True)
class Cursor:
    file: str  # "events.jsonl" or a rotated "events.jsonl.<stamp>"
    offset: int  # just past the acknowledged event's line (or skipped lines)
    last_id: str  # the last event acknowledged; "" after a drop
    device: int | None = None  # the file's identity: found again after a rotation
    inode: int | None = None


@dataclass(frozen=True)
class Batch:
    events: tuple[dict[str, Any], ...]
    cursor: Cursor | None  # where the cursor goes once the batch is acknowledged


class Outbox:
    def __init__(self, state_dir: Path, *, max_unsent_bytes: int = MAX_UNSENT_BYTES,
                 instance_id: str | None = None) -> None:
        self.state_dir = state_dir
        self.instance_id = instance_id  # who a damaged cursor's event is from (default: host)
        self.max_unsent_bytes = max_unsent_bytes
        self.skipped_lines = 0  # lines that were not events, each counted once
        self._told: set[Hashable] = set()
        self._read_upto: dict[tuple[int, int], int] = {}  # (device, inode): bytes read
        self._unsaved: Cursor | None = None  # acknowledged, but outbox.json not writable

    def _once(self, key: Hashable, message: str, *args: object) -> bool:
        """Log ``message`` the first time ``key`` comes up; whether it was new."""
        if key in self._told:
            return False
        if len(self._told) >= _MAX_TOLD:
            self._told.clear()
        self._told.add(key)
        log.warning(message, *args)
        return True

    # -- the cursor ------------------------------------------------------------------

    def cursor(self) -> Cursor | None:
        """The acknowledged position; None when there is none or it is unusable."""
        if self._unsaved is not None:
            return self._unsaved
        path = self.state_dir / CURSOR_FILE
        try:  # a damaged one is kept aside, with an event: all is sent again
            return statefile.read(CURSOR_SPEC, self.state_dir, cursor_of,
                                  record=statefile.events_to(self.state_dir, self.instance_id))
        except ClusterctlError as err:
            self._once(("cursor", err.one_line()), "outbox: ignoring the cursor %s (%s); "
                       "sending from the oldest event kept (the control plane drops "
                       "duplicates by id)", path, err.one_line())
            return None

    def ack(self, cursor: Cursor) -> None:
        """Move the cursor (an atomic write). When the file cannot be written (a full disk),
        the cursor is kept in memory until it can: nothing is sent twice while this process
        runs, and a restart before then sends those events again (duplicates, no loss)."""
        try:
            self._save(cursor)
        except ClusterctlError as err:
            self._once(("ack", err.one_line()), "outbox: %s; the acknowledged position is "
                       "kept in memory until it can be written", err.one_line())
            self._unsaved = cursor

    def _save(self, cursor: Cursor) -> None:
        """Write the cursor to ``outbox.json``, or raise ClusterctlError and change nothing."""
        path = self.state_dir / CURSOR_FILE
        statefile.write(CURSOR_SPEC, self.state_dir, asdict(cursor))
        if self._unsaved is not None:
            log.info("outbox: %s written again", path)
            self._told = {key for key in self._told if not _is_ack_key(key)}
        self._unsaved = None

    # -- reading ---------------------------------------------------------------------

    def files(self) -> list[str]:
        """Event files oldest first: the rotated ones by name (UTC stamps), then the live one.
        Anything but a regular file under a rotated name is left out (never read)."""
        rotated = []
        for path in self.state_dir.glob(f"{EVENTS_FILE}.*"):
            if not is_rotated_name(path.name):
                continue
            try:
                regular = stat.S_ISREG(path.lstat().st_mode)
            except OSError:
                continue  # gone meanwhile
            if regular:
                rotated.append(path.name)
            else:
                self._once(("not regular", path.name), "outbox: %s is not a regular file; "
                           "not read (remove it)", path)
        return [*sorted(rotated), EVENTS_FILE]

    def _start(self, files: list[str]) -> tuple[int, int, Cursor | None]:
        """(file index, offset) of the first unsent event, and the cursor it came from.
        A file found by the cursor's identity must also hold the acknowledged event just
        before the offset: a deleted file's inode is soon another file's."""
        cursor = self.cursor()
        if cursor is None:
            return 0, 0, None
        same = self._same_file(files, cursor)
        if cursor.offset == 0 and cursor.file in files:  # the start of a file (after a drop)
            if cursor.file != EVENTS_FILE:
                return files.index(cursor.file), 0, cursor  # a rotated file keeps its name
            if same is not None and same <= self._rotated_since_cursor(files, strictly=True):
                return same, 0, cursor  # no file written after the drop comes before it
            return self._rotated_since_cursor(files, strictly=False), 0, cursor
        if same is not None and _acked_upto(self.state_dir / files[same], cursor.offset,
                                            cursor.last_id):
            return same, cursor.offset, cursor
        # where it was; else, rotated since: the live file became one of the rotated ones
        candidates = [cursor.file] if cursor.file != EVENTS_FILE else []
        candidates += [cursor.file, *reversed(files[:-1])]
        for name in dict.fromkeys(candidates):
            if name in files and _id_ending_at(self.state_dir / name, cursor.offset) == \
                    cursor.last_id:
                return files.index(name), cursor.offset, cursor
        if cursor.last_id:
            for index, name in enumerate(files):  # last resort: look for the id anywhere
                offset = _find(self.state_dir / name, cursor.last_id)
                if offset is not None:
                    return index, offset, cursor
        if not self._new_files(files):  # else a rotation since listing hid it: no news
            self._once(("gone", cursor), "outbox: the last acknowledged event %s is gone; "
                       "sending from the oldest event kept (the control plane drops duplicates "
                       "by id)", cursor.last_id or f"({cursor.file} at {cursor.offset})")
        return 0, 0, None

    def _same_file(self, files: list[str], cursor: Cursor) -> int | None:
        """The index of the file with the cursor's device and inode, whatever its name."""
        if cursor.inode is None:
            return None
        for index, name in enumerate(files):
            st = _lstat(self.state_dir / name)
            if st is not None and (st.st_dev, st.st_ino) == (cursor.device, cursor.inode):
                return index
        return None

    def _rotated_since_cursor(self, files: list[str], *, strictly: bool) -> int:
        """For a cursor at the start of the live file (after a drop): the live file may have
        rotated since, so the first rotated file last written after the cursor was (or at
        the same time, unless ``strictly``: duplicates rather than a loss when unsure)."""
        cursor_st = _lstat(self.state_dir / CURSOR_FILE)
        if cursor_st is None:
            return 0
        for index, name in enumerate(files[:-1]):
            st = _lstat(self.state_dir / name)
            if st is not None and (st.st_mtime_ns > cursor_st.st_mtime_ns or (
                    not strictly and st.st_mtime_ns == cursor_st.st_mtime_ns)):
                return index
        return len(files) - 1

    def pending(self, *, limit: int = 200, max_bytes: int = 1 << 20) -> Batch:
        """The next unsent events, in order. A batch may hold no events and still move the
        cursor: past lines that are not events, which are never read again once acked.
        A rotation between listing the files and opening the live one (which is then another
        file) is seen as a new rotated file: the files are listed and read again."""
        batch = Batch((), None)
        for _ in range(_MAX_LISTINGS):
            batch, whole = self._read_batch(self.files(), limit, max_bytes)
            if whole:
                break
        return batch  # else what came before the live file: the rest next time

    def _new_files(self, files: list[str]) -> bool:
        """Whether a rotation added a file since ``files`` were listed."""
        return not set(self.files()) <= set(files)

    def _read_batch(self, files: list[str], limit: int, max_bytes: int) -> tuple[Batch, bool]:
        """The batch from ``files``, and False when it stopped at a rotation since listed."""
        index, offset, start = self._start(files)
        last_id = start.last_id if start else ""
        events: list[dict[str, Any]] = []
        size = 0
        cursor: Cursor | None = None
        for name in files[index:]:
            path = self.state_dir / name
            try:
                fd = open_regular(path, os.O_RDONLY, what="the event file")
            except FileNotFoundError:
                offset = 0
                continue
            except OSError as err:
                raise HostError(f"cannot read the event file {path}: {err.strerror}") from err
            with os.fdopen(fd, "rb") as handle:
                if name == EVENTS_FILE and self._new_files(files):
                    return Batch(tuple(events), cursor), False  # not the live file listed
                st = os.fstat(handle.fileno())
                seen = self._read_upto.get((st.st_dev, st.st_ino), 0)
                skipped: list[int] = []  # where each line not seen before that was junk starts
                try:
                    handle.seek(offset)
                    for line, length in _lines(handle):
                        complete = line is not None and line.endswith(b"\n")
                        if not complete and name == EVENTS_FILE:
                            break  # being written right now: next time
                        event = parse_event(line) if complete and line is not None else None
                        if event is None and offset >= seen:
                            skipped.append(offset)
                        offset += length
                        if event is not None:
                            events.append(event)
                            size += length
                            last_id = event["id"]
                        cursor = Cursor(name, offset, last_id, st.st_dev, st.st_ino)
                        if len(events) >= limit or size >= max_bytes:
                            return Batch(tuple(events), cursor), True
                except OSError as err:
                    raise HostError(f"cannot read the event file {path}: "
                                    f"{err.strerror}") from err
                finally:
                    self._read(path, st, max(seen, offset), skipped)
            offset = 0
        return Batch(tuple(events), cursor), True

    def _read(self, path: Path, st: os.stat_result, upto: int, skipped: list[int]) -> None:
        """Remember how far ``path`` was read; count and log (once) the junk lines found."""
        if len(self._read_upto) >= _MAX_TOLD:
            self._read_upto.clear()
        self._read_upto[(st.st_dev, st.st_ino)] = upto
        if skipped:
            self.skipped_lines += len(skipped)
            log.warning("outbox: %s: %d lines that are not events skipped (the first at byte "
                        "%d)", path, len(skipped), skipped[0])

    def unsent_bytes(self) -> int:
        files = self.files()
        index, offset, _ = self._start(files)
        total = 0
        for i, name in enumerate(files[index:]):
            st = _lstat(self.state_dir / name)
            if st is not None:
                total += max(0, st.st_size - (offset if i == 0 else 0))
        return total

    def unsent_files(self) -> set[str]:
        """The event files holding events not yet acknowledged; a file that a rotation
        created meanwhile is one of them."""
        files = self.files()
        index, _, _ = self._start(files)
        return set(files[index:]) | (set(self.files()) - set(files))

    def bound(self) -> int:
        """Drop the oldest rotated files while too much is unsent; how many events went.
        The cursor moves to the next file, on disk, before the file goes, so a crash between
        never loses one; while the cursor cannot be written nothing is dropped. A file that
        cannot be dropped is logged once and kept."""
        dropped, rotations = 0, 0
        while self.unsent_bytes() > self.max_unsent_bytes and rotations < _MAX_LISTINGS:
            files = self.files()
            index, offset, _ = self._start(files)
            if files[index] == EVENTS_FILE:
                break  # only the live file is left: never dropped
            path = self.state_dir / files[index]
            following = self.state_dir / files[index + 1]
            try:
                count = _count_lines(path, offset)
                device, inode = _identity(following)
                if self._new_files(files):  # rotated meanwhile: ``following`` may be another
                    rotations += 1
                    continue
                self._save(Cursor(following.name, 0, "", device, inode))  # first
                path.unlink(missing_ok=True)
            except (OSError, ClusterctlError) as err:
                problem = err.one_line() if isinstance(err, ClusterctlError) else err.strerror
                self._once(("bound", path.name, problem), "outbox: cannot drop %s to keep "
                           "unsent events under %s: %s", path,
                           format_size(self.max_unsent_bytes), problem)
                break
            dropped += count
        if dropped:
            log.error("outbox: %d unsent events dropped (over %s unsent)", dropped,
                      format_size(self.max_unsent_bytes))
        return dropped

def _is_ack_key(key: Hashable) -> bool:
    return isinstance(key, tuple) and bool(key) and key[0] == "ack"


def is_rotated_name(name: str) -> bool:
    stamp = name[len(EVENTS_FILE) + 1:]
    return name.startswith(f"{EVENTS_FILE}.") and stamp.endswith("Z") and "/" not in stamp \
        and "\0" not in stamp


def cursor_of(data: dict[str, Any]) -> Cursor:
    """The cursor in ``outbox.json``'s object, or ValueError saying what is wrong."""
    name, offset, last_id = data.get("file"), data.get("offset"), data.get("last_id")
    device, inode = data.get("device"), data.get("inode")
    if not isinstance(name, str) or not (name == EVENTS_FILE or is_rotated_name(name)):
        raise ValueError(f"file {name!r} is not an event file's name")
    if not _is_int(offset, MAX_OFFSET):
        raise ValueError(f"offset {offset!r} is not a whole number of bytes")
    if not isinstance(last_id, str):
        raise ValueError(f"last_id {last_id!r} is not a string")
    if (device is None) != (inode is None) or (
            inode is not None and not (_is_int(device, 2**64) and _is_int(inode, 2**64))):
        raise ValueError(f"device {device!r} and inode {inode!r} are not a file's identity")
    return Cursor(name, offset, last_id, device, inode)


def _is_int(value: object, limit: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _lines(handle: IO[bytes]) -> Iterator[tuple[bytes | None, int]]:
    """(line, its length in bytes) from where ``handle`` is; a line over MAX_LINE_BYTES
    comes as None (read past, never held). The last line may lack its newline."""
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            if not line:
                return
            yield line, len(line)
            continue
        length = len(line)
        while not line.endswith(b"\n"):
            line = handle.readline(MAX_LINE_BYTES)
            if not line:
                break
            length += len(line)
        yield None, length


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of an event file; the live one is created (empty) when missing."""
    fd = open_regular(path, os.O_RDONLY | os.O_CREAT, what="the event file")
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def _count_lines(path: Path, offset: int) -> int:
    count = 0
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def _id_ending_at(path: Path, offset: int) -> str | None:
    """The id of the event whose line ends exactly at ``offset``."""
    if offset <= 0:
        return None
    try:
        fd = open_regular(path, os.O_RDONLY, what="the event file")
        with os.fdopen(fd, "rb") as handle:
            start = max(0, offset - 65536)
            handle.seek(start)
            chunk = handle.read(offset - start)
    except (OSError, HostError):
        return None
    if not chunk.endswith(b"\n"):
        return None
    event = parse_event(chunk[:-1].rsplit(b"\n", 1)[-1])
    return None if event is None else str(event["id"])


def _acked_upto(path: Path, offset: int, last_id: str) -> bool:
    """Whether ``offset`` in ``path`` is where a cursor acknowledging ``last_id`` points: the
    end of a line, with ``last_id`` the last event before it (or none in this file: the
    cursor came past lines that are not events, from an earlier file or a drop)."""
    if offset <= 0:
        return False  # the start of a file says nothing about which file it is
    ending = _id_ending_at(path, offset)
    if ending is not None:
        return ending == last_id
    try:  # no event ends there: lines that are not events, mid-line, or past the end
        fd = open_regular(path, os.O_RDONLY, what="the event file")
    except (OSError, HostError):
        return False
    at, seen = 0, ""
    with os.fdopen(fd, "rb") as handle:
        for line, length in _lines(handle):
            at += length
            if at > offset:
                return False
            event = parse_event(line) if line is not None and line.endswith(b"\n") else None
            seen = str(event["id"]) if event is not None else seen
            if at == offset:
                return seen in ("", last_id)
    return False


def _find(path: Path, event_id: str) -> int | None:
    """Just past the line of the event ``event_id`` in ``path``."""
    try:
        fd = open_regular(path, os.O_RDONLY, what="the event file")
    except (OSError, HostError):
        return None
    offset = 0
    with os.fdopen(fd, "rb") as handle:
        for line, length in _lines(handle):
            offset += length
            if line is not None and line.endswith(b"\n"):
                event = parse_event(line)
                if event is not None and event["id"] == event_id:
                    return offset
    return None
