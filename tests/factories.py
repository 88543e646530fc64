"""HostFacts for pure tests of the checker: the machine, described in a few numbers."""

from __future__ import annotations

from clusterctl.host import (
    CpuFacts,
    DaskFacts,
    FilesystemFacts,
    GpuInfo,
    GpuInventory,
    HostFacts,
    MemoryFacts,
    OllamaFacts,
    PressureFacts,
    SystemFacts,
)
from clusterctl.host.procfs import Pressure, PressureLine
from clusterctl.units import GIB, KIB, MIB

CALM = Pressure(PressureLine(0.0, 0.0, 0.0, 0), PressureLine(0.0, 0.0, 0.0, 0))


def machine(
    *,
    cores: int,
    memtotal_kib: int,
    media: str | None = "ssd",
    fstype: str = "ext4",
    free_gib: float = 200,
    vram_mib: list[int] | None = None,
    psi: bool = True,
    systemd: bool = True,
    used_percent: float = 20,
    cpu_busy: float | None = 10,
    ollama: str = "absent",
    lost_gpu: bool = False,
) -> HostFacts:
    total = memtotal_kib * KIB
    gpus = tuple(
        GpuInfo(i, f"GPU {i}", f"GPU-{i}", f"0000:{i:02x}:00.0", mib * MIB,
                lost=lost_gpu and i == 0, error="GPU is lost" if lost_gpu and i == 0 else None)
        for i, mib in enumerate(vram_mib or [])
    )
    reason = None if gpus else "no NVIDIA driver: libnvidia-ml.so.1 was not found"
    rotational = None if media is None else media == "hdd"
    return HostFacts(
        system=SystemFacts("node", "6.8.0", systemd, "systemd" if systemd else "init", "v2"),
        cpu=CpuFacts(cores, cores, "CPU", cpu_busy, 0.5, 0.5, 0.5),
        memory=MemoryFacts(
            total_bytes=total, free_bytes=total // 2,
            available_bytes=int(total * (1 - used_percent / 100)),
            buffers_bytes=0, cached_bytes=0, swap_total_bytes=0, swap_free_bytes=0,
            committed_as_bytes=None),
        swaps=(),
        pressure=PressureFacts(CALM, CALM, CALM, None) if psi else PressureFacts(
            None, None, None, "kernel has no PSI (needs Linux 4.20+ with CONFIG_PSI)"),
        swap_dir=FilesystemFacts(
            path="/var/lib/clusterctl/swap", existing_path="/var/lib", mountpoint="/",
            fstype=fstype, source="/dev/sda1", device="sda1",
            disks=("sda",) if media else (), rotational=rotational,
            total_bytes=int(500 * GIB), available_bytes=int(free_gib * GIB),
            free_bytes=int(free_gib * GIB)),
        disks=(),
        gpus=GpuInventory(gpus, "550.54.15" if gpus else None, None, reason),
        ollama=OllamaFacts(
            binary="/usr/local/bin/ollama" if ollama != "absent" else None, unit=None,
            api_url="http://127.0.0.1:11434",
            api_version="0.5.7" if ollama == "running" else None,
            api_error=None if ollama == "running" else "no answer"),
        dask=DaskFacts(None, None, None, None),
    )


# Three example machines, one per tier of the hardware table, with MemTotal as such
# machines show it.
# 2 cores, "4 GB", HDD, no GPU
BASIC = {"cores": 2, "memtotal_kib": 3_995_000, "media": "hdd", "free_gib": 50}
# 6 cores, "12 GB", SSD, an RTX 4060 8 GB
INTERMEDIATE = {"cores": 6, "memtotal_kib": 12_150_000, "media": "ssd", "free_gib": 150,
                "vram_mib": [8188]}
# 16 cores, "32 GB", SSD, an RTX 4090 24 GB
ADVANCED = {"cores": 16, "memtotal_kib": 32_780_000, "media": "ssd", "free_gib": 400,
            "vram_mib": [24564]}
