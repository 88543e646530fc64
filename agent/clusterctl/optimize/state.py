"""What `optimize apply` changed, and what was there before (like tuned's saved state).

The ``"optimize"`` section of ``<state_dir>/originals.json`` (the one record of saved
originals, :mod:`clusterctl.system.originals`; ``optimize.json`` before, moved in on
first load). Originals are written, fsync'd, before the first change to anything and
never overwritten by a later apply, so a crash at any point leaves them on record and
`optimize revert` puts the machine back; revert removes the section.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clusterctl.system import originals

LEGACY_NAME = "optimize.json"  # where the section was kept before originals.json
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
    return originals.path_of(state_dir)


def load(state_dir: Path) -> OptimizeState:
    """The saved originals; empty when there are none. A damaged record is refused, never
    set aside: without it `optimize revert` could not put the machine back."""
    found = originals.load(SECTION, state_dir)
    return OptimizeState() if found is None else found


def _parse(data: dict[str, Any]) -> OptimizeState:
    originals, applied = data.get("originals", {}), data.get("applied", {})
    return OptimizeState(
        original_sysctl=dict(originals.get("sysctl", {})),
        original_files=dict(originals.get("files", {})),
        created_dirs=tuple(originals.get("dirs", ())),
        applied_sysctl=dict(applied.get("sysctl", {})),
        applied_files=dict(applied.get("files", {})),
    )


SECTION = originals.Section(
    "optimize", "the saved originals of optimize", LEGACY_NAME, _parse, version=VERSION,
    fix="it holds the values `optimize revert` puts back: restore it from a backup, or "
    "take it out to start afresh (what it held can then not be reverted)")


def save(state_dir: Path, state: OptimizeState) -> None:
    originals.save(SECTION, state_dir, {
        "originals": {"sysctl": state.original_sysctl, "files": state.original_files,
                      "dirs": list(state.created_dirs)},
        "applied": {"sysctl": state.applied_sysctl, "files": state.applied_files},
    })


def forget(state_dir: Path) -> None:
    """Nothing left to revert: the section gone (originals.json with the last section)."""
    originals.save(SECTION, state_dir, None)
