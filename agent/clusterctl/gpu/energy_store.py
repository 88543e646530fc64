"""The GPU energy ledger kept by the agent, and where `hibernate status` finds it.

The agent accounts every GPU sample (:mod:`clusterctl.gpu.energy`) and writes the ledger
to ``<run_dir>/gpu-energy.json`` (0644, not fsync'd: rewritten every sample), with the
boot it belongs to. A restarted agent goes on from it within the same boot; after a
reboot (another ``boot_id``) it starts from zero, so the totals are "since boot".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterctl.errors import ClusterctlError
from clusterctl.gpu import energy
from clusterctl.host.nvml import GpuSnapshot
from clusterctl.host.procfs import read_boot_id
from clusterctl.system import statefile

log = logging.getLogger("clusterctl.gpu")
ENERGY_FILE = "gpu-energy.json"
SPEC = statefile.StateFile(ENERGY_FILE, "the GPU energy accounting",
                           statefile.Policy.START_OVER, mode=0o644, durable=False,
                           pretty=False, events_here=False)


def this_boot() -> str | None:
    try:
        return read_boot_id(Path("/"))
    except (ClusterctlError, OSError):
        return None


def load(run_dir: Path, boot_id: str | None) -> energy.EnergyLedger:
    """The ledger of this boot from the file; an empty one for another boot, or when
    there is none or it cannot be read (set aside when damaged)."""
    try:
        found = statefile.read(SPEC, run_dir, energy.from_dict)
    except (ClusterctlError, OSError) as err:
        log.warning("the GPU energy accounting starts afresh: %s", err)
        found = None
    if found is None or found.boot_id != boot_id or boot_id is None:
        return energy.EnergyLedger({}, boot_id)
    return found


def peek(run_dir: Path, boot_id: str | None) -> energy.EnergyLedger | None:
    """The ledger of this boot, for a reader (`hibernate status`): None when there is
    none, it is another boot's, or it cannot be read (nothing is changed)."""
    try:
        found = statefile.peek(SPEC, run_dir, energy.from_dict)
    except (ClusterctlError, OSError):
        return None
    if found is None or boot_id is None or found.boot_id != boot_id:
        return None
    return found


def summary(ledger: energy.EnergyLedger | None) -> dict[str, Any] | None:
    """What idle and busy GPUs burned since boot, in kWh, and the idle draw now (the sum
    of the GPUs' mean idle draws), as `hibernate status` shows it."""
    if ledger is None or not ledger.gpus:
        return None
    draws = [g.idle_power_w for g in ledger.gpus.values() if g.idle_power_w is not None]
    sources = sorted({g.source for g in ledger.gpus.values() if g.source is not None})
    return {"idle_kwh": round(energy.kwh(ledger.idle_j), 6),
            "busy_kwh": round(energy.kwh(ledger.busy_j), 6),
            "idle_hours": round(sum(g.idle_s for g in ledger.gpus.values()) / 3600, 3),
            "idle_power_w": round(sum(draws), 1) if draws else None,
            "sources": sources}


class EnergyKeeper:
    """The agent's ledger: accounted after every GPU sample and written to the run dir.
    Never raises: a failure is handed to ``failed`` (counted as the GPU loop's) and the
    ledger stays as it was."""

    def __init__(self, run_dir: Path, *, failed: Callable[[BaseException], None],
                 boot_id: str | None = None) -> None:
        self.run_dir = run_dir
        self.failed = failed
        self.ledger = load(run_dir, boot_id if boot_id is not None else this_boot())
        self._write_failed = False

    def after(self, snapshot: GpuSnapshot | None, now: float, threshold_percent: float,
              max_gap_s: float) -> energy.EnergyLedger:
        """The ledger with ``snapshot`` (taken at monotonic ``now``) accounted."""
        if snapshot is None:
            return self.ledger
        try:
            self.ledger = energy.account(self.ledger, snapshot.gpus, now, threshold_percent,
                                         max_gap_s)
        except Exception as err:  # a bug must not stop sampling: counted, logged
            self.failed(err)
            return self.ledger
        self._save()
        return self.ledger

    def _save(self) -> None:
        try:
            statefile.write(SPEC, self.run_dir, energy.to_dict(self.ledger))
        except (ClusterctlError, OSError) as err:
            if not self._write_failed:
                log.warning("cannot write %s (hibernate status will not show GPU energy): %s",
                            self.run_dir / ENERGY_FILE, err)
            self._write_failed = True
        else:
            if self._write_failed:
                log.info("%s is written again", self.run_dir / ENERGY_FILE)
            self._write_failed = False
