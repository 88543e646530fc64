"""A hibernation action that fails in a way nobody planned for (an exception that is not
one of clusterctl's, a command that is not a program, a full event log) still ends in
``hibernate_failed`` and the node back to running; the next idle period acts again.
Nothing here sleeps this machine: no test uses the ``systemd`` action."""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clusterctl import config as cfg
from clusterctl.agent.service import Agent
from clusterctl.hibernate import actions
from clusterctl.hibernate.controller import Hibernation
from tests.conftest import wait_until

PAUSE_S = 6.0  # pause_after_minutes = 0.1


class Exploding:
    """A control client whose request fails with an exception that is not clusterctl's."""

    def __init__(self) -> None:
        self.calls = 0

    def post(self, path: str, payload: Any) -> Any:
        self.calls += 1
        raise ValueError("Port could not be cast to integer value as 'x'")


def settings(tmp_path: Path, **hibernate: object) -> cfg.Config:
    config = cfg.with_changes(cfg.Config(), "paths", {"state_dir": str(tmp_path / "state"),
                                                       "run_dir": str(tmp_path / "run")})
    config = cfg.with_changes(config, "heartbeat", {"control_url": "http://127.0.0.1:9"})
    return cfg.with_changes(config, "hibernate", {"enabled": True, "pause_after_minutes": 0.1,
                                                  **hibernate})


