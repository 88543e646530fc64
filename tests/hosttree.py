"""Build /proc + /sys shaped trees for the host readers (``root=`` in clusterctl.host).

Sysfs is modelled the way the kernel lays it out: devices live under
``sys/devices/...``; ``sys/class/block/NAME``, ``sys/block/DISK`` and
``sys/dev/block/MAJ:MIN`` are relative symlinks to them; partitions are child
directories with a ``partition`` file; dm and md devices are virtual with
``slaves/`` links.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLES = Path(__file__).parent / "fixtures" / "samples"


class HostTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._mounts: list[str] = []
        root.mkdir(parents=True, exist_ok=True)

    def file(self, rel: str, text: str) -> HostTree:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return self

    def sample(self, name: str) -> HostTree:
        """proc files from tests/fixtures/samples/NAME."""
        for src in (SAMPLES / name).iterdir():
            rel = src.name.replace("pressure-", "pressure/")
            self.file(f"proc/{rel}", src.read_text())
        return self

    def _link(self, rel: str, target_rel: str) -> None:
        link = self.root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(self.root / target_rel, link.parent))

    def _device(self, devpath: str, name: str, dev: str, *, size_sectors: int,
                rotational: int | None, partition: int | None = None) -> None:
        base = f"{devpath}/{name}"
        self.file(f"{base}/size", f"{size_sectors}\n")
        self.file(f"{base}/dev", f"{dev}\n")
        if rotational is not None:
            self.file(f"{base}/queue/rotational", f"{rotational}\n")
        if partition is not None:
            self.file(f"{base}/partition", f"{partition}\n")
        self._link(f"sys/class/block/{name}", base)
        self._link(f"sys/dev/block/{dev}", base)

    def disk(self, name: str, dev: str, *, rotational: int, size_gib: float = 100,
             model: str | None = None, partitions: dict[str, str] | None = None,
             bus: str = "sys/devices/pci0000:00/0000:00:1d.0/block") -> HostTree:
        """A whole disk with optional partitions {name: "maj:min"}."""
        sectors = int(size_gib * 2**30 / 512)
        self._device(bus, name, dev, size_sectors=sectors, rotational=rotational)
        self.file(f"{bus}/{name}/removable", "0\n")
        if model:
            self.file(f"{bus}/{name}/device/model", f"{model}\n")
        self._link(f"sys/block/{name}", f"{bus}/{name}")
        for number, (part, part_dev) in enumerate((partitions or {}).items(), start=1):
            self._device(f"{bus}/{name}", part, part_dev, size_sectors=sectors // 4,
                         rotational=None, partition=number)
        return self

    def virtual(self, name: str, dev: str, *, slaves: list[str], dm_name: str | None = None,
                rotational: int = 0) -> HostTree:
        """A dm-N or mdN device over ``slaves`` (kernel names)."""
        base = "sys/devices/virtual/block"
        self._device(base, name, dev, size_sectors=2**24, rotational=rotational)
        self._link(f"sys/block/{name}", f"{base}/{name}")
        if dm_name:
            self.file(f"{base}/{name}/dm/name", f"{dm_name}\n")
        for slave in slaves:
            real = (self.root / "sys/class/block" / slave).resolve()
            self._link(f"{base}/{name}/slaves/{slave}", str(real.relative_to(self.root.resolve())))
        return self

    def mount(self, point: str, fstype: str, dev: str, source: str,
              options: str = "rw,relatime") -> HostTree:
        number = 20 + len(self._mounts)
        self._mounts.append(f"{number} 1 {dev} / {point} {options} - {fstype} {source} rw")
        self.file("proc/self/mountinfo", "\n".join(self._mounts) + "\n")
        (self.root / point.lstrip("/")).mkdir(parents=True, exist_ok=True)
        return self

    def system(self, *, hostname: str = "host", kernel: str = "6.8.0", init: str = "systemd",
               booted: bool = True, cgroup: str = "v2") -> HostTree:
        self.file("proc/sys/kernel/hostname", hostname + "\n")
        self.file("proc/sys/kernel/osrelease", kernel + "\n")
        self.file("proc/1/comm", init + "\n")
        if booted:
            (self.root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
        if cgroup == "v2":
            self.file("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
        elif cgroup == "hybrid":
            self.file("sys/fs/cgroup/unified/cgroup.controllers", "\n")
            (self.root / "sys/fs/cgroup/memory").mkdir(parents=True, exist_ok=True)
        elif cgroup == "v1":
            (self.root / "sys/fs/cgroup/memory").mkdir(parents=True, exist_ok=True)
        return self


def laptop(root: Path) -> HostTree:
    """8-thread laptop, NVMe SSD with ext4 root, swap partition, PSI, cgroup v2."""
    return (
        HostTree(root).sample("laptop").system(hostname="laptop", kernel="6.5.0-14-generic")
        .disk("nvme0n1", "259:0", rotational=0, size_gib=476.9, model="SAMSUNG MZVL2512HCJQ",
              partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2", "nvme0n1p3": "259:3"},
              bus="sys/devices/pci0000:00/0000:00:06.0/0000:01:00.0/nvme/nvme0")
        .mount("/", "ext4", "259:2", "/dev/nvme0n1p2")
        .mount("/boot/efi", "vfat", "259:1", "/dev/nvme0n1p1")
        .mount("/tmp", "tmpfs", "0:40", "tmpfs")
    )


def gpu_server(root: Path) -> HostTree:
    """2-socket 64-thread server: /var/lib on md RAID1 of two NVMe partitions, /data on HDD."""
    return (
        HostTree(root).sample("gpu-server").system(hostname="gpu-node-07",
                                                   kernel="5.15.0-91-generic")
        .disk("nvme0n1", "259:0", rotational=0, size_gib=1788.5, model="SAMSUNG MZQL21T9HCJR",
              partitions={"nvme0n1p1": "259:1", "nvme0n1p2": "259:2"},
              bus="sys/devices/pci0000:40/0000:40:01.1/0000:41:00.0/nvme/nvme0")
        .disk("nvme1n1", "259:3", rotational=0, size_gib=1788.5, model="SAMSUNG MZQL21T9HCJR",
              partitions={"nvme1n1p1": "259:4", "nvme1n1p2": "259:5"},
              bus="sys/devices/pci0000:c0/0000:c0:01.1/0000:c1:00.0/nvme/nvme1")
        .disk("sda", "8:0", rotational=1, size_gib=7452, model="ST8000NM000A-2KE",
              partitions={"sda1": "8:1"},
              bus="sys/devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block")
        .virtual("md0", "9:0", slaves=["nvme0n1p2", "nvme1n1p2"])
        .mount("/", "ext4", "9:0", "/dev/md0")
        .mount("/boot/efi", "vfat", "259:1", "/dev/nvme0n1p1")
        .mount("/data", "xfs", "8:1", "/dev/sda1")
    )


def old_kernel(root: Path) -> HostTree:
    """3.10 kernel: no PSI, no MemAvailable, cgroup v1, XFS root on LVM over a SATA disk."""
    return (
        HostTree(root).sample("old-kernel").system(hostname="legacy", kernel="3.10.0-1160.el7",
                                                   cgroup="v1")
        .disk("sda", "8:0", rotational=1, size_gib=931.5, model="WDC WD10EZEX-08W",
              partitions={"sda1": "8:1", "sda2": "8:2"},
              bus="sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block")
        .virtual("dm-0", "253:0", slaves=["sda2"], dm_name="centos-root", rotational=1)
        .virtual("dm-1", "253:1", slaves=["sda2"], dm_name="centos-swap", rotational=1)
        .mount("/", "xfs", "253:0", "/dev/mapper/centos-root")
        .mount("/boot", "xfs", "8:1", "/dev/sda1")
    )
