"""Filesystems and block devices, rooted at ``root``.

Which filesystem holds a path (from /proc/self/mountinfo), how much room it
has, and whether the disks under it rotate: a partition is followed to its
disk, device-mapper and md devices to their ``slaves``, a loop device to the
filesystem of its backing file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from clusterctl.host.procfs import read_text, unescape_octal

Media = Literal["ssd", "hdd"]
StatVfs = Callable[[Path], os.statvfs_result]
# a path that is not there (or a loop of symlinks): the probe goes on without it
ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class Unreadable(Exception):
    """A path a probe needs is there but cannot be read (EACCES, EPERM, EIO, ...).

    Raised inside this module only: ``read_filesystem`` turns it into facts that are
    unknown (None), with the reason in ``unknown_reason``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _exists(path: Path, shown: str) -> bool:
    """Whether ``path`` exists (symlinks followed); Unreadable when it cannot tell."""
    try:
        path.stat()
    except OSError as err:
        if err.errno in ABSENT:
            return False
        raise Unreadable(f"cannot read {shown}: {err.strerror or err}") from err
    return True


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        major, _, minor = fields[2].partition(":")
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                major=int(major),
                minor=int(minor),
                mountpoint=unescape_octal(fields[4]),
                fstype=fields[sep + 1],
                source=unescape_octal(fields[sep + 2]),
                options=fields[5],
            )
        )
    return tuple(mounts)


def read_mounts(root: Path) -> tuple[Mount, ...]:
    text = read_text(root, "proc/self/mountinfo")
    return parse_mountinfo(text) if text else ()


def mount_of(path: str, mounts: tuple[Mount, ...]) -> Mount | None:
    """The mount that holds ``path``: longest mountpoint prefix, later mounts on top."""
    best: Mount | None = None
    target = PurePosixPath(path)
    for mount in mounts:
        point = PurePosixPath(mount.mountpoint)
        if (target == point or point in target.parents) and (
            best is None or len(point.parts) >= len(PurePosixPath(best.mountpoint).parts)
        ):
            best = mount
    return best


@dataclass(frozen=True)
class FilesystemFacts:
    path: str  # as asked
    existing_path: str  # nearest existing ancestor, symlinks resolved
    mountpoint: str | None
    fstype: str | None
    source: str | None
    device: str | None  # the block device mounted ("sda1", "dm-0"); None for virtual fs
    disks: tuple[str, ...]  # physical disks under it
    rotational: bool | None  # True if any disk under it rotates; None when unknown
    total_bytes: int | None
    available_bytes: int | None  # free to ordinary users (statvfs f_bavail)
    free_bytes: int | None  # free including root's reserve (f_bfree)
    # why some of the above is unknown: a path the probe could not read (a loop device's
    # backing file under a hidden /root, say), or None when nothing was in the way
    unknown_reason: str | None = None

    @property
    def media(self) -> Media | None:
        if self.rotational is None:
            return None
        return "hdd" if self.rotational else "ssd"


def existing_ancestor(root: Path, path: str) -> str:
    """The nearest existing directory at or above ``path``, symlinks resolved, root-relative.

    Unreadable when a path on the way up is there but cannot be looked at: then which
    filesystem holds ``path`` is unknown (the one above it would be a guess).
    """
    candidate = PurePosixPath(path)
    while True:
        full = root / str(candidate).lstrip("/")
        if _exists(full, str(candidate)):
            resolved = full.resolve()
            try:
                return "/" + str(resolved.relative_to(root.resolve())).removeprefix(".")
            except ValueError:
                return str(candidate)
        if candidate.parent == candidate:
            return "/"
        candidate = candidate.parent


def read_filesystem(
    root: Path,
    path: str,
    *,
    mounts: tuple[Mount, ...] | None = None,
    statvfs: StatVfs | None = None,
    _depth: int = 0,
) -> FilesystemFacts:
    """Everything about the filesystem that holds ``path`` (which need not exist yet).

    Never raises for a path it cannot read: what depends on it is None, and
    ``unknown_reason`` says which path and why.
    """
    mounts = read_mounts(root) if mounts is None else mounts
    reason: str | None = None
    try:
        existing: str | None = existing_ancestor(root, path)
    except Unreadable as err:
        existing, reason = None, err.reason
    mount = mount_of(existing, mounts) if existing is not None else None
    device = disks_rotational = None
    disks: tuple[str, ...] = ()
    if mount is not None:
        try:
            device = block_device_name(root, mount)
            if device is not None and _depth < 4:
                disks, disks_rotational = underlying_disks(root, device, mounts, _depth=_depth)
        except Unreadable as err:  # which disks are under it is advice: unknown
            reason = err.reason
    total = available = free = None
    stat_fn: StatVfs = statvfs or os.statvfs
    try:
        if existing is not None:
            st = stat_fn(root / existing.lstrip("/"))
            total = st.f_blocks * st.f_frsize
            available = st.f_bavail * st.f_frsize
            free = st.f_bfree * st.f_frsize
    except OSError:
        pass
    return FilesystemFacts(
        path=path,
        existing_path=existing if existing is not None else path,
        mountpoint=mount.mountpoint if mount else None,
        fstype=mount.fstype if mount else None,
        source=mount.source if mount else None,
        device=device,
        disks=disks,
        rotational=disks_rotational,
        total_bytes=total,
        available_bytes=available,
        free_bytes=free,
        unknown_reason=reason,
    )


