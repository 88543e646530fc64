"""The control plane over real HTTP on 127.0.0.1, on SQLite and on a real PostgreSQL
(``database_url``): enrolment, heartbeats, events once each, commands, liveness, wake,
statistics, and what it answers to bad input."""

from __future__ import annotations

import socket
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import ADMIN, JOIN, Clock, FleetServer, event, heartbeat


def beat(srv: FleetServer, token: str, instance: str, **kw: Any) -> dict[str, Any]:
    status, answer = srv.request("POST", "/api/agent/status", heartbeat(instance, **kw),
                                 token=token)
    assert status == 200, answer
    return dict(answer)


def states(srv: FleetServer) -> dict[str, str]:
    status, answer = srv.admin("GET", "/api/instances")
    assert status == 200, answer
    return {n["instance_id"]: n["state"] for n in answer["instances"]}


def test_a_node_enrols_once_with_the_join_token_and_is_listed(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    assert len(token) >= 40 and token != JOIN
    assert states(server) == {"gpu-01": "running"}
    status, answer = server.request("POST", "/api/agent/enroll",
                                    {"instance_id": "gpu-01", "hostname": "x"}, token=JOIN)
    assert status == 409 and "already enrolled" in answer["error"]
    assert "revoke" in answer["fix"]
    status, answer = server.request("POST", "/api/agent/enroll",
                                    {"instance_id": "gpu-02"}, token="not-the-join-token")
    assert status == 401 and answer["error"]
    for bad in ("-rf", "a b", "", "x" * 300, 7, None, "../etc"):
        status, answer = server.request("POST", "/api/agent/enroll", {"instance_id": bad},
                                        token=JOIN)
        assert status == 400, (bad, answer)
    assert set(states(server)) == {"gpu-01"}


def test_a_heartbeat_is_answered_with_the_interval_and_no_commands(server: FleetServer
                                                                   ) -> None:
    token = server.enrol("gpu-01")
    answer = beat(server, token, "gpu-01", interval_s=30)
    assert answer == {"next_interval_s": 30, "commands": []}
    answer = beat(server, token, "gpu-01", interval_s=2)  # never under 10 s a node
    assert answer["next_interval_s"] == 10
    status, shown = server.admin("GET", "/api/instances/gpu-01/status")
    assert status == 200
    assert shown["mac"] == "52:54:00:12:34:56" and shown["gpus"] == 2
    assert shown["heartbeat"]["interval_s"] == 2


def test_the_server_spreads_a_large_fleet_to_max_heartbeats_per_s(tmp_path: Path,
                                                                   clock: Clock) -> None:
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock,
                     max_heartbeats_per_s=2) as srv:
        tokens = {f"n{i:02d}": srv.enrol(f"n{i:02d}") for i in range(90)}
        srv.tick()  # counts the live nodes
        answer = beat(srv, tokens["n00"], "n00")
        assert answer["next_interval_s"] == 45  # 90 nodes / 2 a second
        clock.advance(3 * 45 + 6)  # every node silent: lost, and still counted
        srv.tick()
        assert set(states(srv).values()) == {"lost"}
        answer = beat(srv, tokens["n00"], "n00")  # an overloaded server that lost its
        assert answer["next_interval_s"] == 45  # nodes must not ask for more heartbeats


def test_a_node_cannot_write_as_another_or_with_a_bad_token(server: FleetServer) -> None:
    a, b = server.enrol("gpu-a"), server.enrol("gpu-b")
    status, answer = server.request("POST", "/api/agent/status", heartbeat("gpu-b"), token=a)
    assert status == 403 and "gpu-a" in answer["error"]
    status, answer = server.request("POST", "/api/agent/events",
                                    [event("gpu-a", "e1"), event("gpu-b", "e2")], token=a)
    assert status == 403
    _, events = server.admin("GET", "/api/instances/gpu-b/events")
    assert [e for e in events["events"] if e["source"] == "node"] == []
    _, events = server.admin("GET", "/api/instances/gpu-a/events")
    assert [e for e in events["events"] if e["source"] == "node"] == []  # nothing half-stored
    for token in (None, "", "nope", ADMIN, JOIN):
        status, _ = server.request("POST", "/api/agent/status", heartbeat("gpu-a"),
                                   token=token)
        assert status == 401, token
    assert beat(server, b, "gpu-b")["commands"] == []


