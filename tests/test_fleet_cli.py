"""`clusterctl fleet serve` as the unit runs it (a subprocess, SIGTERM to stop), and the
operator's `clusterctl fleet ...` commands against it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.control_plane import free_port
from tests.fleet import ADMIN, JOIN, FleetServer, heartbeat, stop_process, token_file

CLI = [sys.executable, "-m", "clusterctl"]


def _config(tmp: Path, port: int, extra: str = "") -> Path:
    conf = tmp / "clusterctl.toml"
    conf.write_text(
        f'[fleet]\nlisten = "127.0.0.1:{port}"\ndatabase = "sqlite:///{tmp}/db/fleet.db"\n'
        f'join_token_file = "{token_file(tmp / "join", JOIN)}"\n'
        f'admin_token_file = "{token_file(tmp / "admin", ADMIN)}"\n{extra}'
        f'[paths]\nstate_dir = "{tmp / "state"}"\nrun_dir = "{tmp / "run"}"\n')
    return conf


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FleetServer, Path, subprocess.Popen[str]]]:
    port = free_port()
    conf = _config(tmp_path, port, f'wake = "command"\nwake_command = ["{tmp_path}/wake", '
                                   '"{instance_id}"]\n')
    wake = tmp_path / "wake"
    wake.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path}/woken\n')
    wake.chmod(0o755)
    proc = subprocess.Popen([*CLI, "fleet", "serve", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = FleetServer(tmp_path, "unused", port=port)  # only its HTTP helpers
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "fleet serve did not answer within 60 s"
            time.sleep(0.1)
        yield client, conf, proc
    finally:
        stop_process(proc)


def cli(conf: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, "fleet", *args, "--config", str(conf)], capture_output=True,
                          text=True, timeout=60, check=False)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def cli_json(conf: Path, *args: str) -> Any:
    return json.loads(cli(conf, *args, "--json").stdout)


def test_an_operator_sees_and_steers_the_fleet_from_the_command_line(
        served: tuple[FleetServer, Path, subprocess.Popen[str]], tmp_path: Path) -> None:
    client, conf, proc = served
    assert "no nodes have enrolled yet" in cli(conf, "nodes").stdout
    token = client.enrol("gpu-01")
    status, _ = client.request("POST", "/api/agent/status",
                               heartbeat("gpu-01", status="hibernating"), token=token)
    assert status == 200
    nodes = cli_json(conf, "nodes")
    assert [(n["instance_id"], n["state"]) for n in nodes] == [("gpu-01", "hibernating")]
    table = cli(conf, "nodes").stdout.splitlines()
    assert table[0].split()[:2] == ["INSTANCE_ID", "STATE"]
    assert table[1].split()[:2] == ["gpu-01", "hibernating"]

    queued = cli_json(conf, "hibernate", "gpu-01")
    assert queued["command"]["type"] == "hibernate"
    shown = cli_json(conf, "show", "gpu-01")
    assert [c["type"] for c in shown["pending_commands"]] == ["hibernate"]

    woken = cli_json(conf, "wake", "gpu-01")
    assert woken["state"] == "waking"
    assert (tmp_path / "woken").read_text() == "gpu-01\n"
    kinds = [e["event_type"] for e in cli_json(conf, "events", "gpu-01", "--limit", "3")]
    assert kinds == ["wake_sent", "command_queued", "node_enrolled"]
    assert cli_json(conf, "stats")["waking"] == 1

    assert cli_json(conf, "revoke", "gpu-01")["revoked"] is True
    status, _ = client.request("POST", "/api/agent/status", heartbeat("gpu-01"), token=token)
    assert status == 401

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_operator_commands_fail_with_one_clear_line(
        served: tuple[FleetServer, Path, subprocess.Popen[str]], tmp_path: Path) -> None:
    _client, conf, _proc = served
    done = cli(conf, "show", "nope", ok=False)
    assert done.returncode == 1
    assert done.stderr.startswith("clusterctl: ") and "no instance 'nope'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    wrong = token_file(tmp_path / "wrong", "not-the-admin-token")
    done = cli(conf, "nodes", "--token-file", str(wrong), ok=False)
    assert done.returncode == 1 and "admin token" in done.stderr
    done = cli(conf, "nodes", "--server", f"http://127.0.0.1:{free_port()}", ok=False)
    assert done.returncode == 1 and "did not answer" in done.stderr and "clusterctl-fleet" in \
        done.stderr


def test_serve_refuses_a_taken_port_and_a_bad_database_with_the_fix(tmp_path: Path) -> None:
    port = free_port()
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run([*CLI, "fleet", "serve", "--config", str(_config(tmp_path, port))],
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "[fleet] listen" in \
        done.stderr
    conf = tmp_path / "pg.toml"
    conf.write_text(f'[fleet]\ndatabase = "postgresql://nobody@127.0.0.1:{free_port()}/fleet"\n'
                    f'listen = "127.0.0.1:{port}"\n[paths]\nstate_dir = "{tmp_path}/s"\n'
                    f'run_dir = "{tmp_path}/r"\n')
    done = subprocess.run([*CLI, "fleet", "serve", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "the fleet database postgresql://nobody@127.0.0.1:" in done.stderr
    assert "unavailable" in done.stderr and "Traceback" not in done.stderr


def test_text_a_node_sent_cannot_drive_the_operators_terminal(
        served: tuple[FleetServer, Path, subprocess.Popen[str]]) -> None:
    client, conf, _proc = served
    token = client.enrol("gpu-01")
    hostile = "\x1b]0;pwned\x07\x1b[2J"
    status, _ = client.request("POST", "/api/agent/events", [
        {"id": "e1", "event_type": "idle_detected", "instance_id": "gpu-01",
         "timestamp": "2027-01-01T00:00:00Z", "reason": hostile}], token=token)
    assert status == 200
    for args in (("events", "gpu-01"), ("show", "gpu-01"), ("nodes",)):
        out = cli(conf, *args).stdout
        assert "\x1b" not in out and "\x07" not in out, args
    assert "pwned" in cli(conf, "events", "gpu-01").stdout  # shown, defused
