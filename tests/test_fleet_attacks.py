"""The control plane attacked through its real HTTP interface and its config: a hostile
node, a hostile operator client, a hostile peer and a broken host. Whatever they send,
the answer is one JSON error (never a 500 or a traceback), nothing is lost or stored
twice, and the server keeps serving."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from clusterctl.errors import ClusterctlError
from clusterctl.fleet.store import engine_url, open_store
from tests.fleet import ADMIN, JOIN, Clock, FleetServer, event, heartbeat
from tests.loopfs import loop_mount


def strict(text: str) -> Any:
    """JSON as any strict parser reads it (no NaN, no Infinity)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def raw(srv: FleetServer, method: str, path: str, data: bytes = b"", *,
        token: str | bytes | None = None, head: bytes = b"") -> tuple[int, str]:
    """One request written byte by byte (headers no client library would send)."""
    auth = b""
    if token is not None:
        auth = b"Authorization: Bearer " + (token.encode() if isinstance(token, str)
                                            else token) + b"\r\n"
    message = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               f"Content-Length: {len(data)}\r\nContent-Type: application/json\r\n"
               ).encode() + auth + head + b"\r\n" + data
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(message)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), body.decode(errors="replace")


def beat(srv: FleetServer, token: str, instance: str, **kw: Any) -> dict[str, Any]:
    status, answer = srv.request("POST", "/api/agent/status", heartbeat(instance, **kw),
                                 token=token)
    assert status == 200, answer
    return dict(answer)


def listed(srv: FleetServer) -> dict[str, dict[str, Any]]:
    """/api/instances, read strictly."""
    status, text = raw(srv, "GET", "/api/instances", token=ADMIN)
    assert status == 200, text
    return {n["instance_id"]: n for n in strict(text)["instances"]}


def stored_events(srv: FleetServer, instance: str) -> list[dict[str, Any]]:
    status, text = raw(srv, "GET", f"/api/instances/{instance}/events?limit=1000",
                       token=ADMIN)
    assert status == 200, text
    return [e for e in strict(text)["events"] if e["source"] == "node"]


# -- tokens ------------------------------------------------------------------------------
HOSTILE_TOKENS: list[bytes] = [
    b"", b" ", b"x" * 4000, "é".encode(), b"\xff\xfe\x80", "字".encode(), b"a\tb",
    JOIN.encode() + b"\xff", ADMIN.encode()[:-1], b"tok, Bearer " + ADMIN.encode(),
]


def test_tokens_of_any_shape_are_a_json_401_and_never_a_500(server: FleetServer) -> None:
    node_token = server.enrol("gpu-01")
    paths = [("POST", "/api/agent/status"), ("POST", "/api/agent/events"),
             ("POST", "/api/agent/enroll"), ("GET", "/api/instances"),
             ("POST", "/api/instances/gpu-01/hibernate"), ("GET", "/metrics")]
    for token in HOSTILE_TOKENS:
        for method, path in paths:
            status, text = raw(server, method, path, b"{}", token=token)
            assert status == 401, (token[:20], path, text)
            assert strict(text)["error"] and ADMIN not in text and JOIN not in text
    # a header that smuggles a second Authorization line is still one wrong token
    status, text = raw(server, "GET", "/api/instances", token=b"nope",
                       head=b"Authorization: Bearer " + ADMIN.encode() + b"\r\n")
    assert status in (400, 401), text
    # a header over aiohttp's limit, or with a control character, is refused by its HTTP
    # parser (a plain-text 400, before any handler), and the server goes on
    for token in (b"x" * 20000, b"\x01tok", b"tok\x00"):
        status, _ = raw(server, "GET", "/api/instances", token=token)
        assert status in (400, 413, 431), token[:10]
    assert beat(server, node_token, "gpu-01")["commands"] == []


def test_a_node_cannot_act_for_another_on_any_path(server: FleetServer) -> None:
    a, b = server.enrol("gpu-a"), server.enrol("gpu-b")
    status, _ = server.request("POST", "/api/agent/status", heartbeat("gpu-b"), token=a)
    assert status == 403
    batch = [event("gpu-a", "e1"), event("gpu-b", "e2")]
    status, _ = server.request("POST", "/api/agent/events", batch, token=a)
    assert status == 403
    assert stored_events(server, "gpu-a") == [] and stored_events(server, "gpu-b") == []
    status, _ = server.request("POST", "/api/instances/gpu-b/hibernate", token=a)
    assert status == 401
    for path in ("/api/instances/gpu-b/wake", "/api/instances/gpu-b/revoke",
                 "/api/instances/gpu-a/revoke"):
        status, _ = server.request("POST", path, {}, token=a)
        assert status == 401, path
    assert {k: v["state"] for k, v in listed(server).items()} == {"gpu-a": "running",
                                                                  "gpu-b": "running"}
    assert beat(server, b, "gpu-b")["commands"] == []


