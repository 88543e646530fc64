"""Real filesystems on loop devices for tests (root only), always torn down."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.systemd_sandbox import swapoff_files_under

MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}


def require_loop(fstype: str = "ext4") -> None:
    """Skip, saying why, where loop filesystems cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("needs root to attach loop devices and mount")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop device support (/dev/loop-control missing)")
    if shutil.which(MKFS[fstype][0]) is None:
        pytest.skip(f"{MKFS[fstype][0]} is not installed")


def active_swaps_under(directory: Path) -> list[str]:
    lines = Path("/proc/swaps").read_text().splitlines()[1:]
    paths = [line.split()[0].replace("\\040", " ") for line in lines]
    return [p for p in paths if p.startswith(f"{directory}/")]


def swapoff_under(directory: Path) -> None:
    """Swap off every area under ``directory`` (a test's own files only).

    Also those /proc/swaps names by another path (enabled in another mount namespace):
    swapoff(2) finds an area by its file.
    """
    for path in active_swaps_under(directory):
        subprocess.run(["swapoff", path], check=False, capture_output=True)
    swapoff_files_under(directory)


@contextlib.contextmanager
def loop_mount(workdir: Path, fstype: str = "ext4", size_mib: int = 320) -> Iterator[Path]:
    """A fresh ``fstype`` filesystem mounted at workdir/mnt; unmounted and detached after."""
    require_loop(fstype)
    image = workdir / f"{fstype}.img"
    mountpoint = workdir / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as handle:
        handle.truncate(size_mib * 2**20)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    mounted = False
    try:
        subprocess.run([*MKFS[fstype], device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(mountpoint)], check=True, capture_output=True)
        mounted = True
        yield mountpoint
    finally:
        swapoff_under(mountpoint)
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        image.unlink(missing_ok=True)
