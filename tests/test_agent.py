"""The agent in-process: heartbeats and events against a real HTTP control plane on
127.0.0.1, the local API over real HTTP, /metrics; GPUs from the fake NVML."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl.agent.service import Agent
from clusterctl.events.log import EventLog
from clusterctl.host.nvml import Nvml
from tests.conftest import H100, load_fake_nvml, quiet_host, wait_until
from tests.fakes.control_plane import free_port, running

GIB = 2**30


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"driver_version": "580.95.05", "gpus": [
        {**H100, "uuid": f"GPU-{i}", "pci_bus_id": f"00000000:{i:02x}:00.0",
         "utilization_gpu": 10 * i, "temperature": 40 + i, "memory_used": i * GIB}
        for i in range(8)]})
    return fake


class Ticker:
    """A clock of the test's own that drives an agent's loops through ``Agent.tick``, on
    the test's thread: no loop thread, no sleep. ``now`` is the agent's monotonic time and
    ``wall`` (give it as the agent's ``clock``) moves with it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.started = time.time()

    def wall(self) -> float:
        return self.started + self.now - 1000.0

    def until(self, agent: Agent, condition: Callable[[], object], *, within_s: float
              ) -> None:
        """Tick (jumping to each next due time) until ``condition``; AssertionError when
        the agent's clock passes ``within_s`` first."""
        deadline = self.now + within_s
        while not condition():
            if self.now > deadline:
                raise AssertionError(f"not within {within_s:g} s of the agent's clock")
            self.now = max(agent.tick(self.now), self.now + 0.001)

    def run_for(self, agent: Agent, seconds: float) -> None:
        """Every iteration due in the next ``seconds``."""
        end = self.now + seconds
        self.until(agent, lambda: self.now >= end, within_s=seconds + 1)


class Node:
    def __init__(self, tmp_path: Path, nv: ModuleType, control_url: str = "",
                 **extra: str) -> None:
        self.tmp = tmp_path
        self.nv = nv
        self.port = free_port()
        self.state = tmp_path / "state"
        self.token = tmp_path / "token"
        self.api_token = tmp_path / "api-token"
        sections = {"heartbeat": f'control_url = "{control_url}"\ninterval = 1\n'
                                 f'token_file = "{self.token}"\n',
                    "gpu": "monitor_interval = 0.1\n",
                    "api": f'listen = "127.0.0.1:{self.port}"\n'
                           f'token_file = "{self.api_token}"\n',
                    "paths": f'state_dir = "{self.state}"\nrun_dir = "{tmp_path / "run"}"\n',
                    "swap": f'dir = "{tmp_path / "swap"}"\n',
                    "ollama": 'url = "http://127.0.0.1:9"\n'}
        for key, text in extra.items():
            sections[key] += text
        self.conf = tmp_path / "clusterctl.toml"
        self.conf.write_text("".join(f"[{k}]\n{v}" for k, v in sections.items()))
        self.notes: list[str] = []
        self.agent: Agent | None = None

    def make(self, clock: Callable[[], float] = time.time) -> Agent:
        """The agent, its loops not started (``Agent.tick`` drives them)."""
        self.agent = Agent(self.conf, nvml=Nvml(module=self.nv), notify=self.notes.append,
                           clock=clock, owns_swap_policy=False)
        quiet_host(self.agent, self.tmp)
        return self.agent

    def start(self) -> Agent:
        self.make()
        assert self.agent is not None
        self.agent.start()
        assert self.agent.first_cycle.wait(10)
        return self.agent

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def record(self, *numbers: int) -> None:
        log = EventLog(self.state, "node-1")
        for n in numbers:
            log.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                raw, status, kind = response.read(), response.status, response.headers
        except urllib.error.HTTPError as err:
            raw, status, kind = err.read(), err.code, err.headers
        if "json" in kind.get("Content-Type", ""):
            return status, json.loads(raw)
        return status, raw.decode()


# -- heartbeats and events -----------------------------------------------------------


def test_heartbeats_arrive_with_the_versioned_payload_and_the_token(
        node: Callable[..., Node]) -> None:
    with running() as plane:
        n = node(plane.url)
        n.token.write_text("s3cret\n")
        n.token.chmod(0o600)
        n.start()
        wait_until(lambda: len(plane.heartbeats) >= 2)
    first, second = plane.heartbeats[:2]
    assert first["schema_version"] == 1
    assert second["sequence"] == first["sequence"] + 1
    assert first["status"] == "running" and first["idle_since"] is None
    assert first["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert len(first["gpus"]) == 8 and first["gpus"][3]["uuid"] == "GPU-3"
    assert first["gpu_utilization"] == 35.0
    assert set(first["memory"]) >= {"total_bytes", "available_bytes", "used_percent"}
    assert first["agent_version"] and first["hostname"] and first["timestamp"].endswith("Z")
    assert plane.auth[0] == "Bearer s3cret"


def test_a_token_others_can_read_is_refused_with_the_fix(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    with running() as plane:
        n = node(plane.url)
        n.token.write_text("s3cret\n")
        n.token.chmod(0o644)
        n.start()
        wait_until(lambda: "can be read by group or others" in caplog.text)
        assert plane.heartbeats == []
    assert f"chmod 600 {n.token}" in caplog.text


def test_an_hour_long_outage_then_every_event_once_in_order_across_a_restart(
        node: Callable[..., Node]) -> None:
    port = free_port()
    n = node(f"http://127.0.0.1:{port}")
    n.conf.write_text(n.conf.read_text().replace("interval = 1\n", "interval = 60\n")
                      .replace("monitor_interval = 0.1", "monitor_interval = 60"))
    clock = Ticker()
    n.record(1, 2, 3)
    clock.run_for(n.make(), 3600)  # the control plane is down for an hour
    n.stop()  # the agent restarts while it is still down
    n.record(4, 5)
    agent = n.make()
    clock.run_for(agent, 120)
    n.record(6)
    with running(port) as plane:
        clock.until(agent, lambda: len(plane.events) >= 6, within_s=120)
        n.record(7)
        clock.until(agent, lambda: len(plane.events) >= 7, within_s=120)
    numbers = [e["n"] for e in plane.events]
    assert numbers == [1, 2, 3, 4, 5, 6, 7]
    assert len({e["id"] for e in plane.events}) == 7
    assert all(e["instance_id"] == "node-1" for e in plane.events)


def test_errors_and_garbage_are_retried_and_nothing_is_lost(node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        plane.mode = "error"
        n = node(plane.url)
        n.record(1)
        agent = n.make()
        clock.run_for(agent, 3)  # three delivery passes, heartbeats every 1 s
        plane.mode = "garbage"
        n.record(2)
        clock.run_for(agent, 3)
        assert plane.events == [] and len(plane.heartbeats) == 0
        plane.mode = "ok"
        clock.until(agent, lambda: len(plane.events) >= 2, within_s=60)
    assert [e["n"] for e in plane.events] == [1, 2]


def test_a_slow_control_plane_never_slows_gpu_sampling(node: Callable[..., Node]) -> None:
    with running() as plane:
        plane.delay_s = 8.0  # every request hangs for 8 s
        n = node(plane.url)
        agent = n.start()
        before = len(agent.monitor.histories["GPU-0"])
        # 0.1 s apart, while the heartbeat hangs for 8 s
        wait_until(lambda: len(agent.monitor.histories["GPU-0"]) >= before + 10, 5)
        plane.delay_s = 0.0
        n.stop()


# -- the local API -------------------------------------------------------------------


def test_the_api_endpoints_in_their_documented_shapes(node: Callable[..., Node]) -> None:
    n = node()
    n.start()
    status, metrics = n.get("/api/v1/monitoring/gpu-metrics")
    assert status == 200 and len(metrics["gpus"]) == 8
    assert metrics["gpus"][2]["memory"]["used"] == 2048
    status, gpu = n.get("/api/gpu/status?gpu_id=5")
    assert status == 200 and gpu["success"]
    assert gpu["data"]["gpu_id"] == 5 and gpu["data"]["temperature_celsius"] == 45
    assert gpu["data"]["throttling"]["speed_multiplier"] == 1.0
    wait_until(lambda: len(n.agent.monitor.histories["GPU-1"]) >= 3)  # type: ignore[union-attr]
    status, trend = n.get("/api/gpu/temperature/trend?gpu_id=1&duration=5")
    assert status == 200 and trend["data"]["current_temp"] == 41
    assert trend["data"]["trend"] == "stable"
    status, health = n.get("/healthz")
    assert status == 200 and health["status"] == "healthy"
    n.nv.machine.gpus[7].temperature = 95
    wait_until(lambda: n.get("/healthz")[0] == 503)
    assert "GPU 7 is at 95 C" in n.get("/healthz")[1]["problems"][0]


def test_changes_need_the_token_and_bad_requests_change_nothing(node: Callable[..., Node]
                                                                ) -> None:
    n = node()
    n.start()
    allocate = json.dumps({"allocation_id": "llm", "required_mb": 2048}).encode()
    status, answer = n.request("POST", "/api/gpu/memory/allocate", allocate)
    assert status == 403 and "no token file" in answer["error"]
    n.api_token.write_text("t0ken\n")
    n.api_token.chmod(0o600)
    status, answer = n.request("POST", "/api/gpu/memory/allocate", allocate,
                               {"Authorization": "Bearer wrong"})
    assert (status, answer["error"]) == (401, "missing or wrong bearer token")
    auth = {"Authorization": "Bearer t0ken", "Content-Type": "application/json"}
    status, answer = n.request("POST", "/api/gpu/memory/allocate", allocate, auth)
    assert status == 200 and answer["data"]["gpu_id"] == 0  # the least busy
    for body, code, words in ((b"{not json", 400, "not JSON"),
                              (b"[1, 2]", 400, "JSON object"),
                              (json.dumps({"allocation_id": "x", "required_mb": -5}).encode(),
                               400, "positive"),
                              (json.dumps({"allocation_id": "x", "required_mb": 10**9})
                               .encode(), 409, "no GPU has"),
                              (b"x" * 70_000, 413, "body over")):
        status, answer = n.request("POST", "/api/gpu/memory/allocate", body, auth)
        assert status == code and words in answer["error"], answer
    ledger = json.loads((n.state / "gpu-allocations.json").read_text())
    assert [a["name"] for a in ledger["allocations"]] == ["llm"]
    status, answer = n.request("PUT", "/api/gpu/config",
                               json.dumps({"temp_throttle": 80}).encode(), auth)
    assert status == 200 and answer["data"]["temp_throttle"] == 80
    status, answer = n.request("PUT", "/api/gpu/config",
                               json.dumps({"temp_throttle": 99}).encode(), auth)
    assert status == 400 and "thresholds out of order" in answer["error"]
    assert n.agent is not None and n.agent.config.gpu.temp_throttle_c == 80
    assert n.request("DELETE", "/api/gpu/config")[0] == 405
    assert n.get("/api/nothing")[0] == 404


def test_metrics_in_dcgm_exporter_names(node: Callable[..., Node]) -> None:
    n = node()
    n.start()
    status, text = n.get("/metrics")
    assert status == 200
    assert ('DCGM_FI_DEV_GPU_TEMP{Hostname="' in text and 'UUID="GPU-4"' in text
            and 'gpu="4"' in text and 'modelName="NVIDIA H100 80GB HBM3"' in text)
    line = next(x for x in text.splitlines()
                if x.startswith("DCGM_FI_DEV_GPU_UTIL") and 'UUID="GPU-3"' in x)
    assert line.endswith(" 30.0")
    assert "DCGM_FI_DEV_FAN_SPEED{" not in text  # unsupported: absent, not 0
    assert 'clusterctl_gpu_state{' in text and "clusterctl_swap_used_bytes" in text


def test_the_agent_says_when_swap_growth_is_blocked(node: Callable[..., Node]) -> None:
    n = node()
    n.start()
    _, text = n.get("/metrics")
    assert "clusterctl_swap_growth_blocked 0.0" in text
    ledger = n.state / "swap.json"
    ledger.write_text(json.dumps({"version": 1, "files": [],
                                  "blocked": "the swap dir's filesystem is full"}))
    wait_until(lambda: "clusterctl_swap_growth_blocked 1.0" in n.get("/metrics")[1])
    ledger.write_text("{cut sh")  # damaged: unknown, and left for its owner to set aside
    wait_until(lambda: "clusterctl_swap_growth_blocked 0.0" in n.get("/metrics")[1])
    assert ledger.read_text() == "{cut sh"
    assert [p.name for p in n.state.iterdir() if "corrupt" in p.name] == []


def test_metrics_are_rendered_once_per_sample_and_every_scrape_gets_those_bytes(
        node: Callable[..., Node], nv: ModuleType) -> None:
    n = node()
    n.conf.write_text(n.conf.read_text().replace("monitor_interval = 0.1",
                                                 "monitor_interval = 3600"))  # one sample
    n.start()

    def temperature(text: str) -> str:
        return next(x for x in text.splitlines()
                    if x.startswith("DCGM_FI_DEV_GPU_TEMP") and 'UUID="GPU-4"' in x).split()[-1]

    status, first = n.get("/metrics")
    assert status == 200 and temperature(first) == "44.0"
    nv.machine.gpus[4].temperature = 77  # the GPU changes; no sample has read it yet
    assert all(n.get("/metrics")[1] == first for _ in range(5))
    assert n.agent is not None
    n.agent.gpu_step(time.monotonic())  # the next sample: new bytes
    assert temperature(n.get("/metrics")[1]) == "77.0"


def test_the_blocked_metric_never_follows_blocks_on_or_moves_a_planted_ledger(
        tmp_path: Path) -> None:
    """swap.json as a link to a ledger that says blocked, a FIFO, a directory, a sparse
    1 TiB file: read as unknown (not blocked) at once, and each left where it is."""
    import os
    import threading

    from clusterctl.swap import ledger

    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"version": 1, "files": [], "blocked": "followed"}))

    def planted(kind: str, path: Path) -> None:
        if kind == "link":
            path.symlink_to(elsewhere)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        else:
            with path.open("wb") as handle:
                handle.truncate(1 << 40)

    for kind in ("link", "fifo", "dir", "sparse"):
        state = tmp_path / kind
        state.mkdir()
        path = state / "swap.json"
        planted(kind, path)
        before = os.lstat(path)
        found: list[str | None] = []
        reader = threading.Thread(target=lambda out=found, at=state: out.append(
            ledger.growth_blocked(at)), daemon=True)
        started = time.monotonic()
        reader.start()
        reader.join(10)
        assert found == [None], kind  # neither hung nor followed the link
        assert time.monotonic() - started < 5, kind
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_size) == \
            (before.st_ino, before.st_mode, before.st_size), kind
        assert sorted(p.name for p in state.iterdir()) == ["swap.json"], kind
    assert json.loads(elsewhere.read_text())["blocked"] == "followed"


