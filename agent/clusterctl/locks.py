"""One writer at a time: an flock under the run dir, waited for briefly.

The lock file is never followed through a symlink nor taken when it is not a regular
file: either is refused with a HostError naming the file, and nothing is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from clusterctl.errors import HostError, TemporaryError
from clusterctl.system import open_regular


@contextlib.contextmanager
def exclusive(path: Path, *, what: str, wait_s: float = 10.0,
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> Iterator[None]:
    """Hold ``path`` locked; wait up to ``wait_s`` for another holder, then give up.

    The holder's PID is written into the file so the "busy" message can name it.
    The lock dies with the process, so a crash never leaves it held.
    """
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = open_regular(path, os.O_RDWR | os.O_CREAT, what="the lock", mode=0o644)
    except OSError as err:
        raise HostError(f"cannot open the lock {path}: {err.strerror}",
                        fix="run as root" if err.errno == 13 else None) from err
    try:
        deadline = clock() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= deadline:
                    os.lseek(fd, 0, os.SEEK_SET)
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                    raise TemporaryError(
                        f"busy: another {what} (pid {holder}) holds {path}",
                        fix="try again when it has finished") from None
                sleep(0.05)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
