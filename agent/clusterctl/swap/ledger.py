"""The swap ledger: which files clusterctl made, and the policy's memory.

Kept in ``<state_dir>/swap.json`` (mode 0600), replaced atomically after every
change. It is reconciled with the swap dir and /proc/swaps on every run, so
a lost or stale ledger is rebuilt rather than trusted blindly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from clusterctl import system
from clusterctl.errors import HostError

log = logging.getLogger(__name__)

FILE_NAME = "swap.json"
VERSION = 1


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


def load(state_dir: Path) -> Ledger:
    """The ledger; empty when absent; a corrupt one is set aside (never deleted)."""
    path = ledger_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Ledger()
    except OSError as err:
        raise HostError(f"cannot read the swap ledger {path}: {err.strerror}",
                        fix="run as root") from err
    try:
        data = json.loads(text)
        return Ledger(
            files=tuple(LedgerFile(**entry) for entry in data.get("files", [])),
            low_since=data.get("low_since"),
            blocked=data.get("blocked"),
        )
    except (ValueError, TypeError) as err:
        aside = path.with_name(f"{FILE_NAME}.corrupt-{int(time.time())}")
        path.rename(aside)
        log.warning("swap ledger %s was unreadable (%s); kept as %s and rebuilt from the "
                    "swap dir", path, err, aside)
        return Ledger()


def save(state_dir: Path, ledger: Ledger) -> None:
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    data: dict[str, Any] = {"version": VERSION, **asdict(ledger)}
    system.atomic_write_text(ledger_path(state_dir), json.dumps(data, indent=2) + "\n",
                             mode=0o600)

