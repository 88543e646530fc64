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


class PressureTrigger:
    def __init__(self, threshold_percent: float, *, root: Path = Path("/")) -> None:
        self.path = root / "proc/pressure/memory"
        self.threshold_percent = threshold_percent
        self.window_s: float | None = None
        self._fd: int | None = None
        self._poll: select.poll | None = None

    def arm(self) -> float:
        """Arm the trigger; the window it got (1 s, or 2 s without CAP_SYS_RESOURCE)."""
        last: OSError | None = None
        for window_us in (1_000_000, 2_000_000):
            stall_us = max(1, int(window_us * self.threshold_percent / 100))
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError as err:
                raise HostError("this kernel has no PSI (/proc/pressure/memory)",
                                fix="boot Linux 4.20+ with psi=1; until then swap steps come "
                                "every [swap] check_interval only") from err
            except OSError as err:
                if err.errno in TRANSIENT:  # out of descriptors or memory: try again later
                    raise
                # EACCES, EOPNOTSUPP (psi=0), EIO, EISDIR: this node cannot have one
                raise HostError(f"cannot open {self.path}: {err.strerror or err}",
                                fix="run as root on a kernel with PSI enabled; until then "
                                "swap steps come every [swap] check_interval only") from err
            try:
                os.write(fd, f"some {stall_us} {window_us}\n".encode())  # the newline matters
            except OSError as err:
                os.close(fd)
                last = err
                if err.errno in (errno.EPERM, errno.EACCES, errno.EINVAL):
                    continue
                raise HostError(f"cannot arm a PSI trigger: {err.strerror}") from err
            self._fd = fd
            self._poll = select.poll()
            self._poll.register(fd, select.POLLPRI)
            self.window_s = window_us / 1e6
            return self.window_s
        raise HostError(f"cannot arm a PSI trigger on {self.path}: "
                        f"{last.strerror if last else 'refused'}",
                        fix="run as root (and with CAP_SYS_RESOURCE for a 1 s window)")

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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._poll = None