def _trickle(srv: FleetServer, path: str, token: str, body: bytes) -> tuple[socket.socket,
                                                                            bytes]:
    """Headers and all but the last byte of the body; the caller sends the rest."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:-1])
    return sock, body[-1:]


def _finish(sock: socket.socket, rest: bytes) -> int:
    with sock:
        sock.sendall(rest)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split()[1])


@pytest.mark.parametrize("forget", [False, True])
def test_a_token_revoked_while_its_request_is_in_flight_is_refused(
        server: FleetServer, forget: bool) -> None:
    token = server.enrol("gpu-01")
    beat(server, token, "gpu-01")
    events_sock, events_rest = _trickle(server, "/api/agent/events", token,
                                        json.dumps([event("gpu-01", "late")]).encode())
    beat_sock, beat_rest = _trickle(server, "/api/agent/status", token,
                                    json.dumps(heartbeat("gpu-01", status="idle")).encode())
    time.sleep(0.3)  # both requests are past the token check, waiting for their body
    status, _ = server.admin("POST", "/api/instances/gpu-01/revoke", {"forget": forget})
    assert status == 200
    assert _finish(events_sock, events_rest) == 401
    assert _finish(beat_sock, beat_rest) == 401
    if forget:
        assert listed(server) == {}
        status, _ = server.admin("GET", "/api/instances/gpu-01/events")
        assert status == 404
        server.enrol("gpu-01")  # it enrols afresh, with no history but its enrolment
    else:
        assert listed(server)["gpu-01"]["state"] == "revoked"
    assert stored_events(server, "gpu-01") == []


def test_a_trailing_newline_does_not_slip_an_id_or_a_mac_past_the_checks(
        server: FleetServer) -> None:
    status, answer = server.request("POST", "/api/agent/enroll",
                                    {"instance_id": "gpu-01\n", "hostname": "x"}, token=JOIN)
    assert status == 400, answer
    token = server.enrol("gpu-01")
    beat(server, token, "gpu-01", mac="52:54:00:12:34:57\n")
    assert listed(server)["gpu-01"]["mac"] is None  # not a MAC: not taken
    assert set(listed(server)) == {"gpu-01"}


# -- bodies ------------------------------------------------------------------------------
def test_malformed_huge_and_deep_bodies_are_4xx_and_the_server_goes_on(
        server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    bodies = [b"\xff\xfe{", b"\x00", b"{" * 5000, b'{"a": ' * 3000 + b"1" + b"}" * 3000,
              b"[" * 900 + b"]" * 900, b"1" * 5000, b'"' + b"x" * 1000 + b'"',
              json.dumps({"instance_id": "gpu-01", "status": "running",
                          "hibernate": {"x": "y" * (1 << 20)}}).encode()]
    for path in ("/api/agent/status", "/api/agent/events", "/api/agent/enroll"):
        for body in bodies:
            status, text = raw(server, "POST", path, body,
                               token=JOIN if "enroll" in path else token)
            assert status in (400, 401, 413), (path, body[:30], text[:200])
            assert strict(text)["error"]
    # a deep heartbeat the parser accepts is kept and shown back
    deep: Any = "bottom"
    for _ in range(400):
        deep = {"d": deep}
    beat(server, token, "gpu-01", hibernate={"enabled": True, "deep": deep})
    status, text = raw(server, "GET", "/api/instances/gpu-01/status", token=ADMIN)
    assert status == 200 and strict(text)["heartbeat"]["hibernate"]["deep"]["d"]


def test_a_batch_of_10000_events_is_stored_once_each_and_one_more_is_refused(
        server: FleetServer) -> None:
    a, b = server.enrol("gpu-a"), server.enrol("gpu-b")
    batch = [{"id": f"e{i}", "event_type": "x", "instance_id": "gpu-a"} for i in range(10000)]
    started = time.monotonic()
    status, answer = server.request("POST", "/api/agent/events", batch, token=a)
    took_s = time.monotonic() - started
    assert (status, answer) == (200, {"stored": 10000, "duplicates": 0})
    assert took_s < 20, took_s
    status, answer = server.request("POST", "/api/agent/events", batch, token=a)
    assert (status, answer) == (200, {"stored": 0, "duplicates": 10000})
    status, answer = server.request("POST", "/api/agent/events",
                                    [*batch, {**batch[0], "id": "one-more"}], token=a)
    assert status == 413 and "10000" in answer["error"]
    same_ids = [{**e, "instance_id": "gpu-b"} for e in batch[:3]] * 2  # and repeated
    status, answer = server.request("POST", "/api/agent/events", same_ids, token=b)
    assert (status, answer) == (200, {"stored": 3, "duplicates": 3})
    assert [e["id"] for e in stored_events(server, "gpu-b")] == ["e2", "e1", "e0"]


BAD_TEXT = ["a\x00b", "\ud800", "x" * 129, "\x1b]0;owned\x07", "", "line\nbreak"]


def test_event_ids_and_types_a_database_cannot_hold_are_a_400_not_a_503(
        server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    for bad in BAD_TEXT:
        for key in ("id", "event_type"):
            one = {**event("gpu-01", "good"), key: bad}
            status, text = raw(server, "POST", "/api/agent/events",
                               json.dumps([event("gpu-01", "ok"), one]).encode(), token=token)
            assert status == 400, (key, bad[:10], text)
            assert strict(text)["error"]
    assert stored_events(server, "gpu-01") == []  # nothing of a refused batch
    # NUL and lone surrogates in the details are kept as the node sent them
    odd = event("gpu-01", "odd", reason="a\x00b\ud800", detail={"k\x00": ["\udfff"]})
    status, answer = server.request("POST", "/api/agent/events", [odd], token=token)
    assert (status, answer) == (200, {"stored": 1, "duplicates": 0}), answer
    shown = stored_events(server, "gpu-01")[0]
    assert shown["reason"] == "a\x00b\ud800" and shown["detail"] == {"k\x00": ["\udfff"]}


def test_a_command_failure_with_unstorable_text_still_acknowledges_the_command(
        server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    beat(server, token, "gpu-01")
    for n, error in enumerate(["bad\x00byte", "\ud800 lone", "x" * 100000]):
        status, answer = server.admin("POST", "/api/instances/gpu-01/hibernate")
        assert status == 202
        command_id = answer["command"]["id"]
        ack = event("gpu-01", f"ack-{n}", "command_failed", command_id=command_id,
                    command_type="hibernate", error=error)
        status, answer = server.request("POST", "/api/agent/events", [ack], token=token)
        assert (status, answer) == (200, {"stored": 1, "duplicates": 0}), error[:10]
        assert beat(server, token, "gpu-01")["commands"] == []


@pytest.mark.parametrize("key", ["hostname", "interface", "agent_version", "boot_id"])
def test_heartbeat_text_that_cannot_be_stored_or_shown_is_dropped_not_a_503(
        server: FleetServer, key: str) -> None:
    token = server.enrol("gpu-01")
    beat(server, token, "gpu-01")
    before = listed(server)["gpu-01"]
    for bad in ["a\x00b", "\ud800", "\x1b[2J\x1b]0;owned\x07", "b" * 300]:
        body = heartbeat("gpu-01")
        if key == "interface":
            body["net"]["interface"] = bad
        else:
            body[key] = bad
        status, text = raw(server, "POST", "/api/agent/status", json.dumps(body).encode(),
                           token=token)
        assert status == 200, (bad[:10], text)
        shown = listed(server)["gpu-01"]
        assert shown[key] == before[key], (bad[:10], shown[key])


NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e309", b"-1e309", b"1" + b"0" * 400,
           b"1" + b"0" * 4400]


def test_non_finite_and_huge_numbers_never_reach_an_answer(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    template = json.dumps(heartbeat("gpu-01", hibernate={"gpu_usage_threshold": 5}))
    for number in NUMBERS:
        body = template.replace('"gpu_utilization": 0.0', '"gpu_utilization": NUM') \
            .replace('"gpu_usage_threshold": 5', '"gpu_usage_threshold": NUM') \
            .replace('"interval_s": 30', '"interval_s": NUM').encode().replace(b"NUM", number)
        status, text = raw(server, "POST", "/api/agent/status", body, token=token)
        assert status in (200, 400), (number[:10], text)
        if status == 200:
            assert strict(text)["next_interval_s"] >= 10
        ev = b'[{"id": "n-%d", "event_type": "x", "instance_id": "gpu-01", "v": %s}]' % (
            len(number), number)
        status, text = raw(server, "POST", "/api/agent/events", ev, token=token)
        assert status in (200, 400), (number[:10], text)
        for path in ("/config", "/inhibit"):
            args = b'{"gpu_usage_threshold": %s}' % number if path == "/config" else \
                b'{"duration_s": %s, "reason": "x"}' % number
            status, text = raw(server, "PUT" if path == "/config" else "POST",
                               f"/api/instances/gpu-01{path}", args, token=ADMIN)
            assert status == 400, (path, number[:10], text)
    for path in ("/api/instances", "/api/instances/gpu-01/status",
                 "/api/instances/gpu-01/config", "/api/instances/gpu-01/events",
                 "/api/hibernation/stats"):
        status, text = raw(server, "GET", path, token=ADMIN)
        assert status == 200, (path, text)
        strict(text)
    status, text = raw(server, "GET", "/metrics", token=ADMIN)
    assert status == 200 and "NaN" not in text


WRONG = [None, True, 0, -1, 1.5, "", "running", [], [1, "a"], {}, {"a": {"b": None}}]


def test_a_heartbeat_with_any_field_of_the_wrong_type_is_never_a_500(
        server: FleetServer, clock: Clock) -> None:
    token = server.enrol("gpu-01")
    keys = [*heartbeat("gpu-01"), "net", "schedule"]
    for key in keys:
        for value in WRONG:
            body = {**heartbeat("gpu-01"), key: value}
            status, text = raw(server, "POST", "/api/agent/status", json.dumps(body).encode(),
                               token=token)
            assert status in (200, 400, 403), (key, value, text)
            assert strict(text)
    for sched in [{"wake_at": v} for v in [*WRONG, "9999-12-31T23:59:59-14:00",
                                           "0001-01-01T00:00:00+14:00", "2020-02-30T00:00",
                                           "0001-01-01T00:00", "9999-12-31T23:59",
                                           "2020-01-01T00:00:00\x00"]]:
        beat(server, token, "gpu-01", status="hibernating", schedule=sched)
        clock.advance(1000)
        server.tick()  # the liveness pass copes with whatever the node reported
    for path in ("/api/instances", "/api/instances/gpu-01/status",
                 "/api/instances/gpu-01/schedule", "/api/hibernation/stats"):
        status, text = raw(server, "GET", path, token=ADMIN)
        assert status == 200, (path, text)


@pytest.mark.parametrize("limit", ["\u00b2", "\u0661\u0662", "+5", " 5", "-1", "1e3",
                                   "9" * 5000, "\uff15"])
def test_an_events_limit_that_is_not_plain_digits_is_a_400(server: FleetServer,
                                                            limit: str) -> None:
    server.enrol("gpu-01")
    from urllib.parse import quote
    status, answer = server.admin("GET", f"/api/instances/gpu-01/events?limit={quote(limit)}")
    assert status == 400, answer
    assert "limit" in answer["error"]


def test_command_args_at_their_limits(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    ok = [("POST", "/inhibit", {"duration_s": 1, "reason": ""}),
          ("POST", "/inhibit", {"duration_s": 31536000, "reason": "r" * 200}),
          ("PUT", "/config", {"gpu_usage_threshold": 0}),
          ("PUT", "/config", {"gpu_usage_threshold": 100.0, "enabled": False}),
          ("PUT", "/config", {"pause_after_minutes": 1}),
          ("PUT", "/config", {"pause_after_minutes": 10080}),
          ("PUT", "/schedule", {"wake": "23:59", "sleep": "00:00", "tz": "Pacific/Kiritimati"})]
    bad = [("POST", "/inhibit", {"duration_s": 0, "reason": ""}),
           ("POST", "/inhibit", {"duration_s": 31536001, "reason": ""}),
           ("POST", "/inhibit", {"duration_s": True, "reason": ""}),
           ("POST", "/inhibit", {"duration_s": 60.0, "reason": ""}),
           ("POST", "/inhibit", {"duration_s": 60, "reason": "r" * 201}),
           ("POST", "/inhibit", {"duration_s": 60, "reason": "a\x00b"}),
           ("POST", "/inhibit", {"duration_s": 60, "reason": "\ud800"}),
           ("POST", "/inhibit", {"duration_s": 60, "reason": "x", "run": "rm -rf /"}),
           ("PUT", "/config", {}),
           ("PUT", "/config", {"gpu_usage_threshold": 100.0001}),
           ("PUT", "/config", {"gpu_usage_threshold": "5"}),
           ("PUT", "/config", {"action": "command"}),
           ("PUT", "/config", {"enabled": 1}),
           ("PUT", "/config", {"pause_after_minutes": 0.5}),  # the agent takes whole minutes
           ("PUT", "/config", {"pause_after_minutes": 10081}),
           ("PUT", "/config", {"pause_after_minutes": 1.0}),
           ("PUT", "/schedule", {"wake": "9:00", "tz": "UTC"}),  # the agent wants HH:MM
           ("PUT", "/schedule", {"wake": "24:00", "tz": "UTC"}),
           ("PUT", "/schedule", {"wake": "09:00", "tz": "\x00"}),
           ("PUT", "/schedule", {"wake": "09:00", "tz": "../../../etc/passwd"}),
           ("PUT", "/schedule", {"wake": "09:00", "tz": "/etc/localtime"}),
           ("PUT", "/schedule", {"wake": "09:00", "tz": "U" * 65}),
           ("PUT", "/schedule", {"wake": "\u0660\u0669:\u0660\u0660", "tz": "UTC"}),
           ("PUT", "/schedule", {"wake": "09:00\n", "tz": "UTC"}),
           ("PUT", "/schedule", {})]
    for method, path, body in ok:
        status, answer = server.admin(method, f"/api/instances/gpu-01{path}", body)
        assert status == 202, (path, body, answer)
    for method, path, body in bad:
        status, text = raw(server, method, f"/api/instances/gpu-01{path}",
                           json.dumps(body).encode(), token=ADMIN)
        assert status == 400, (path, body, text)
        assert strict(text)["error"]
    assert len(beat(server, token, "gpu-01")["commands"]) == len(ok)


# -- many and slow clients ---------------------------------------------------------------
def test_slow_and_idle_connections_do_not_stop_the_fleet(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    body = json.dumps(heartbeat("gpu-01")).encode()
    held: list[socket.socket] = []
    try:
        for n in range(300):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if n % 3 == 0:  # a body that trickles, holding the node's own path
                sock.sendall(f"POST /api/agent/status HTTP/1.1\r\nHost: x\r\n"
                             f"Authorization: Bearer {token}\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            elif n % 3 == 1:  # headers that never end
                sock.sendall(b"POST /api/agent/events HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)  # else: connected and silent
        started = time.monotonic()
        assert beat(server, token, "gpu-01")["commands"] == []
        status, _ = server.request("POST", "/api/agent/events", [event("gpu-01", "e1")],
                                   token=token)
        assert status == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in held:
            sock.close()


def test_many_nodes_at_once_are_all_answered(server: FleetServer) -> None:
    tokens = {f"n{i:03d}": server.enrol(f"n{i:03d}") for i in range(40)}
    failures: list[Any] = []

    def node(name: str) -> None:
        for n in range(5):
            status, answer = server.request("POST", "/api/agent/events",
                                            [event(name, f"e{n}")], token=tokens[name])
            if status != 200:
                failures.append((name, status, answer))
            status, answer = server.request("POST", "/api/agent/status",
                                            heartbeat(name, status="idle" if n % 2 else
                                                      "running"), token=tokens[name])
            if status != 200:
                failures.append((name, status, answer))

    threads = [threading.Thread(target=node, args=(name,)) for name in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert all(len(stored_events(server, name)) == 5 for name in ("n000", "n039"))


# -- a broken host -----------------------------------------------------------------------
def test_a_full_disk_under_sqlite_is_a_503_and_nothing_is_lost(tmp_path: Path,
                                                               clock: Clock) -> None:
    with loop_mount(tmp_path, size_mib=32) as mnt:
        with FleetServer(tmp_path, f"sqlite:///{mnt}/fleet.db", clock=clock) as srv:
            token = srv.enrol("gpu-01")
            filler = mnt / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"],
                           capture_output=True, check=False)
            big = [{**event("gpu-01", f"e{i}"), "pad": "p" * 500} for i in range(1500)]
            status, answer = srv.request("POST", "/api/agent/events", big, token=token)
            assert status == 503, answer
            assert "unavailable" in answer["error"] and "space" in answer["fix"]
            assert beat(srv, token, "gpu-01")["next_interval_s"] >= 10  # liveness: memory
            clock.advance(200)
            srv.tick()  # the loop cannot write "lost": it says so and goes on
            status, _ = srv.request("GET", "/healthz")
            assert status in (200, 503)
            filler.unlink()
            status, answer = srv.request("POST", "/api/agent/events", big, token=token)
            assert (status, answer) == (200, {"stored": 1500, "duplicates": 0})
            srv.tick()
            assert listed(srv)["gpu-01"]["state"] == "lost"
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(ClusterctlError) as raised:
            open_store(f"sqlite:///{mnt}/fleet.db")
        assert raised.value.fix


def test_a_sqlite_path_that_is_a_directory_or_a_symlink_is_refused_clearly(
        tmp_path: Path) -> None:
    directory = tmp_path / "dir.db"
    directory.mkdir()
    with pytest.raises(ClusterctlError) as raised:
        open_store(f"sqlite:///{directory}")
    assert str(directory) in raised.value.message and raised.value.fix
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("precious\n")
    elsewhere.chmod(0o644)
    link = tmp_path / "link.db"
    link.symlink_to(elsewhere)
    with pytest.raises(ClusterctlError) as raised:
        open_store(f"sqlite:///{link}")
    assert "symbolic link" in raised.value.message
    assert elsewhere.read_text() == "precious\n"
    assert oct(elsewhere.stat().st_mode & 0o777) == oct(0o644)  # not chmod-ed through it
    dangling = tmp_path / "dangling.db"
    dangling.symlink_to(tmp_path / "made-by-sqlite")
    with pytest.raises(ClusterctlError):
        open_store(f"sqlite:///{dangling}")
    assert not (tmp_path / "made-by-sqlite").exists()


def test_a_database_at_a_newer_schema_revision_is_refused_with_a_fix(
        database_url: str) -> None:
    open_store(database_url).close()
    engine = sa.create_engine(engine_url(database_url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0999'"))
    engine.dispose()
    with pytest.raises(ClusterctlError) as raised:
        open_store(database_url)
    assert "0999" in raised.value.message and "newer" in raised.value.message
    assert "upgrade" in (raised.value.fix or "")


def test_admin_and_join_token_files_that_are_missing_loose_or_links_never_leak(
        tmp_path: Path, clock: Clock) -> None:
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock) as srv:
        admin_file, join_file = srv.config.admin_token_file, srv.config.join_token_file
        for setup in ("missing", "world", "link", "directory", "empty"):
            for f in (admin_file, join_file):
                secret = ADMIN if f == admin_file else JOIN
                if f.is_dir():
                    f.rmdir()
                else:
                    f.unlink(missing_ok=True)
                if setup == "world":
                    f.write_text(secret)
                    f.chmod(0o644)
                elif setup == "link":
                    (tmp_path / "real").write_text(secret)
                    (tmp_path / "real").chmod(0o600)
                    f.symlink_to(tmp_path / "real")
                elif setup == "directory":
                    f.mkdir()
                elif setup == "empty":
                    f.write_text("")
                    f.chmod(0o600)
            for method, path, token in (("GET", "/api/instances", ADMIN),
                                        ("POST", "/api/agent/enroll", JOIN)):
                status, text = raw(srv, method, path, b'{"instance_id": "n1"}', token=token)
                assert status in (401, 500), (setup, path, text)
                answer = strict(text)
                assert answer["error"] and answer["fix"], (setup, answer)
                assert ADMIN not in text and JOIN not in text
        status, _ = srv.request("GET", "/healthz")
        assert status == 200


# -- hostile [fleet] config --------------------------------------------------------------
def _stand_in(tmp: Path, name: str, code: int = 0, sleep_s: float = 0) -> tuple[Path, Path]:
    record = tmp / f"{name}.args"
    program = tmp / "bin" / name
    program.parent.mkdir(exist_ok=True)
    program.write_text(f'#!/bin/sh\nsleep {sleep_s}\nprintf "%s\\n" "$@" >> {record}\n'
                       f"exit {code}\n")
    program.chmod(0o755)
    return program, record


def _asleep(srv: FleetServer, name: str, **kw: Any) -> str:
    token = srv.enrol(name)
    beat(srv, token, name, status="hibernating", **kw)
    return token


def test_wake_command_placeholders_fill_whole_and_odd_places_and_never_options(
        tmp_path: Path, clock: Clock) -> None:
    program, record = _stand_in(tmp_path, "waker")
    argv = (str(program), "--id={instance_id}", "{hostname}{mac}", "{instance_id",
            "{{mac}}", "{unknown}")
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock, wake="command",
                     wake_command=argv) as srv:
        _asleep(srv, "gpu-01")
        status, answer = srv.admin("POST", "/api/instances/gpu-01/wake")
        assert status == 202, answer
        assert record.read_text().splitlines() == [
            "--id=gpu-01", "gpu-0152:54:00:12:34:56", "{instance_id", "{52:54:00:12:34:56}",
            "{unknown}"]
        record.unlink()
        # a node that reports a hostname like an option, or no MAC for a {mac} argv
        _asleep(srv, "gpu-02", hostname="-oProxyCommand=sh")
        status, answer = srv.admin("POST", "/api/instances/gpu-02/wake")
        assert status == 400 and "host name" in answer["error"], answer
        _asleep(srv, "gpu-03", mac=None)
        status, answer = srv.admin("POST", "/api/instances/gpu-03/wake")
        assert status == 400 and "MAC" in answer["error"], answer
        assert not record.exists()  # the operator's program never ran for either


def test_a_wake_that_hangs_does_not_stall_the_database_or_the_liveness_loop(
        tmp_path: Path, clock: Clock) -> None:
    program, record = _stand_in(tmp_path, "slow-waker", sleep_s=4)
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock, wake="command",
                     wake_command=(str(program), "{instance_id}")) as srv:
        for n in range(5):
            _asleep(srv, f"gpu-{n}")
        answers: list[int] = []
        wakes = [threading.Thread(target=lambda n=n: answers.append(
            srv.admin("POST", f"/api/instances/gpu-{n}/wake")[0])) for n in range(4)]
        for thread in wakes:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        srv.enrol("gpu-new")  # a database write while four wakes run
        assert time.monotonic() - started < 2
        # a scheduled wake that hangs: the liveness pass is not held up by it
        token = srv.enrol("gpu-sched")
        beat(srv, token, "gpu-sched", status="hibernating",
             schedule={"wake_at": "2020-01-01T00:00:00Z"})
        clock.advance(200)
        started = time.monotonic()
        srv.tick()
        assert time.monotonic() - started < 2
        for thread in wakes:
            thread.join(30)
        assert answers == [202] * 4
        deadline = time.monotonic() + 15
        while listed(srv)["gpu-sched"]["state"] != "waking" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert listed(srv)["gpu-sched"]["state"] == "waking"
        assert "gpu-sched" in record.read_text().split()


def test_the_control_plane_listens_on_ipv6(tmp_path: Path, clock: Clock) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    srv = FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock)
    from dataclasses import replace
    srv.config = replace(srv.config, listen=f"[::1]:{srv.port}")
    with srv:
        import http.client
        conn = http.client.HTTPConnection("::1", srv.port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()


# -- garbage in the database -------------------------------------------------------------
def test_the_liveness_loop_and_the_api_survive_garbage_node_rows(
        tmp_path: Path, database_url: str, clock: Clock) -> None:
    with FleetServer(tmp_path, database_url, clock=clock) as srv:
        for name in ("a-garbage", "b-nulls", "z-healthy"):
            beat(srv, srv.enrol(name), name)
    engine = sa.create_engine(engine_url(database_url))
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE nodes SET schedule = '[1, 2]', hibernate = '\"text\"', "
            "heartbeat = '{\"status\": 5}', state = 'zombie' WHERE instance_id = 'a-garbage'"))
        conn.execute(sa.text(
            "UPDATE nodes SET schedule = '{\"wake_at\": 7}', hibernate = 'not json', "
            "heartbeat = 'null', state = '', gpus = -3, interval_s = -5 "
            "WHERE instance_id = 'b-nulls'"))
    engine.dispose()
    with FleetServer(tmp_path, database_url, clock=clock) as srv:
        clock.advance(500)
        srv.tick()
        shown = listed(srv)
        assert shown["z-healthy"]["state"] == "lost"  # the pass reached it
        assert set(shown) == {"a-garbage", "b-nulls", "z-healthy"}
        for name in shown:
            for path in ("status", "config", "schedule", "events"):
                status, text = raw(srv, "GET", f"/api/instances/{name}/{path}", token=ADMIN)
                assert status == 200, (name, path, text)
        for path in ("/api/hibernation/stats", "/metrics"):
            status, text = raw(srv, "GET", path, token=ADMIN)
            assert status == 200, (path, text)
        status, text = raw(srv, "GET", "/api/hibernation/stats", token=ADMIN)
        assert set(strict(text)) <= {"nodes", "running", "idle", "hibernating", "hibernated",
                                     "waking", "lost", "wake_failed", "revoked",
                                     "hibernated_hours", "idle_gpu_hours_avoided",
                                     "idle_gpu_kwh", "busy_gpu_kwh"}


def test_the_server_process_reports_a_broken_store_without_a_traceback(
        tmp_path: Path) -> None:
    """`clusterctl fleet serve` with a database it cannot use: one error line and a fix."""
    directory = tmp_path / "fleet.db"
    directory.mkdir()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[fleet]\nlisten = "127.0.0.1:9"\ndatabase = "sqlite:///{directory}"\n'
                    f'join_token_file = "{tmp_path}/j"\nadmin_token_file = "{tmp_path}/a"\n')
    done = subprocess.run([sys.executable, "-m", "clusterctl", "fleet", "serve"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "CLUSTERCTL_CONFIG": str(conf),
                               "PYTHONPATH": os.pathsep.join(
                              [str(Path(__file__).parents[1] / "agent"),
                               str(Path(__file__).parents[1])])})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert str(directory) in done.stderr


# -- what the fleet page, /metrics and `fleet targets` take from nodes (issue 17) --------
def _compact(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def test_a_node_reporting_80000_gpus_does_not_swell_the_node_list(tmp_path: Path) -> None:
    """Within the 256 KiB heartbeat cap a node can list ~85,000 empty GPUs; the node list
    (read by the page every 5 s, and by the CLI) shows a bounded number of them."""
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db") as srv:
        token = srv.enrol("many-gpus")
        body = _compact({**heartbeat("many-gpus"), "gpus": [{}] * 85_000})
        assert len(body) < 256 << 10
        status, text = raw(srv, "POST", "/api/agent/status", body, token=token)
        assert status == 200, text
        for path in ("/api/instances", "/api/instances/many-gpus/status"):
            status, text = raw(srv, "GET", path, token=ADMIN)
            assert status == 200
            answer = strict(text)
            node = answer["instances"][0] if "instances" in answer else answer
            assert node["gpus"] == 85_000  # the count is still told
            assert len(node["gpu_list"]) <= 64, (path, len(node["gpu_list"]))
        status, text = raw(srv, "GET", "/api/instances", token=ADMIN)
        assert len(text) < 64 << 10, f"/api/instances is {len(text)} bytes for one node"


LABEL_TEXT = 'q"uo\\te} {a="b",c=d}\u00e9\u4e2d\U0001F600 #HELP x'


def test_metrics_label_values_a_node_chose_stay_valid_exposition(tmp_path: Path) -> None:
    """Host names and event types with quotes, backslashes, braces and unicode: /metrics
    still parses (prometheus_client and promtool) and gives them back as sent."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.prometheus import tool

    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db") as srv:
        token = srv.enrol("odd-labels", hostname=LABEL_TEXT)
        odd_type = LABEL_TEXT[:64]
        batch = [event("odd-labels", "e1", odd_type), event("odd-labels", "e2", "wake_failed")]
        assert srv.request("POST", "/api/agent/events", batch, token=token)[0] == 200
        status, text = raw(srv, "GET", "/metrics", token=ADMIN)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [state] = families["clusterctl_fleet_node_state"].samples
    assert state.labels == {"instance_id": "odd-labels", "hostname": LABEL_TEXT,
                            "state": "running"}
    received = {s.labels["event_type"] for s in families["clusterctl_fleet_events_received"]
                .samples}
    assert odd_type in received
    [failed] = families["clusterctl_fleet_node_events"].samples
    assert failed.labels["hostname"] == LABEL_TEXT
    done = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60, check=False)
    assert "parsing error" not in done.stderr + done.stdout, done.stderr


