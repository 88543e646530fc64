"""`systemctl reload` (SIGHUP -> Agent.reload) as the node shows it: a config that fails
validation is refused and the node goes on doing what the running config says; a
`[hibernate]` change that loads changes when the node goes to sleep. One idle fake GPU,
an in-process agent, a command action that appends to a file."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clusterctl.agent.service import Agent
from tests.conftest import agent_config, wait_until
from tests.fakes.control_plane import free_port

Start = Callable[..., tuple[Agent, list[str]]]


def hibernate(ran: Path, *, enabled: bool) -> str:
    return (f"enabled = {'true' if enabled else 'false'}\npause_after_minutes = 0.1\n"
            f'action = "command"\ncommand = ["sh", "-c", "echo ran >> {ran}"]\n')


def events_of(tmp_path: Path) -> list[str]:
    log = tmp_path / "state/events.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["event_type"] for line in log.read_text().splitlines()]


BAD_VALUES = {  # each fails validation, not TOML syntax
    "a word for a temperature": ("[gpu]\n", '[gpu]\ntemp_optimal = "hot"\n'),
    "a negative interval": ("interval = 1\n", "interval = -5\n"),
    "thresholds out of order": ("[gpu]\n", "[gpu]\ntemp_optimal = 95\n"),
    "an unknown action": ('action = "command"\n', 'action = "teleport"\n'),
}


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_a_reload_with_a_value_that_fails_validation_keeps_the_node_on_the_old_config(
        start_agent: Start, tmp_path: Path, bad: str) -> None:
    """The operator turns hibernation off and gets one value wrong: refused, said in
    STATUS, and the node still goes to sleep when idle, as the running config says."""
    ran, port = tmp_path / "action-ran", free_port()
    path = tmp_path / "clusterctl.toml"
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=True), port=port))
    agent, notes = start_agent(path)
    old, new = BAD_VALUES[bad]
    edited = agent_config(tmp_path, hibernate(ran, enabled=False), port=port)
    assert old in edited
    path.write_text(edited.replace(old, new, 1))
    agent.reload()
    wait_until(ran.exists, 15)  # idle for 6 s: the running config's action
    wait_until(lambda: agent.hibernation.state.status == "hibernated", 10)
    assert ran.read_text() == "ran\n"
    assert "hibernate_started" in events_of(tmp_path)
    assert any(n.startswith("STATUS=reload refused: ") for n in notes), notes


def test_a_reload_that_enables_hibernation_puts_an_idle_node_to_sleep(
        start_agent: Start, tmp_path: Path) -> None:
    ran, port = tmp_path / "action-ran", free_port()
    path = tmp_path / "clusterctl.toml"
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=False), port=port))
    agent, notes = start_agent(path)
    assert agent.first_cycle.wait(10)
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=True), port=port))
    agent.reload()
    assert not [n for n in notes if "reload refused" in n]
    wait_until(ran.exists, 15)  # 6 s idle, then the action
    wait_until(lambda: agent.hibernation.state.status == "hibernated", 10)
    assert ran.read_text() == "ran\n"
    assert events_of(tmp_path)[-2:] == ["hibernate_started", "hibernated"]


def test_a_reload_that_disables_hibernation_keeps_an_idle_node_awake(
        start_agent: Start, tmp_path: Path) -> None:
    ran, port = tmp_path / "action-ran", free_port()
    path = tmp_path / "clusterctl.toml"
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=True), port=port))
    agent, notes = start_agent(path)
    wait_until(lambda: agent.hibernation.state.status == "idle", 10)  # its 6 s run
    idle_since = agent.hibernation.state.idle_since
    assert idle_since is not None
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=False), port=port))
    agent.reload()
    assert not [n for n in notes if "reload refused" in n]
    # samples well past the 6 s the old config would have waited (sampled every 0.2 s)
    wait_until(lambda: time.time() > idle_since + 8, 15)
    past = len(agent.monitor.histories["GPU-0"])
    wait_until(lambda: len(agent.monitor.histories["GPU-0"]) >= past + 3, 10)
    assert not ran.exists()
    assert agent.hibernation.state.status == "idle"
    assert "hibernate_started" not in events_of(tmp_path)