def test_a_revoked_node_is_refused_and_enrols_again_only_once_forgotten(server: FleetServer
                                                                         ) -> None:
    token = server.enrol("gpu-01")
    status, _ = server.admin("POST", "/api/instances/gpu-01/revoke", {})
    assert status == 200
    status, _ = server.request("POST", "/api/agent/status", heartbeat("gpu-01"), token=token)
    assert status == 401
    status, answer = server.request("POST", "/api/agent/enroll", {"instance_id": "gpu-01"},
                                    token=JOIN)
    assert status == 403 and "--forget" in answer["fix"]
    assert states(server) == {"gpu-01": "revoked"}
    status, _ = server.admin("POST", "/api/instances/gpu-01/revoke", {"forget": True})
    assert status == 200
    fresh = server.enrol("gpu-01")
    assert beat(server, fresh, "gpu-01")["commands"] == []


def test_events_are_stored_once_each_in_order_across_a_restart(tmp_path: Path,
                                                               database_url: str) -> None:
    with FleetServer(tmp_path, database_url) as srv:
        token = srv.enrol("gpu-01")
        batch = [event("gpu-01", f"e{i}", "idle_detected" if i % 2 else "active_again")
                 for i in range(5)]
        status, answer = srv.request("POST", "/api/agent/events", batch[:3], token=token)
        assert (status, answer) == (200, {"stored": 3, "duplicates": 0})
    with FleetServer(tmp_path, database_url, port=srv.port) as srv:  # the same database
        status, answer = srv.request("POST", "/api/agent/events", batch, token=token)
        assert (status, answer) == (200, {"stored": 2, "duplicates": 3})  # a resent batch
        _, shown = srv.admin("GET", "/api/instances/gpu-01/events?limit=100")
        node_events = [e["id"] for e in shown["events"] if e["source"] == "node"]
        assert node_events == ["e4", "e3", "e2", "e1", "e0"]  # newest first, each once
        assert states(srv) == {"gpu-01": "running"}


