"""What the control plane sees across agent restarts: every event once, in order, after
an acknowledgement that reached the disk; the same ids again after a kill between a POST
and its acknowledgement (at least once, with ids to drop duplicates by); every event the
size cap kept, and an ``outbox_overflow`` event for those it dropped; heartbeat sequence
numbers that keep increasing over a restart. Real agents, as processes where a kill or a
restart is the point, and a real HTTP control plane on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl.agent.control import ControlClient
from clusterctl.agent.heartbeat import Delivery
from clusterctl.agent.service import Agent
from clusterctl.config import HeartbeatConfig
from clusterctl.events.log import FILE_NAME as EVENTS_FILE
from clusterctl.events.log import EventLog
from clusterctl.events.outbox import Outbox
from clusterctl.host.nvml import Nvml
from tests.conftest import H100, load_fake_nvml, quiet_host, wait_until
from tests.fakes.control_plane import ControlPlane, Hold, free_port, running
from tests.faults import AgentProcess
from tests.test_agent import Node

ROTATE_BYTES = 600  # about five events a file
CAP_BYTES = 500  # under a file of events: every rotated file goes, the live one stays


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """One fake GPU for the in-process agents of the ``node`` fixture."""
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"gpus": [{**H100, "uuid": "GPU-0", "utilization_gpu": 50}]})
    return fake


def record(log: EventLog, *numbers: int) -> None:
    """As `clusterctl` commands record events: the time of day, which names rotated files."""
    for n in numbers:
        log.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())


def numbers(events: list[dict[str, Any]]) -> list[int]:
    return [e["n"] for e in events]


def kill(agent: AgentProcess) -> None:
    """SIGKILL the agent's own process (no chance to write anything) and reap it."""
    assert agent.proc is not None and agent.alive()
    agent.proc.kill()
    assert agent.proc.wait(timeout=10) == -9


def events_on_disk(state: Path) -> list[dict[str, Any]]:
    """Every event in the state dir's event files, oldest file first (as the outbox
    reads them), without touching the outbox's cursor."""
    rotated = sorted(p.name for p in state.glob(f"{EVENTS_FILE}.*"))
    return [json.loads(line) for name in [*rotated, EVENTS_FILE] if (state / name).exists()
            for line in (state / name).read_bytes().splitlines()]


# -- 1. the outbox across restarts --------------------------------------------------------


def test_events_acknowledged_before_a_restart_are_not_sent_again(tmp_path: Path) -> None:
    with running() as plane:
        agent = AgentProcess(tmp_path, plane.url)
        agent.start()
        agent.record(1, 2, 3)
        wait_until(lambda: len(plane.events) >= 3)
        wait_until((agent.state / "outbox.json").exists)  # the acknowledgement on disk
        assert agent.stop() == 0
        agent.record(4)  # while the agent is down
        agent.start()
        wait_until(lambda: 4 in numbers(plane.events))  # 1-3 again would come before it
        agent.stop()
    assert numbers(plane.events) == [1, 2, 3, 4]
    assert len({e["id"] for e in plane.events}) == 4


def test_a_kill_between_the_post_and_its_acknowledgement_resends_the_same_ids(
        tmp_path: Path) -> None:
    with running() as plane:
        plane.hold = hold = Hold()  # the batch is taken, the 2xx held back
        agent = AgentProcess(tmp_path, plane.url)
        agent.record(1, 2, 3)
        agent.start()
        assert hold.arrived.wait(15), agent.stderr()
        kill(agent)  # it never heard the answer
        plane.hold = None
        hold.release()
        first = [e["id"] for e in plane.events]
        assert numbers(plane.events) == [1, 2, 3]
        assert not (agent.state / "outbox.json").exists()  # nothing acknowledged on disk
        agent.start()
        wait_until(lambda: len(plane.events) >= 6)
        agent.record(4)
        wait_until(lambda: 4 in numbers(plane.events))
        agent.stop()
    ids = [e["id"] for e in plane.events]
    assert numbers(plane.events) == [1, 2, 3, 1, 2, 3, 4]  # the batch again, then on
    assert ids[3:6] == first  # the same ids: the control plane drops them as duplicates
    assert len(set(ids)) == 4


