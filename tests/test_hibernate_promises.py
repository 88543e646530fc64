"""What an operator is promised before an idle node is put to sleep, proven on an agent
in-process (one idle fake GPU) against a real control plane and a real Ollama stand-in on
127.0.0.1: the drain comes first, then the action."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from clusterctl.agent.service import Agent
from clusterctl.events.log import EventLog
from tests.conftest import agent_config, wait_until
from tests.fakes import ollama
from tests.fakes.control_plane import free_port, running

GIB = 2**30


def loaded_model(name: str, size: int) -> dict[str, object]:
    """An /api/ps entry as Ollama gives it."""
    return {"name": name, "model": name, "size": size, "size_vram": size,
            "digest": "0" * 64, "expires_at": "2026-11-23T01:00:00Z"}


def test_before_the_action_the_control_plane_has_everything_and_ollama_is_empty(
        start_agent: Callable[..., tuple[Agent, list[str]]], tmp_path: Path) -> None:
    """The action (a command that waits to be let go) starts only after the control plane
    got the `hibernating` heartbeat and every event recorded until then, and after
    Ollama unloaded every model. Heartbeats come once an hour here, so only the drain
    can have sent them."""
    started, release = tmp_path / "action-started", tmp_path / "release"
    hold = (f"date +%s.%N > {started}.new; mv {started}.new {started}; "
            f"while [ ! -e {release} ]; do sleep 0.05; done")
    server = ollama.FakeOllama()
    server.loaded = [loaded_model("llama3.1:8b", 6 * GIB), loaded_model("nomic-embed", GIB)]
    with running() as plane, ollama.running(server):
        path = tmp_path / "clusterctl.toml"
        path.write_text(agent_config(
            tmp_path, 'enabled = true\npause_after_minutes = 0.1\naction = "command"\n'
                      f'command = ["sh", "-c", "{hold}"]\ncommand_timeout = 60\n',
            port=free_port(), control_url=plane.url, interval_s=3600, ollama_url=server.url))
        agent, _ = start_agent(path)
        try:
            wait_until(lambda: agent.progress.delivery_at is not None, 10)  # the hourly pass
            log = EventLog(tmp_path / "state", "vast_12345")
            for n in (1, 2, 3):  # pending until the next pass, an hour away
                log.record("swap_expanded", f"event {n}", {"n": n}, now=1_790_000_000.0 + n)
            wait_until(started.exists, 15)  # the idle period (6 s) is over, the action runs
            # the action is held: what the control plane and Ollama have now, they had before
            action_at = float(started.read_text())
            heartbeats = [h["status"] for h in plane.heartbeats]
            received = [e["id"] for e in plane.events]
            unloads = list(server.unloads)
            still_loaded = list(server.loaded)
            recorded = [json.loads(line) for line in
                        (tmp_path / "state/events.jsonl").read_text().splitlines()]
        finally:  # the held command never outlives the test
            release.touch()
        wait_until(lambda: agent.hibernation.state.status == "hibernated", 15)
    assert heartbeats[-1] == "hibernating" and len(heartbeats) == 2, heartbeats
    kinds = [e["event_type"] for e in recorded]
    assert kinds.count("swap_expanded") == 3 and kinds[-1] == "hibernate_started", kinds
    assert received == [e["id"] for e in recorded]  # each once, in order, none left
    assert still_loaded == []
    assert sorted(name for name, _ in unloads) == ["llama3.1:8b", "nomic-embed"]
    assert all(at <= action_at for _, at in unloads)
    assert not [c for c in server.calls if c[0] == "DELETE" or "delete" in c[1]]
