from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from clusterctl.errors import TemporaryError
from clusterctl.locks import exclusive


def test_the_lock_records_its_holder(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "swap.lock"
    with exclusive(lock, what="swap command"):
        assert lock.read_text() == f"{os.getpid()}\n"


def test_a_held_lock_is_waited_for_then_busy(tmp_path: Path) -> None:
    lock = tmp_path / "swap.lock"
    with lock.open("w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242\n")
        other.flush()
        ticks = iter(range(100))
        with pytest.raises(TemporaryError) as info, exclusive(
                lock, what="clusterctl swap command", wait_s=1.0,
                clock=lambda: next(ticks) * 0.25, sleep=lambda s: None):
            pass
    assert info.value.one_line() == (f"busy: another clusterctl swap command (pid 4242) holds "
                                     f"{lock}; try again when it has finished")


def test_the_lock_is_free_again_after_use(tmp_path: Path) -> None:
    lock = tmp_path / "swap.lock"
    with exclusive(lock, what="x"):
        pass
    with exclusive(lock, what="x", wait_s=0):
        pass
