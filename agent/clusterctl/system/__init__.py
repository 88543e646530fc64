"""The one place that changes the host.

Reads live in ``clusterctl.host``; everything that writes a file, runs a
command with side effects or changes kernel state goes through here, so
there is one spot to audit, to log and to make dry-run aware. So far: atomic
file writes (the config editor); swap, sysctl and unit changes join it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from clusterctl.errors import HostError


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644,
                      keep_owner: bool = True, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` atomically.

    Written to a temporary file in the same directory (a fresh random name, created
    with O_EXCL: never through a planted link), fsync'd, renamed over the target (a
    link there is replaced, not followed), and the directory fsync'd: a crash leaves
    the old file or the new one, never half of either. An existing regular file keeps
    its mode and owner (never those of what a planted link points at); with
    ``keep_owner=False`` it gets ``mode`` and the caller's owner, as a new one does.
    ``durable=False`` skips both fsyncs (still atomic): for a file rewritten every few
    seconds whose loss in a crash costs nothing, like the metrics textfile.
    """
    path = Path(path)
    try:
        current = path.lstat() if keep_owner else None
    except FileNotFoundError:
        current = None
    except OSError as err:  # a parent that is a file, a loop of links
        raise HostError(f"cannot write {path}: {err.strerror}",
                        fix=f"{path.parent} must be a directory") from err
    if current is not None and not stat.S_ISREG(current.st_mode):
        current = None  # a link or other thing in its place: its mode and owner are not ours
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except FileNotFoundError as err:
        raise HostError(
            f"cannot write {path}: directory {directory} does not exist",
            fix=f"create {directory} first",
        ) from err
    except PermissionError as err:
        raise HostError(f"cannot write {path}: permission denied", fix="run as root") from err
    except OSError as err:
        raise HostError(f"cannot write {path}: {err.strerror}") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if current is not None:
                os.fchmod(handle.fileno(), current.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):
                    os.fchown(handle.fileno(), current.st_uid, current.st_gid)
            else:
                os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot write {path}: {err.strerror}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: Path, flags: int, *, what: str, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symlink at ``path`` and accepts only a regular file
    (O_NONBLOCK: a FIFO planted there cannot hang the open)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise HostError(f"{what} {path} is a symlink; clusterctl never writes through one",
                            fix=f"remove {path}") from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HostError(f"{what} {path} is not a regular file", fix=f"remove {path}")
    return fd
