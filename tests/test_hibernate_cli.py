"""`clusterctl hibernate ...` as an operator runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_NVML_DIR, H100, REPO, wait_until, write_scenario
from tests.fakes.control_plane import free_port, running


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "clusterctl.toml"
    shutil.copy(REPO / "etc/clusterctl.toml", path)  # the shipped, commented file
    text = path.read_text().replace('state_dir = "/var/lib/clusterctl"',
                                    f'state_dir = "{tmp_path / "state"}"')
    text = text.replace('listen = "127.0.0.1:9408"', f'listen = "127.0.0.1:{free_port()}"')
    text = text.replace('token_file = "/etc/clusterctl/api-token"',
                        f'token_file = "{tmp_path / "api-token"}"')
    path.write_text(text.replace('run_dir = "/run/clusterctl"', f'run_dir = "{tmp_path}/run"'))
    return path


def cli(conf: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "CLUSTERCTL_CONFIG"} | (env or {})
    return subprocess.run([sys.executable, "-m", "clusterctl", "hibernate", *args, "--config",
                           str(conf)], capture_output=True, text=True, env=full, timeout=60,
                          check=False)


def test_status_has_the_control_planes_fields(conf: Path) -> None:
    data = json.loads(cli(conf, "status", "--json").stdout)
    assert data["status"] == "running"
    assert data["auto_hibernation"] == {"enabled": False, "pause_after_minutes": 3.0,
                                        "gpu_usage_threshold": 5.0}
    assert set(data) >= {"instance_id", "gpu_utilization", "last_activity"}


def test_config_set_validates_and_keeps_the_comments(conf: Path) -> None:
    done = cli(conf, "config", "--set", "pause_after_minutes=10", "--set", "enabled=true")
    assert done.returncode == 0, done.stderr
    text = conf.read_text()
    assert "pause_after_minutes = 10" in text and "enabled = true" in text
    assert "# Idle minutes before the action runs." in text
    bad = cli(conf, "config", "--set", "action=teleport")
    assert bad.returncode == 2
    assert 'unknown action "teleport"' in bad.stderr
    assert "pause_after_minutes = 10" in conf.read_text()  # unchanged by the bad one


def test_now_runs_the_actions_and_records_the_events(conf: Path, tmp_path: Path) -> None:
    marker = tmp_path / "snap"
    with running() as plane:
        cli(conf, "config", "--set", "action=command,control", "--set",
            f"command=touch,{marker}")
        text = conf.read_text().replace('control_url = ""', f'control_url = "{plane.url}"')
        conf.write_text(text.replace('token_file = "/etc/clusterctl/token"',
                                     f'token_file = "{tmp_path / "token"}"'))
        dry = cli(conf, "now", "--dry-run")
        assert dry.stdout.splitlines() == [
            f"would run command: touch {marker}",
            f"would run control: POST {plane.url}/api/instances/{os.uname().nodename}"
            "/hibernate"]
        assert not marker.exists()
        done = cli(conf, "now")
    assert done.returncode == 0, done.stderr
    assert marker.exists() and len(plane.hibernate_requests) == 1
    events = json.loads(cli(conf, "events", "--json", "--limit", "5").stdout)["events"]
    assert [e["event_type"] for e in events] == ["hibernated", "hibernate_started"]
    assert "control plane accepted: snapshot" in events[0]["reason"]


def test_a_failing_action_exits_1_and_is_an_event(conf: Path) -> None:
    cli(conf, "config", "--set", "action=command", "--set", "command=false")
    done = cli(conf, "now")
    assert done.returncode == 1
    assert "command failed: false exited 1" in done.stdout
    events = json.loads(cli(conf, "events", "--json").stdout)["events"]
    assert events[0]["event_type"] == "hibernate_failed"


def test_inhibit_shows_in_status_and_clears(conf: Path) -> None:
    assert cli(conf, "inhibit", "--for", "2h", "--why", "training").returncode == 0
    data = json.loads(cli(conf, "status", "--json").stdout)
    assert data["inhibited_by"].startswith("clusterctl hibernate inhibit (120 min left): "
                                           "training")
    assert cli(conf, "inhibit", "--for", "soon").returncode == 2
    cli(conf, "inhibit", "--clear")
    held = json.loads(cli(conf, "status", "--json").stdout)["inhibited_by"]
    assert held is None or held.startswith("systemd inhibitor")  # this host's own, if any


def test_heartbeat_once_sends_the_payload(conf: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path / "gpus.json", {"gpus": [{**H100, "uuid": "GPU-0",
                                                                  "utilization_gpu": 42}]})
    env = {"PYTHONPATH": str(FAKE_NVML_DIR), "FAKE_NVML_SCENARIO": str(scenario)}
    with running() as plane:
        conf.write_text(conf.read_text().replace('control_url = ""',
                                                 f'control_url = "{plane.url}"'))
        done = cli(conf, "heartbeat", "--once", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("heartbeat accepted")
    (beat,) = plane.heartbeats
    assert beat["gpu_utilization"] == 42.0 and beat["status"] == "running"


def with_control_plane(conf: Path, url: str, tmp_path: Path) -> None:
    text = conf.read_text().replace('control_url = ""', f'control_url = "{url}"')
    conf.write_text(text.replace('token_file = "/etc/clusterctl/token"',
                                 f'token_file = "{tmp_path / "token"}"'))


def test_now_without_an_agent_drains_and_keeps_the_state_as_the_agent_would(
        conf: Path, tmp_path: Path) -> None:
    """No agent runs: the command runs the agent's own sequence: a last heartbeat saying
    `hibernating` and the pending events reach the control plane before the action, and
    the node's state ends `hibernated`, as `hibernate status` shows."""
    marker = tmp_path / "snap"
    with running() as plane:
        with_control_plane(conf, plane.url, tmp_path)
        cli(conf, "config", "--set", "action=command,control", "--set",
            f"command=touch,{marker}")
        cli(conf, "schedule", "set", "--wake", "07:30", "--tz", "UTC")
        done = cli(conf, "now")
        received = [(r.kind, r.payload) for r in plane.received_list()]
    assert done.returncode == 0, done.stderr
    kinds = [kind for kind, _ in received]
    assert kinds == ["heartbeat", "events", "hibernate"], kinds  # drained, then the action
    beat = received[0][1]
    assert beat["status"] == "hibernating"
    assert beat["schedule"]["wake_at"].endswith("T07:30:00Z")  # the agent's payload
    assert [e["event_type"] for e in received[1][1]] == ["hibernate_started"]
    status = json.loads(cli(conf, "status", "--json").stdout)
    assert status["status"] == "hibernated"
    events = json.loads(cli(conf, "events", "--json").stdout)["events"]
    assert [e["event_type"] for e in events] == ["hibernated", "hibernate_started"]


