"""One record of the originals clusterctl saved before changing the host, for every owner.

``<state_dir>/originals.json`` holds one section per owner (``"optimize"``: the sysctls
and files `optimize apply` changed; ``"gpu-power"``: the power limits the agent lowered),
each with its own schema version. It is a :mod:`statefile` with policy REFUSE: it holds
the only copy of the values to put back, so a damaged copy is never set aside nor
written over, and nothing that needs it runs until it can be read.

Every change to a section is a read-modify-write of the whole file under an flock on
``<state_dir>/originals.lock`` (the agent's throttle loop and `optimize apply` write at
the same time, in different processes): one owner's write never loses another's
section. Reads need no lock (every write replaces the file atomically).

Each section was a file of its own before (``optimize.json``, ``gpu-power.json``). The
first load that finds the old file moves it in: its content is checked as the section's
schema (a damaged old file is refused, like the record it was), written as the section,
read back from ``originals.json`` and compared, and only then is the old file removed.
A crash between the write and the removal leaves both: the section is taken when it
equals the old file, otherwise both are refused, naming both files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from clusterctl import locks
from clusterctl.system import statefile

T = TypeVar("T")
FILE_NAME = "originals.json"
LOCK_NAME = "originals.lock"
SPEC = statefile.StateFile(
    FILE_NAME, "the saved originals", statefile.Policy.REFUSE,
    fix=f"it holds the values clusterctl puts back (`optimize revert`, the GPU power limits): "
    f"restore {FILE_NAME} from a backup or correct it by hand; moving it away loses them "
    "(then set those values yourself: sysctl -w, nvidia-smi -pl)")


@dataclass(frozen=True)
class Section(Generic[T]):
    """One owner's part of ``originals.json``.

    ``parse`` makes the owner's value from the section's object (its ``"version"`` taken
    out); ValueError, TypeError, KeyError or AttributeError there means damaged. The
    values it makes must compare by value: a half-done move is judged by ``==``."""

    name: str  # "optimize": the key in originals.json
    what: str  # "the saved originals of optimize"
    legacy: str  # "optimize.json": the file the section was kept in before
    parse: Callable[[dict[str, Any]], T]
    fix: str  # what the operator does about a damaged copy ("it": the section, the old file)
    version: int = 1  # the section's schema this clusterctl writes

    def legacy_spec(self) -> statefile.StateFile:
        return statefile.StateFile(self.legacy, self.what, statefile.Policy.REFUSE,
                                   fix=f"{self.legacy}: {self.fix}")


def path_of(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def load(section: Section[T], state_dir: Path) -> T | None:
    """The section's value; None when there is none. Raises StateRefused when
    ``originals.json``, the section or the old file is damaged (nothing changed), or the
    section and an old file left by a cut-short move differ; HostError when a file
    cannot be read at all."""
    legacy = _read_legacy(section, state_dir)  # damaged: refused before any lock or write
    if legacy is None:
        return _section_of(section, state_dir, _read(state_dir))
    with _locked(state_dir):
        return _section_of(section, state_dir, _settled(section, state_dir))


def save(section: Section[T], state_dir: Path, data: Mapping[str, Any] | None) -> None:
    """Replace the section with ``data`` (its version added); ``None`` or empty removes the
    section, and ``originals.json`` with the last one. Every other section is kept as it
    is on disk, under the lock; an old file not moved in yet is moved first. A damaged
    file or section is refused like in :func:`load`: never written over."""
    with _locked(state_dir):
        doc = _settled(section, state_dir)
        _section_of(section, state_dir, doc)  # a damaged section is refused, never replaced
        doc.pop(section.name, None)
        if data:
            doc[section.name] = {"version": section.version,
                                 **{k: v for k, v in data.items() if k != "version"}}
        _write(state_dir, doc)


# -- inside ----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    with locks.exclusive(state_dir / LOCK_NAME, what="writer of the saved originals"):
        yield


def _read(state_dir: Path) -> dict[str, Any]:
    """Every section as stored (raw objects); empty when there is no file."""
    def parse(data: dict[str, Any]) -> dict[str, Any]:
        for name, body in data.items():
            if not isinstance(body, dict):
                raise TypeError(f"section {name!r} is not an object")
        return data
    return statefile.read(SPEC, state_dir, parse) or {}


def _write(state_dir: Path, doc: dict[str, Any]) -> None:
    if doc:
        statefile.write(SPEC, state_dir, doc)
    else:
        statefile.remove(SPEC, state_dir)


def _read_legacy(section: Section[T], state_dir: Path) -> tuple[dict[str, Any], T] | None:
    """The old file's object (version taken out) and what it parses to; None when gone."""
    def parse(data: dict[str, Any]) -> tuple[dict[str, Any], T]:
        return data, section.parse(dict(data))
    return statefile.read(section.legacy_spec(), state_dir, parse)


def _parsed(section: Section[T], state_dir: Path, body: dict[str, Any]) -> T:
    data = dict(body)
    version = data.pop("version", 1)
    problem = None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        problem = f"version {version!r} is not a schema version"
    elif version > section.version:
        problem = (f"version {version} is newer than this clusterctl reads "
                   f"({section.version}): written by a newer clusterctl")
    else:
        try:
            return section.parse(data)
        except statefile.PARSE_ERRORS as err:
            problem = f"unexpected content ({type(err).__name__}: {err})"
    path = path_of(state_dir)
    raise statefile.StateRefused(
        f"{section.what} (section {section.name!r} of {path}) cannot be used: {problem}; "
        "clusterctl changes nothing that needs it until it can be read",
        fix=f"{section.fix} (the {section.name!r} section of {path})", path=path)


def _section_of(section: Section[T], state_dir: Path, doc: dict[str, Any]) -> T | None:
    body = doc.get(section.name)
    return None if body is None else _parsed(section, state_dir, body)


def _settled(section: Section[T], state_dir: Path) -> dict[str, Any]:
    """Under the lock: every section as stored, with the old file moved in (and removed)
    when there is one. Refuses a section and an old file that differ."""
    doc = _read(state_dir)
    legacy = _read_legacy(section, state_dir)
    if legacy is None:
        return doc
    raw, value = legacy
    old = state_dir / section.legacy
    if section.name in doc:  # a move cut short after its write, or two different records
        if _parsed(section, state_dir, doc[section.name]) != value:
            path = path_of(state_dir)
            raise statefile.StateRefused(
                f"{section.what} are in both {path} (section {section.name!r}) and {old}, "
                "and they differ: clusterctl cannot tell which holds the values to put back",
                fix=f"compare {old} with the {section.name!r} section of {path}; keep the "
                f"right one: remove {old} to keep the section, or remove the section from "
                f"{path} to move {old} in again", path=path)
    else:
        doc[section.name] = {"version": section.version, **raw}
        _write(state_dir, doc)
        doc = _read(state_dir)
        if section.name not in doc or _parsed(section, state_dir, doc[section.name]) != value:
            raise statefile.StateRefused(
                f"{section.what} moved from {old} into {path_of(state_dir)} did not read "
                f"back the same; {old} is kept",
                fix=f"check that {state_dir} is writable and not full, then run it again",
                path=path_of(state_dir))
    statefile.remove(section.legacy_spec(), state_dir)
    return doc

