"""The swap ledger: which files clusterctl made, and the policy's memory.

Kept in ``<state_dir>/swap.json`` (mode 0600), replaced atomically after every
change. It is reconciled with the swap dir and /proc/swaps on every run, so
a lost or stale ledger is rebuilt rather than trusted blindly.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from clusterctl.errors import ClusterctlError
from clusterctl.system import statefile

log = logging.getLogger(__name__)

FILE_NAME = "swap.json"
VERSION = 1
SPEC = statefile.StateFile(FILE_NAME, "the swap ledger", statefile.Policy.REDERIVE,
                           version=VERSION)


@dataclass(frozen=True)
class LedgerFile:
    name: str  # "swap-0001", in the swap dir
    size_bytes: int
    created_at: float  # unix seconds
    method: str  # "fallocate", "zeros" or "adopted"
    boot_id: str | None = None  # the boot in which clusterctl last activated it
    off_since: float | None = None  # swapped off by someone else, this boot


@dataclass(frozen=True)
class Ledger:
    files: tuple[LedgerFile, ...] = ()
    low_since: float | None = None  # memory use has been low since (shrink cooldown)
    blocked: str | None = None  # why growth is blocked, while it is (events once per cause)

    def file(self, name: str) -> LedgerFile | None:
        return next((f for f in self.files if f.name == name), None)

    def with_file(self, entry: LedgerFile) -> Ledger:
        others = tuple(f for f in self.files if f.name != entry.name)
        return replace(self, files=tuple(sorted((*others, entry), key=lambda f: f.name)))

    def without(self, name: str) -> Ledger:
        return replace(self, files=tuple(f for f in self.files if f.name != name))

    def next_name(self, taken: Collection[str] = ()) -> str:
        """The lowest free ``swap-NNNN`` not in the ledger nor in ``taken``."""
        used = {f.name for f in self.files} | set(taken)
        number = 1
        while f"swap-{number:04d}" in used:
            number += 1
        return f"swap-{number:04d}"


def ledger_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def load(state_dir: Path, *, record: statefile.Recorder | None = None) -> Ledger:
    """The ledger; empty when absent. A damaged one is kept aside (never deleted), an
    event recorded, and the ledger starts empty: every run reconciles it with the swap
    dir and /proc/swaps, which adopts the files clusterctl made."""
    found = statefile.read(SPEC, state_dir, _parse, record=record)
    return Ledger() if found is None else found


def growth_blocked(state_dir: Path) -> str | None:
    """Why swap needs to grow and cannot, while it is so; read only (metrics, heartbeats:
    a ledger that cannot be read is not known to block, and never stops them)."""
    try:
        found = statefile.peek(SPEC, state_dir, _parse)
    except ClusterctlError:
        return None
    blocked = None if found is None else found.blocked
    return blocked if isinstance(blocked, str) else None


def _parse(data: dict[str, Any]) -> Ledger:
    files = data.get("files", [])
    if not isinstance(files, list):
        raise TypeError("files is not a list")
    return Ledger(
        files=tuple(LedgerFile(**entry) for entry in files),
        low_since=data.get("low_since"),
        blocked=data.get("blocked"),
    )


def save(state_dir: Path, ledger: Ledger) -> None:
    statefile.write(SPEC, state_dir, asdict(ledger))
