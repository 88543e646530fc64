"""One writer of GPU power limits: the agent (or `clusterctl gpu throttle reset` by hand).

The Python API embedded in someone's program reads and plans: by default it never sets a
limit, never gives back (or sets aside) a saved limit of the agent's; asked to act, it gives
back only what its own process lowered. On the fake NVML, in-process; the agent's side is
its GPU monitor, made as the agent makes it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl import config as cfg
from clusterctl.gpu import power
from clusterctl.gpu.manager import GpuManager
from clusterctl.gpu.monitor import GpuMonitor, GpuView
from clusterctl.host.nvml import Nvml
from tests.conftest import H100, load_fake_nvml

HOT = 88  # from temp_throttle (85): one step down, 700 W -> 630 W
CARD1 = {**H100, "uuid": "GPU-1", "pci_bus_id": "00000000:9A:00.0"}


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"gpus": [{**H100, "uuid": "GPU-0"}, CARD1]})
    return fake


def node_config(tmp_path: Path) -> cfg.Config:
    """The node's config, as the agent and a program on the node both read it."""
    base = cfg.Config(paths=cfg.PathsConfig(state_dir=tmp_path / "state",
                                            run_dir=tmp_path / "run"))
    return cfg.with_changes(base, "gpu", {"throttle_enabled": True, "monitor_interval": 0.1})


def power_records(tmp_path: Path) -> dict[str, object] | None:
    """The saved power limits: the "gpu-power" section of originals.json (None: none)."""
    path = tmp_path / "state/originals.json"
    section = json.loads(path.read_text()).get("gpu-power") if path.exists() else None
    return None if section is None else dict(section["gpus"])


def every_limit_asked(nv: ModuleType, monkeypatch: pytest.MonkeyPatch
                      ) -> list[tuple[str, int]]:
    """Every nvmlDeviceSetPowerManagementLimit call at the fake driver, refused ones too,
    as (GPU uuid, milliwatts)."""
    asked: list[tuple[str, int]] = []
    real = nv.nvmlDeviceSetPowerManagementLimit

    def set_limit(handle: Any, limit: int) -> None:
        asked.append((nv.machine.gpus[handle.index].uuid, limit))
        real(handle, limit)

    monkeypatch.setattr(nv, "nvmlDeviceSetPowerManagementLimit", set_limit)
    return asked


def agent_lowers_gpu0(nv: ModuleType, tmp_path: Path) -> dict[str, object]:
    """The agent's monitor (as the agent makes it) lowers GPU 0: its record on disk."""
    nv.machine.gpus[0].temperature = HOT
    agent = GpuMonitor(node_config(tmp_path), Nvml(module=nv), write_history=True)
    agent.step()
    assert nv.machine.gpus[0].power_limit_mw == 630_000
    records = power_records(tmp_path)
    assert records is not None and set(records) == {"GPU-0"}
    return records


def sample_in_the_background(manager: GpuManager, kind: str) -> None:
    """start_monitoring until the first sample has been heard (``kind``'s callback), then
    stop_monitoring and shutdown, as a program on the node would."""
    heard = threading.Event()

    def hear(view: GpuView) -> None:
        heard.set()

    manager.register_callback(kind, hear)
    manager.start_monitoring()
    try:
        assert heard.wait(10), "the manager never sampled"
    finally:
        manager.stop_monitoring()
        manager.shutdown()


