"""A kernel PSI trigger on /proc/pressure/memory: wake up when memory stalls pile up.

Writing "some STALL_US WINDOW_US" to the file arms a trigger; ``poll`` then reports
POLLPRI when tasks stalled on memory for STALL_US within any WINDOW_US. Windows
under 2 s need CAP_SYS_RESOURCE (kernel/sched/psi.c); without it the 2 s window is
used. See Documentation/accounting/psi.rst.
"""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path

from clusterctl.errors import HostError

TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})


def open_trigger(path: Path, threshold_percent: float) -> tuple[int, float]:
    """A trigger on ``path`` (/proc/pressure/memory, a cgroup2 group's memory.pressure) at
    ``threshold_percent`` of a 1 s window, or of 2 s where the kernel refuses 1 s (no
    CAP_SYS_RESOURCE): (its open file, the window in s).

    OSError: open(2)'s, and write(2)'s when it is TRANSIENT; HostError: the kernel takes
    no trigger."""
    last: OSError | None = None
    for window_us in (1_000_000, 2_000_000):
        stall_us = max(1, int(window_us * threshold_percent / 100))
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, f"some {stall_us} {window_us}\n".encode())  # the newline matters
        except OSError as err:
            os.close(fd)
            last = err
            if err.errno in (errno.EPERM, errno.EACCES, errno.EINVAL):
                continue
            if err.errno in TRANSIENT:  # out of memory: try again later
                raise
            raise HostError(f"cannot arm a PSI trigger: {err.strerror}") from err
        return fd, window_us / 1e6
    raise HostError(f"cannot arm a PSI trigger on {path}: "
                    f"{last.strerror if last else 'refused'}",
                    fix="run as root (and with CAP_SYS_RESOURCE for a 1 s window)")


class PressureTrigger:
    def __init__(self, threshold_percent: float, *, root: Path = Path("/")) -> None:
        self.path = root / "proc/pressure/memory"
        self.threshold_percent = threshold_percent
        self.window_s: float | None = None
        self._fd: int | None = None
        self._poll: select.poll | None = None

    def arm(self) -> float:
        """Arm the trigger; the window it got (1 s, or 2 s without CAP_SYS_RESOURCE)."""
        try:
            fd, window_s = open_trigger(self.path, self.threshold_percent)
        except FileNotFoundError as err:
            raise HostError("this kernel has no PSI (/proc/pressure/memory)",
                            fix="boot Linux 4.20+ with psi=1; until then memory pressure "
                            "does not start swap steps") from err
        except OSError as err:
            if err.errno in TRANSIENT:  # out of descriptors or memory: try again later
                raise
            # EACCES, EOPNOTSUPP (psi=0), EIO, EISDIR: this node cannot have one
            raise HostError(f"cannot open {self.path}: {err.strerror or err}",
                            fix="run as root on a kernel with PSI enabled; until then "
                            "memory pressure does not start swap steps") from err
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLPRI)
        self.window_s = window_s
        return window_s

    def wait(self, timeout_s: float) -> bool:
        """True when the trigger fired within ``timeout_s``."""
        if self._poll is None:
            raise RuntimeError("arm() first")
        for _fd, mask in self._poll.poll(int(timeout_s * 1000)):
            if mask & select.POLLERR:
                raise HostError("the PSI trigger was torn down (cgroup or file gone)")
            if mask & select.POLLPRI:
                return True
        return False

    def fileno(self) -> int:
        """The armed file, for a caller's own poll (POLLPRI); see ``fired``."""
        if self._fd is None:
            raise RuntimeError("arm() first")
        return self._fd

    def fired(self, mask: int) -> bool:
        """What a caller's poll mask for ``fileno()`` says: True when it fired."""
        if mask & select.POLLERR:
            raise HostError("the PSI trigger was torn down (cgroup or file gone)")
        return bool(mask & select.POLLPRI)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._poll = None
