"""The swap dir as it is on disk: is it trusted, and what files are in it.

Trusted means that no user but root can change what the swap dir's path leads to:
the swap dir is root's and writable by nobody else, and so is every directory
above it (or it is sticky, like /tmp), and no component of the path is a symlink.
``walk_to_dir`` checks this the way it opens the dir, from / one component at a
time, each directory checked before anything is looked up in it, so what is
checked is what is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from clusterctl.host.procfs import SwapArea

SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
NAME_RE = re.compile(r"^swap-(\d{4})$")
TMP_RE = re.compile(r"^\.(swap-\d{4})\.tmp$")
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
NOT_READABLE = "not readable (run as root)"


def dir_problem(st: os.stat_result) -> str | None:
    """Why a directory may not hold clusterctl's swap files, or None if it may."""
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def ancestor_problem(st: os.stat_result, euid: int) -> str | None:
    """Why a directory above the swap dir lets another user swap the dir for another."""
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid not in (0, euid):
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


@dataclass(frozen=True)
class Distrust:
    """The first directory on the way to the swap dir that fails the checks."""

    directory: str
    problem: str
    target: bool  # the swap dir itself, not one above it

    def describe(self) -> str:
        """What follows "swap dir PATH is"."""
        return self.problem if self.target else f"under {self.directory}, which is {self.problem}"

    def fix(self) -> str:
        where = self.directory
        if self.problem == "a symlink":
            return "set [swap] dir to its real path, with no symlink in it"
        if self.problem == NOT_READABLE:
            return "run it as root"
        if self.target:
            return f"chown root:root {where} && chmod 0700 {where}, or choose another dir"
        return f"chown root {where} && chmod go-w {where}, or set [swap] dir elsewhere"


def walk_to_dir(path: Path, *, create: bool = False, strict: bool = True
                ) -> tuple[int | None, Distrust | None]:
    """An O_RDONLY descriptor of the swap dir, reached from / without following symlinks.

    Returns the descriptor (None when the dir does not exist or cannot be reached) and
    the first directory that fails the checks (None when all pass). ``strict`` stops
    at that directory, before anything is looked up or made in it; otherwise the walk
    goes on where it can, to list a dir that is reported, not used. ``create`` makes
    what is missing: 0755 above the dir, 0700 the dir itself.
    """
    if not path.is_absolute() or ".." in path.parts:
        return None, Distrust(str(path), "not an absolute path without '..'", True)
    euid = os.geteuid()
    first: Distrust | None = None
    here = Path("/")
    fd = os.open("/", _PATH_FLAGS)
    try:
        while True:
            target = here == path
            st = os.fstat(fd)
            problem = dir_problem(st) if target else ancestor_problem(st, euid)
            if problem is not None:
                first = first or Distrust(str(here), problem, target)
                if strict or not stat.S_ISDIR(st.st_mode):
                    return None, first
            try:
                if target:
                    return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                   dir_fd=fd), first
                part = path.parts[len(here.parts)]
                child = _open_child(fd, part, 0o700 if here / part == path else 0o755,
                                    create=create)
            except FileNotFoundError:
                return None, first
            except PermissionError:
                return None, first or Distrust(str(here), NOT_READABLE, target)
            except OSError as err:  # EIO, ENOTDIR...: it cannot be reached, so not used
                return None, first or Distrust(str(here), f"not readable ({err.strerror})",
                                               target)
            os.close(fd)
            fd, here = child, here / part
    finally:
        os.close(fd)


