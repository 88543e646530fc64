"""The VRAM placement ledger (what the Python API's assign_model_to_gpu / allocate_memory use).

``<state_dir>/gpu-allocations.json``, changed only under ``<run_dir>/gpu.lock`` with a
fresh NVML sample taken inside the lock, so two processes placing at once can never
hand out the same VRAM twice.

What a GPU can still give: its free VRAM now, less what was handed out and is not
yet in use (a model still loading), less ``[gpu] memory_reserve_mb``. "Not yet in
use" is the reserved total less how much the GPU's used VRAM has grown since the
oldest allocation on it was handed out: once the models are loaded, NVML sees
them and they are not counted twice. Among the GPUs that fit, the least busy wins,
then the one with the most VRAM to give.

A GPU with an unrecovered fatal XID (``clusterctl.gpu.xid_ledger``: the agent's
``gpu-xid.json`` in this boot) is not placed on; the refusal names the XID and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clusterctl import locks
from clusterctl.errors import ClusterctlError, UsageError
from clusterctl.gpu import xid_ledger
from clusterctl.gpu.xid_ledger import Fatal, gpu_key
from clusterctl.host.nvml import GpuSample, GpuSnapshot
from clusterctl.system import statefile

FILE_NAME = "gpu-allocations.json"
SPEC = statefile.StateFile(FILE_NAME, "the GPU placement ledger", statefile.Policy.START_OVER)
LOCK_NAME = "gpu.lock"


@dataclass(frozen=True)
class Allocation:
    name: str
    gpu_uuid: str
    gpu_index: int
    vram_mib: int
    placed_at: float
    used_mib_at_place: int  # the GPU's used VRAM when this was handed out


@dataclass(frozen=True)
class Room:
    """What one GPU can still give, and why."""

    index: int
    uuid: str
    free_mib: int
    pending_mib: int  # handed out, not yet visible as used
    reserve_mib: int
    utilization_percent: int | None

    @property
    def available_mib(self) -> int:
        return self.free_mib - self.pending_mib - self.reserve_mib

    def explain(self) -> str:
        return (f"GPU {self.index} has {max(0, self.available_mib)} MiB to give (free "
                f"{self.free_mib} - {self.pending_mib} handed out, not yet in use - "
                f"{self.reserve_mib} kept back)")


class NoFit(ClusterctlError):
    """No GPU can take the request (exit 1)."""


def load(state_dir: Path) -> list[Allocation]:
    """The allocations handed out; none when there are none. A damaged ledger is kept
    aside and forgotten: what it reserved for models still loading is lost, the loaded
    ones NVML counts as used VRAM."""
    found = statefile.read(SPEC, state_dir, _parse)
    return [] if found is None else found


def _parse(data: dict[str, Any]) -> list[Allocation]:
    allocations = data["allocations"]
    if not isinstance(allocations, list):
        raise TypeError("allocations is not a list")
    return [Allocation(**a) for a in allocations]


def save(state_dir: Path, allocations: list[Allocation]) -> None:
    statefile.write(SPEC, state_dir, {"allocations": [asdict(a) for a in allocations]})


def room(gpu: GpuSample, allocations: list[Allocation], reserve_mib: int) -> Room | None:
    """None when the GPU cannot be placed on (lost, or no memory figures)."""
    if gpu.lost or gpu.uuid is None or gpu.memory_free_mib is None \
            or gpu.memory_used_mib is None:
        return None
    mine = [a for a in allocations if a.gpu_uuid == gpu.uuid]
    pending = 0
    if mine:
        grown = max(0, gpu.memory_used_mib - min(a.used_mib_at_place for a in mine))
        pending = max(0, sum(a.vram_mib for a in mine) - grown)
    return Room(gpu.index, gpu.uuid, gpu.memory_free_mib, pending, reserve_mib,
                gpu.utilization_gpu_percent)


def choose(snapshot: GpuSnapshot, allocations: list[Allocation], name: str, vram_mib: int,
           reserve_mib: int, gpu_index: int | None = None,
           faulty: Mapping[str, Fatal] | None = None) -> tuple[Room, bool]:
    """The GPU for ``name``: (room, already_placed). NoFit names the best candidate.
    ``faulty``: GPUs (by ``gpu_key``) with an unrecovered fatal XID, left out."""
    placed = next((a for a in allocations if a.name == name), None)
    if placed is not None:
        gpu = next((g for g in snapshot.gpus if g.uuid == placed.gpu_uuid), None)
        r = room(gpu, allocations, reserve_mib) if gpu else None
        if r is None:
            raise NoFit(f"{name} is placed on GPU {placed.gpu_index} ({placed.gpu_uuid}), "
                        "which NVML no longer reports",
                        fix=f"clusterctl gpu release {name}, then place it again")
        return r, True
    if not snapshot.gpus:
        raise NoFit(f"no GPU to place {name} on: {snapshot.reason}", fix=snapshot.fix)
    candidates = [g for g in snapshot.gpus if gpu_index is None or g.index == gpu_index]
    if not candidates:
        raise UsageError(f"--gpu {gpu_index}: this node has GPUs 0-{len(snapshot.gpus) - 1}")
    held = [f for f in (faulty or {}).values()
            if any(gpu_key(g.index, g.uuid) == gpu_key(f.index, f.uuid) for g in candidates)]
    if held:
        candidates = [g for g in candidates if gpu_key(g.index, g.uuid) not in (faulty or {})]
        if not candidates:
            raise NoFit(f"not placing {name}: {'; '.join(f.problem for f in held)}",
                        fix=held[0].fix)
    left_out = "".join(f" ({f.problem}: left out)" for f in held)
    rooms = [r for r in (room(g, allocations, reserve_mib) for g in candidates) if r]
    if not rooms:
        raise NoFit(f"no usable GPU for {name}: every candidate is lost or reports no "
                    "memory", fix="clusterctl gpu status")
    fits = [r for r in rooms if r.available_mib >= vram_mib]
    if not fits:
        best = max(rooms, key=lambda r: r.available_mib)
        raise NoFit(f"no GPU has {vram_mib} MiB for {name}: {best.explain()}{left_out}",
                    fix="release an allocation (clusterctl gpu allocations), or ask for less")
    fits.sort(key=lambda r: (r.utilization_percent if r.utilization_percent is not None
                             else 100, -r.available_mib, r.index))
    return fits[0], False


@dataclass(frozen=True)
class Placed:
    allocation: Allocation
    room: Room  # as it was before this placement
    existing: bool  # the name was placed already


def place(state_dir: Path, run_dir: Path, sample: Any, name: str, vram_mib: int,
          reserve_mib: int, *, gpu_index: int | None = None, now: float,
          wait_s: float = 10.0, faulty: Mapping[str, Fatal] | None = None) -> Placed:
    """Hand ``vram_mib`` on one GPU to ``name``; ``sample()`` gives a fresh GpuSnapshot.
    GPUs with an unrecovered fatal XID (``faulty``, and those the agent's file names)
    are left out."""
    if vram_mib <= 0:
        raise UsageError(f"--vram must be a positive number of MiB, got {vram_mib}")
    if not name or len(name) > 200:
        raise UsageError("a placement needs a name of 1-200 characters")
    with locks.exclusive(run_dir / LOCK_NAME, what="clusterctl gpu placement", wait_s=wait_s):
        allocations = load(state_dir)
        snapshot = sample()
        held = {**xid_ledger.load(state_dir), **(faulty or {})}
        chosen, existing = choose(snapshot, allocations, name, vram_mib, reserve_mib, gpu_index,
                                  held)
        if existing:
            allocation = next(a for a in allocations if a.name == name)
            return Placed(allocation, chosen, True)
        gpu = next(g for g in snapshot.gpus if g.uuid == chosen.uuid)
        allocation = Allocation(name, chosen.uuid, chosen.index, vram_mib, now,
                                gpu.memory_used_mib or 0)
        save(state_dir, [*allocations, allocation])
        return Placed(allocation, chosen, False)


def release(state_dir: Path, run_dir: Path, name: str, *, wait_s: float = 10.0
            ) -> Allocation | None:
    with locks.exclusive(run_dir / LOCK_NAME, what="clusterctl gpu placement", wait_s=wait_s):
        allocations = load(state_dir)
        found = next((a for a in allocations if a.name == name), None)
        if found is not None:
            save(state_dir, [a for a in allocations if a.name != name])
        return found
