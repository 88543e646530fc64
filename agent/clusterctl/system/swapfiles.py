"""Swap files on disk and in the kernel: create, activate, deactivate, remove.

Everything happens relative to an open, verified directory descriptor and
with O_NOFOLLOW: the dir is reached from / one component at a time, and each
directory on the way is checked before the next is looked up in it (see
``clusterctl.host.swapdir``), so a symlink planted in the swap dir or above it
is never followed. swapon(2) and swapoff(2) are given ``/proc/self/fd/N`` of a
file opened that way, so the kernel acts on the file that was checked, not on
whatever its path leads to by then; /proc/swaps still names it by its real path. A
file is built under a temporary name (``.NAME.tmp``), allocated and given a
swap header, renamed to its final name once it is a valid swap area, and
then activated (the kernel refuses to rename an active swap file). A crash
leaves either a temporary file (removed by the next run) or a valid, inactive
swap file (activated by the next run).

swapon(2) and swapoff(2) are called directly (no subprocess), without
SWAP_FLAG_PREFER: the kernel then gives each new area a priority below every
area that exists, so the operator's own swap (a hibernation resume area,
zram) stays first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from clusterctl.errors import HostError
from clusterctl.host.procfs import read_swaps
from clusterctl.host.swapdir import has_swap_signature, walk_to_dir
from clusterctl.units import MIB, format_size

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SWAP_MAGIC = b"SWAPSPACE2"
ZERO_CHUNK = 4 * MIB

# linux/fs.h: chattr flags through FS_IOC_GETFLAGS / FS_IOC_SETFLAGS
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_COMPR_FL = 0x00000004
FS_NOCOMP_FL = 0x00000400
FS_NOCOW_FL = 0x00800000

Method = Literal["auto", "fallocate", "zeros"]
Progress = Callable[[int, int], None]  # (done, total)
Allocate = Callable[[int, int, int], None]  # (fd, offset, length), like os.posix_fallocate

_libc = ctypes.CDLL(None, use_errno=True)


class SwapError(HostError):
    """A swap operation the kernel or the filesystem refused."""

    def __init__(self, message: str, *, errno_value: int | None = None,
                 fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.errno = errno_value


# ---------------------------------------------------------------------------
# the directory


def open_dir(path: Path, *, create: bool) -> int:
    """An O_RDONLY descriptor of the swap dir, once it and every directory above it are trusted.

    ``create`` makes the missing directories (0755 above, 0700 the dir), each only
    after the one it is made in has passed the checks.
    """
    try:
        dfd, distrust = walk_to_dir(path, create=create)
    except OSError as err:
        raise HostError(f"cannot open swap dir {path}: {err.strerror}") from err
    if distrust is not None:
        raise HostError(f"swap dir {path} is {distrust.describe()}; refusing it",
                        fix=distrust.fix())
    if dfd is None:
        raise HostError(f"swap dir {path} does not exist",
                        fix="create it (mode 0700, owned by root) or run a changing command "
                        "as root")
    return dfd


def fsync_dir(dfd: int) -> None:
    os.fsync(dfd)


# ---------------------------------------------------------------------------
# the swap header


def write_header(fd: int, size_bytes: int) -> None:
    """A version-1 swap header, as mkswap writes it (no bad pages, a fresh UUID)."""
    pages = size_bytes // PAGE_SIZE
    if pages < 10:
        raise SwapError(f"a swap area needs at least 10 pages, got {pages}")
    header = bytearray(PAGE_SIZE)
    # union swap_header.info at offset 1024: version, last_page, nr_badpages, uuid, label
    struct.pack_into("<III16s16s", header, 1024, 1, pages - 1, 0, uuid.uuid4().bytes, b"")
    header[PAGE_SIZE - len(SWAP_MAGIC):] = SWAP_MAGIC
    if os.pwrite(fd, bytes(header), 0) != PAGE_SIZE:
        raise SwapError("short write of the swap header")


# ---------------------------------------------------------------------------
# allocation


def set_nocow(fd: int) -> None:
    """btrfs: mark an empty file NOCOW and uncompressed, as swap files must be."""
    flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
    flags = (flags | FS_NOCOW_FL | FS_NOCOMP_FL) & ~FS_COMPR_FL
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))


def zero_fill(fd: int, size_bytes: int, progress: Progress | None = None) -> None:
    """Write real zeros over the whole file: no holes, no unwritten extents."""
    chunk = bytes(ZERO_CHUNK)
    done = 0
    while done < size_bytes:
        length = min(ZERO_CHUNK, size_bytes - done)
        done += os.pwrite(fd, chunk[:length], done)
        if progress is not None:
            progress(done, size_bytes)
    os.fsync(fd)


# ---------------------------------------------------------------------------
# the kernel


def _by_fd(fd: int) -> bytes:
    """A name for the open file that the kernel resolves to that file, whatever its path."""
    return f"/proc/self/fd/{fd}".encode()


def swapon(fd: int, path: str) -> None:
    """Enable the open file ``fd`` as swap; ``path`` names it in messages."""
    if _libc.swapon(_by_fd(fd), 0) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EINVAL:
        raise SwapError(f"the kernel refused {path} as swap (EINVAL): the file has holes or "
                        "unwritten extents, or its filesystem cannot hold swap files",
                        errno_value=code)
    if code == errno.EPERM:
        if os.geteuid() != 0:
            raise SwapError(f"swapon {path}: permission denied", errno_value=code,
                            fix="run as root")
        active = len(read_swaps(Path("/")))
        raise SwapError(f"the kernel refused another swap area: {active} are active, the "
                        "kernel's limit", errno_value=code,
                        fix="raise [swap] increment so fewer, larger files reach max_size")
    if code == errno.EBUSY:
        raise SwapError(f"{path} is already in use as swap", errno_value=code)
    raise SwapError(f"swapon {path}: {os.strerror(code)}", errno_value=code)


def swapoff(fd: int, path: str) -> None:
    """Disable the swap area that is the open file ``fd``; ``path`` names it in messages."""
    if _libc.swapoff(_by_fd(fd)) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.ENOMEM:
        raise SwapError(f"swapoff {path}: not enough memory to take its pages back",
                        errno_value=code,
                        fix="free memory, or raise the memory limit of the cgroup whose pages "
                        "they are, then try again")
    if code == errno.EINVAL:
        raise SwapError(f"{path} is not an active swap area", errno_value=code)
    if code == errno.EPERM:
        raise SwapError(f"swapoff {path}: permission denied", errno_value=code,
                        fix="run as root")
    raise SwapError(f"swapoff {path}: {os.strerror(code)}", errno_value=code)


def open_swap_file(dfd: int, dir_path: Path, name: str, size_bytes: int) -> int:
    """A descriptor of the swap dir's file ``name``, once it is fit to swap on.

    Opened without following a symlink; a regular file of root's that group and
    others cannot read or write, with a swap header, at least ``size_bytes`` long.
    """
    path = dir_path / name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except OSError as err:
        what = "a symlink" if err.errno == errno.ELOOP else err.strerror
        raise SwapError(f"cannot open {path} to swap on it: {what}",
                        errno_value=err.errno) from err
    try:
        st = os.fstat(fd)
        problem, fix = _swap_file_problem(fd, st, size_bytes, path)
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise SwapError(f"{path} is {problem}; refusing to swap on it", fix=fix)
    return fd


def _swap_file_problem(fd: int, st: os.stat_result, size_bytes: int, path: Path
                       ) -> tuple[str | None, str | None]:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", f"remove {path}"
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root", f"chown root {path}, or remove it"
    if st.st_mode & 0o077:
        return (f"open to group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod 0600 {path}")
    if st.st_size < size_bytes:
        return (f"{format_size(st.st_size)}, shorter than the {format_size(size_bytes)} "
                "recorded", "run `clusterctl swap clean`")
    if st.st_size < PAGE_SIZE or not has_swap_signature(fd, PAGE_SIZE):
        return "without a swap header", "run `clusterctl swap clean`"
    return None, None


def activate(dfd: int, dir_path: Path, name: str, size_bytes: int) -> None:
    """swapon the swap dir's file ``name``: the file checked by ``open_swap_file``."""
    fd = open_swap_file(dfd, dir_path, name, size_bytes)
    try:
        swapon(fd, str(dir_path / name))
    finally:
        os.close(fd)


