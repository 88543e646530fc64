"""Reading the host: /proc, /sys, NVML and local services, all rooted at ``root``.

This package is the only place that looks at the machine. Everything above
it works on the frozen facts returned here, so planners and reports are pure
functions that tests drive with fixture trees (``root=tests/fixtures/...``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from clusterctl.host.cgroups import SwapCap, read_swap_caps
from clusterctl.host.nvml import GpuInfo, GpuInventory, Nvml
from clusterctl.host.oomd import OomdFacts, read_oomd
from clusterctl.host.procfs import (
    CpuFacts,
    MemoryFacts,
    PressureFacts,
    SwapArea,
    cpu_usage_percent,
    read_cpu,
    read_cpu_times,
    read_memory,
    read_pressure,
    read_swaps,
)
from clusterctl.host.software import (
    DaskFacts,
    OllamaFacts,
    SystemFacts,
    read_dask,
    read_ollama,
    read_system,
)
from clusterctl.host.storage import (
    BlockDevice,
    FilesystemFacts,
    StatVfs,
    read_block_devices,
    read_filesystem,
)
from clusterctl.system.systemd import swap_dir_unreachable  # reads the unit files

__all__ = [
    "BlockDevice",
    "CpuFacts",
    "DaskFacts",
    "FilesystemFacts",
    "GpuInfo",
    "GpuInventory",
    "HostFacts",
    "MemoryFacts",
    "Nvml",
    "OllamaFacts",
    "OomdFacts",
    "PressureFacts",
    "SwapArea",
    "SwapCap",
    "SystemFacts",
    "read_host",
]


@dataclass(frozen=True)
class HostFacts:
    system: SystemFacts
    cpu: CpuFacts
    memory: MemoryFacts
    swaps: tuple[SwapArea, ...]
    pressure: PressureFacts
    swap_dir: FilesystemFacts
    disks: tuple[BlockDevice, ...]
    gpus: GpuInventory
    ollama: OllamaFacts
    dask: DaskFacts
    # installed swap units whose sandbox cannot write the swap dir (no ReadWritePaths=)
    swap_units_blocked: tuple[str, ...] = ()
    # systemd-oomd: None when it could not be read (OomdFacts.running says if it runs)
    oomd: OomdFacts | None = None
    # populated memory cgroups that swap cannot help (empty when cgroups are unreadable)
    swap_caps: tuple[SwapCap, ...] = ()


def read_host(
    root: Path,
    *,
    swap_dir: Path,
    ollama_url: str,
    nvml: Nvml,
    cpu_sample_s: float = 0.2,
    statvfs: StatVfs | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> HostFacts:
    """Everything `clusterctl check` reports about the node.

    CPU usage is measured over ``cpu_sample_s``; the other reads run inside
    that window, so the sample costs no extra time when they are slow.
    """
    started = clock()
    first = read_cpu_times(root) if cpu_sample_s > 0 else None
    facts = HostFacts(
        system=read_system(root),
        cpu=read_cpu(root),
        memory=read_memory(root),
        swaps=read_swaps(root),
        pressure=read_pressure(root),
        swap_dir=read_filesystem(root, str(swap_dir), statvfs=statvfs),
        disks=read_block_devices(root),
        gpus=nvml.inventory(),
        ollama=read_ollama(root, ollama_url),
        dask=read_dask(root),
        swap_units_blocked=swap_dir_unreachable(swap_dir, root=root),
        oomd=_oomd_or_none(root),
        swap_caps=read_swap_caps(root),
    )
    if first is None:
        return facts
    remaining = cpu_sample_s - (clock() - started)
    if remaining > 0:
        sleep(remaining)
    second = read_cpu_times(root)
    usage = cpu_usage_percent(first, second) if second else None
    return replace(facts, cpu=replace(facts.cpu, usage_percent=usage))


def _oomd_or_none(root: Path) -> OomdFacts | None:
    """systemd-oomd's facts; None when something there could not be made sense of, so
    that `check` goes on without them."""
    try:
        return read_oomd(root)
    except (OSError, ValueError):
        return None
