"""The agent's start, in-process on the fake NVML: READY=1 only once the first GPU sample
is in (however slow the driver), and power limits a crashed run left lowered given back
while it starts, not when it stops."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl import config as cfg
from clusterctl.agent.service import Agent
from clusterctl.gpu.monitor import GpuMonitor
from clusterctl.host.nvml import Nvml
from tests.conftest import H100, load_fake_nvml, quiet_host, run_as_systemd_would, wait_until
from tests.test_agent import Node

SLOW_S = 2.0  # the first temperature read of a slow driver


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"gpus": [{**H100, "uuid": "GPU-0", "temperature": 52}]})
    return fake


def test_ready_is_sent_only_once_the_first_gpu_sample_is_in(node: Callable[..., Node]) -> None:
    """The first sample takes 2 s (a slow driver): READY=1 comes after it, its STATUS and
    /metrics already show the GPU."""
    n = node()
    n.nv.machine.gpus[0].delays_s["nvmlDeviceGetTemperature"] = [SLOW_S, 0]
    notes: list[str] = []
    at_ready: list[tuple[float, str]] = []  # (seconds since run(), /metrics then)
    started = time.monotonic()

    def notify(message: str) -> None:
        if message.startswith("READY=1"):
            at_ready.append((time.monotonic() - started, str(n.get("/metrics")[1])))
        notes.append(message)

    agent = Agent(n.conf, nvml=Nvml(module=n.nv), notify=notify)
    quiet_host(agent, n.tmp)

    def operator(send: Callable[[int], None]) -> None:
        wait_until(lambda: bool(at_ready), 20)
        send(signal.SIGTERM)

    started = time.monotonic()  # notify measures from run()
    run_as_systemd_would(agent, operator)
    assert notes[0].startswith("READY=1\nSTATUS=GPUs 0:optimal, hottest 52 C;"), notes[0]
    after_s, metrics = at_ready[0]
    assert after_s >= SLOW_S  # not before the slow read returned
    temperatures = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("DCGM_FI_DEV_GPU_TEMP{")]
    assert temperatures == [52.0]


def test_the_agent_gives_back_a_crashed_runs_power_limit_as_it_starts(
        node: Callable[..., Node]) -> None:
    """A run with throttling on lowered GPU 0 and died (no stop); the agent started next,
    throttling off, has the limit back by its first sample, long before any stop."""
    n = node()
    gpu = n.nv.machine.gpus[0]
    gpu.temperature = 88
    base = cfg.Config(paths=cfg.PathsConfig(state_dir=n.state, run_dir=n.tmp / "run"))
    crashed = GpuMonitor(cfg.with_changes(base, "gpu", {"throttle_enabled": True}),
                         Nvml(module=n.nv))
    crashed.step()  # ... and the process dies here: no stop()
    assert gpu.power_limit_mw == 630_000
    gpu.temperature = 50
    agent = n.start()  # returns at the first sample
    assert not agent.config.gpu.throttle_enabled
    assert gpu.power_limit_mw == 700_000
    assert not Path(n.state / "originals.json").exists()