def test_a_default_gpu_manager_leaves_the_limit_the_agent_lowered_and_its_record(
        nv: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = agent_lowers_gpu0(nv, tmp_path)
    asked = every_limit_asked(nv, monkeypatch)
    manager = GpuManager(node_config(tmp_path), nvml=Nvml(module=nv))
    status = manager.get_gpu_status(0)
    assert status["throttling"]["is_throttled"]  # it reads the agent's record ...
    sample_in_the_background(manager, "throttle")
    assert nv.machine.gpus[0].power_limit_mw == 630_000  # ... and leaves the limit lowered
    assert power_records(tmp_path) == record
    assert asked == []


def test_a_default_gpu_manager_never_sets_a_power_limit_even_on_a_95c_gpu(
        nv: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nv.machine.gpus[0].temperature = 95
    asked = every_limit_asked(nv, monkeypatch)
    manager = GpuManager(node_config(tmp_path), nvml=Nvml(module=nv))
    status = manager.get_gpu_status(0)
    assert asked == []
    assert status["state"] == "critical" and manager.should_throttle_processing(0)
    assert manager.monitor.views[0].decision is not None
    assert manager.monitor.views[0].decision.move == "floor"  # planned, never done
    sample_in_the_background(manager, "critical")
    assert asked == []
    assert nv.machine.gpus[0].power_limit_mw == 700_000
    assert power_records(tmp_path) is None


@pytest.mark.parametrize("name", ["originals.json", "gpu-power.json"],
                         ids=["originals", "old-file"])
@pytest.mark.parametrize("asked", [{}, {"plan_only": False}], ids=["default", "asked-to-act"])
def test_a_gpu_manager_leaves_a_damaged_power_record_where_it_is(
        nv: ModuleType, tmp_path: Path, asked: dict[str, bool], name: str) -> None:
    """The agent's saved originals (or the old gpu-power.json not moved in yet), damaged,
    hold the only copy of the original limits: a program on the node must neither move
    them aside nor write over them, even on a hot GPU when asked to act."""
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_bytes(b'{"gpus": ')
    nv.machine.gpus[0].temperature = HOT
    manager = GpuManager(node_config(tmp_path), nvml=Nvml(module=nv), **asked)
    sample_in_the_background(manager, "throttle")
    assert nv.machine.gpus[0].power_limit_mw == 700_000
    assert sorted(p.name for p in state.iterdir() if p.name != "originals.lock") == [name]
    assert (state / name).read_bytes() == b'{"gpus": '


def test_a_gpu_manager_asked_to_act_gives_back_only_what_it_lowered(
        nv: ModuleType, tmp_path: Path) -> None:
    record = agent_lowers_gpu0(nv, tmp_path)
    nv.machine.gpus[1].temperature = HOT
    manager = GpuManager(node_config(tmp_path), nvml=Nvml(module=nv), plan_only=False)
    manager.get_gpu_status(1)  # one sample: it lowers GPU 1 itself
    assert nv.machine.gpus[1].power_limit_mw == 630_000
    records = power_records(tmp_path)
    assert records is not None and set(records) == {"GPU-0", "GPU-1"}
    manager.shutdown()
    assert nv.machine.gpus[1].power_limit_mw == 700_000  # its own, given back
    assert nv.machine.gpus[0].power_limit_mw == 630_000  # the agent's, left lowered
    assert power_records(tmp_path) == record


def test_a_gpu_manager_asked_to_act_leaves_a_limit_the_agent_has_taken_over(
        nv: ModuleType, tmp_path: Path) -> None:
    """The manager lowered GPU 1; the operator reset it by hand and the agent lowered it
    again: the record is the agent's now, and the manager's stop leaves it."""
    nv.machine.gpus[1].temperature = HOT
    manager = GpuManager(node_config(tmp_path), nvml=Nvml(module=nv), plan_only=False)
    manager.get_gpu_status(1)
    assert nv.machine.gpus[1].power_limit_mw == 630_000
    with Nvml(module=nv) as by_hand:  # `clusterctl gpu throttle reset`
        power.restore_all(by_hand, tmp_path / "state", {"GPU-0": 0, "GPU-1": 1})
    assert nv.machine.gpus[1].power_limit_mw == 700_000
    agent = GpuMonitor(node_config(tmp_path), Nvml(module=nv), clock=lambda: 1_700_000_000.0)
    agent.step()
    agents = power_records(tmp_path)
    assert nv.machine.gpus[1].power_limit_mw == 630_000 and agents is not None
    manager.shutdown()
    assert nv.machine.gpus[1].power_limit_mw == 630_000
    assert power_records(tmp_path) == agents