def test_metrics_are_written_for_the_textfile_collector(node: Callable[..., Node],
                                                        tmp_path: Path) -> None:
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    n = node(api=f'textfile_dir = "{textfiles}"\n')
    n.start()
    wait_until((textfiles / "clusterctl.prom").exists)
    assert "DCGM_FI_DEV_GPU_TEMP" in (textfiles / "clusterctl.prom").read_text()
    assert [p.name for p in textfiles.iterdir()] == ["clusterctl.prom"]  # no temp left


def test_a_bad_config_on_reload_is_refused_and_the_old_one_kept(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    n = node()
    agent = n.start()
    n.conf.write_text(n.conf.read_text() + "[gpu]\ntemp_optimal = 'hot'\n")
    agent.reload()
    assert "reload refused, the running config stays" in caplog.text
    assert any(x.startswith("STATUS=reload refused") for x in n.notes)
    assert agent.config.gpu.monitor_interval_s == 0.1


def test_stop_gives_back_a_lowered_power_limit(node: Callable[..., Node]) -> None:
    n = node(gpu="throttle_enabled = true\n")
    n.nv.machine.gpus[0].temperature = 88
    agent = n.start()
    wait_until(lambda: n.nv.machine.gpus[0].power_limit_mw < 700_000)
    time.sleep(0.2)
    agent.stop()
    n.agent = None
    assert n.nv.machine.gpus[0].power_limit_mw == 700_000
