"""A memory cgroup of a test's own (v1 or v2), removed afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MIB = 2**20


@contextlib.contextmanager
def memory_cgroup(tag: str) -> Iterator[tuple[Path, Callable[[int], None]]]:
    """(the group, a limit setter in MiB); skips where there is no memory controller."""
    v1 = Path("/sys/fs/cgroup/memory")
    v2 = Path("/sys/fs/cgroup")
    if (v1 / "memory.limit_in_bytes").exists():
        group, limit_file = v1 / f"clusterctl-{tag}-{os.getpid()}", "memory.limit_in_bytes"
    elif "memory" in (v2 / "cgroup.subtree_control").read_text():
        group, limit_file = v2 / f"clusterctl-{tag}-{os.getpid()}", "memory.max"
    else:
        pytest.skip("no memory cgroup controller")
    group.mkdir()
    try:
        yield group, lambda mib: (group / limit_file).write_text(f"{mib * MIB}\n")
    finally:
        for _ in range(50):  # its processes take a moment to leave
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_in(group: Path, program: str, **kwargs: object) -> subprocess.Popen[str]:
    """Python ``program`` in ``group``: the shell joins it, then becomes the Python."""
    return subprocess.Popen(["sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec "$2" -c "$3"',
                             "sh", str(group), sys.executable, program], text=True,
                            **kwargs)  # type: ignore[call-overload]