def _sysfs(root: Path) -> Path:
    return root / "sys"


def _cat(path: Path) -> str | None:
    """A sysfs attribute already resolved to a real path, or None."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def block_device_name(root: Path, mount: Mount) -> str | None:
    """Kernel name of the block device behind a mount, if it has one."""
    link = _sysfs(root) / "dev/block" / f"{mount.major}:{mount.minor}"
    if _exists(link, f"/sys/dev/block/{mount.major}:{mount.minor}"):
        return link.resolve().name
    # btrfs and a few others show an anonymous 0:N; the source names the device.
    if mount.source.startswith("/dev/mapper/"):
        wanted = mount.source.removeprefix("/dev/mapper/")
        for dm_name in (_sysfs(root) / "class/block").glob("dm-*/dm/name"):
            if (_cat(dm_name) or "").strip() == wanted:
                return dm_name.parent.parent.name
        return None
    if mount.source.startswith("/dev/"):
        name = PurePosixPath(mount.source).name
        if _exists(_sysfs(root) / "class/block" / name, f"/sys/class/block/{name}"):
            return name
    return None


def underlying_disks(
    root: Path, name: str, mounts: tuple[Mount, ...], *, _depth: int = 0
) -> tuple[tuple[str, ...], bool | None]:
    """The whole disks under a block device and whether any of them rotates.

    Unreadable when a path on the way cannot be read (a loop device's backing file
    in a directory this process may not look into).
    """
    node = _sysfs(root) / "class/block" / name
    if not _exists(node, f"/sys/class/block/{name}"):
        return (), None
    real = node.resolve()
    if _exists(real / "partition", f"/sys/class/block/{name}/partition"):
        real = real.parent
    backing = _cat(real / "loop/backing_file")
    if backing:
        fs = read_filesystem(root, backing.strip(), mounts=mounts, _depth=_depth + 1)
        if fs.unknown_reason is not None:
            raise Unreadable(f"{fs.unknown_reason} (the backing file of {real.name})")
        return fs.disks, fs.rotational
    slaves = sorted(p.name for p in (real / "slaves").glob("*"))
    if slaves:
        found: list[str] = []
        rotates: list[bool | None] = []
        for slave in slaves:
            sub_disks, sub_rot = underlying_disks(root, slave, mounts, _depth=_depth)
            found.extend(sub_disks)
            rotates.append(sub_rot)
        return tuple(dict.fromkeys(found)), _any_rotates(rotates)
    flag = _cat(real / "queue/rotational")
    rotational = None if flag is None else flag.strip() == "1"
    return (real.name,), rotational


def _any_rotates(values: list[bool | None]) -> bool | None:
    if any(v is True for v in values):
        return True
    if values and all(v is False for v in values):
        return False
    return None


@dataclass(frozen=True)
class BlockDevice:
    name: str
    size_bytes: int
    rotational: bool | None
    removable: bool | None
    model: str | None

    @property
    def media(self) -> Media | None:
        if self.rotational is None:
            return None
        return "hdd" if self.rotational else "ssd"


def read_block_devices(root: Path) -> tuple[BlockDevice, ...]:
    """Physical disks (loop, ram, zram, dm and md are virtual and left out)."""
    devices = []
    for entry in sorted((_sysfs(root) / "block").glob("*")):
        real = entry.resolve()
        if "virtual" in real.parts:
            continue
        size = _cat(real / "size")
        if size is None or int(size) == 0:
            continue
        rotational = _cat(real / "queue/rotational")
        removable = _cat(real / "removable")
        model = _cat(real / "device/model")
        devices.append(
            BlockDevice(
                name=entry.name,
                size_bytes=int(size) * 512,
                rotational=None if rotational is None else rotational.strip() == "1",
                removable=None if removable is None else removable.strip() == "1",
                model=(model.strip() or None) if model else None,
            )
        )
    return tuple(devices)
