"""The swap dir as it is on disk: is it trusted, and what files are in it."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
NAME_RE = re.compile(r"^swap-(\d{4})$")
TMP_RE = re.compile(r"^\.(swap-\d{4})\.tmp$")


def dir_problem(st: os.stat_result) -> str | None:
    """Why a directory may not hold clusterctl's swap files, or None if it may."""
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


@dataclass(frozen=True)
class SwapDirEntry:
    name: str
    size_bytes: int
    regular: bool
    has_signature: bool  # a swap header at the end of the first page

    @property
    def managed_name(self) -> bool:
        return NAME_RE.match(self.name) is not None

    @property
    def leftover_of(self) -> str | None:
        """For ``.swap-0003.tmp``, the name it was being built as."""
        match = TMP_RE.match(self.name)
        return match.group(1) if match else None


@dataclass(frozen=True)
class SwapDirListing:
    path: str
    exists: bool
    problem: str | None  # why it is not trusted (symlink, owner, mode)
    entries: tuple[SwapDirEntry, ...]


def _signature(fd: int, page_size: int) -> bool:
    tail = os.pread(fd, 10, page_size - 10)
    return tail in SWAP_MAGICS


def read_swap_dir(path: Path, *, page_size: int | None = None) -> SwapDirListing:
    page = page_size or os.sysconf("SC_PAGE_SIZE")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return SwapDirListing(str(path), False, None, ())
    if stat.S_ISLNK(st.st_mode):
        return SwapDirListing(str(path), True, "a symlink", ())
    problem = dir_problem(st)
    entries = []
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except PermissionError:
        return SwapDirListing(str(path), True, problem or "not readable (run as root)", ())
    try:
        for name in sorted(os.listdir(dfd)):  # noqa: PTH208 - listing by descriptor
            est = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            regular = stat.S_ISREG(est.st_mode)
            signature = False
            if regular and est.st_size >= page:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    fd = -1
                if fd >= 0:
                    try:
                        signature = _signature(fd, page)
                    finally:
                        os.close(fd)
            entries.append(SwapDirEntry(name, est.st_size, regular, signature))
    finally:
        os.close(dfd)
    return SwapDirListing(str(path), True, problem, tuple(entries))