class Node:
    """A Hibernation driven by hand: a clock to move, the events it records."""

    def __init__(self, config: cfg.Config, *, control: Callable[[], Any],
                 record: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.now = 1_000_000.0
        self.events: list[tuple[str, str]] = []
        self.failures: list[BaseException] = []
        self.hook = record
        self.hibernation = Hibernation(
            config, instance_id="n1", record=self.record, drain=lambda: None,
            control=control, clock=lambda: self.now, logind=False,
            failed=self.failures.append)

    def record(self, kind: str, reason: str, details: dict[str, Any]) -> None:
        self.events.append((kind, reason))
        if self.hook is not None:
            self.hook(kind, reason, details)

    def idle_period(self) -> None:
        """An idle GPU for the whole pause: the action starts; wait until it is over."""
        self.hibernation.observe((1.0,))
        self.now += PAUSE_S + 1
        self.hibernation.observe((1.0,))
        assert "hibernate_started" in (kind for kind, _ in self.events[-2:])
        for thread in threading.enumerate():
            if thread.name == "hibernate":
                thread.join(5)
        wait_until(lambda: self.hibernation.state.status != "hibernating", 5)
        self.now += 1


def test_an_unexpected_exception_in_the_control_action_is_a_failed_action() -> None:
    client = Exploding()
    outcome = actions.run(cfg.with_changes(settings(Path("/nonexistent")), "hibernate",
                                           {"action": ["control", "command"],
                                            "command": ["true"]}),
                          instance_id="n1", control=client)
    assert outcome == actions.Outcome(
        False, (), "control",
        "unexpected ValueError: Port could not be cast to integer value as 'x'")
    assert client.calls == 1


def test_a_control_client_that_cannot_be_made_fails_the_action_and_the_clock_restarts(
        tmp_path: Path) -> None:
    def control() -> Any:
        raise ValueError("Invalid IPv6 URL")  # what urlsplit says of "http://[::1"

    node = Node(settings(tmp_path, action="control"), control=control)
    node.idle_period()
    assert node.hibernation.state.status == "running"
    assert node.events[-1] == ("hibernate_failed", "control: unexpected ValueError: "
                                                   "Invalid IPv6 URL")
    saved = json.loads((tmp_path / "state/hibernate.json").read_text())
    assert saved["status"] == "running"
    node.idle_period()  # the next idle period acts again
    kinds = [kind for kind, _ in node.events]
    assert kinds == ["idle_detected", "hibernate_started", "hibernate_failed"] * 2


def test_a_control_request_that_raises_fails_and_acts_again_next_time(tmp_path: Path) -> None:
    client = Exploding()
    node = Node(settings(tmp_path, action="control"), control=lambda: client)
    node.idle_period()
    node.idle_period()
    assert client.calls == 2
    assert node.hibernation.state.status == "running"
    failed = [reason for kind, reason in node.events if kind == "hibernate_failed"]
    assert failed == ["control: unexpected ValueError: Port could not be cast to integer "
                      "value as 'x'"] * 2


def test_an_event_log_that_cannot_be_written_still_ends_the_action(tmp_path: Path) -> None:
    def record(kind: str, reason: str, details: dict[str, Any]) -> None:
        if kind in ("hibernate_failed", "hibernated"):
            raise OSError(errno.ENOSPC, "No space left on device")

    node = Node(settings(tmp_path, action="command", command=["false"]), control=lambda: None,
                record=record)
    node.idle_period()
    assert node.hibernation.state.status == "running"
    assert [type(err) for err in node.failures] == [OSError]
    node.idle_period()  # and acts again
    assert [kind for kind, _ in node.events] == ["idle_detected", "hibernate_started",
                                                 "hibernate_failed"] * 2


# -- the agent ------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path, agent_with: Callable[..., Agent]) -> Agent:
    snapshot = tmp_path / "snapshot"
    snapshot.write_text("echo saved\n")  # no #! line: exec says "Exec format error"
    snapshot.chmod(0o755)
    return agent_with("", f'action = "command"\ncommand = ["{snapshot}"]\n')


def test_a_command_that_is_not_a_program_fails_and_the_next_idle_period_acts_again(
        agent: Agent, tmp_path: Path) -> None:
    log = tmp_path / "state/events.jsonl"

    def kinds() -> list[str]:
        if not log.exists():
            return []
        return [json.loads(x)["event_type"] for x in log.read_text().splitlines()]

    wait_until(lambda: "hibernate_failed" in kinds(), 20)
    wait_until(lambda: agent.hibernation.state.status != "hibernating", 5)
    assert agent.hibernation.state.status in ("running", "idle")  # the clock starts again
    failed = next(json.loads(x) for x in log.read_text().splitlines()
                  if json.loads(x)["event_type"] == "hibernate_failed")
    assert failed["reason"] == (f"command: cannot run {tmp_path / 'snapshot'}: Exec format "
                                "error; fix [hibernate] command")
    wait_until(lambda: kinds().count("hibernate_failed") >= 2, 20)  # it acts again
    assert kinds()[:6] == ["idle_detected", "hibernate_started", "hibernate_failed"] * 2


def test_a_busy_node_writes_its_state_at_most_once_a_minute_and_a_full_disk_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = Node(settings(tmp_path), control=lambda: None)
    state_file = tmp_path / "state/hibernate.json"
    inodes = set()
    for _ in range(30):  # busy samples 3 s apart: only the last activity moves
        node.hibernation.observe((90.0,))
        inodes.add(state_file.stat().st_ino)  # each write is a new file (atomic rename)
        node.now += 3
    assert 2 <= len(inodes) <= 3  # 90 s of samples: written at the start and each minute
    node.hibernation.observe((1.0,))  # idle: a change of status is written at once
    node.hibernation.observe((1.0,))
    node.now += PAUSE_S + 1
    before = state_file.stat().st_ino
    (tmp_path / "state").rename(tmp_path / "state.away")
    (tmp_path / "state").write_text("a file where the state dir was: every write fails")
    with caplog.at_level("ERROR", logger="clusterctl.hibernate"):
        for _ in range(20):
            node.hibernation.observe((90.0,))
            node.now += 70
    said = [r for r in caplog.records if "cannot save the hibernation state" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert node.hibernation.state.status == "running"  # the state lives on in memory
    assert (tmp_path / "state.away/hibernate.json").stat().st_ino == before


@pytest.mark.parametrize("content", [
    '{"wake": "25:99", "sleep": "18:00", "tz": "UTC"}', '{"wake": null, "sleep": "18:00", '
    '"tz": "Mars/Olympus"}', '{"wake": 9, "sleep": [], "tz": "UTC"}', '[1, 2]', '"x"',
    '{"wake": "09:00", "sleep": "18:00"}', '{"wake": "09:00", "sleep": "18:00", "tz": "UTC", '
    '"extra": 1}', "\udcff"])
def test_a_damaged_schedule_or_inhibit_file_never_stops_idle_detection_or_heartbeats(
        tmp_path: Path, content: str) -> None:
    node = Node(settings(tmp_path), control=lambda: None)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    for name in ("hibernate-schedule.json", "hibernate-inhibit.json"):
        (state / name).write_bytes(content.encode("utf-8", "surrogateescape"))
    node.hibernation.observe((90.0,))
    node.now += 3
    node.hibernation.observe((90.0,))  # no exception: the sample is taken
    times = node.hibernation.next_times(node.now)  # what every heartbeat carries
    assert times is None or times["timezone"] == "UTC"


def test_an_action_ending_during_a_sample_is_not_overwritten_by_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU thread computes the next state from "hibernating" while the action thread
    concludes: the sample must not write the stale "hibernating" back (the node would
    stay there for good)."""
    from clusterctl.hibernate import controller

    node = Node(settings(tmp_path, action="command", command=["/bin/false"]),
                control=lambda: None)
    node.hibernation.observe((1.0,))
    node.now += PAUSE_S + 1
    real_step = controller.step

    def step_while_the_action_ends(*args: Any) -> Any:
        out = real_step(*args)
        for thread in threading.enumerate():  # let the action finish in between, if it can
            if thread.name == "hibernate":
                thread.join(0.5)
        return out

    node.hibernation.observe((1.0,))  # the action starts
    monkeypatch.setattr(controller, "step", step_while_the_action_ends)
    node.hibernation.observe((2.0,))
    monkeypatch.setattr(controller, "step", real_step)
    for thread in threading.enumerate():  # the action, over whichever way it ended
        if thread.name == "hibernate":
            thread.join(5)
    assert "hibernate_failed" in (kind for kind, _ in node.events)
    node.now += 60
    node.hibernation.observe((1.0,))
    assert node.hibernation.state.status in ("running", "idle")


def test_an_inhibit_is_said_once_not_each_minute_it_has_left(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from clusterctl.hibernate.controller import inhibit

    node = Node(settings(tmp_path, action="command", command=["/bin/true"]),
                control=lambda: None)
    inhibit(tmp_path / "state", node.now + 7200, "training run", "test")
    with caplog.at_level("INFO", logger="clusterctl.hibernate"):
        for _ in range(30):
            node.hibernation.observe((1.0,))
            node.now += 60
    said = [r.getMessage() for r in caplog.records if "held off" in r.getMessage()]
    assert len(said) == 1, said
    assert node.hibernation.state.status != "hibernating"
