"""The node side of the fleet protocol: enrolment and the node token, the heartbeat's
new keys, the answer's next_interval_s and commands (each run once, acknowledged by an
event), against the test control plane on 127.0.0.1; the default route's MAC from
fixture trees. The agent's loops run on the test's own clock (``Agent.tick``)."""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl.agent import commands
from clusterctl.agent.commands import BadCommand, directions, validate
from clusterctl.agent.service import Agent
from clusterctl.hibernate import schedule
from clusterctl.hibernate.controller import inhibited_by
from clusterctl.host.net import NetFacts, default_interface, read_net
from clusterctl.host.nvml import Nvml
from tests.conftest import H100, load_fake_nvml, quiet_host, wait_until
from tests.fakes.control_plane import ControlPlane, Enroll, running
from tests.test_agent import Node, Ticker

JOIN = "join-secret-of-the-fleet"


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"gpus": [{**H100, "uuid": "GPU-0", "utilization_gpu": 1}]})
    return fake


def node_token() -> str:
    return secrets.token_urlsafe(32)  # 43 characters, as the fleet makes them


def fleet_node(node: Callable[..., Node], url: str, *, join: str | None = JOIN,
               hibernate: str = "", heartbeat: str = "") -> Node:
    n = node(url, heartbeat=heartbeat)
    if join is not None:
        n.token.write_text(f"{join}\n")
        n.token.chmod(0o600)
    if hibernate:
        n.conf.write_text(n.conf.read_text() + f"[hibernate]\n{hibernate}")
    return n


def ticked(n: Node, clock: Ticker) -> Agent:
    """The node's agent, every loop (and its monotonic clock) on ``clock``."""
    agent = Agent(n.conf, nvml=Nvml(module=n.nv), notify=n.notes.append, clock=clock.wall,
                  owns_swap_policy=False, monotonic=lambda: clock.now)
    quiet_host(agent, n.tmp)
    agent.hibernation.logind = False
    n.agent = agent  # stopped by the fixture
    return agent


def acks(plane: ControlPlane) -> list[dict[str, Any]]:
    return [e for e in plane.events if e["event_type"] in ("command_applied", "command_failed")]


def status_auth(plane: ControlPlane) -> list[str | None]:
    """The Authorization of every request but enrolment's, in order."""
    enrol = {auth for auth, _ in plane.enrolls}
    return [a for a in plane.auth if a not in enrol]


# -- enrolment and the node token ----------------------------------------------------


