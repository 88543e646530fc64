"""optimize on this machine's real kernel: sysctls set live, then put back by revert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl.config import Config, OllamaConfig, OptimizeConfig, PathsConfig
from clusterctl.optimize import executor as optimize

pytestmark = pytest.mark.integration
KEYS = {"vm.swappiness": Path("/proc/sys/vm/swappiness"),
        "vm.vfs_cache_pressure": Path("/proc/sys/vm/vfs_cache_pressure")}


@pytest.fixture
def live() -> Iterator[dict[str, str]]:
    """This machine's values, restored after the test whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("setting sysctls needs root")
    before = {k: p.read_text().strip() for k, p in KEYS.items()}
    try:
        yield before
    finally:
        for key, value in before.items():
            KEYS[key].write_text(value + "\n")


def test_apply_sets_the_kernels_values_and_revert_puts_them_back(
        live: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"  # files go here; /proc and /sys are this machine's
    root.mkdir()
    for name in ("proc", "sys"):
        (root / name).symlink_to(f"/{name}")
    swappiness = (int(live["vm.swappiness"]) + 7) % 100
    pressure = int(live["vm.vfs_cache_pressure"]) + 13
    config = Config(
        optimize=OptimizeConfig(swappiness_ssd=swappiness, swappiness_hdd=swappiness,
                                cache_pressure_ssd=pressure, cache_pressure_hdd=pressure),
        ollama=OllamaConfig(url="http://127.0.0.1:9"),
        paths=PathsConfig(state_dir=Path("/state"), run_dir=Path("/run")))
    result = optimize.apply(config, root=root)
    assert result.set_live == {"vm.swappiness": str(swappiness),
                               "vm.vfs_cache_pressure": str(pressure)}
    assert KEYS["vm.swappiness"].read_text() == f"{swappiness}\n"
    assert KEYS["vm.vfs_cache_pressure"].read_text() == f"{pressure}\n"
    assert (root / "etc/sysctl.d/90-clusterctl.conf").read_text().endswith(
        f"vm.swappiness = {swappiness}\nvm.vfs_cache_pressure = {pressure}\n")
    assert optimize.verify(config, root=root) == ()
    optimize.revert(config, root=root)
    assert {k: p.read_text().strip() for k, p in KEYS.items()} == live
    assert not (root / "etc/sysctl.d").exists()  # the directories it made went too


def test_the_cli_plans_this_machine(conf: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "clusterctl", "optimize", "plan", "--json",
                             "--config", str(conf)], capture_output=True, text=True,
                            check=True)
    plan = json.loads(result.stdout)
    keys = {s["key"]: s for s in plan["settings"]}
    assert keys["vm.swappiness"]["current"] == Path("/proc/sys/vm/swappiness").read_text().strip()
    assert plan["files"][0]["path"] == "/etc/sysctl.d/90-clusterctl.conf"
    dry = subprocess.run([sys.executable, "-m", "clusterctl", "optimize", "apply", "--dry-run",
                          "--config", str(conf)], capture_output=True, text=True, check=True)
    assert "would write /etc/sysctl.d/90-clusterctl.conf" in dry.stdout \
        or dry.stdout == "nothing to change\n"
    assert not Path("/etc/sysctl.d/90-clusterctl.conf").exists()