def test_a_command_is_sent_with_every_answer_until_the_node_acknowledges_it(
        server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    status, queued = server.admin("PUT", "/api/instances/gpu-01/config",
                                  {"pause_after_minutes": 10, "enabled": True})
    assert status == 202
    command = queued["command"]
    assert command["type"] == "set_hibernate"
    assert command["args"] == {"pause_after_minutes": 10, "enabled": True}
    status, _ = server.admin("POST", "/api/instances/gpu-01/hibernate")
    assert status == 202
    first = beat(server, token, "gpu-01")["commands"]
    assert [c["type"] for c in first] == ["set_hibernate", "hibernate"]
    assert beat(server, token, "gpu-01")["commands"] == first  # again, until acknowledged
    ack = event("gpu-01", "a1", "command_applied", command_id=first[0]["id"],
                command_type="set_hibernate")
    fail = event("gpu-01", "a2", "command_failed", command_id=first[1]["id"],
                 command_type="hibernate", error="refused")
    status, _ = server.request("POST", "/api/agent/events", [ack, fail], token=token)
    assert status == 200
    assert beat(server, token, "gpu-01")["commands"] == []
    _, shown = server.admin("GET", "/api/instances/gpu-01/status")
    assert shown["pending_commands"] == []


@pytest.mark.parametrize(("path", "method", "body", "word"), [
    ("/config", "PUT", {"command": ["/bin/sh"]}, "cannot change"),
    ("/config", "PUT", {"pause_after_minutes": -1}, "pause_after_minutes"),
    ("/config", "PUT", {"enabled": "yes"}, "true or false"),
    ("/config", "PUT", {}, "at least one"),
    ("/schedule", "PUT", {"wake": "25:00", "tz": "UTC"}, "wake"),
    ("/schedule", "PUT", {"wake": "09:00", "tz": "Mars/Olympus"}, "time zone"),
    ("/inhibit", "POST", {"duration_s": 0}, "duration_s"),
    ("/inhibit", "POST", {"duration_s": 60, "reason": "x" * 500}, "reason"),
])
def test_a_command_outside_the_closed_list_is_refused_and_nothing_is_queued(
        server: FleetServer, path: str, method: str, body: Any, word: str) -> None:
    token = server.enrol("gpu-01")
    status, answer = server.admin(method, f"/api/instances/gpu-01{path}", body)
    assert status == 400 and word in answer["error"], answer
    assert beat(server, token, "gpu-01")["commands"] == []


def test_a_silent_node_is_lost_after_three_intervals_and_back_when_it_heartbeats(
        server: FleetServer, clock: Clock) -> None:
    token = server.enrol("gpu-01")
    beat(server, token, "gpu-01", interval_s=30)
    clock.advance(3 * 30 + 4)  # within 3 intervals and the grace
    server.tick()
    assert states(server) == {"gpu-01": "running"}
    clock.advance(2)
    server.tick()
    assert states(server) == {"gpu-01": "lost"}
    beat(server, token, "gpu-01")
    assert states(server) == {"gpu-01": "running"}
    _, shown = server.admin("GET", "/api/instances/gpu-01/events")
    kinds = [e["event_type"] for e in shown["events"]]
    assert kinds[:2] == ["node_back", "node_lost"]


def test_a_node_that_said_it_was_going_to_sleep_is_hibernated_not_lost(
        server: FleetServer, clock: Clock) -> None:
    token = server.enrol("gpu-01")
    beat(server, token, "gpu-01", status="hibernating")
    clock.advance(3600)
    server.tick()
    assert states(server) == {"gpu-01": "hibernated"}
    _, stats = server.admin("GET", "/api/hibernation/stats")
    assert stats["hibernated"] == 1 and stats["lost"] == 0
    clock.advance(3600)
    _, stats = server.admin("GET", "/api/hibernation/stats")
    assert stats["hibernated_hours"] == pytest.approx(2, abs=0.01)  # since its last word
    assert stats["idle_gpu_hours_avoided"] == pytest.approx(2 * stats["hibernated_hours"],
                                                            abs=0.01)


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    return sock


def test_wake_on_lan_sends_the_magic_packet_and_a_silent_wake_fails_after_the_timeout(
        tmp_path: Path, database_url: str, clock: Clock) -> None:
    with _udp() as listener, FleetServer(
            tmp_path, database_url, clock=clock, wol_broadcast="127.0.0.1",
            wol_port=listener.getsockname()[1], resume_timeout_s=600) as srv:
        token = srv.enrol("gpu-01")
        beat(srv, token, "gpu-01", status="hibernating", mac="52:54:00:AB:cd:0F")
        status, answer = srv.admin("POST", "/api/instances/gpu-01/wake")
        assert status == 202, answer  # hibernating: it may be asleep already
        packet, _ = listener.recvfrom(1024)
        assert packet == b"\xff" * 6 + bytes.fromhex("525400abcd0f") * 16
        assert len(packet) == 102
        assert states(srv) == {"gpu-01": "waking"}
        status, answer = srv.admin("POST", "/api/instances/gpu-01/wake")
        assert status == 409  # already waking
        clock.advance(599)
        srv.tick()
        assert states(srv) == {"gpu-01": "waking"}
        clock.advance(2)
        srv.tick()
        assert states(srv) == {"gpu-01": "wake_failed"}
        beat(srv, token, "gpu-01", boot_id="b2")
        assert states(srv) == {"gpu-01": "running"}
        _, shown = srv.admin("GET", "/api/instances/gpu-01/events")
        kinds = [e["event_type"] for e in shown["events"]]
        assert kinds[:3] == ["woke", "wake_failed", "wake_sent"]


def _stand_in(tmp: Path, name: str, code: int = 0) -> tuple[Path, Path]:
    record = tmp / f"{name}.args"
    program = tmp / "bin" / name
    program.parent.mkdir(exist_ok=True)
    program.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit {code}\n')
    program.chmod(0o755)
    return program, record


def test_a_command_wake_runs_the_operators_argv_with_the_node_filled_in(
        tmp_path: Path, clock: Clock) -> None:
    program, record = _stand_in(tmp_path, "cloud-start")
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock, wake="command",
                     wake_command=(str(program), "--instance", "{instance_id}", "{mac}")
                     ) as srv:
        token = srv.enrol("gpu-01")
        beat(srv, token, "gpu-01")
        clock.advance(200)
        srv.tick()
        assert states(srv) == {"gpu-01": "lost"}
        status, answer = srv.admin("POST", "/api/instances/gpu-01/wake")
        assert status == 202, answer
        assert record.read_text().split() == ["--instance", "gpu-01", "52:54:00:12:34:56"]


def test_ipmi_wake_gives_the_password_as_a_file_never_in_argv(
        tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    program, record = _stand_in(tmp_path, "ipmitool")
    monkeypatch.setenv("PATH", f"{program.parent}:/usr/bin:/bin")
    password = tmp_path / "ipmi-password"
    password.write_text("s3cret\n")
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock, wake="ipmi",
                     ipmi_host="{hostname}-bmc", ipmi_user="admin",
                     ipmi_password_file=password) as srv:
        token = srv.enrol("gpu-01")
        beat(srv, token, "gpu-01", status="hibernating")
        status, answer = srv.admin("POST", "/api/instances/gpu-01/wake")
        assert status == 202, answer
        argv = record.read_text().split()
        assert argv == ["-I", "lanplus", "-H", "gpu-01-bmc", "-U", "admin", "-f",
                        str(password), "chassis", "power", "on"]
        assert "s3cret" not in record.read_text()