# -- `clusterctl fleet targets|show|nodes` against a hostile control plane ---------------
class _Answer:
    """A stand-in control plane on 127.0.0.1 that answers every GET with ``body``."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.body = b""

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client stopped reading
                    self.wfile.write(owner.body)

            do_POST = do_GET  # hibernate, wake

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def _cli(tmp: Path, *args: str) -> tuple[int, str, str, BaseException | None]:
    """`clusterctl ARGS` in this process (typer's runner): exit code, out, err, and an
    exception that escaped the command (a traceback for a user)."""
    from typer.testing import CliRunner

    from clusterctl.cli import app

    conf = tmp / "operator.toml"
    admin = tmp / "admin-token-file"
    admin.write_text(ADMIN + "\n")
    admin.chmod(0o600)
    conf.write_text(f'[fleet]\nadmin_token_file = "{admin}"\n'
                    f'[paths]\nstate_dir = "{tmp / "state"}"\n')
    result = CliRunner().invoke(app, [*args, "--config", str(conf)])
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, escaped


HOSTILE_ANSWERS: list[bytes] = [
    b"", b"not json", b"null", b"[]", b'"instances"', b"[" * 100_000, b'{"instances": 5}',
    b'{"instances": {"a": 1}}', b'{"instances": [1, null, "x", []]}',
    b'{"instances": [{"instance_id": {"x": 1}, "state": ["running"], "hostname": 7}]}',
    b'{"gpu_list": 5, "pending_commands": 7}', b'{"gpu_list": [1, "x", null]}',
    b'{"pending_commands": [1, {}]}',
    b'{"events": 5}', b'{"events": [1, {"timestamp": {"x": 1}, "event_type": ["a"]}]}',
    b'{"command": 5}', b'{"command": {"type": [], "id": null}, "note": {"x": 1}}',
    b'{"done": {"x": 1}}',
]


def _one_clear_line(tmp: Path, command: list[str], body: bytes, url: str) -> None:
    """`clusterctl COMMAND` against a control plane answering ``body``: it succeeds, or
    fails with one `clusterctl: ` line; never a traceback, never an escape sequence."""
    code, out, err, escaped = _cli(tmp, *command, "--server", url)
    what = (command, body[:60])
    assert escaped is None, (what, repr(escaped))
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clusterctl: "), (what, err)
    assert "Traceback" not in out + err and "\x1b" not in out, what


def test_operator_commands_give_one_clear_error_on_any_answer(tmp_path: Path) -> None:
    answers = _Answer()
    try:
        for body in [*HOSTILE_ANSWERS, b"[" * ((64 << 20) + 1)]:
            answers.body = body
            for command in (["fleet", "targets"], ["fleet", "show", "n1"],
                            ["fleet", "nodes"],
                            ["fleet", "targets", "--output", str(tmp_path / "t.json")]):
                _one_clear_line(tmp_path, command, body, answers.url)
                assert not (tmp_path / "t.json").exists() or \
                    json.loads((tmp_path / "t.json").read_text()) == [], (command, body[:60])
        for body in HOSTILE_ANSWERS:  # the other commands: each answer, every command
            answers.body = body
            for command in (["fleet", "events", "n1"], ["fleet", "stats"],
                            ["fleet", "hibernate", "n1"], ["fleet", "wake", "n1"]):
                _one_clear_line(tmp_path, command, body, answers.url)
    finally:
        answers.close()


def test_an_oversized_event_is_stored_cut_with_its_identity(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    big = event("gpu-01", "e-big", "hibernate_failed", blob="x" * (200 << 10),
                reason="r" * 5000)
    status, answer = server.request("POST", "/api/agent/events",
                                    [big, event("gpu-01", "e-small")], token=token)
    assert status == 200 and answer["stored"] == 2
    status, shown = server.admin("GET", "/api/instances/gpu-01/events?limit=10")
    kept = {e["id"]: e for e in shown["events"]}
    assert "blob" not in kept["e-big"] and kept["e-big"]["event_type"] == "hibernate_failed"
    assert kept["e-big"]["cut_from_bytes"] > 200 << 10 and len(kept["e-big"]["reason"]) == 500
    assert kept["e-small"]["reason"] == "test" and "cut_from_bytes" not in kept["e-small"]


@contextlib.contextmanager
def _tmpfs(mountpoint: Path, size_kib: int) -> Iterator[Path]:
    """A small tmpfs at ``mountpoint`` (root only: skipped otherwise), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs",
                    str(mountpoint)], check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_targets_output_never_writes_through_or_onto_what_is_not_its_own(
        tmp_path: Path) -> None:
    """--output at a link, a directory, a FIFO, someone's file; on a full or read-only
    filesystem: one clear error or a plain replaced file, the other thing untouched."""
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db") as server:
        server.enrol("gpu-01")
        _targets_output(server, tmp_path)


