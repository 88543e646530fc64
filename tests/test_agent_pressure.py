"""A real memory pressure trigger: a process thrashing in a small memory cgroup makes
the kernel's PSI trigger fire, and the agent answers with a swap policy step."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl.agent.service import Agent
from clusterctl.host.nvml import Nvml
from tests.cgroups import memory_cgroup, run_in
from tests.conftest import load_fake_nvml
from tests.fakes.control_plane import free_port
from tests.loopfs import active_swaps_under, loop_mount

pytestmark = pytest.mark.integration
HOG = ("b = bytearray(128 * 2**20)\n"
       "while True:\n"
       "    for i in range(0, len(b), 4096): b[i] = (b[i] + 1) % 256\n")


def test_memory_pressure_runs_a_swap_step_within_seconds(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("this kernel has no PSI")
    nv: ModuleType = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": []})
    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount, \
            memory_cgroup("psi") as (group, set_limit):
        # the thrashing process needs swap of its own to thrash into (the test's file)
        hog_swap = mount / "hog-swap"
        subprocess.run(["fallocate", "-l", "256M", str(hog_swap)], check=True)
        hog_swap.chmod(0o600)
        subprocess.run(["mkswap", "-q", str(hog_swap)], check=True)
        subprocess.run(["swapon", str(hog_swap)], check=True)
        conf = tmp_path / "clusterctl.toml"
        conf.write_text(
            f'[swap]\ndir = "{mount / "swap"}"\nmin_size = "64M"\nmax_size = "128M"\n'
            'increment = "64M"\n'
            f'pressure_threshold = 1.0\n[api]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[paths]\nstate_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n'
            '[ollama]\nurl = "http://127.0.0.1:9"\n')
        agent = Agent(conf, nvml=Nvml(module=nv), notify=lambda _: None)
        hog = None
        try:
            agent.start()
            deadline = time.monotonic() + 10
            while agent.progress.pressure_at is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert agent.progress.pressure_at is not None, "the trigger was not armed"
            assert active_swaps_under(mount / "swap") == []
            set_limit(32)
            started = time.monotonic()
            hog = run_in(group, HOG)
            while not active_swaps_under(mount / "swap"):
                assert time.monotonic() - started < 30, (
                    f"no swap step within 30 s: {agent.progress}")
                time.sleep(0.05)
            took = time.monotonic() - started
            print(f"pressure to an active swap file: {took:.2f} s")
            while agent.progress.swap_steps < 1:  # the step returns after its swapon
                assert time.monotonic() - started < 30
                time.sleep(0.05)
            assert active_swaps_under(mount / "swap") == [str(mount / "swap/swap-0001")]
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            agent.stop()
            subprocess.run(["swapoff", str(hog_swap)], check=False)