def test_a_failing_wake_says_why_and_leaves_the_node_as_it_was(tmp_path: Path,
                                                              clock: Clock) -> None:
    program, _ = _stand_in(tmp_path, "cloud-start", code=3)
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock, wake="command",
                     wake_command=(str(program),)) as srv:
        token = srv.enrol("gpu-01")
        beat(srv, token, "gpu-01", status="hibernating")
        status, answer = srv.admin("POST", "/api/instances/gpu-01/wake")
        assert status == 502 and "exited with 3" in answer["error"]
        assert states(srv) == {"gpu-01": "hibernating"}


def test_bad_requests_get_one_json_error_each(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    cases = [
        ("POST", "/api/agent/status", b"{not json", token, 400),
        ("POST", "/api/agent/status", b"[]", token, 400),
        ("POST", "/api/agent/status", b'{"instance_id": "gpu-01", "status": "asleep"}',
         token, 400),
        ("POST", "/api/agent/events", b'{"a": 1}', token, 400),
        ("POST", "/api/agent/events", b'[{"id": 5, "event_type": "x"}]', token, 400),
        ("POST", "/api/agent/events", b"[" + b"[" * 100000 + b"]" * 100000 + b"]", token, 400),
        ("POST", "/api/agent/events", b"x" * (2 << 20), token, 413),
        ("POST", "/api/agent/status", b'{"pad": "' + b"x" * (300 << 10) + b'"}', token, 413),
        ("GET", "/api/instances", None, None, 401),
        ("GET", "/api/instances", None, token, 401),
        ("GET", "/api/instances/nope/status", None, ADMIN, 404),
        ("GET", "/api/instances/gpu-01/events?limit=0", None, ADMIN, 400),
        ("GET", "/api/instances/gpu-01/events?limit=abc", None, ADMIN, 400),
        ("GET", "/no/such/path", None, ADMIN, 404),
    ]
    for method, path, raw, who, want in cases:
        status, answer = server.request(method, path, raw=raw, token=who)
        assert status == want, (path, raw and raw[:40], answer)
        assert isinstance(answer, dict) and answer["error"], (path, answer)
    assert beat(server, token, "gpu-01")["commands"] == []  # and it still serves


def test_healthz_is_open_and_metrics_need_the_admin_token(server: FleetServer) -> None:
    status, answer = server.request("GET", "/healthz")
    assert (status, answer["status"]) == (200, "ok")
    server.enrol("gpu-01")
    status, text = server.admin("GET", "/metrics")
    assert status == 200
    assert 'clusterctl_fleet_nodes{state="running"} 1.0' in text
    status, _ = server.request("GET", "/metrics")
    assert status == 401


def test_a_locked_database_is_a_503_and_the_events_are_not_acknowledged(
        tmp_path: Path, clock: Clock) -> None:
    db = tmp_path / "f.db"
    with FleetServer(tmp_path, f"sqlite:///{db}", clock=clock) as srv:
        token = srv.enrol("gpu-01")
        holder = sqlite3.connect(db, timeout=0)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            status, answer = srv.request("POST", "/api/agent/events",
                                         [event("gpu-01", "e1")], token=token)
            assert status == 503 and "unavailable" in answer["error"], answer
        finally:
            holder.rollback()
            holder.close()
        status, answer = srv.request("POST", "/api/agent/events", [event("gpu-01", "e1")],
                                     token=token)
        assert (status, answer) == (200, {"stored": 1, "duplicates": 0})


def test_a_postgresql_that_goes_away_is_a_503_and_the_server_recovers(
        tmp_path: Path, postgres_url: str, clock: Clock) -> None:
    import psycopg

    with FleetServer(tmp_path, postgres_url, clock=clock) as srv:
        token = srv.enrol("gpu-01")
        beat(srv, token, "gpu-01")  # what it reports is stored: the next one writes nothing
        name = postgres_url.rsplit("/", 1)[1]
        admin_url = postgres_url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (name,))
            try:
                status, answer = srv.request("POST", "/api/agent/events",
                                             [event("gpu-01", "e1")], token=token)
                assert status == 503 and "unavailable" in answer["error"], answer
                assert beat(srv, token, "gpu-01")["next_interval_s"] >= 10  # liveness: memory
                status, health = srv.request("GET", "/healthz")
                assert status == 503 and health["status"] == "unhealthy"
            finally:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        status, answer = srv.request("POST", "/api/agent/events", [event("gpu-01", "e1")],
                                     token=token)
        assert (status, answer) == (200, {"stored": 1, "duplicates": 0})


def test_the_sqlite_database_is_root_only(tmp_path: Path) -> None:
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/db/fleet.db"):
        pass
    assert stat.S_IMODE((tmp_path / "db/fleet.db").stat().st_mode) == 0o600
