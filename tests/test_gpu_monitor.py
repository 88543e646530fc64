"""The GPU monitor and the Python API, on the fake NVML (in-process)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl import config as cfg
from clusterctl.errors import ConfigError, UsageError
from clusterctl.gpu.manager import GpuManager
from clusterctl.gpu.monitor import GpuMonitor, GpuView
from clusterctl.host.nvml import Nvml
from tests.conftest import H100, load_fake_nvml

GIB = 2**30


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"gpus": [{**H100, "uuid": "GPU-0", "memory_used": 8 * GIB}]})
    return fake


def config(tmp_path: Path, **gpu: object) -> cfg.Config:
    base = cfg.Config(paths=cfg.PathsConfig(state_dir=tmp_path / "state",
                                            run_dir=tmp_path / "run"))
    return cfg.with_changes(base, "gpu", gpu) if gpu else base


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def events(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "state/events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_state_changes_fire_callbacks_and_events_once(nv: ModuleType, tmp_path: Path) -> None:
    nv.machine.gpus[0].temperature = [60, 70, 76, 76, 74, 72, 91]
    seen: list[tuple[str, int | None]] = []
    monitor = GpuMonitor(config(tmp_path), Nvml(module=nv), clock=Clock())
    def heard(kind: str) -> Callable[[GpuView], None]:
        return lambda view: seen.append((kind, view.temperature_celsius))

    for kind in ("normal", "throttle", "critical"):
        monitor.callbacks[kind].append(heard(kind))
    states = [monitor.step()[0].state.value for _ in range(7)]
    assert states == ["optimal", "normal", "throttled", "throttled", "throttled", "normal",
                      "critical"]  # 74 keeps THROTTLED (hysteresis), 72 leaves it
    assert seen == [("normal", 60), ("normal", 70), ("throttle", 76), ("normal", 72),
                    ("critical", 91)]
    changes = [(e["state_from"], e["state_to"]) for e in events(tmp_path)
               if e["event_type"] == "gpu_state_changed"]
    assert changes == [("optimal", "normal"), ("normal", "throttled"), ("throttled", "normal"),
                       ("normal", "critical")]


def test_a_failing_callback_does_not_stop_monitoring(nv: ModuleType, tmp_path: Path) -> None:
    monitor = GpuMonitor(config(tmp_path), Nvml(module=nv))
    def fails(view: GpuView) -> None:
        raise ZeroDivisionError("a caller's bug")

    monitor.callbacks["normal"].append(fails)
    assert monitor.step()[0].state.value == "optimal"
    assert monitor.step()


def saved_limits(state_dir: Path) -> dict[str, dict[str, object]] | None:
    """The saved power limits on disk (the "gpu-power" section of originals.json), or None
    when there is none."""
    path = state_dir / "originals.json"
    section = json.loads(path.read_text()).get("gpu-power") if path.exists() else None
    return None if section is None else dict(section["gpus"])


def originals_on_disk_at_each_set(nv: ModuleType, state_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, object]]:
    """Every power limit the fake GPU 0 is given, as (milliwatts, the original limit in W
    that originals.json held for it at that moment, or None): the driver's side of the
    promise that the original is on disk before the limit goes down."""
    seen: list[tuple[int, object]] = []
    real_set = nv.nvmlDeviceSetPowerManagementLimit
    uuid = nv.machine.gpus[0].uuid

    def set_limit(handle: object, limit: int) -> None:
        record = (saved_limits(state_dir) or {}).get(uuid)
        seen.append((limit, None if record is None else record["original_limit_w"]))
        real_set(handle, limit)

    monkeypatch.setattr(nv, "nvmlDeviceSetPowerManagementLimit", set_limit)
    return seen


def test_throttling_lowers_saves_the_original_first_and_gives_it_back_on_stop(
        nv: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = nv.machine.gpus[0]
    sets = originals_on_disk_at_each_set(nv, tmp_path / "state", monkeypatch)
    gpu.temperature = 88
    clock = Clock()
    monitor = GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=nv), clock=clock)
    monitor.step()
    assert gpu.set_limit_calls == [630_000]
    saved = saved_limits(tmp_path / "state")
    assert saved is not None and saved["GPU-0"]["original_limit_w"] == 700.0
    clock.now += 15
    monitor.step()
    assert gpu.set_limit_calls == [630_000, 560_000]
    gpu.temperature = 95
    clock.now += 1
    monitor.step()
    assert gpu.set_limit_calls[-1] == 350_000  # CRITICAL: the floor at once
    assert [e["move"] for e in events(tmp_path) if e["event_type"] == "gpu_power_limited"] == [
        "lower", "lower", "floor"]
    monitor.stop()
    assert gpu.power_limit_mw == 700_000
    assert not (tmp_path / "state/originals.json").exists()  # nothing left to give back
    # each lowering, and the way back, found the original already on disk
    assert sets == [(630_000, 700.0), (560_000, 700.0), (350_000, 700.0), (700_000, 700.0)]


def test_after_a_crash_the_next_start_gives_the_limit_back_before_any_stop(
        nv: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that lowered a limit and died (no stop) leaves the GPU lowered, the original on
    disk; the next start gives it back at once, with throttling now off, no stop needed."""
    gpu = nv.machine.gpus[0]
    sets = originals_on_disk_at_each_set(nv, tmp_path / "state", monkeypatch)
    gpu.temperature = 88
    crashed = GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=nv))
    crashed.step()  # ... and the process dies here: no stop()
    assert gpu.power_limit_mw == 630_000
    assert sets == [(630_000, 700.0)]  # the original was on disk when the limit went down
    gpu.temperature = 50
    monitor = GpuMonitor(config(tmp_path), Nvml(module=nv))  # throttling off now
    monitor.start()
    try:
        assert gpu.power_limit_mw == 700_000  # back before any stop
        assert not (tmp_path / "state/originals.json").exists()
        assert sets == [(630_000, 700.0), (700_000, 700.0)]
    finally:
        monitor.stop()
    assert gpu.power_limit_mw == 700_000


