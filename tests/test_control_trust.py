"""The control-plane client against a hostile peer (tests/fakes/hostile.py): only 2xx
acknowledges, the deadline holds for the whole exchange, and the token file is trusted
only when it is root's, root-only, not a symlink, and one printable word."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterctl import config as cfg
from clusterctl.agent import control
from clusterctl.agent.control import Answer, ControlClient, read_token
from clusterctl.agent.heartbeat import Delivery
from clusterctl.errors import ClusterctlError, HostError, TemporaryError
from clusterctl.events.log import EventLog
from clusterctl.events.outbox import Outbox
from clusterctl.hibernate import actions
from tests.fakes.hostile import (
    GARBAGE,
    INFORMATIONAL,
    TRUNCATED_STATUS,
    Behaviour,
    Hostile,
    answer,
    huge_body,
    raw,
    redirect,
    reset,
    silent,
    trickle,
)

OK = answer(200, b'{"ok": true}')


def client(url: str, token_file: Path) -> ControlClient:
    return ControlClient(cfg.HeartbeatConfig(control_url=url, token_file=token_file))


def record(state: Path, *numbers: int) -> None:
    log = EventLog(state, "node-1")
    for n in numbers:
        log.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())


# -- only 2xx acknowledges -----------------------------------------------------------


@pytest.mark.parametrize(("status", "with_body"),
                         [(301, True), (302, True), (302, False), (307, True), (308, False)])
def test_a_redirect_acknowledges_no_event_and_all_arrive_once_in_order_later(
        tmp_path: Path, status: int, with_body: bool) -> None:
    record(tmp_path, 1, 2, 3)
    with Hostile(redirect(status, "https://moved.example/api/agent/events",
                          with_body=with_body)) as plane:
        delivery = Delivery(client(plane.url, tmp_path / "none"), Outbox(tmp_path), tmp_path)
        assert delivery.flush() is False
        assert delivery.flush() is False
        assert "redirect" in (delivery.state.last_error or "")
        record(tmp_path, 4)
        plane.behaviour = OK
        assert delivery.flush() is True
        bodies = plane.json_bodies()
    sent = [e["n"] for e in bodies[-1]]
    assert sent == [1, 2, 3, 4]
    assert len(bodies) == 3  # two refused attempts, then one batch
    assert delivery.outbox.pending().events == ()


def test_a_redirect_is_an_error_that_says_where_it_pointed_and_the_fix(tmp_path: Path) -> None:
    with Hostile(redirect(302, "https://new.example/")) as plane, \
            pytest.raises(HostError) as err:
        client(plane.url, tmp_path / "none").post("/api/agent/status", {})
    assert err.value.message == (f"control plane {plane.url}/api/agent/status answered a "
                                 "redirect (HTTP 302) to 'https://new.example/'")
    assert err.value.fix == "redirects are not followed: fix [heartbeat] control_url"


def test_the_hibernate_control_action_fails_on_a_redirect_and_a_1xx(tmp_path: Path) -> None:
    for behaviour, said in ((redirect(307, "https://x/"), "redirect (HTTP 307)"),
                            (INFORMATIONAL, "HTTP 102")):
        with Hostile(behaviour) as plane:
            conf = cfg.with_changes(cfg.with_changes(cfg.Config(), "heartbeat", {
                "control_url": plane.url}), "hibernate", {"enabled": True, "action": "control"})
            outcome = actions.run(conf, instance_id="n1",
                                  control=client(plane.url, tmp_path / "none"),
                                  start_unit=lambda unit: None)
        assert not outcome.ok and said in (outcome.error or ""), outcome


def test_a_heartbeat_answered_with_a_1xx_is_not_acknowledged(tmp_path: Path) -> None:
    with Hostile(INFORMATIONAL) as plane:
        delivery = Delivery(client(plane.url, tmp_path / "none"), Outbox(tmp_path), tmp_path)
        assert delivery.heartbeat({"sequence": 1}) is False
    assert delivery.state.last_heartbeat_ok is False


# -- a real deadline -----------------------------------------------------------------


@pytest.mark.parametrize("behaviour", [
    trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", 0.2),  # the head, slowly
    trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + b" " * 200, 0.01),
    silent(),
], ids=["trickled-head", "trickled-body", "silent"])
def test_a_slow_control_plane_is_cut_at_the_total_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: Behaviour) -> None:
    monkeypatch.setattr(control, "TOTAL_TIMEOUT_S", 1.5)
    with Hostile(behaviour) as plane:
        started = time.monotonic()
        with pytest.raises(TemporaryError) as err:
            client(plane.url, tmp_path / "none").post("/api/agent/status", {})
        took_s = time.monotonic() - started
    assert took_s < 1.5 + 0.5
    assert "no whole answer within 1.5 s" in err.value.message


@pytest.mark.parametrize("behaviour", [reset(), GARBAGE, TRUNCATED_STATUS,
                                       raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")],
                         ids=["reset", "garbage", "truncated-status", "truncated-body"])
def test_resets_garbage_and_truncated_answers_are_temporary(
        tmp_path: Path, behaviour: Behaviour) -> None:
    with Hostile(behaviour) as plane, pytest.raises(TemporaryError) as err:
        client(plane.url, tmp_path / "none").post("/api/agent/status", {})
    assert err.value.message.startswith(f"control plane {plane.url}")
    assert len(err.value.message) < 300


def test_a_huge_answer_is_read_only_up_to_the_cap(tmp_path: Path) -> None:
    with Hostile(huge_body(8 * control.MAX_ANSWER_BYTES)) as plane:
        got = client(plane.url, tmp_path / "none").post("/api/agent/status", {})
    assert got == Answer(200, None)


# -- the token file ------------------------------------------------------------------


def token_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("text", ["abc\ndef\n", "abc def", "abc\rdef", "ab\x00c", "abc\x7f",
                                  "jeton-é"])
def test_a_token_with_whitespace_or_control_characters_is_refused(
        tmp_path: Path, text: str) -> None:
    path = token_file(tmp_path, text)
    with pytest.raises(HostError) as err:
        read_token(path)
    assert err.value.one_line() == (f"token file {path} holds whitespace, control or non-ASCII "
                                    f"characters inside the token; put the token alone on one "
                                    f"line in {path}")


def test_a_token_with_a_newline_never_reaches_the_log_or_the_wire(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = token_file(tmp_path, "s3cret-part-one\ns3cret-part-two\n")
    record(tmp_path, 1)
    with Hostile(OK) as plane:
        delivery = Delivery(client(plane.url, path), Outbox(tmp_path), tmp_path)
        for _ in range(3):
            assert delivery.heartbeat({"sequence": 1}) is False
            assert delivery.flush() is False
    assert plane.requests == []
    assert "s3cret" not in caplog.text
    assert f"token file {path} holds whitespace" in caplog.text


def test_a_token_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    path = token_file(tmp_path, "abc\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(HostError) as err:
        read_token(path)
    assert err.value.one_line() == (f"token file {path} is owned by uid 65534, not root; "
                                    f"chown root:root {path}")


def test_a_symlinked_token_file_is_refused(tmp_path: Path) -> None:
    real = token_file(tmp_path, "abc\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(HostError) as err:
        read_token(link)
    assert err.value.message == f"token file {link} is a symbolic link"
    assert read_token(real) == "abc"


def test_a_fifo_as_token_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(HostError) as err:
        read_token(fifo)
    assert err.value.message == f"token file {fifo} is not a regular file"


# -- any answer: an Answer for 2xx, else one of the project's errors -----------------

statuses = st.integers(min_value=0, max_value=1100)
lines = st.one_of(
    st.builds(lambda code, reason: f"HTTP/1.1 {code} {reason}".encode(), statuses,
              st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=20)),
    st.binary(max_size=40).filter(lambda b: b"\r\n" not in b))
headers = st.lists(st.one_of(
    st.sampled_from([b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: x",
                     b"Content-Length: 99999999999999999999", b"Transfer-Encoding: chunked",
                     b"Location: https://elsewhere/", b"Connection: close"]),
    st.binary(max_size=30).filter(lambda b: b"\r\n" not in b)), max_size=5)
bodies = st.one_of(st.binary(max_size=200), st.sampled_from(
    [b'{"ok": true}', b"[" * 5000, b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n"]))


@pytest.fixture(scope="module")
def peer() -> Iterator[Hostile]:
    with Hostile(OK) as hostile:
        yield hostile


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=lines, head=headers, body=bodies, cut=st.one_of(st.none(), st.integers(0, 300)))
def test_any_answer_ends_in_an_answer_for_2xx_or_a_project_error(
        peer: Hostile, line: bytes, head: list[bytes], body: bytes, cut: int | None) -> None:
    data = b"\r\n".join([line, *head]) + b"\r\n\r\n" + body
    peer.behaviour = raw(data[:cut] if cut is not None else data)
    try:
        got = client(peer.url, Path("/nonexistent/token")).post("/api/agent/events", [])
    except ClusterctlError:
        return
    assert 200 <= got.status < 300


@pytest.mark.parametrize(("url", "port"), [("http://[::1]", 80), ("https://[::1]", 443),
                                           ("https://[::ffff:127.0.0.1]", 443)])
def test_an_ipv6_control_url_without_a_port_means_the_schemes_port(
        tmp_path: Path, url: str, port: int) -> None:
    """http.client would read the last group of an IPv6 host as a port (or refuse it as
    one): the scheme's port is always given, and a refusal is one of ours."""
    from clusterctl import config as cfg

    config = cfg.with_changes(cfg.Config(), "heartbeat", {"control_url": url,
                                                         "token_file": str(tmp_path / "t")})
    client = ControlClient(config.heartbeat)
    assert client.port == port
    assert ":" in client.host