def test_after_the_size_cap_drops_files_and_the_live_file_rotates_every_kept_event_arrives(
        tmp_path: Path, node: Callable[..., Node], nv: ModuleType) -> None:
    port = free_port()  # the control plane is down
    n = node(f"http://127.0.0.1:{port}")
    log = EventLog(n.state, "node-1", rotate_bytes=ROTATE_BYTES)
    record(log, *range(1, 15))
    assert len(list(n.state.glob(f"{EVENTS_FILE}.*"))) >= 2
    capped = Agent(n.conf, nvml=Nvml(module=nv), notify=n.notes.append)
    capped.outbox = Outbox(n.state, max_unsent_bytes=CAP_BYTES)  # a small cap, as a param
    quiet_host(capped, tmp_path)
    n.agent = capped  # stopped by the fixture should the test fail
    capped.start()
    wait_until(lambda: any(e["event_type"] == "outbox_overflow"
                           for e in events_on_disk(n.state)))
    n.stop()
    kept = [e["n"] for e in events_on_disk(n.state) if e["event_type"] == "swap_expanded"]
    assert kept and kept == list(range(15 - len(kept), 15))  # the oldest went, whole files
    assert list(n.state.glob(f"{EVENTS_FILE}.*")) == []  # only the live file is left
    live_inode = (n.state / EVENTS_FILE).stat().st_ino
    record(log, *range(15, 21))
    assert (n.state / EVENTS_FILE).stat().st_ino != live_inode  # the live file rotated
    with running(port) as plane:
        n.start()  # the usual cap from here on
        wait_until(lambda: 20 in [e.get("n") for e in plane.events])
        n.stop()
    got = [(e["event_type"], e.get("n")) for e in plane.events]
    overflow = [e for e in plane.events if e["event_type"] == "outbox_overflow"]
    assert got == [*(("swap_expanded", k) for k in kept), ("outbox_overflow", None),
                   *(("swap_expanded", k) for k in range(15, 21))]
    assert overflow[0]["dropped"] == 14 - len(kept)  # each event sent or counted
    assert len({e["id"] for e in plane.events}) == len(plane.events)


def test_events_recorded_after_the_clock_was_set_back_still_arrive_in_order(
        tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node-1", rotate_bytes=ROTATE_BYTES)
    now = time.time()
    with running() as plane:
        beat = HeartbeatConfig(control_url=plane.url, token_file=tmp_path / "none")
        sender = Delivery(ControlClient(beat), Outbox(tmp_path), tmp_path)
        for n in range(1, 9):
            log.record("swap_expanded", f"event {n}", {"n": n}, now=now)
        assert sender.flush() is True
        for n in range(9, 17):  # the clock an hour back: a node woken before NTP set it
            log.record("swap_expanded", f"event {n}", {"n": n}, now=now - 3600)
        assert len(list(tmp_path.glob(f"{EVENTS_FILE}.*"))) >= 3  # rotated meanwhile
        assert sender.flush() is True
    assert numbers(plane.events) == list(range(1, 17))


# -- 2. the heartbeat sequence across restarts --------------------------------------------


def test_the_heartbeat_sequence_keeps_increasing_across_a_restart(tmp_path: Path) -> None:
    with running() as plane:
        agent = AgentProcess(tmp_path, plane.url)
        agent.start()
        wait_until(lambda: len(plane.heartbeats) >= 2)
        assert agent.stop() == 0
        before = len(plane.heartbeats)
        agent.start()
        wait_until(lambda: len(plane.heartbeats) >= before + 2)
        agent.stop()
    beats = _in_arrival_order(plane)
    sequences = [b["sequence"] for b in beats]
    assert sequences == sorted(set(sequences))  # strictly increasing, as received
    assert sequences[before] > sequences[before - 1]
    assert {b["instance_id"] for b in beats} == {"node-1"}


def _in_arrival_order(plane: ControlPlane) -> list[dict[str, Any]]:
    return [r.payload for r in plane.received_list() if r.kind == "heartbeat"]
