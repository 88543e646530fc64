"""A real `clusterctl agent run` (fake NVML: one idle GPU) heartbeating to a real control
plane on 127.0.0.1: enrolment, commands through the operator API, a config change,
events once each and in order across a control-plane restart, and a node that refuses
commands and is `lost` once its agent stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_NVML_DIR
from tests.fakes.control_plane import free_port
from tests.fleet import IDLE_H100, FleetServer, agent_conf, stop_process

pytestmark = pytest.mark.integration
NODE = "gpu-node-1"


@contextlib.contextmanager
def agent_process(conf: Path, tmp: Path, *, gpus: list[dict[str, Any]] | None = None,
                  xid_file: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`clusterctl agent run --config conf` on the fake NVML with ``gpus`` (one idle H100 by
    default) and, given ``xid_file``, the XIDs written there ("INDEX XID" lines)."""
    scenario = tmp / "agent-gpus.json"
    scenario.write_text(json.dumps({"gpus": gpus if gpus is not None else [IDLE_H100]}))
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLUSTERCTL_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAKE_NVML_DIR),
                                                    env.get("PYTHONPATH", "")) if p)
    env["FAKE_NVML_SCENARIO"] = str(scenario)
    if xid_file is not None:
        env["FAKE_NVML_XID_FILE"] = str(xid_file)
    with (tmp / "agent.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "clusterctl", "agent", "run", "--config",
                                 str(conf), "-v"], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    try:
        yield proc
    finally:
        stop_process(proc)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, tmp: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    log = (tmp / "agent.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\nagent log:\n{log}")


def node_events(srv: FleetServer) -> list[dict[str, Any]]:
    status, answer = srv.admin("GET", f"/api/instances/{NODE}/events?limit=1000")
    return list(reversed(answer["events"])) if status == 200 else []


def state(srv: FleetServer) -> str | None:
    status, answer = srv.admin("GET", f"/api/instances/{NODE}/status")
    return answer["state"] if status == 200 else None


def local_events(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "state/events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_agent_enrols_takes_commands_and_is_lost_when_it_stops(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/fleet/fleet.db"
    srv = FleetServer(tmp_path, db).start()
    try:
        conf = agent_conf(tmp_path, srv.url, port=free_port())
        with agent_process(conf, tmp_path) as agent:
            wait_for("enrolment", lambda: state(srv) in ("running", "idle"), 60, tmp_path)
            token_path = tmp_path / "state/node-token"
            assert token_path.stat().st_mode & 0o777 == 0o600
            status, shown = srv.admin("GET", f"/api/instances/{NODE}/status")
            assert shown["gpus"] == 1 and shown["heartbeat"]["instance_id"] == NODE

            # a config change reaches the agent's config file and comes back in heartbeats
            status, _ = srv.admin("PUT", f"/api/instances/{NODE}/config",
                                       {"pause_after_minutes": 7})
            assert status == 202
            wait_for("the config change", lambda: (srv.admin(
                "GET", f"/api/instances/{NODE}/config")[1]["hibernate"] or {}).get(
                    "pause_after_minutes") == 7, 60, tmp_path)
            assert "pause_after_minutes = 7" in conf.read_text()

            # the control plane goes away; the agent keeps its events and sends them later
            srv.stop()
            status_q = None
            srv = FleetServer(tmp_path, db, port=srv.port).start()
            status_q, _ = srv.admin("POST", f"/api/instances/{NODE}/hibernate")
            assert status_q == 202
            mark = tmp_path / "hibernated-by-command"
            wait_for("the hibernate command's action", mark.exists, 60, tmp_path)
            wait_for("the acknowledgement", lambda: srv.admin(
                "GET", f"/api/instances/{NODE}/status")[1]["pending_commands"] == [], 60,
                tmp_path)

            def all_sent() -> bool:
                mine = [e["id"] for e in local_events(tmp_path)]
                theirs = [e["id"] for e in node_events(srv) if e["source"] == "node"]
                return bool(mine) and theirs == mine
            wait_for("every event, once each and in order", all_sent, 60, tmp_path)
            kinds = [e["event_type"] for e in node_events(srv)]
            assert "command_applied" in kinds and "hibernate_started" in kinds

            # its `hibernated` event: asleep as far as the fleet knows, not lost when silent
            assert state(srv) == "hibernated"
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
        srv.fleet.nodes[NODE].seen_mono = 0.0  # as if silent for ages
        srv.tick()
        assert state(srv) == "hibernated"
    finally:
        srv.stop()


def test_a_node_that_refuses_commands_says_so_and_runs_nothing(tmp_path: Path) -> None:
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/fleet.db") as srv:
        conf = agent_conf(tmp_path, srv.url, port=free_port(),
                          extra="accept_commands = false\n")
        with agent_process(conf, tmp_path):
            wait_for("enrolment", lambda: state(srv) in ("running", "idle"), 60, tmp_path)
            status, queued = srv.admin("POST", f"/api/instances/{NODE}/hibernate")
            assert status == 202
            failed = wait_for("the refusal", lambda: [
                e for e in node_events(srv) if e["event_type"] == "command_failed"], 60,
                tmp_path)
            assert failed[0]["command_id"] == queued["command"]["id"]
            assert "accept_commands" in failed[0]["error"]
            assert not (tmp_path / "hibernated-by-command").exists()
            status, shown = srv.admin("GET", f"/api/instances/{NODE}/status")
            assert shown["pending_commands"] == [] and shown["accept_commands"] is False
            interval = shown["next_interval_s"]
        stopped = time.monotonic()
        wait_for("lost", lambda: state(srv) == "lost", 3 * interval + 30, tmp_path)
        assert time.monotonic() - stopped <= 3 * interval + 5 + 2  # 3 intervals and the grace
        kinds = [e["event_type"] for e in node_events(srv)]
        assert kinds[-1] == "node_lost"
