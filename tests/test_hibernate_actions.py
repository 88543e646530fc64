"""The hibernation actions, and the agent hibernating an idle node (fake NVML, a real
control plane on 127.0.0.1, real commands); nothing here sleeps this machine."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clusterctl import config as cfg
from clusterctl.agent.control import ControlClient
from clusterctl.agent.service import Agent
from clusterctl.errors import HostError
from clusterctl.hibernate import actions
from tests.conftest import wait_until
from tests.fakes.control_plane import running


def conf(**hibernate: object) -> cfg.Config:
    return cfg.with_changes(cfg.Config(), "hibernate", {"enabled": True, **hibernate})


def never(unit: str) -> None:
    raise AssertionError(f"a test must never start {unit}")


def test_command_success_failure_and_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "snapshot-done"
    ok = actions.run(conf(action="command", command=["sh", "-c", f"echo saved > {marker}; "
                                                     "echo snapshot 42"]),
                     instance_id="n1", control=None, start_unit=never)
    assert ok.ok and ok.done == ("command sh succeeded: snapshot 42",)
    assert marker.read_text() == "saved\n"
    bad = actions.run(conf(action=["command", "control"],
                           command=["sh", "-c", "echo disk full >&2; exit 3"]),
                      instance_id="n1", control=None, start_unit=never)
    assert (bad.ok, bad.failed_action, bad.error) == (False, "command", "sh exited 3: disk full")
    slow = actions.run(conf(action="command", command=[sys.executable, "-c",
                                                        "import time; time.sleep(30)"],
                            command_timeout=1), instance_id="n1", control=None,
                       start_unit=never)
    assert not slow.ok and "did not finish in 1 s (killed)" in (slow.error or "")
    missing = actions.run(conf(action="command", command=["/nonexistent/snap"]),
                          instance_id="n1", control=None, start_unit=never)
    assert missing.error == "/nonexistent/snap: no such program; fix [hibernate] command"


def test_the_control_action_asks_the_control_plane(tmp_path: Path) -> None:
    with running() as plane:
        client = ControlClient(cfg.HeartbeatConfig(control_url=plane.url,
                                                   token_file=tmp_path / "none"))
        outcome = actions.run(conf(action="control"), instance_id="vast_12345",
                              control=client, start_unit=never)
        plane.mode = "error"
        failed = actions.run(conf(action="control"), instance_id="vast_12345",
                             control=client, start_unit=never)
    assert outcome.ok
    assert outcome.done == ("control plane accepted: snapshot vast_12345_hibernate_1734441600",)
    assert [i for i, _ in plane.hibernate_requests] == ["vast_12345"]
    assert not failed.ok and "HTTP 500" in (failed.error or "")


def test_systemd_asks_logind_then_falls_back_or_refuses() -> None:
    answers = {"hibernate.target": "na", "suspend.target": "yes", "poweroff.target": "yes"}
    started: list[str] = []
    refuse = actions.run(conf(action="systemd"), instance_id="n", control=None,
                         can=answers.get, start_unit=started.append)
    assert not refuse.ok and "cannot hibernate (na: no resume swap" in (refuse.error or "")
    assert started == []  # never half asleep
    fallback = actions.run(conf(action="systemd", fallback="suspend"), instance_id="n",
                           control=None, can=answers.get, start_unit=started.append)
    assert fallback.ok and started == ["suspend.target"]
    custom = actions.run(conf(action="systemd", systemd_unit="snapshot-and-stop.service"),
                         instance_id="n", control=None, can=lambda u: None,
                         start_unit=started.append)
    assert custom.ok and started[-1] == "snapshot-and-stop.service"
    with pytest.raises(HostError):
        actions.systemd_target(conf(fallback="poweroff"),
                               {"hibernate.target": "no", "poweroff.target": "no"}.get)


# -- the agent ------------------------------------------------------------------------


def test_an_idle_node_runs_its_actions_and_says_so(
        agent_with: Callable[..., Agent], tmp_path: Path) -> None:
    marker = tmp_path / "snapshot"
    with running() as plane:
        agent = agent_with(plane.url, f'action = ["command", "control"]\ncommand = '
                                      f'["sh", "-c", "date +%s.%N > {marker}"]\n')
        wait_until(lambda: agent.hibernation.state.status == "hibernated", 30)
        took = float(marker.read_text()) - (agent.hibernation.state.idle_since or 0)
        wait_until(lambda: "hibernated" in [e["event_type"] for e in plane.events], 30)
    kinds = [e["event_type"] for e in plane.events]
    assert kinds[:3] == ["idle_detected", "hibernate_started", "hibernated"]
    idle = plane.events[0]
    assert idle["gpu_utilization"] == 1.0 and idle["reason"] == "GPU utilization < 5%"
    assert "command sh succeeded" in plane.events[2]["reason"]
    assert [i for i, _ in plane.hibernate_requests] == ["vast_12345"]
    statuses = [h["status"] for h in plane.heartbeats]
    assert "hibernating" in statuses  # the drain's order: test_hibernate_promises.py
    print(f"action started {took - 6.0:.3f} s after the idle period ended")
    assert 6.0 <= took < 6.0 + 1.0  # 0.1 min, then within a few samples
    saved = json.loads((tmp_path / "state/hibernate.json").read_text())
    assert saved["status"] == "hibernated"


def test_a_failed_action_is_an_event_and_the_node_keeps_running(
        agent_with: Callable[..., Agent], tmp_path: Path) -> None:
    agent = agent_with("", 'action = ["command", "systemd"]\ncommand = ["false"]\n')
    wait_until(lambda: "hibernate_failed" in (tmp_path / "state/events.jsonl").read_text()
               if (tmp_path / "state/events.jsonl").exists() else False, 30)
    events = [json.loads(x) for x in
              (tmp_path / "state/events.jsonl").read_text().splitlines()]
    failed = next(e for e in events if e["event_type"] == "hibernate_failed")
    assert failed["reason"] == "command: false exited 1: "
    assert agent.hibernation.state.status in ("running", "idle")  # the clock starts again


def test_the_first_start_after_a_hibernation_says_woke(agent_with: Callable[..., Agent],
                                                      tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "hibernate.json").write_text(json.dumps(
        {"status": "hibernated", "idle_since": 1.0, "last_activity": 0.5,
         "last_utilization": 0.0}))
    agent = agent_with("", 'action = "none"\n')
    events = [json.loads(x)["event_type"] for x in (state / "events.jsonl").read_text()
              .splitlines()]
    assert events[0] == "woke"
    assert agent.hibernation.state.status in ("running", "idle")


def test_an_inhibit_holds_the_action_off(agent_with: Callable[..., Agent],
                                         tmp_path: Path) -> None:
    from clusterctl.hibernate.controller import inhibit

    inhibit(tmp_path / "state", time.time() + 3600, "training run", "alice")
    marker = tmp_path / "ran"
    agent = agent_with("", f'action = "command"\ncommand = ["touch", "{marker}"]\n')
    time.sleep(8)  # past the 6 s pause
    assert not marker.exists()
    assert agent.hibernation.state.status == "idle"
