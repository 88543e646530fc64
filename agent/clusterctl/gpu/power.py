"""The power limits clusterctl changed, kept so they can be given back (even after a crash).

The ``"gpu-power"`` section of ``<state_dir>/originals.json`` (the one record of saved
originals, :mod:`clusterctl.system.originals`; ``gpu-power.json`` before, moved in on
first load): per GPU (by UUID) the original limit, saved before the first change and
never overwritten, and what clusterctl set last. A clean stop restores every original;
a start that finds records (a crash) restores them first. The section is removed when
the last limit is given back.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clusterctl.errors import ClusterctlError
from clusterctl.gpu.throttle import Decision, Throttled
from clusterctl.system import originals
from clusterctl.system.gpu import set_power_limit

log = logging.getLogger("clusterctl.gpu")
LEGACY_NAME = "gpu-power.json"  # where the section was kept before originals.json


def load(state_dir: Path) -> dict[str, Throttled]:
    """The saved records; none when there are none. A damaged record is refused, never set
    aside: it holds the only copy of the limits to give back."""
    found = originals.load(SECTION, state_dir)
    return {} if found is None else found


def _parse(data: dict[str, Any]) -> dict[str, Throttled]:
    gpus = data["gpus"]
    if not isinstance(gpus, dict):
        raise TypeError("gpus is not an object")
    return {uuid: Throttled(**rec) for uuid, rec in gpus.items()}


SECTION = originals.Section(
    "gpu-power", "the saved GPU power limits", LEGACY_NAME, _parse,
    fix="it holds the original limits clusterctl gives back: restore it from a backup or "
    "correct it by hand (nvidia-smi -q -d POWER shows each GPU's default limit), or take it "
    "out and set the limits yourself (nvidia-smi -pl)")


def save(state_dir: Path, records: dict[str, Throttled]) -> None:
    """The records on disk; none left removes the section (and originals.json with the
    last section)."""
    originals.save(SECTION, state_dir,
                   {"gpus": {u: asdict(r) for u, r in records.items()}} if records else None)


def apply(decision: Decision, nvml: Any, state_dir: Path, records: dict[str, Throttled]
          ) -> dict[str, Throttled]:
    """Carry out one decision; the record is on disk before the limit changes."""
    if decision.move == "hold" or decision.limit_w is None:
        if decision.record != records.get(decision.uuid):
            records = _with(records, decision.uuid, decision.record)
            save(state_dir, records)
        return records
    if decision.record is not None:
        save(state_dir, _with(records, decision.uuid, decision.record))
    set_power_limit(nvml, decision.index, decision.limit_w)
    log.warning("GPU %d: power limit %.0f W: %s", decision.index, decision.limit_w,
                decision.reason)
    records = _with(records, decision.uuid, decision.record)
    save(state_dir, records)
    return records


def restore_all(nvml: Any, state_dir: Path, uuids: dict[str, int]) -> list[str]:
    """Every saved original back; ``uuids`` maps UUID -> index now. What was done: a GPU
    that refuses (or is gone) keeps its record, and the others are still given back."""
    records = load(state_dir)
    done = []
    for uuid, record in list(records.items()):
        index = uuids.get(uuid)
        if index is None:
            done.append(f"{uuid}: not present now; its original {record.original_limit_w:.0f} W "
                        "kept on record")
            continue
        try:
            set_power_limit(nvml, index, record.original_limit_w)
        except ClusterctlError as err:  # the other GPUs still get theirs back
            done.append(f"{err.one_line()}; its original "  # the message names the GPU
                        f"{record.original_limit_w:.0f} W kept on record")
            continue
        del records[uuid]
        save(state_dir, records)
        done.append(f"GPU {index}: power limit back to {record.original_limit_w:.0f} W")
    return done


def _with(records: dict[str, Throttled], uuid: str, record: Throttled | None
          ) -> dict[str, Throttled]:
    out = dict(records)
    if record is None:
        out.pop(uuid, None)
    else:
        out[uuid] = record
    return out
