"""One way to keep a JSON state file, for every state file clusterctl has.

Each file declares a :class:`StateFile`: its name, what it holds, its schema version,
its mode and what a damaged copy costs. Every write is atomic and fsync'd (through
``atomic_write_text``: a crash leaves the old file or the new one), mode 0600 unless the
file says otherwise, owned by the writer, with ``"version"`` first. Every read opens
the file without following a symlink and only when it is a regular file (a FIFO cannot
hang it), and accepts only a JSON object of a version this clusterctl knows; a file
written before files had a version reads as version 1.

A file that fails any of that is damaged, and there is one policy for it, chosen by
what the file holds:

- ``START_OVER``: nothing in it is worth more than a fresh start (a sequence, an idle
  clock, a cursor). The file is kept aside as ``NAME.corrupt-<UTC time>``, never
  deleted; an event ``state_file_set_aside`` is recorded; the owner starts empty.
- ``REDERIVE``: the same, and the owner rebuilds it from the host (the swap ledger
  from /proc/swaps and the swap dir).
- ``REFUSE``: it holds what nothing else knows (the values to put back). Nothing is
  moved or written; :class:`StateRefused` names the file and the fix, and the action
  that needed it does not run.

A file that cannot be read for another reason (permission, I/O error) is not damaged:
that is a HostError, and the file stays as it is.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from clusterctl import system
from clusterctl.errors import ClusterctlError, HostError
from clusterctl.events.log import EventLog

log = logging.getLogger("clusterctl")
T = TypeVar("T")
EVENT = "state_file_set_aside"
MAX_BYTES = 16 * 2**20  # far above any state file; a bigger one is not ours
PARSE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, RecursionError)


class Policy(enum.Enum):
    START_OVER = "start over"
    REDERIVE = "re-derive"
    REFUSE = "refuse"


@dataclass(frozen=True)
class StateFile:
    name: str  # "swap.json"
    what: str  # "the swap ledger": how messages and events name it
    policy: Policy
    version: int = 1  # the schema this clusterctl writes; a file without one is 1
    fix: str = ""  # REFUSE: what the operator does about a damaged copy
    mode: int = 0o600
    durable: bool = True  # False: rewritten every few seconds, a crash may lose the last
    pretty: bool = True  # indented, for a file an operator reads by hand
    events_here: bool = True  # the state dir's event log sits in the same directory


class Recorder(Protocol):
    def __call__(self, event_type: str, reason: str, details: dict[str, Any], *,
                 now: float) -> object: ...


class StateRefused(HostError):
    """A damaged state file that nothing can re-derive: nothing was changed."""

    def __init__(self, message: str, *, fix: str, path: Path) -> None:
        super().__init__(message, fix=fix)
        self.path = path


class _Damaged(Exception):
    """What is wrong with a state file's content or kind (not a failed read)."""


def events_to(state_dir: Path, instance_id: str | None = None) -> Recorder:
    """A recorder into the event log of ``state_dir`` (``instance_id``: the configured
    one; the host name, its default, when not known)."""
    return EventLog(state_dir, instance_id or socket.gethostname()).record


def read(spec: StateFile, directory: Path, parse: Callable[[dict[str, Any]], T], *,
         record: Recorder | None = None, now: float | None = None) -> T | None:
    """What ``parse`` makes of the file (its object, ``"version"`` taken out), or None when
    there is no file, or it was damaged and set aside (START_OVER, REDERIVE).

    ``parse`` raising ValueError, TypeError, KeyError or AttributeError means damaged
    too. The set-aside event goes to ``record``, by default the event log in the same
    directory (``events_here``), else only to the journal. Raises StateRefused for a
    damaged REFUSE file, HostError when the file cannot be read at all."""
    path = directory / spec.name
    try:
        raw = _read_raw(path, spec)
    except FileNotFoundError:
        return None
    except _Damaged as err:
        problem = str(err)
    else:
        try:
            return parse(_decode(raw, spec))
        except _Damaged as err:
            problem = str(err)
        except PARSE_ERRORS as err:
            problem = f"unexpected content ({type(err).__name__}: {err})"
    if record is None and spec.events_here:
        record = events_to(directory)
    _damaged(spec, path, problem, record, time.time() if now is None else now)
    return None


