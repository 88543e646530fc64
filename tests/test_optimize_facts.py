"""optimize reads captured machines: the CI VM and the H100 device machine."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl.config import Config, OllamaConfig
from clusterctl.host.nvml import Nvml
from clusterctl.optimize.executor import read_facts
from clusterctl.optimize.plan import plan
from tests.conftest import H100, HOSTS, load_fake_nvml

CONFIG = Config(ollama=OllamaConfig(url="http://127.0.0.1:9"))


@pytest.fixture
def one_h100(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    nv = load_fake_nvml(monkeypatch)
    nv.configure({"driver_version": "580.95.05", "cuda_version": 13000, "gpus": [H100]})
    return nv


def test_the_h100_machine(one_h100: ModuleType) -> None:
    facts = read_facts(CONFIG, root=HOSTS / "h100-vm", nvml=Nvml(module=one_h100))
    assert facts.logical_cores == 16
    assert round(facts.ram_bytes / 2**30, 1) == 125.9
    assert facts.swap_media == "hdd"  # vda says rotational, as virtio disks often do
    assert facts.gpu_vram_bytes == (H100["memory_total"],)
    assert facts.sysctl_live == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert not facts.ollama_installed and not facts.dask_installed
    p = plan(facts, CONFIG)
    assert p.tier == "advanced"
    assert p.sysctl == {"vm.swappiness": "30", "vm.vfs_cache_pressure": "100"}
    assert p.setting("vm.swappiness").current == "60"


def test_the_ci_vm_without_a_gpu() -> None:
    facts = read_facts(CONFIG, root=HOSTS / "ci-vm", nvml=None)
    assert (facts.logical_cores, facts.gpu_vram_bytes) == (2, ())
    assert plan(facts, CONFIG).tier == "basic"
    assert facts.sysctl_overrides == ()


def test_a_kernel_without_the_sysctl_is_skipped_not_guessed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(HOSTS / "ci-vm", tree, symlinks=True)
    (tree / "proc/sys/vm/vfs_cache_pressure").unlink()
    p = plan(read_facts(CONFIG, root=tree), CONFIG)
    assert list(p.sysctl) == ["vm.swappiness"]
    assert "vm.vfs_cache_pressure: this kernel has no /proc/sys/vm/vfs_cache_pressure" in p.skipped
