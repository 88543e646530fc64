"""A measured sequential write on a filesystem (`clusterctl check full`).

Writes ``size_bytes`` of incompressible data to a temporary file in the
directory, fsyncs it, and times both. The file is removed whatever happens:
an error, Ctrl-C, or SIGTERM (turned into KeyboardInterrupt for the duration).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from clusterctl.errors import HostError
from clusterctl.units import MIB, format_size

TEMP_PREFIX = ".clusterctl-writetest-"


@dataclass(frozen=True)
class WriteTestResult:
    directory: str
    size_bytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.size_bytes / self.seconds if self.seconds > 0 else float("inf")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C so ``finally`` blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure_sequential_write(
    directory: Path,
    *,
    size_bytes: int = 256 * MIB,
    block_bytes: int = 1 * MIB,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> WriteTestResult:
    """Write, fsync and time ``size_bytes`` in ``directory``; the file never stays."""
    block = os.urandom(block_bytes)
    with _sigterm_interrupts():
        try:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        except OSError as err:
            raise HostError(
                f"cannot create a test file in {directory}: {err.strerror}",
                fix="run as root, or check that the filesystem is writable",
            ) from err
        path = Path(name)
        try:
            written = 0
            started = clock()
            while written < size_bytes:
                chunk = block[: min(block_bytes, size_bytes - written)]
                written += os.write(fd, chunk)
                if progress is not None:
                    progress(written)
            os.fsync(fd)
            elapsed = clock() - started
        except OSError as err:
            raise HostError(
                f"write test in {directory} failed after {format_size(written)}: {err.strerror}",
                fix="free space on that filesystem" if err.errno == 28 else None,
            ) from err
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
    return WriteTestResult(directory=str(directory), size_bytes=size_bytes, seconds=elapsed)