def test_enrolment_writes_the_node_token_root_only_and_every_later_request_carries_it(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = node_token()
    clock = Ticker()
    with running() as plane:
        plane.enroll = Enroll(token)
        n = fleet_node(node, plane.url)
        n.record(1)
        agent = ticked(n, clock)
        clock.run_for(agent, 5)
    assert len(plane.enrolls) == 1
    auth, body = plane.enrolls[0]
    assert auth == f"Bearer {JOIN}"
    assert set(body) == {"instance_id", "hostname", "boot_id"}
    assert body["instance_id"] == plane.heartbeats[0]["instance_id"]
    kept = n.state / "node-token"
    assert kept.read_text() == f"{token}\n"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and not kept.is_symlink()
    assert len(plane.heartbeats) >= 5 and [e["n"] for e in plane.events if "n" in e] == [1]
    assert plane.auth[0] == f"Bearer {JOIN}"
    assert set(plane.auth[1:]) == {f"Bearer {token}"}
    assert token not in caplog.text and JOIN not in caplog.text


def test_a_control_plane_without_enrolment_gets_the_token_file_token_as_before(
        node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:  # /api/agent/enroll answers 404
        n = fleet_node(node, plane.url)
        agent = ticked(n, clock)
        clock.run_for(agent, 20)
    assert not (n.state / "node-token").exists()
    assert len(plane.heartbeats) >= 20
    assert set(plane.auth) == {f"Bearer {JOIN}"}
    sent = len(plane.received_list())  # heartbeats and event batches
    assert len(plane.auth) == sent + 1  # enrolment asked once, not before each request


def test_no_join_token_no_enrolment(node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        plane.enroll = Enroll(node_token())
        n = fleet_node(node, plane.url, join=None)
        clock.run_for(ticked(n, clock), 3)
    assert plane.enrolls == [] and set(plane.auth) == {None} and plane.heartbeats


def test_a_forgotten_node_token_makes_the_node_enrol_again_at_most_once_a_minute(
        node: Callable[..., Node]) -> None:
    first, second, third = node_token(), node_token(), node_token()
    clock = Ticker()
    with running() as plane:
        plane.enroll = Enroll(first)
        n = fleet_node(node, plane.url)
        agent = ticked(n, clock)
        clock.run_for(agent, 3)
        plane.refused_tokens = {first}  # the control plane forgot it
        plane.enroll = Enroll(second)
        beats = len(plane.heartbeats)
        clock.run_for(agent, 1.5)
        assert len(plane.enrolls) == 2  # enrolled again at once, the heartbeat sent again
        assert len(plane.heartbeats) > beats
        assert (n.state / "node-token").read_text() == f"{second}\n"
        assert plane.auth[-1] == f"Bearer {second}"
        plane.refused_tokens = {first, second}  # forgotten again, within the minute
        plane.enroll = Enroll(third)
        clock.run_for(agent, 30)
        assert len(plane.enrolls) == 2
        assert agent.delivery is not None
        assert "refused the node token (HTTP 401)" in (agent.delivery.state.last_error or "")
        clock.run_for(agent, 45)  # a minute after the last enrolment
        assert len(plane.enrolls) == 3
        beats = len(plane.heartbeats)
        clock.run_for(agent, 3)
    assert (n.state / "node-token").read_text() == f"{third}\n"
    assert len(plane.heartbeats) > beats and plane.auth[-1] == f"Bearer {third}"


@pytest.mark.parametrize(("status", "said", "fix"), [
    (403, "node vast_1 was revoked", "clusterctl fleet revoke vast_1 --forget lets it enrol"),
    (409, "vast_1 is enrolled already", "revoke it on the control plane"),
])
def test_a_refused_enrolment_is_logged_once_with_the_fix_and_asked_again_after_a_minute(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture, status: int, said: str,
        fix: str) -> None:
    clock = Ticker()
    with running() as plane:
        plane.enroll = Enroll("", status=status, body={"error": said, "fix": fix})
        n = fleet_node(node, plane.url)
        agent = ticked(n, clock)
        clock.run_for(agent, 30)
        assert len(plane.enrolls) == 1
        clock.run_for(agent, 40)
        assert len(plane.enrolls) == 2
    assert not (n.state / "node-token").exists()
    lines = [r.getMessage() for r in caplog.records if "enrolment:" in r.getMessage()]
    assert len(lines) == 1 and caplog.records[0].levelno >= logging.WARNING
    assert f"(HTTP {status}): {said}; {fix}" in lines[0]
    assert JOIN not in caplog.text
    assert len(plane.heartbeats) >= 60  # heartbeats went on, with the join token


# -- the heartbeat ----------------------------------------------------------------------


def test_the_heartbeat_says_the_interval_commands_net_and_hibernate_settings(
        node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        n = fleet_node(node, plane.url, heartbeat="accept_commands = false\n",
                       hibernate="enabled = true\ngpu_usage_threshold = 7.5\n"
                                 "pause_after_minutes = 12\n")
        clock.run_for(ticked(n, clock), 1)
    beat = plane.heartbeats[0]
    assert beat["interval_s"] == 1 and beat["accept_commands"] is False
    assert beat["hibernate"] == {"enabled": True, "gpu_usage_threshold": 7.5,
                                 "pause_after_minutes": 12}
    assert beat["net"] == {"interface": read_net(Path("/")).interface,
                           "mac": read_net(Path("/")).mac}
    assert set(beat["net"]) == {"interface", "mac"}


def beats_in(plane: ControlPlane, agent: Agent, clock: Ticker, seconds: float) -> int:
    before = len(plane.heartbeats)
    clock.run_for(agent, seconds)
    return len(plane.heartbeats) - before


def test_next_interval_s_spaces_heartbeats_with_jitter_until_an_answer_drops_it(
        node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        n = fleet_node(node, plane.url)
        agent = ticked(n, clock)
        assert beats_in(plane, agent, clock, 10) >= 9  # [heartbeat] interval = 1
        plane.status_answer = {"next_interval_s": 20}
        clock.run_for(agent, 2)
        times = []
        for _ in range(10):
            start = len(plane.heartbeats)

            def another(start: int = start) -> bool:
                return len(plane.heartbeats) > start

            clock.until(agent, another, within_s=30)
            times.append(clock.now)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(17.9 <= g <= 22.1 for g in gaps), gaps
        assert len({round(g, 3) for g in gaps}) > 1  # jittered, not one fixed gap
        plane.status_answer = {"ok": True}  # no next_interval_s: the node's own again
        clock.run_for(agent, 23)
        assert beats_in(plane, agent, clock, 10) >= 9


@pytest.mark.parametrize("given", [9, 0, -5, 86401, 20.0, "20", True, None, [20]])
def test_a_next_interval_s_that_is_not_a_whole_number_from_10_is_ignored(
        node: Callable[..., Node], given: Any) -> None:
    clock = Ticker()
    with running() as plane:
        plane.status_answer = {"next_interval_s": given}
        n = fleet_node(node, plane.url)
        assert beats_in(plane, ticked(n, clock), clock, 10) >= 9


def test_a_long_next_interval_does_not_stop_the_watchdog_pings(
        node: Callable[..., Node]) -> None:
    with running() as plane:
        plane.status_answer = {"next_interval_s": 3600}
        n = fleet_node(node, plane.url)
        agent = n.start()  # its own threads: the delivery loop naps for an hour
        wait_until(lambda: agent.next_interval_s == 3600)
    def delivery(later_s: float) -> list[str]:
        return [p for p in agent.problems(now=time.monotonic() + later_s)
                if p.startswith("delivery")]

    assert delivery(600) == []  # [heartbeat] interval = 1 alone would allow 81 s
    assert delivery(4100) == ["delivery loop stuck for 4100 s"]


# -- commands ---------------------------------------------------------------------------


def cmd(cid: str, kind: str, **args: Any) -> dict[str, Any]:
    return {"id": cid, "type": kind, "args": args}


def test_each_command_runs_once_and_is_acknowledged_once_though_sent_again(
        node: Callable[..., Node]) -> None:
    token = node_token()
    clock = Ticker()
    with running() as plane:
        plane.enroll = Enroll(token)
        n = fleet_node(node, plane.url, hibernate='action = "control"\n')
        agent = ticked(n, clock)
        plane.status_answer = {"commands": [
            cmd("c-1", "set_hibernate", enabled=True, gpu_usage_threshold=12.5,
                pause_after_minutes=7),
            cmd("c-2", "set_schedule", wake="08:00", sleep="20:30", tz="Europe/Berlin"),
            cmd("c-3", "inhibit", duration_s=3600, reason="training run"),
        ]}
        clock.run_for(agent, 5)  # five answers carry the same three commands
        assert [(e["event_type"], e["command_id"], e["command_type"]) for e in acks(plane)] == [
            ("command_applied", "c-1", "set_hibernate"),
            ("command_applied", "c-2", "set_schedule"),
            ("command_applied", "c-3", "inhibit")]
        h = agent.config.hibernate  # reloaded, as SIGHUP does
        assert (h.enabled, h.gpu_usage_threshold_percent, h.pause_after_minutes) == (
            True, 12.5, 7)
        text = n.conf.read_text()
        assert "enabled = true" in text and "gpu_usage_threshold = 12.5" in text
        assert schedule.load(n.state) == schedule.Schedule("08:00", "20:30", "Europe/Berlin")
        held = inhibited_by(n.state, clock.wall(), logind=False) or ""
        assert "training run" in held and "(60 min left)" in held
        assert plane.heartbeats[-1]["hibernate"]["gpu_usage_threshold"] == 12.5
        plane.status_answer = {"commands": [*plane.status_answer["commands"],
                                            cmd("c-4", "clear_schedule")]}
        clock.run_for(agent, 3)
        assert schedule.load(n.state) is None
        plane.status_answer = {"commands": [cmd("c-5", "hibernate")]}
        clock.run_for(agent, 1)
        wait_until(lambda: plane.hibernate_requests, timeout_s=15)  # [hibernate] action
        clock.run_for(agent, 3)
        wait_until(lambda: [e["command_id"] for e in acks(plane)][-1:] == ["c-5"])
    assert [e["command_id"] for e in acks(plane)] == ["c-1", "c-2", "c-3", "c-4", "c-5"]
    assert all(e["event_type"] == "command_applied" for e in acks(plane))
    assert len(plane.hibernate_requests) == 1  # the hibernate command ran once
    assert set(plane.auth[1:]) == {f"Bearer {token}"}  # the hibernate request's too
    kept = json.loads((n.state / "commands.json").read_text())["handled"]
    assert kept == ["c-1", "c-2", "c-3", "c-4", "c-5"]


def test_a_restarted_agent_does_not_run_a_command_it_handled_before(
        node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        plane.status_answer = {"commands": [cmd("c-9", "inhibit", duration_s=60)]}
        n = fleet_node(node, plane.url)
        clock.run_for(ticked(n, clock), 2)
        n.stop()
        (n.state / "hibernate-inhibit.json").unlink()
        clock.run_for(ticked(n, clock), 3)
    assert [e["command_id"] for e in acks(plane)] == ["c-9"]
    assert not (n.state / "hibernate-inhibit.json").exists()


BAD = [
    (cmd("b-1", "rm -rf /"), "unknown command 'rm -rf /'"),
    ({"id": "b-2", "type": "hibernate", "args": "now"}, "hibernate: args must be a JSON object"),
    (cmd("b-3", "hibernate", force=True), "hibernate takes no args"),
    (cmd("b-4", "set_hibernate"), "needs at least one of"),
    (cmd("b-5", "set_hibernate", enabled="yes"), "enabled must be true or false"),
    (cmd("b-6", "set_hibernate", gpu_usage_threshold=100.5), "gpu_usage_threshold must be"),
    (cmd("b-7", "set_hibernate", gpu_usage_threshold=True), "gpu_usage_threshold must be"),
    (cmd("b-8", "set_hibernate", pause_after_minutes=0), "pause_after_minutes must be"),
    (cmd("b-9", "set_hibernate", pause_after_minutes="5"), "pause_after_minutes must be"),
    (cmd("b-10", "set_hibernate", pause_after_minutes=525601), "pause_after_minutes must be"),
    (cmd("b-11", "set_hibernate", action="command"), "set_hibernate cannot change 'action'"),
    (cmd("b-12", "set_schedule", wake="25:00", tz="UTC"), 'wake must be a time like "09:00"'),
    (cmd("b-13", "set_schedule", wake="08:00", tz=5), "tz must be an IANA time zone"),
    (cmd("b-14", "set_schedule", wake="08:00", tz="Mars/Olympus_Mons"), "not a time zone"),
    (cmd("b-15", "set_schedule", wake="08:00", tz="../../etc/passwd"), "is not a time zone"),
    (cmd("b-16", "set_schedule", tz="UTC"), "needs wake, sleep or both"),
    (cmd("b-17", "inhibit", duration_s=0), "duration_s must be whole seconds"),
    (cmd("b-18", "inhibit", duration_s=31536001), "duration_s must be whole seconds"),
    (cmd("b-19", "inhibit", duration_s="3600"), "duration_s must be whole seconds"),
    (cmd("b-20", "inhibit", duration_s=60, reason="x" * 201), "reason must be printable text"),
    (cmd("b-21", "inhibit", duration_s=60, reason="a\nb"), "reason must be printable text"),
    ({"id": "b-22", "args": {}}, "unknown command None"),
]


@pytest.mark.parametrize(("raw", "problem"), BAD, ids=[raw["id"] for raw, _ in BAD])
def test_validate_refuses_what_is_not_exactly_a_known_command(raw: Any, problem: str) -> None:
    with pytest.raises(BadCommand) as err:
        validate(raw)
    assert problem in str(err.value)


def test_validate_takes_each_known_command_as_the_contract_gives_it() -> None:
    assert validate({"id": "a", "type": "hibernate"}).args == {}
    assert validate(cmd("a", "clear_schedule")).type == "clear_schedule"
    assert dict(validate(cmd("a", "set_hibernate", gpu_usage_threshold=0)).args) == {
        "gpu_usage_threshold": 0}
    assert dict(validate(cmd("a", "set_schedule", sleep="23:59", tz="America/Sao_Paulo")
                         ).args) == {"wake": None, "sleep": "23:59", "tz": "America/Sao_Paulo"}
    assert dict(validate(cmd("a", "inhibit", duration_s=31536000)).args) == {
        "duration_s": 31536000, "reason": ""}


def test_bad_commands_are_refused_with_command_failed_and_change_nothing(
        node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        plane.status_answer = {"commands": [raw for raw, _ in BAD]}
        n = fleet_node(node, plane.url)
        conf = n.conf.read_text()
        agent = ticked(n, clock)
        clock.run_for(agent, 3)
    failed = acks(plane)
    assert [e["command_id"] for e in failed] == [raw["id"] for raw, _ in BAD]
    for event, (_, problem) in zip(failed, BAD, strict=True):
        assert event["event_type"] == "command_failed" and problem in event["error"]
    assert failed[0]["command_type"] == "rm -rf /" and failed[-1]["command_type"] is None
    assert n.conf.read_text() == conf and schedule.load(n.state) is None
    assert inhibited_by(n.state, time.time(), logind=False) is None
    assert agent.loop_errors["delivery"] == 0


def test_a_node_that_refuses_commands_refuses_each_and_says_why(
        node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        plane.status_answer = {"commands": [
            cmd("r-1", "set_hibernate", enabled=True), cmd("r-2", "hibernate"),
            cmd("r-3", "inhibit", duration_s=60)]}
        n = fleet_node(node, plane.url, heartbeat="accept_commands = false\n",
                       hibernate='action = "control"\n')
        conf = n.conf.read_text()
        clock.run_for(ticked(n, clock), 3)
    assert [(e["event_type"], e["command_id"], e["error"]) for e in acks(plane)] == [
        ("command_failed", f"r-{i}", commands.REFUSED) for i in (1, 2, 3)]
    assert commands.REFUSED == ("this node refuses commands ([heartbeat] accept_commands "
                                "= false)")
    assert n.conf.read_text() == conf and plane.hibernate_requests == []
    assert inhibited_by(n.state, time.time(), logind=False) is None


HOSTILE: list[Any] = [
    b"this is not JSON",
    b'{"commands": [',
    b"[" * 100_000 + b"]" * 100_000,  # deeper than any parser's recursion
    b'{"junk": "' + b"x" * 2_000_000 + b'"}',  # past the 1 MiB an answer is read to
    [], 12345, "commands", None,
    {"commands": "hibernate"},
    {"commands": {"id": "c", "type": "hibernate"}},
    {"commands": [1, None, "hibernate", [], {"id": 5, "type": "hibernate"},
                  {"id": "x" * 129, "type": "hibernate"}, {"id": "a b", "type": "hibernate"},
                  {"id": {"$gt": ""}, "type": "hibernate"}, {"id": "", "type": "hibernate"}]},
    {"next_interval_s": "30", "commands": [{"id": "k", "type": ["hibernate"]}]},
]


@pytest.mark.parametrize("answer", HOSTILE, ids=[f"h{i}" for i in range(len(HOSTILE))])
def test_a_hostile_answer_never_ends_the_loop_nor_runs_anything(
        node: Callable[..., Node], answer: Any) -> None:
    clock = Ticker()
    with running() as plane:
        plane.status_answer = answer if answer is not None else b"null"
        n = fleet_node(node, plane.url, hibernate='action = "control"\n')
        agent = ticked(n, clock)
        assert beats_in(plane, agent, clock, 5) >= 4
    assert agent.loop_errors["delivery"] == 0 and plane.hibernate_requests == []
    assert all(e["event_type"] == "command_failed" for e in acks(plane))
    assert agent.next_interval_s is None


def test_a_thousand_commands_are_taken_a_few_at_a_time_each_once(
        node: Callable[..., Node]) -> None:
    clock = Ticker()
    with running() as plane:
        plane.status_answer = {"commands": [cmd(f"m-{i}", "inhibit", duration_s=60)
                                            for i in range(1000)]}
        n = fleet_node(node, plane.url)
        agent = ticked(n, clock)
        clock.run_for(agent, 1)
        assert len(acks(plane)) == commands.MAX_PER_ANSWER
        clock.run_for(agent, 4)
    ids = [e["command_id"] for e in acks(plane)]
    assert len(ids) == len(set(ids)) >= 4 * commands.MAX_PER_ANSWER
    assert ids == [f"m-{i}" for i in range(len(ids))]
    assert agent.loop_errors["delivery"] == 0


def test_directions_of_an_answer_are_read_defensively() -> None:
    assert directions({"next_interval_s": 10, "commands": []}).next_interval_s == 10
    assert directions({"next_interval_s": 86400}).next_interval_s == 86400
    assert directions({"next_interval_s": 86401}).next_interval_s is None
    assert directions(["x"]) == directions(None) == commands.Directions(None, ())
    assert len(directions({"commands": list(range(5000))}).commands) == commands.MAX_LISTED


# -- the default route's interface and MAC ----------------------------------------------

ROUTE_HEAD = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\t"
              "Window\tIRTT\n")


def net_tree(tmp_path: Path, routes: list[str], macs: dict[str, str]) -> Path:
    root = tmp_path / "host"
    (root / "proc/net").mkdir(parents=True)
    (root / "proc/net/route").write_text(ROUTE_HEAD + "".join(f"{r}\n" for r in routes))
    for name, mac in macs.items():
        (root / "sys/class/net" / name).mkdir(parents=True)
        (root / "sys/class/net" / name / "address").write_text(f"{mac}\n")
    return root


def route(name: str, destination: str = "00000000", flags: str = "0003", metric: int = 0,
          mask: str = "00000000") -> str:
    return f"{name}\t{destination}\t0101A8C0\t{flags}\t0\t0\t{metric}\t{mask}\t0\t0\t0"


@pytest.mark.parametrize(("routes", "macs", "expected"), [
    ([route("eth0")], {"eth0": "52:54:00:AB:cd:01"}, NetFacts("eth0", "52:54:00:ab:cd:01")),
    ([route("docker0", "000011AC", "0001", 0, "0000FFFF"), route("enp1s0", metric=100)],
     {"enp1s0": "aa:bb:cc:dd:ee:ff", "docker0": "02:42:00:00:00:01"},
     NetFacts("enp1s0", "aa:bb:cc:dd:ee:ff")),
    ([route("wlan0", metric=600), route("eth1", metric=100)],
     {"wlan0": "aa:aa:aa:aa:aa:aa", "eth1": "bb:bb:bb:bb:bb:bb"},
     NetFacts("eth1", "bb:bb:bb:bb:bb:bb")),
    ([route("eth0", flags="0002")], {"eth0": "aa:bb:cc:dd:ee:ff"}, NetFacts(None, None)),
    ([route("virbr0", "007AA8C0", "0001", 0, "00FFFFFF")], {}, NetFacts(None, None)),
    ([route("wg0")], {}, NetFacts("wg0", None)),
    ([route("tun0")], {"tun0": "00:00:00:00:00:00"}, NetFacts("tun0", None)),
    ([route("eth0")], {"eth0": "not a mac"}, NetFacts("eth0", None)),
    ([route("../../etc"), "garbage line", route("eth0", metric="x")],  # type: ignore[arg-type]
     {}, NetFacts(None, None)),
    ([], {}, NetFacts(None, None)),
])
def test_the_default_routes_interface_and_its_mac(
        tmp_path: Path, routes: list[str], macs: dict[str, str], expected: NetFacts) -> None:
    assert read_net(net_tree(tmp_path, routes, macs)) == expected


def test_no_route_table_is_no_interface(tmp_path: Path) -> None:
    assert read_net(tmp_path) == NetFacts(None, None)
    assert default_interface("") is None