def test_with_restore_on_stop_off_a_stop_leaves_the_limit_and_the_next_start_gives_it_back(
        nv: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """tuned's "not on exit": stopping the agent (an upgrade, a restart) changes no GPU;
    the original stays on record and the next start gives it back, as after a crash."""
    gpu = nv.machine.gpus[0]
    gpu.temperature = 88
    monitor = GpuMonitor(config(tmp_path, throttle_enabled=True, restore_on_stop=False),
                         Nvml(module=nv))
    monitor.step()
    assert gpu.power_limit_mw == 630_000
    monitor.stop()
    assert gpu.power_limit_mw == 630_000
    assert saved_limits(tmp_path / "state")["GPU-0"]["original_limit_w"] == 700.0
    assert "restore_on_stop = false" in caplog.text
    gpu.temperature = 50
    again = GpuMonitor(config(tmp_path, restore_on_stop=False), Nvml(module=nv))
    again.start()
    try:
        assert gpu.power_limit_mw == 700_000
        assert saved_limits(tmp_path / "state") is None
    finally:
        again.stop()


def test_a_hung_driver_holds_the_sample_until_it_answers(
        nv: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake's hung driver (FAKE_NVML_STALL_FILE, for tests watching another process):
    a sample started while the file exists waits, and completes once it is removed."""
    stall = tmp_path / "stall"
    stall.touch()
    monkeypatch.setenv("FAKE_NVML_STALL_FILE", str(stall))
    monitor = GpuMonitor(config(tmp_path), Nvml(module=nv))
    done = threading.Event()

    def sample() -> None:
        monitor.step()
        done.set()

    threading.Thread(target=sample, daemon=True).start()
    assert not done.wait(0.5)  # still hanging
    assert monitor.snapshot is None
    stall.unlink()
    assert done.wait(10)
    assert monitor.views[0].sample.temperature_c == 40


def test_plan_only_and_disabled_never_touch_the_gpu(nv: ModuleType, tmp_path: Path) -> None:
    gpu = nv.machine.gpus[0]
    gpu.temperature = 95
    for monitor in (GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=nv),
                               plan_only=True),
                    GpuMonitor(config(tmp_path), Nvml(module=nv))):
        view = monitor.step()[0]
        assert view.decision is not None and view.decision.move == "floor"
        monitor.stop()
    assert gpu.set_limit_calls == []


def test_a_gpu_refusing_the_limit_is_logged_and_sampling_goes_on(
        nv: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gpu = nv.machine.gpus[0]
    gpu.temperature = 88
    gpu.errors["nvmlDeviceSetPowerManagementLimit"] = nv.NVML_ERROR_NO_PERMISSION
    monitor = GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=nv))
    assert monitor.step()[0].state.value == "throttled"
    assert "GPU 0: no permission to set its power limit; run as root" in caplog.text


# -- the Python API -------------------------------------------------------------------


def test_the_python_api_quick_start_works(nv: ModuleType, tmp_path: Path) -> None:
    gpu_manager = GpuManager(config(tmp_path), nvml=Nvml(module=nv))
    assert gpu_manager.is_available()
    status = gpu_manager.get_gpu_status()
    assert status["name"] == H100["name"] and status["state"] == "optimal"
    assert isinstance(total := H100["memory_total"], int)
    assert status["memory"]["percent"] == round(100 * 8 * GIB / total, 1)
    assert status["throttling"] == {"is_throttled": False, "should_throttle": False,
                                    "speed_multiplier": 1.0}
    before = gpu_manager.get_available_memory()
    assert gpu_manager.allocate_memory("llm_model", 2048)
    assert gpu_manager.get_available_memory() == before - 2048
    assert gpu_manager.get_gpu_status()["memory"]["allocation_stats"] == {
        "allocations": {"llm_model": 2048}, "allocated_mb": 2048}
    assert gpu_manager.deallocate_memory("llm_model")
    assert not gpu_manager.deallocate_memory("llm_model")
    assert not gpu_manager.allocate_memory("too_big", 10**6)
    assert gpu_manager.assign_model_to_gpu("embedder", 1024) == 0
    assert gpu_manager.release_model("embedder")
    nv.machine.gpus[0].temperature = 80
    assert gpu_manager.should_throttle_processing()
    assert gpu_manager.get_processing_speed_multiplier() == 0.5
    gpu_manager.shutdown()


def test_monitoring_trend_callbacks_and_config_updates(nv: ModuleType, tmp_path: Path) -> None:
    nv.machine.gpus[0].temperature = [60, 62, 64, 66, 68, 70, 72, 74, 76]
    gpu_manager = GpuManager(config(tmp_path, monitor_interval=0.1), nvml=Nvml(module=nv))
    hot: list[GpuView] = []
    gpu_manager.register_callback("throttle", hot.append)
    with pytest.raises(UsageError):
        gpu_manager.register_callback("meltdown", hot.append)
    gpu_manager.start_monitoring()
    try:
        import time

        deadline = time.monotonic() + 10
        while not hot and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gpu_manager.stop_monitoring()
    assert hot and hot[0].temperature_celsius == 76
    trend = gpu_manager.get_temperature_trend(duration_minutes=5)
    assert trend["trend"] == "rising" and trend["max_temp"] == 76 and trend["min_temp"] == 60
    gpu_manager.update_config({"temp_normal": 80, "throttle_cooldown_seconds": 60})
    assert gpu_manager.config.gpu.temp_normal_c == 80
    with pytest.raises(ConfigError):
        gpu_manager.update_config({"temp_normal": 99})  # above temp_throttle
    assert gpu_manager.config.gpu.temp_normal_c == 80  # unchanged
    with pytest.raises(UsageError):
        gpu_manager.update_config({"memory_limit_mb": 7168})
    gpu_manager.shutdown()


# -- saved originals that cannot be read -------------------------------------------------

UNREADABLE = {  # the file, what it holds
    "originals-truncated": ("originals.json", b'{"version": 1, "gpu-power": {"gpus": '),
    "originals-section": ("originals.json", b'{"gpu-power": {"gpus": {"GPU-0": {"bogus": 1}}}}'),
    "old-file-truncated": ("gpu-power.json", b'{"gpus": '),
    "old-file-not-an-object": ("gpu-power.json", b"42"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_the_monitor_never_lowers_a_limit_while_the_saved_originals_cannot_be_read(
        nv: ModuleType, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    """Damaged originals hold the only copy of the limits to give back: sampling goes on, but
    no limit goes down (it could not be given back), the file is neither set aside nor
    written over, the monitor says why; once the operator fixes it, throttling resumes."""
    name, content = UNREADABLE[case]
    gpu = nv.machine.gpus[0]
    gpu.temperature = [60, 88, 88, 88, 88]
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_bytes(content)
    clock = Clock()
    monitor = GpuMonitor(config(tmp_path, throttle_enabled=True, throttle_step_interval=0),
                         Nvml(module=nv), clock=clock)
    with caplog.at_level("INFO", logger="clusterctl.gpu"):
        assert monitor.restore() == []  # nothing it could give back
        views = [monitor.step()[0] for _ in range(3)]
    assert [v.state.value for v in views] == ["optimal", "throttled", "throttled"]
    assert gpu.set_limit_calls == [] and gpu.power_limit_mw == 700_000
    assert not any(v.throttled for v in views)
    assert sorted(p.name for p in state.iterdir()
                  if p.name not in ("events.jsonl", "originals.lock")) == [name]
    assert (state / name).read_bytes() == content  # kept whole, where it was
    assert name in (monitor.originals_problem or "")  # why, for the agent to report
    assert sum(name in r.getMessage() for r in caplog.records) == 1  # said once

    (state / name).unlink()  # the operator sets the limits by hand and starts afresh
    clock.now += 1
    assert monitor.step()[0].throttled
    assert gpu.set_limit_calls == [630_000]
    assert monitor.originals_problem is None
    saved = saved_limits(state)
    assert saved is not None and saved["GPU-0"]["original_limit_w"] == 700.0
