"""The power limits clusterctl changed, kept so they can be given back (even after a crash).

``<state_dir>/gpu-power.json``: per GPU (by UUID) the original limit, saved before
the first change and never overwritten, and what clusterctl set last. A clean stop
restores every original; a start that finds records (a crash) restores them first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clusterctl import system
from clusterctl.errors import HostError
from clusterctl.gpu.throttle import Decision, Throttled
from clusterctl.system.gpu import set_power_limit

log = logging.getLogger("clusterctl.gpu")
FILE_NAME = "gpu-power.json"


def load(state_dir: Path) -> dict[str, Throttled]:
    path = state_dir / FILE_NAME
    try:
        data = json.loads(path.read_text())
        return {uuid: Throttled(**rec) for uuid, rec in data["gpus"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HostError(f"cannot read {path}: {err}",
                        fix="it holds the original GPU power limits: check it by hand "
                        "(nvidia-smi -q -d POWER shows the default limits)") from err


def set_aside(state_dir: Path, *, now: float) -> Path | None:
    """Move an unreadable record file out of the way, never deleting it: where it went,
    or None when it could not be moved."""
    path = state_dir / FILE_NAME
    aside = path.with_name(f"{FILE_NAME}.corrupt-{int(now)}")
    try:
        path.rename(aside)
    except OSError:
        return None
    return aside


def save(state_dir: Path, records: dict[str, Throttled]) -> None:
    path = state_dir / FILE_NAME
    if not records:
        path.unlink(missing_ok=True)
        return
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    data = {"version": 1, "gpus": {u: asdict(r) for u, r in records.items()}}
    system.atomic_write_text(path, json.dumps(data, indent=2) + "\n", mode=0o600)


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
    """Every saved original back; ``uuids`` maps UUID -> index now. What was done."""
    records = load(state_dir)
    done = []
    for uuid, record in list(records.items()):
        index = uuids.get(uuid)
        if index is None:
            done.append(f"{uuid}: not present now; its original {record.original_limit_w:.0f} W "
                        "kept on record")
            continue
        set_power_limit(nvml, index, record.original_limit_w)
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