def _open_child(dfd: int, name: str, mode: int, *, create: bool) -> int:
    try:
        return os.open(name, _PATH_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # made by a concurrent run
        os.mkdir(name, mode, dir_fd=dfd)
    return os.open(name, _PATH_FLAGS, dir_fd=dfd)


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
    problem: str | None  # why it is not trusted: follows "swap dir PATH is"
    entries: tuple[SwapDirEntry, ...]
    # entries that are there but could not be read (EIO): "NAME: strerror", left out of
    # ``entries`` (what they are is unknown, so nothing may be done with them)
    unreadable: tuple[str, ...] = ()


def has_swap_signature(fd: int, page_size: int) -> bool:
    """Whether the open file has a swap header's magic at the end of its first page."""
    tail = os.pread(fd, 10, page_size - 10)
    return tail in SWAP_MAGICS


def read_swap_dir(path: Path, *, page_size: int | None = None) -> SwapDirListing:
    """The swap dir's files, and why it is not trusted (if it is not): reports, never raises."""
    page = page_size or os.sysconf("SC_PAGE_SIZE")
    dfd, distrust = walk_to_dir(path, strict=False)
    problem = distrust.describe() if distrust else None
    if dfd is None:
        return SwapDirListing(str(path), distrust is not None and distrust.target, problem, ())
    entries = []
    unreadable: list[str] = []
    try:
        try:
            names = sorted(os.listdir(dfd))  # noqa: PTH208 - listing by descriptor
        except OSError as err:  # EIO on a failing disk: nothing in it can be used
            return SwapDirListing(str(path), True, problem or f"not readable ({err.strerror})",
                                  ())
        for name in names:
            try:
                est = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing (a `swap clean` under way): gone
            except OSError as err:
                unreadable.append(f"{name}: {err.strerror or err}")
                continue
            regular = stat.S_ISREG(est.st_mode)
            signature = False
            if regular and est.st_size >= page:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=dfd)
                except OSError:
                    fd = -1
                if fd >= 0:
                    try:
                        signature = has_swap_signature(fd, page)
                    except OSError as err:  # EIO reading the header: swap or not, unknown
                        unreadable.append(f"{name}: {err.strerror or err}")
                        continue
                    finally:
                        os.close(fd)
            entries.append(SwapDirEntry(name, est.st_size, regular, signature))
    finally:
        os.close(dfd)
    return SwapDirListing(str(path), True, problem, tuple(entries), tuple(unreadable))


# ---------------------------------------------------------------------------
# which /proc/swaps line is which file
#
# /proc/swaps names an area by the path it had in the mount namespace that enabled
# it. A file enabled by a sandboxed service (ProtectSystem=, ReadWritePaths=: its own
# mount namespace) is listed, once that service has exited, relative to the mount it
# was reached through: /var/lib/clusterctl/swap/swap-0001 reads "/swap/swap-0001", or
# "/swap-0001" when the swap dir is a filesystem of its own. Such a line is matched to
# the file whose path ends with it and whose size fits, and the kernel confirms it.

FALLOC_FL_KEEP_SIZE = 1
HEADER_SLACK_BYTES = 64 * 1024  # the header page (4-64 KiB) is not counted in /proc/swaps

_libc: ctypes.CDLL | None = None


def swap_in_use(path: str) -> bool | None:
    """Whether the kernel holds ``path`` as an active swap area; None if it cannot tell.

    fallocate(2) refuses an active swap file with ETXTBSY before any filesystem code
    runs. On an inactive, fully allocated swap file, a KEEP_SIZE fallocate of its first
    page allocates nothing (it may touch the mtime).
    """
    global _libc  # noqa: PLW0603 - loaded once, on first need
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    try:  # never blocks on a FIFO planted in its place; only a regular file is asked
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4096) == 0:
            return False
        return True if ctypes.get_errno() == errno.ETXTBSY else None
    finally:
        os.close(fd)


def attribute_areas(areas: tuple[SwapArea, ...], listing: SwapDirListing,
                    in_use: Callable[[str], bool | None] = swap_in_use) -> tuple[SwapArea, ...]:
    """``areas`` with the swap dir's files named by their real paths (see above)."""
    directory = listing.path.rstrip("/")
    files = {f"{directory}/{e.name}": e for e in listing.entries if e.regular and e.managed_name}
    unmatched = [p for p in files if p not in {a.path for a in areas}]
    out = []
    for area in areas:
        if area.type != "file" or area.path in files or not area.path.startswith("/"):
            out.append(area)
            continue
        fits = [p for p in unmatched if p.endswith(area.path)
                and 0 <= files[p].size_bytes - area.size_bytes <= HEADER_SLACK_BYTES]
        found = next((p for p in fits if in_use(p)), None)
        if found is None:
            out.append(area)
        else:
            unmatched.remove(found)
            out.append(replace(area, path=found))
    return tuple(out)