def peek(spec: StateFile, directory: Path, parse: Callable[[dict[str, Any]], T]) -> T | None:
    """What ``read`` would return, for a reader that changes nothing (metrics): None when
    there is no file or it is damaged, which stays where it is for its owner to set aside;
    HostError when it cannot be read."""
    try:
        return parse(_decode(_read_raw(directory / spec.name, spec), spec))
    except (FileNotFoundError, _Damaged, *PARSE_ERRORS):
        return None


def write(spec: StateFile, directory: Path, data: Mapping[str, Any]) -> None:
    """Replace the file with ``data`` and its version: atomic, fsync'd, ``spec.mode``,
    owned by the caller; a link or other thing at the path is replaced, never followed."""
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise HostError(f"cannot create {directory} for {spec.what}: {err.strerror}",
                        fix=f"{directory} must be a directory root can write") from err
    body = {"version": spec.version, **{k: v for k, v in data.items() if k != "version"}}
    text = json.dumps(body, indent=2) if spec.pretty else json.dumps(body, separators=(",", ":"))
    system.atomic_write_text(directory / spec.name, text + "\n", mode=spec.mode,
                             keep_owner=False, durable=spec.durable)


def remove(spec: StateFile, directory: Path) -> None:
    """The file gone (nothing left to remember); its directory entry made durable."""
    path = directory / spec.name
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as err:
        raise HostError(f"cannot remove {spec.what} {path}: {err.strerror}") from err
    if spec.durable:
        with contextlib.suppress(OSError):
            system.fsync_dir(directory)


def _read_raw(path: Path, spec: StateFile) -> bytes:
    try:
        fd = system.open_regular(path, os.O_RDONLY, what=spec.what)
    except HostError as err:  # a symlink, a FIFO, a directory: not a file we wrote
        raise _Damaged(err.message) from err
    except FileNotFoundError:
        raise
    except OSError as err:
        raise HostError(f"cannot read {spec.what} {path}: {err.strerror}",
                        fix="run as root" if isinstance(err, PermissionError) else None
                        ) from err
    try:
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as err:
        raise HostError(f"cannot read {spec.what} {path}: {err.strerror}") from err
    if len(raw) > MAX_BYTES:
        raise _Damaged(f"over {MAX_BYTES} bytes")
    return raw


def _decode(raw: bytes, spec: StateFile) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise _Damaged("not JSON (cut short or overwritten?)") from err
    if not isinstance(data, dict):
        raise _Damaged(f"a JSON {type(data).__name__}, not an object")
    version = data.pop("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _Damaged(f"version {version!r} is not a schema version")
    if version > spec.version:
        raise _Damaged(f"version {version} is newer than this clusterctl reads "
                       f"({spec.version}): written by a newer clusterctl")
    return data


def _damaged(spec: StateFile, path: Path, problem: str, record: Recorder | None,
             now: float) -> None:
    if spec.policy is Policy.REFUSE:
        raise StateRefused(f"{spec.what} {path} cannot be used: {problem}; clusterctl "
                           "changes nothing that needs it until it can be read",
                           fix=spec.fix or f"fix or restore {path}", path=path)
    aside = _set_aside(path, now)
    then = ("rebuilt from the host" if spec.policy is Policy.REDERIVE
            else "started afresh")
    kept = f"kept as {aside.name}" if aside else "left where it is (it could not be moved)"
    log.warning("%s %s was damaged (%s): %s, %s", spec.what, path, problem, kept, then)
    if record is None:
        return
    with contextlib.suppress(ClusterctlError, OSError):  # the warning above is on record
        record(EVENT, f"{spec.what} was damaged ({problem}); {then}",
               {"file": str(path), "kept_as": None if aside is None else str(aside),
                "policy": spec.policy.value}, now=now)


def _set_aside(path: Path, now: float) -> Path | None:
    """Rename ``path`` (the link itself, never what it points at) to a free
    ``NAME.corrupt-<UTC time>``; None when it cannot be moved."""
    stamp = datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(100):
        suffix = f"-{attempt}" if attempt else ""
        aside = path.with_name(f"{path.name}.corrupt-{stamp}{suffix}")
        if os.path.lexists(aside):
            continue
        try:
            path.rename(aside)
        except FileNotFoundError:
            return None  # another reader set it aside first
        except OSError:
            return None
        with contextlib.suppress(OSError):
            system.fsync_dir(path.parent)
        return aside
    return None
