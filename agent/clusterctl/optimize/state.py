"""What `optimize apply` changed, and what was there before (like tuned's saved state).

``<state_dir>/optimize.json`` (mode 0600). Originals are written, fsync'd, before
the first change to anything and never overwritten by a later apply, so a crash
at any point leaves them on record and `optimize revert` puts the machine back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clusterctl import system
from clusterctl.errors import HostError

FILE_NAME = "optimize.json"
VERSION = 1


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class OptimizeState:
    original_sysctl: dict[str, str] = field(default_factory=dict)
    original_files: dict[str, str | None] = field(default_factory=dict)  # None: was absent
    created_dirs: tuple[str, ...] = ()  # made by apply; removed by revert when empty
    applied_sysctl: dict[str, str] = field(default_factory=dict)
    applied_files: dict[str, str] = field(default_factory=dict)  # path -> sha256 written

    @property
    def empty(self) -> bool:
        return not (self.original_sysctl or self.original_files)

    def remembering(self, sysctl: dict[str, str], files: dict[str, str | None],
                    dirs: tuple[str, ...]) -> OptimizeState:
        """With originals added for what had none yet (the first original wins)."""
        return replace(
            self,
            original_sysctl={**sysctl, **self.original_sysctl},
            original_files={**files, **self.original_files},
            created_dirs=self.created_dirs + tuple(d for d in dirs if d not in self.created_dirs),
        )


def path_of(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def load(state_dir: Path) -> OptimizeState:
    path = path_of(state_dir)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return OptimizeState()
    except (OSError, ValueError) as err:
        raise HostError(f"cannot read {path}: {err}",
                        fix="it holds the values to revert to: restore it from a backup, or "
                        "move it away to start afresh (revert is then impossible)") from err
    originals, applied = data.get("originals", {}), data.get("applied", {})
    return OptimizeState(
        original_sysctl=dict(originals.get("sysctl", {})),
        original_files=dict(originals.get("files", {})),
        created_dirs=tuple(originals.get("dirs", ())),
        applied_sysctl=dict(applied.get("sysctl", {})),
        applied_files=dict(applied.get("files", {})),
    )


def save(state_dir: Path, state: OptimizeState) -> None:
    data = {
        "version": VERSION,
        "originals": {"sysctl": state.original_sysctl, "files": state.original_files,
                      "dirs": list(state.created_dirs)},
        "applied": {"sysctl": state.applied_sysctl, "files": state.applied_files},
    }
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    system.atomic_write_text(path_of(state_dir), json.dumps(data, indent=2) + "\n", mode=0o600)


def forget(state_dir: Path) -> None:
    path_of(state_dir).unlink(missing_ok=True)