def _targets_output(server: FleetServer, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    theirs = elsewhere / "theirs.json"
    theirs.write_text('[{"targets": ["keep-me:1"]}]\n')
    secret = elsewhere / "secret"
    secret.write_text("not json\n")
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "to-secret.json").symlink_to(secret)
    (sd / "to-theirs.json").symlink_to(theirs)
    (sd / "dir.json").mkdir()
    _fifo(sd / "fifo.json")
    (sd / "to-fifo.json").symlink_to(sd / "fifo.json")
    (sd / "loop.json").symlink_to(sd / "loop.json")

    def targets(path: Path) -> tuple[int, str]:
        result: list[tuple[int, str, str, BaseException | None]] = []
        worker = threading.Thread(target=lambda: result.append(_cli(
            tmp_path, "fleet", "targets", "--server", server.url, "--output", str(path))))
        worker.start()
        worker.join(30)
        assert result, f"--output {path} hung"
        code, _, err, escaped = result[0]
        assert escaped is None, repr(escaped)
        assert "Traceback" not in err
        return code, err

    for refused in ("to-secret.json", "dir.json", "fifo.json", "to-fifo.json"):
        code, err = targets(sd / refused)
        assert code != 0 and err.startswith("clusterctl: "), (refused, err)
    assert secret.read_text() == "not json\n"
    assert (sd / "to-secret.json").is_symlink() and (sd / "fifo.json").is_fifo()
    # a link to a targets file is replaced by a file, never written through
    code, err = targets(sd / "to-theirs.json")
    assert code == 0, err
    assert not (sd / "to-theirs.json").is_symlink()
    assert json.loads((sd / "to-theirs.json").read_text())[0]["targets"] == ["gpu-01:9408"]
    assert theirs.read_text() == '[{"targets": ["keep-me:1"]}]\n'
    code, err = targets(sd / "loop.json")  # a loop of links: replaced as a dangling link
    assert code == 0 or err.startswith("clusterctl: "), err

    with _tmpfs(tmp_path / "fs", size_kib=64) as mnt:
        (mnt / "nodes.json").write_text("[]\n")
        subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'filler'}", "bs=4k"],
                       capture_output=True, check=False)
        code, err = targets(mnt / "nodes.json")
        assert code != 0 and err.startswith("clusterctl: ") and "space" in err, err
        assert (mnt / "nodes.json").read_text() == "[]\n"  # the old file stays whole
        assert [p.name for p in mnt.iterdir() if p.name.endswith(".tmp")] == []
        (mnt / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code, err = targets(mnt / "nodes.json")
        assert code != 0 and err.startswith("clusterctl: "), err
        assert (mnt / "nodes.json").read_text() == "[]\n"


def test_the_history_stays_json_through_absurd_numbers_and_clock_jumps(
        tmp_path: Path) -> None:
    """A node reporting a utilization of 1.7e308 % (finite, so it passes the NaN check)
    or -5 %, no nodes at all, the clock going back an hour or forward ten years: the
    history is strict JSON with utilizations between 0 and 100."""
    clock = Clock(start=1_800_000_000.0)
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock) as srv:
        clock.advance(15)
        srv.tick()  # no node yet

        def history() -> list[dict[str, Any]]:
            status, text = raw(srv, "GET", "/api/fleet/history", token=ADMIN)
            assert status == 200, text
            points: list[dict[str, Any]] = strict(text)["points"]
            for p in points:
                assert p["gpu_utilization"] is None or 0 <= p["gpu_utilization"] <= 100, p
            return points

        assert [p["nodes"] for p in history()] == [0]
        huge, negative, fine = srv.enrol("huge"), srv.enrol("negative"), srv.enrol("fine")
        for _ in range(4):  # one 5-minute step: the samples add up in it
            beat(srv, huge, "huge", gpu_utilization=1.7e308)
            beat(srv, negative, "negative", gpu_utilization=-5.0)
            beat(srv, fine, "fine", gpu_utilization=40.0)
            clock.advance(15)
            srv.tick()
        assert history()[-1]["gpu_utilization"] == 40.0
        clock.advance(-3600)
        srv.tick()
        assert len(history()) == 1  # what was "later" is gone
        clock.advance(10 * 365 * 86400)
        srv.tick()
        assert len(history()) == 1
