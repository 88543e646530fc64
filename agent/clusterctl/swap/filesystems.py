"""Which filesystems can hold swap files, and what to tell the operator when one cannot."""

from __future__ import annotations

from dataclasses import dataclass

# Swap files need a filesystem whose blocks the kernel can map once and write
# directly (bmap or swap_activate).
_SUPPORTED: dict[str, str] = {
    "ext4": "ext4 holds swap files (fallocate'd)",
    "ext3": "ext3 holds swap files",
    "ext2": "ext2 holds swap files",
    "xfs": "XFS holds swap files (fallocate'd)",
    "btrfs": "btrfs holds swap files that are NOCOW and uncompressed, on a single device",
    "f2fs": "f2fs holds swap files (written with zeros, not fallocate'd)",
}

_NETWORK = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre",
            "afs", "virtiofs")

_UNSUPPORTED: dict[str, str] = {
    "zfs": "ZFS cannot hold swap files (and swap on a zvol can deadlock under memory pressure)",
    "tmpfs": "tmpfs lives in memory: swap there would give back nothing",
    "ramfs": "ramfs lives in memory: swap there would give back nothing",
    "overlay": "overlayfs cannot hold swap files",
    "squashfs": "squashfs is read-only",
    "iso9660": "iso9660 is read-only",
    "devtmpfs": "devtmpfs is not a disk filesystem",
    "proc": "proc is not a disk filesystem",
    "sysfs": "sysfs is not a disk filesystem",
}

FIX = 'set [swap] dir to a directory on a local ext4, XFS or btrfs filesystem'


@dataclass(frozen=True)
class SwapFsVerdict:
    fstype: str | None
    supported: bool
    reason: str
    fix: str | None


def swapfile_support(fstype: str | None) -> SwapFsVerdict:
    if fstype is None:
        return SwapFsVerdict(None, False, "the filesystem of the swap dir is unknown", FIX)
    if fstype in _SUPPORTED:
        return SwapFsVerdict(fstype, True, _SUPPORTED[fstype], None)
    if fstype in _UNSUPPORTED:
        return SwapFsVerdict(fstype, False, _UNSUPPORTED[fstype], FIX)
    if fstype in _NETWORK or fstype.startswith("fuse"):
        reason = f"{fstype} is a network or FUSE filesystem: swap there fails when memory is short"
        return SwapFsVerdict(fstype, False, reason, FIX)
    return SwapFsVerdict(
        fstype, False, f"{fstype} is not known to hold swap files safely", FIX
    )
