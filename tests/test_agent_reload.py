"""`systemctl reload` (SIGHUP -> Agent.reload) as the node shows it: a config that fails
validation is refused and the node goes on doing what the running config says; a
`[hibernate]` change that loads changes when the node goes to sleep. One idle fake GPU,
an in-process agent whose loops a clock of the test's own drives (``Agent.tick``), a
command action that appends to a file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl.agent.service import Agent
from clusterctl.host.nvml import Nvml
from tests.conftest import agent_config, quiet_host, wait_until
from tests.fakes.control_plane import free_port
from tests.test_agent import Ticker

Start = Callable[[Path], tuple[Agent, list[str]]]


@pytest.fixture
def clock() -> Ticker:
    return Ticker()


@pytest.fixture
def start_agent(tmp_path: Path, idle_gpu: ModuleType, clock: Ticker) -> Iterator[Start]:
    """An agent on a config file, its notifications as systemd would get them, its loops
    not started (``clock`` drives them); this machine's logind is not asked."""
    made: list[Agent] = []

    def start(path: Path) -> tuple[Agent, list[str]]:
        notes: list[str] = []
        agent = Agent(path, nvml=Nvml(module=idle_gpu), notify=notes.append,
                      clock=clock.wall, owns_swap_policy=False)
        agent.hibernation.logind = False
        quiet_host(agent, tmp_path)
        made.append(agent)
        return agent, notes

    yield start
    for agent in made:
        agent.stop()


def hibernated(agent: Agent, clock: Ticker, ran: Path) -> None:
    """Idle past the pause on the agent's clock: the action starts, and ends."""
    clock.until(agent, lambda: agent.hibernation.state.status not in ("running", "idle"),
                within_s=10)  # 6 s idle
    wait_until(ran.exists, 10)  # the action runs on a thread of its own
    wait_until(lambda: agent.hibernation.state.status == "hibernated", 10)


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
        start_agent: Start, clock: Ticker, tmp_path: Path, bad: str) -> None:
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
    hibernated(agent, clock, ran)  # idle for 6 s: the running config's action
    assert ran.read_text() == "ran\n"
    assert "hibernate_started" in events_of(tmp_path)
    assert any(n.startswith("STATUS=reload refused: ") for n in notes), notes


def test_a_reload_that_enables_hibernation_puts_an_idle_node_to_sleep(
        start_agent: Start, clock: Ticker, tmp_path: Path) -> None:
    ran, port = tmp_path / "action-ran", free_port()
    path = tmp_path / "clusterctl.toml"
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=False), port=port))
    agent, notes = start_agent(path)
    clock.run_for(agent, 30)  # idle, and hibernation off: nothing happens
    assert agent.hibernation.state.status == "idle" and not ran.exists()
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=True), port=port))
    agent.reload()
    assert not [n for n in notes if "reload refused" in n]
    hibernated(agent, clock, ran)  # 6 s idle, then the action
    assert ran.read_text() == "ran\n"
    assert events_of(tmp_path)[-2:] == ["hibernate_started", "hibernated"]


def test_a_reload_that_disables_hibernation_keeps_an_idle_node_awake(
        start_agent: Start, clock: Ticker, tmp_path: Path) -> None:
    ran, port = tmp_path / "action-ran", free_port()
    path = tmp_path / "clusterctl.toml"
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=True), port=port))
    agent, notes = start_agent(path)
    clock.until(agent, lambda: agent.hibernation.state.status == "idle", within_s=1)
    assert agent.hibernation.state.idle_since is not None
    path.write_text(agent_config(tmp_path, hibernate(ran, enabled=False), port=port))
    agent.reload()
    assert not [n for n in notes if "reload refused" in n]
    # samples (every 0.2 s) well past the 6 s the old config would have waited
    clock.run_for(agent, 30)
    assert not ran.exists()
    assert agent.hibernation.state.status == "idle"
    assert "hibernate_started" not in events_of(tmp_path)
