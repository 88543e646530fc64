"""The local API against hostile local clients, over real sockets to an in-process agent
(fake NVML): it cannot be starved, one request never becomes two, and no request, however
malformed, gets a 500 or changes anything when it is refused."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterctl import config as cfg
from clusterctl.agent import api
from tests.test_agent import Node
from tests.test_agent import nv as nv  # noqa: PLC0414 - the fixture, re-exported

TOKEN = "t0ken"


@pytest.fixture
def agent_node(tmp_path: Path, nv: ModuleType) -> Iterator[Node]:
    n = Node(tmp_path, nv)
    n.api_token.write_text(TOKEN + "\n")
    n.api_token.chmod(0o600)
    n.start()
    yield n
    n.stop()


def connect(n: Node) -> socket.socket:
    return socket.create_connection(("127.0.0.1", n.port), timeout=5)


def exchange(n: Node, data: bytes, *, wait_s: float = 3.0) -> bytes:
    """Send raw bytes; everything that comes back until the server closes (or wait_s)."""
    with connect(n) as sock:
        sock.sendall(data)
        sock.settimeout(wait_s)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return got


def status_and_json(answer: bytes) -> tuple[int, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- starvation ----------------------------------------------------------------------

HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # the head never ends


def test_half_sent_connections_neither_hold_threads_nor_keep_others_out(
        agent_node: Node) -> None:
    before = threading.active_count()
    held = []
    try:
        for _ in range(200):
            sock = connect(agent_node)
            sock.sendall(HALF_SENT)
            held.append(sock)
        time.sleep(0.5)
        threads = threading.active_count() - before
        started = time.monotonic()
        status, health = agent_node.get("/healthz")
        took_s = time.monotonic() - started
    finally:
        for sock in held:
            sock.close()
    assert threads <= api.MAX_CONNECTIONS
    assert status == 200 and health["status"] == "healthy"
    assert took_s < 2.0


def test_idle_and_trickling_connections_are_closed_after_the_request_timeout(
        agent_node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "REQUEST_TIMEOUT_S", 1.0)
    idle = [connect(agent_node) for _ in range(3)]
    trickling = connect(agent_node)
    started = time.monotonic()
    for byte in HALF_SENT[:5]:  # one byte every 0.15 s: each read is quick, the whole is not
        trickling.sendall(bytes([byte]))
        time.sleep(0.15)
    try:
        assert all(closed_by_server(sock, 2.0) for sock in [*idle, trickling])
        assert time.monotonic() - started < 1.0 + 2.0
    finally:
        for sock in [*idle, trickling]:
            sock.close()


def test_when_every_connection_is_busy_a_new_one_gets_a_quick_503(agent_node: Node) -> None:
    head = (f"PUT /api/gpu/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Length: 100\r\n\r\n").encode()  # a whole head, then a body that waits
    busy = []
    try:
        for _ in range(api.MAX_CONNECTIONS):
            sock = connect(agent_node)
            sock.sendall(head)
            busy.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        answer = exchange(agent_node, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        took_s = time.monotonic() - started
    finally:
        for sock in busy:
            sock.close()
    status, body = status_and_json(answer)
    assert status == 503 and body == {"success": False, "error": "over 32 connections at once; "
                                                                 "retry in a moment"}
    assert took_s < 2.0


# -- one request is one answer -------------------------------------------------------


def test_a_refused_post_closes_so_its_body_is_never_read_as_a_second_request(
        agent_node: Node) -> None:
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(agent_node, b"POST /api/gpu/memory/allocate HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer wrong\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
    assert answer.count(b"HTTP/1.1 ") == 1
    assert status_and_json(answer) == (401, {"success": False,
                                             "error": "missing or wrong bearer token"})
    assert b"Connection: close" in answer


# -- numbers, lengths, nesting -------------------------------------------------------


@pytest.mark.parametrize("query", ["gpu_id=nan", "gpu_id=inf", "gpu_id=1e400", "gpu_id=-0",
                                   "gpu_id=1e20", "gpu_id=1.5", "gpu_id=%EF%BC%91",
                                   "gpu_id=0&duration=nan", "gpu_id=0&duration=inf",
                                   "gpu_id=0&duration=1e400", "gpu_id=0&duration=-5"])
def test_a_number_that_is_not_a_plain_number_is_a_400(agent_node: Node, query: str) -> None:
    path = "/api/gpu/temperature/trend?" + query
    status, answer = agent_node.get(path)
    assert status == 400 and answer["success"] is False
    name = query.rsplit("&", 1)[-1].split("=", maxsplit=1)[0]
    assert answer["error"].startswith(name), answer


@pytest.mark.parametrize(("length", "body", "status", "words"), [
    ("\u00b2", b"{}", 411, "Content-Length (ASCII digits)"),
    ("\u0661", b"{}", 411, "Content-Length (ASCII digits)"),
    ("-1", b"{}", 411, "Content-Length (ASCII digits)"),
    (None, b"[" * 60_000, 400, "not JSON"),
    (None, b'{"temp_throttle": NaN}', 400, "NaN is not a number JSON allows"),
])
def test_odd_lengths_and_deep_json_are_4xx(agent_node: Node, length: str | None, body: bytes,
                                           status: int, words: str) -> None:
    given_length = str(len(body)) if length is None else length
    answer = exchange(agent_node, b"PUT /api/gpu/config HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                      b"Content-Length: " + given_length.encode("utf-8") + b"\r\n\r\n" + body)
    got, data = status_and_json(answer)
    assert got == status and words in data["error"], data  # type: ignore[index]


# -- no request ever gets a 500 or changes anything when refused ---------------------

ROUTE_PATHS = sorted({path for _, path in api.ROUTES})
WEIRD = ["nan", "inf", "-0", "1e400", "1.5", "0", "7", "99", "", "%00", "%ff", "\u00b2", "[",
         "//", "%2e%2e"]
token_ish = st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=12)
methods = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD",
                                     "OPTIONS"]), token_ish.filter(bool))
paths = st.one_of(st.sampled_from([*ROUTE_PATHS, "//[x", "/../etc", "*"]),
                  token_ish.map(lambda t: "/" + t))
queries = st.lists(st.tuples(st.sampled_from(["gpu_id", "duration", "x"]),
                             st.one_of(st.sampled_from(WEIRD), token_ish)), max_size=3)
bodies = st.one_of(
    st.binary(max_size=100),
    st.sampled_from([b"{}", b"[]", b"null", b"[" * 3000, b'{"temp_throttle": NaN}',
                     b'{"temp_throttle": 1e999}', b'{"temp_throttle": 85}',
                     b'{"temp_throttle": "85"}', b'{"memory_reserve_mb": 99999999999999}',
                     b'{"allocation_id": "a", "required_mb": 1e400}',
                     b'{"allocation_id": "", "required_mb": 1}',
                     b'{"allocation_id": "a", "required_mb": 5, "gpu_id": 99}',
                     b'{"allocation_id": "a", "required_mb": true}']),
    st.dictionaries(st.text(max_size=15), st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
        max_size=3).map(lambda d: json.dumps(d).encode()))
auths = st.sampled_from([None, f"Bearer {TOKEN}", "Bearer wrong", "", "Basic x",
                         f"Bearer {TOKEN} "])
lengths = st.sampled_from(["right", None, "0", "\u00b2", "-1", "99999999999", "1", " 3"])
extra = st.lists(st.tuples(token_ish.filter(bool), st.text(
    st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=20)), max_size=3)


def placements(n: Node) -> str | None:
    path = n.state / "gpu-allocations.json"
    return path.read_text() if path.exists() else None


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=methods, path=paths, query=queries, auth=auths, length=lengths, body=bodies,
       headers=extra)
def test_no_request_gets_a_500_and_a_refused_one_changes_nothing(
        agent_node: Node, method: str, path: str, query: list[tuple[str, str]],
        auth: str | None, length: str | None, body: bytes,
        headers: list[tuple[str, str]]) -> None:
    agent = agent_node.agent
    assert agent is not None
    config_before, placed_before = cfg.as_toml_dict(agent.config), placements(agent_node)
    target = path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
    lines = [f"{method} {target} HTTP/1.1", "Host: x"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if length is not None:
        lines.append(f"Content-Length: {len(body) if length == 'right' else length}")
    lines += [f"{k}: {v}" for k, v in headers]
    answer = exchange(agent_node, "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    head, _, raw = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status != 500, raw
    if method == "HEAD" and status < 400:
        return
    data = json.loads(raw) if b"application/json" in head else None
    if status >= 400:
        assert isinstance(data, dict) and data["success"] is False, raw
        assert cfg.as_toml_dict(agent.config) == config_before
        assert placements(agent_node) == placed_before
    elif data is not None and isinstance(data, dict) and "success" in data:
        assert data["success"] is True


def test_the_api_token_file_follows_the_same_rules(agent_node: Node) -> None:
    agent_node.api_token.write_text("t0\nken\n")
    status, answer = agent_node.request("PUT", "/api/gpu/config", b'{"temp_throttle": 80}',
                                        {"Authorization": "Bearer t0"})
    assert status == 403 and "holds whitespace" in answer["error"]
    assert "ken" not in answer["error"].replace("token", "")


def test_the_gpu_endpoints_without_a_gpu_id_mean_gpu_0(agent_node: Node) -> None:
    for path in ("/api/gpu/status", "/api/gpu/temperature/trend"):
        status, body = agent_node.get(path)
        assert status == 200, body
        assert body["data"]["gpu_id"] == 0, body