def deactivate(dfd: int, dir_path: Path, name: str, *, progress: Progress | None = None,
               poll_s: float = 0.25) -> None:
    """swapoff the swap dir's file ``name``, reporting how much of its pages are back in RAM."""
    path = str(dir_path / name)
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as err:
        raise SwapError(f"cannot open {path} to swap it off: {err.strerror}",
                        errno_value=err.errno) from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SwapError(f"{path} is not a regular file; leaving it alone")
        _swapoff_watched(fd, path, progress, poll_s)
    finally:
        os.close(fd)


def _swapoff_watched(fd: int, path: str, progress: Progress | None, poll_s: float) -> None:
    if progress is None:
        swapoff(fd, path)
        return
    used = {a.path: a.used_bytes for a in read_swaps(Path("/"))}.get(path, 0)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            swapoff(fd, path)
        except BaseException as err:  # handed to the waiting thread
            failure.append(err)

    worker = threading.Thread(target=run, name="swapoff", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll_s)
        left = {a.path: a.used_bytes for a in read_swaps(Path("/"))}.get(path, 0)
        progress(max(0, used - left), used)
    if failure:
        raise failure[0]
    progress(used, used)


# ---------------------------------------------------------------------------
# whole operations


def create(
    dfd: int,
    dir_path: Path,
    name: str,
    size_bytes: int,
    *,
    method: Method = "auto",
    btrfs: bool = False,
    progress: Progress | None = None,
    allocate: Allocate = os.posix_fallocate,
) -> Literal["fallocate", "zeros"]:
    """Build, name and activate a swap file; return how its blocks were allocated.

    ``auto`` fallocates and falls back to writing zeros when the kernel
    refuses the fallocated file (EINVAL: unwritten extents or holes, as on
    f2fs and older kernels). Nothing is left behind on failure.
    """
    tmp = f".{name}.tmp"
    final_path = str(dir_path / name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dfd)
    current = tmp  # the name to clean up if anything fails
    try:
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o600)
        if btrfs:
            set_nocow(fd)
        used: Literal["fallocate", "zeros"] = "zeros" if method == "zeros" else "fallocate"
        _allocate(fd, size_bytes, used, allocate, progress)
        write_header(fd, size_bytes)
        os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        current = name
        fsync_dir(dfd)
        try:
            swapon(fd, final_path)
        except SwapError as err:
            if err.errno == errno.EINVAL and btrfs:
                raise SwapError(
                    f"the kernel refused {final_path} on btrfs (EINVAL)", errno_value=err.errno,
                    fix="btrfs swap files need a single-device filesystem and a subvolume "
                    "without snapshots; choose another [swap] dir or a dedicated subvolume"
                ) from err
            if err.errno != errno.EINVAL or method != "auto":
                raise
            log.warning("%s: the kernel refused the fallocated file; writing zeros instead",
                        final_path)
            used = "zeros"
            _allocate(fd, size_bytes, used, allocate, progress)
            write_header(fd, size_bytes)
            os.fsync(fd)
            swapon(fd, final_path)
        return used
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(current, dir_fd=dfd)
        raise
    finally:
        os.close(fd)


def _allocate(fd: int, size_bytes: int, method: Literal["fallocate", "zeros"],
              allocate: Allocate, progress: Progress | None) -> None:
    try:
        if method == "zeros":
            zero_fill(fd, size_bytes, progress)
        else:
            allocate(fd, 0, size_bytes)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise SwapError(f"no space left for a {format_size(size_bytes)} swap file",
                            errno_value=err.errno, fix="free space or lower [swap] increment"
                            ) from err
        raise SwapError(f"allocating {format_size(size_bytes)}: {err.strerror}",
                        errno_value=err.errno) from err


def remove(dfd: int, name: str) -> None:
    """Unlink a (deactivated) file of the swap dir."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise SwapError(f"{name} in the swap dir is not a regular file; leaving it alone")
    os.unlink(name, dir_fd=dfd)
    fsync_dir(dfd)
