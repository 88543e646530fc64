from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterctl.errors import HostError
from clusterctl.host.disk_speed import TEMP_PREFIX, measure_sequential_write
from clusterctl.units import MIB
from tests.conftest import REPO


def test_measures_and_leaves_nothing_behind(tmp_path: Path) -> None:
    seen: list[int] = []
    result = measure_sequential_write(tmp_path, size_bytes=8 * MIB, progress=seen.append)
    assert result.size_bytes == 8 * MIB
    assert result.seconds > 0 and result.bytes_per_s > 0
    assert seen == [n * MIB for n in range(1, 9)]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_mid_write_removes_the_file(tmp_path: Path) -> None:
    def interrupt(done: int) -> None:
        if done >= 3 * MIB:
            assert len(list(tmp_path.iterdir())) == 1  # the test file is there
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_sequential_write(tmp_path, size_bytes=16 * MIB, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="cannot create a test file in"):
        measure_sequential_write(tmp_path / "absent", size_bytes=MIB)


@pytest.mark.integration
def test_full_disk_fails_cleanly_and_removes_the_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(tmp_path)], check=True)
    try:
        with pytest.raises(HostError) as info:
            measure_sequential_write(tmp_path, size_bytes=8 * MIB)
        assert "failed after" in info.value.message
        assert "No space left on device" in info.value.message
        assert info.value.fix == "free space on that filesystem"
        assert list(tmp_path.iterdir()) == []
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)


@pytest.mark.integration
def test_sigterm_mid_write_removes_the_file(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from clusterctl.host.disk_speed import measure_sequential_write\n"
        "def slow(done):\n"
        "    time.sleep(0.05)\n"
        f"measure_sequential_write(Path({str(tmp_path)!r}), size_bytes=200 * 2**20,"
        " progress=slow)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "agent")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline, "the write test never started"
        assert proc.poll() is None, "the write test ended early"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) != 0
    assert list(tmp_path.iterdir()) == []