def test_now_with_a_running_agent_asks_the_agent(
        conf: Path, tmp_path: Path, start_agent: Any) -> None:
    """The agent owns the hibernation state: the command asks it (one writer, one
    sequence), and the agent's state is the one that moves."""
    marker = tmp_path / "snap"
    (tmp_path / "api-token").write_text("s3cret\n")
    (tmp_path / "api-token").chmod(0o600)
    cli(conf, "config", "--set", "action=command", "--set", f"command=touch,{marker}")
    agent, _ = start_agent(conf)
    done = cli(conf, "now")
    assert done.returncode == 0, done.stderr
    assert "the agent is putting the node to sleep" in done.stdout
    wait_until(lambda: agent.hibernation.state.status == "hibernated", 15)
    assert marker.exists()
    events = json.loads(cli(conf, "events", "--json").stdout)["events"]
    kinds = [e["event_type"] for e in events]
    assert kinds[:2] == ["hibernated", "hibernate_started"] and kinds.count("hibernated") == 1
    assert events[1]["reason"] == "clusterctl hibernate now"


def test_now_through_an_agent_without_a_token_says_how_to_allow_it(
        conf: Path, tmp_path: Path, start_agent: Any) -> None:
    marker = tmp_path / "snap"
    cli(conf, "config", "--set", "action=command", "--set", f"command=touch,{marker}")
    agent, _ = start_agent(conf)
    done = cli(conf, "now")
    assert done.returncode != 0
    assert "the agent refused: changes are disabled" in done.stderr
    assert "create [api] token_file" in done.stderr
    assert not marker.exists() and agent.hibernation.state.status in ("running", "idle")


def test_heartbeat_once_sends_the_agents_payload(conf: Path, tmp_path: Path) -> None:
    """The same builder as the agent's: the schedule, and CLOCK_MONOTONIC."""
    with running() as plane:
        with_control_plane(conf, plane.url, tmp_path)
        cli(conf, "schedule", "set", "--wake", "07:30", "--sleep", "19:00", "--tz", "UTC")
        before = time.monotonic()
        assert cli(conf, "heartbeat", "--once").returncode == 0
        (beat,) = plane.heartbeats
    assert before <= beat["monotonic_s"] <= time.monotonic()
    assert beat["schedule"]["timezone"] == "UTC"
    assert beat["schedule"]["sleep_at"].endswith("T19:00:00Z")
    assert {"used_percent", "total_bytes", "available_bytes"} <= set(beat["memory"])
