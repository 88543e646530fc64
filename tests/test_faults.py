"""The fault suite: the real agent process against a full disk, too few file descriptors,
a hostile control plane, corrupt or planted state files and bad configs on reload.

Each case asserts what an operator relies on: nothing is lost (every event arrives once,
in order), nothing outside clusterctl's own files changes, and the agent is still
running and reporting (GPU samples, /healthz, /metrics, heartbeats).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clusterctl.errors import ClusterctlError
from clusterctl.events.log import EventLog
from tests.conftest import wait_until
from tests.fakes import hostile
from tests.fakes.control_plane import ControlPlane, free_port, running
from tests.faults import (
    GPUS,
    INSTANCE_ID,
    AgentProcess,
    Entry,
    changes,
    fill,
    idle_connections,
    snapshot,
    tmpfs,
)

pytestmark = pytest.mark.integration

Factory = Callable[..., AgentProcess]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Factory]:
    """Makes agents under tmp_path/node; each is stopped (SIGTERM) after the test."""
    made: list[AgentProcess] = []

    def make(control_url: str = "", **kwargs: object) -> AgentProcess:
        (tmp_path / "cwd").mkdir(exist_ok=True)  # a relative path taken would land here
        a = AgentProcess(tmp_path / "node", control_url, cwd=tmp_path / "cwd",
                         **kwargs)  # type: ignore[arg-type]
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()
        print(f"--- the agent's stderr ---\n{a.stderr()}")  # shown when the test failed


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """Files that are not clusterctl's, next to its own: none of them may change."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (other / "data.bin").write_bytes(os.urandom(4096))
    return tmp_path


def eventually(condition: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    """wait_until, failing with what was awaited."""
    try:
        wait_until(condition, timeout_s=timeout_s)
    except AssertionError:
        raise AssertionError(f"not within {timeout_s:g} s: {what}") from None


def beats(plane: ControlPlane) -> int:
    with plane.lock:
        return len(plane.heartbeats)


def heartbeats_keep_arriving(plane: ControlPlane, count: int = 2, timeout_s: float = 8.0
                             ) -> None:
    start = beats(plane)
    eventually(lambda: beats(plane) >= start + count,
               f"{count} more heartbeats (after {start})", timeout_s)


def numbers(plane: ControlPlane) -> list[int]:
    with plane.lock:
        # the test's own events carry "n"; a real swap step of the agent's (memory pressure
        # on this machine during the run) may send a swap_expanded of its own
        return [e["n"] for e in plane.events if e.get("event_type") == "swap_expanded"
                and "n" in e]


def assert_delivered_once(plane: ControlPlane) -> None:
    """Every item delivered is an event (an id and a type), and none came twice."""
    with plane.lock:
        delivered = list(plane.events)
    not_events = [e for e in delivered if not (isinstance(e, dict) and e.get("id")
                                                and e.get("event_type"))]
    assert not not_events, f"delivered as events: {not_events}"
    ids = [e["id"] for e in delivered]
    duplicated = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not duplicated, f"events delivered more than once: {duplicated}"


def assert_reporting(a: AgentProcess) -> None:
    """Alive, sampling, answering /healthz and /metrics; no complaint over and over."""
    assert a.alive(), f"the agent ended:\n{a.stderr()[-4000:]}"
    assert a.sampling(), f"GPU sampling stalled:\n{a.stderr()[-4000:]}"
    status, metrics = a.get("/api/v1/monitoring/gpu-metrics")
    assert status == 200 and len(metrics["gpus"]) == GPUS, (metrics, a.stderr()[-4000:])
    status, _ = a.get("/healthz")
    assert status == 200, (status, a.stderr()[-4000:])
    status, text = a.get("/metrics")
    assert status == 200 and "DCGM_FI_DEV_GPU_TEMP" in text, (status, a.stderr()[-4000:])
    assert repeated_complaints(a.stderr()) == {}


def repeated_complaints(stderr: str, most: int = 3) -> dict[str, int]:
    """Warning/error lines and traceback heads that appear more than ``most`` times."""
    counts = collections.Counter(
        line for line in stderr.splitlines()
        if line.startswith(("clusterctl: error", "clusterctl: warning", "Traceback")))
    return {line: n for line, n in counts.items() if n > most}


def assert_untouched(before: dict[str, Entry], world: Path, a: AgentProcess) -> None:
    """Nothing outside clusterctl's own files changed since ``before``."""
    changed = changes(before, snapshot(world, a.own))
    assert not changed, "changed outside clusterctl's files:\n" + "\n".join(changed)


def cut_lines(path: Path) -> list[bytes]:
    """The lines of an event log that are not whole JSON objects (empty: none cut)."""
    data = path.read_bytes()
    bad = [line for line in data.split(b"\n")[:-1] if not _is_event(line)]
    if data and not data.endswith(b"\n"):
        bad.append(data.rsplit(b"\n", 1)[-1])
    return bad


def event_numbers(data: bytes) -> list[int]:
    """The ``n`` of each whole event line in an event log's bytes."""
    return [json.loads(line)["n"] for line in data.split(b"\n")[:-1]
            if _is_event(line) and "n" in json.loads(line)]


def _is_event(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# -- 1. a full filesystem ----------------------------------------------------------------


def test_a_full_state_disk_loses_no_event_and_the_agent_keeps_reporting(
        agent: Factory, world: Path) -> None:
    with running() as plane:
        a = agent(plane.url)
        with tmpfs(a.state, 256 * 1024):
            before = snapshot(world, a.own)
            a.start()
            heartbeats_keep_arriving(plane, 1)
            a.record(1, 2, 3)
            filler = fill(a.state)  # recorded, perhaps not sent yet: now the disk is full
            eventually(lambda: len(numbers(plane)) >= 3, "events 1-3 (recorded before the "
                       f"disk filled) delivered; got {numbers(plane)}")

            heartbeats_keep_arriving(plane, 3, timeout_s=10)  # heartbeat.json can't be written
            assert_reporting(a)
            with pytest.raises(ClusterctlError):  # a clear error, never a raw OSError
                EventLog(a.state, INSTANCE_ID).record(
                    "swap_expanded", "x" * 9000, {"n": 99}, now=time.time())
            assert cut_lines(a.state / "events.jsonl") == []  # no cut event

            filler.unlink()
            a.record(4, 5)
            eventually(lambda: len(numbers(plane)) >= 5,
                       f"events 4-5 (after space came back) delivered; got {numbers(plane)}")
            heartbeats_keep_arriving(plane, 2)
            assert numbers(plane) == [1, 2, 3, 4, 5]
            assert_delivered_once(plane)
            assert cut_lines(a.state / "events.jsonl") == []
            assert_reporting(a)
            assert a.stop() == 0
            assert_untouched(before, world, a)


# -- 2. file-descriptor exhaustion -------------------------------------------------------


def test_idle_connections_past_the_fd_limit_never_stop_heartbeats_or_health(
        agent: Factory, world: Path) -> None:
    with running() as plane:
        a = agent(plane.url, nofile=128)
        before = snapshot(world, a.own)
        a.start()
        heartbeats_keep_arriving(plane, 1)
        held = idle_connections(a.port, 300)
        try:
            heartbeats_keep_arriving(plane, 3, timeout_s=10)
            assert a.alive(), "the agent ended with its descriptors exhausted"
            history = a.run_dir / "gpu-history.json"  # rewritten after every GPU sample
            first = history.stat().st_mtime_ns
            eventually(lambda: history.stat().st_mtime_ns != first,
                       "GPU samples go on (gpu-history.json rewritten)", 5)
        finally:
            for s in held:
                s.close()
        eventually(lambda: a.get("/healthz", timeout_s=2)[0] == 200,
                   "/healthz answers 200 once the connections are closed")
        heartbeats_keep_arriving(plane, 2)
        assert_reporting(a)
        assert a.stop() == 0
        assert_untouched(before, world, a)


# -- 3. a hostile control plane ---------------------------------------------------------


def attempted(peer: hostile.Hostile, n: int) -> bool:
    """The peer has received a POST of the events carrying event ``n``."""
    with peer.lock:
        requests = list(peer.requests)
    for request in requests:
        if request.startswith(b"POST /api/agent/events"):
            with contextlib.suppress(ValueError):
                body = json.loads(request.partition(b"\r\n\r\n")[2])
                if any(isinstance(e, dict) and e.get("n") == n for e in body):
                    return True
    return False


def test_a_hostile_control_plane_loses_no_event_and_never_stalls_sampling(
        agent: Factory, world: Path) -> None:
    endless = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"ok\": true}"  # 100 s
    peer = hostile.Hostile(hostile.trickle(endless, 2.0)).start()
    port = int(peer.url.rsplit(":", 1)[1])
    try:
        a = agent(peer.url)
        before = snapshot(world, a.own)
        a.start()
        a.record(1)
        eventually(lambda: len(peer.requests) > 0, "a first request, answered 1 byte / 2 s")
        assert a.sampling(), "trickle: GPU sampling stalled"
        phases = [("302 to the events", hostile.redirect(302, f"{peer.url}/api/agent/events")),
                  ("reset", hostile.reset()),
                  ("garbage", hostile.GARBAGE),
                  ("a cut status line", hostile.TRUNCATED_STATUS),
                  ("1xx only", hostile.INFORMATIONAL)]
        for n, (what, behaviour) in enumerate(phases, 2):
            peer.behaviour = behaviour  # the trickle goes on for the request it holds
            a.record(n)
            eventually(lambda k=n: attempted(peer, k),  # type: ignore[misc]
                       f"{what}: the agent tries to send event {n} (the trickle given up)", 25)
            assert a.sampling(), f"{what}: GPU sampling stalled"
            assert a.get("/healthz")[0] == 200, what
    finally:
        peer.stop()
    last = len(phases) + 2
    with running(port) as plane:  # healed, on the same address
        a.record(last)
        eventually(lambda: len(numbers(plane)) >= last,
                   f"every event after healing; got {numbers(plane)}")
        heartbeats_keep_arriving(plane, 2)
        assert numbers(plane) == list(range(1, last + 1))
        assert_delivered_once(plane)
        assert_reporting(a)
        assert a.stop() == 0
    assert_untouched(before, world, a)


# -- 4. state files truncated, garbage, or links to someone else's file -----------------

# name under state/ (or run/) -> valid content, which a planted link's victim holds too
STATE_FILES: dict[str, object] = {
    "outbox.json": None,  # filled in: a cursor just past event 1
    "heartbeat.json": {"sequence": 41},
    "hibernate.json": {"status": "hibernating", "idle_since": 1_700_000_000.0,
                       "last_activity": 1_700_000_000.0, "last_utilization": 0.0},
    "hibernate-inhibit.json": {"until": 4_000_000_000.0, "why": "maintenance", "by": "ops"},
    "hibernate-schedule.json": {"wake": "09:00", "sleep": "18:00", "tz": "UTC"},
    "gpu-power.json": {"version": 1, "gpus": {"GPU-0": {
        "uuid": "GPU-0", "original_limit_w": 700.0, "limit_w": 600.0,
        "changed_at": 1_700_000_000.0, "cool_since": None}}},
    "gpu-allocations.json": {"version": 1, "allocations": [{
        "name": "llm", "gpu_uuid": "GPU-1", "gpu_index": 1, "vram_mib": 1024,
        "placed_at": 1_700_000_000.0, "used_mib_at_place": 0}]},
    "swap.json": {"version": 1, "files": [], "low_since": None, "blocked": None},
}
RUN_FILES: dict[str, object] = {"gpu-history.json": {"GPU-0": [[1_700_000_000.0, 40, 0.0, 5.0]]},
             "gpu.lock": "4242\n"}
GARBAGE = b"\xff\xfe\x00garbage\x80\n42\n[1, 2]\nnull\n{\"sequence\": \"x\"}\n"


def seed(a: AgentProcess) -> dict[Path, bytes]:
    """Valid state as a previous run left it, events 1-4 (1 acknowledged); every file."""
    a.state.mkdir(parents=True, exist_ok=True)
    a.run_dir.mkdir(parents=True, exist_ok=True)
    a.record(1, 2, 3, 4)
    log = a.state / "events.jsonl"
    first = log.read_bytes().split(b"\n")[0]
    cursor = {"file": "events.jsonl", "offset": len(first) + 1,
              "last_id": json.loads(first)["id"]}
    files: dict[Path, bytes] = {log: log.read_bytes()}
    for directory, table in ((a.state, STATE_FILES), (a.run_dir, RUN_FILES)):
        for name, stored in table.items():
            value = cursor if name == "outbox.json" else stored
            text = value if isinstance(value, str) else json.dumps(value) + "\n"
            (directory / name).write_text(text)
            files[directory / name] = text.encode()
    return files


@pytest.mark.parametrize("damage", ["truncated", "garbage", "symlink"])
def test_damaged_or_planted_state_files_never_stop_the_agent_nor_touch_other_files(
        agent: Factory, world: Path, damage: str) -> None:
    with running() as plane:
        a = agent(plane.url, gpu="throttle_enabled = true\n")
        files = seed(a)
        log = a.state / "events.jsonl"
        victims = world / "victims"
        victims.mkdir()
        for path, content in files.items():
            if damage == "truncated":
                path.write_bytes(content[:len(content) // 2])
            elif damage == "garbage":
                if path == log:  # valid events around lines that are not events
                    lines = content.split(b"\n")
                    path.write_bytes(b"\n".join([*lines[:2], GARBAGE.rstrip(b"\n"),
                                                 *lines[2:]]))
                else:
                    path.write_bytes(GARBAGE)
            else:
                victim = victims / f"{path.parent.name}-{path.name}"
                victim.write_bytes(content)
                victim.chmod(0o600)
                path.unlink()
                path.symlink_to(victim)
        whole_events = [] if damage == "symlink" else event_numbers(log.read_bytes())
        before = snapshot(world, a.own)

        a.start()
        heartbeats_keep_arriving(plane, 2)
        assert_reporting(a)
        status, answer = a.get("/api/gpu/status?gpu_id=1")
        assert status == 200, answer
        status, answer = a.request("POST", "/api/gpu/memory/allocate",
                                   {"allocation_id": "job", "required_mb": 512}, token=True)
        assert status is not None and "internal error" not in str(answer), (status, answer)
        if damage != "symlink":  # every whole event still goes, once, in order
            a.record(5)
            eventually(lambda: 5 in numbers(plane), f"event 5 delivered; got {numbers(plane)}")
            sent = numbers(plane)
            assert sent in ([*whole_events, 5], [*(n for n in whole_events if n != 1), 5]), sent
            assert_delivered_once(plane)
        heartbeats_keep_arriving(plane, 1)
        assert_reporting(a)
        assert a.stop() == 0
        assert_untouched(before, world, a)  # the victims above all


# -- 5. a reload with every kind of bad config -------------------------------------------


def bad_configs(a: AgentProcess) -> list[tuple[str, Callable[[Path], None]]]:
    """(what is wrong, how to make the config file so); each would also move heartbeats
    to a dead port and rename the node, had it been taken."""
    dead = f"http://127.0.0.1:{free_port()}"

    def text(body: str, **extra: str) -> Callable[[Path], None]:
        def write(p: Path) -> None:
            p.write_text(a.config_text(dead, **extra).replace(
                f'instance_id = "{INSTANCE_ID}"', 'instance_id = "taken"') + body)
        return write

    def raw(data: bytes) -> Callable[[Path], None]:
        def write(p: Path) -> None:
            p.write_bytes(a.config_text(dead).encode() + data)
        return write

    def bad_url(p: Path) -> None:
        p.write_text(a.config_text("http://[::1"))

    def directory(p: Path) -> None:
        p.unlink()
        p.mkdir()

    def dangling(p: Path) -> None:
        p.rmdir()
        p.symlink_to(p.with_name("nowhere.toml"))

    return [
        ("TOML syntax error", text("[gpu\nmonitor_interval = 1\n")),
        ("unknown key", text("", gpu="no_such_key = 1\n")),
        ("wrong type", text("", gpu="temp_optimal = 'hot'\n")),
        ("overflowing size", text("", swap='max_size = "999999999999999999999999T"\n')),
        ("min_size > max_size", text("", swap='min_size = "8G"\nmax_size = "4G"\n')),
        ("bad control_url", bad_url),
        ("relative textfile_dir", text("", api='textfile_dir = "metrics"\n')),
        ("cleanup_paths /etc/.", text("", optimize='cleanup_paths = ["/etc/."]\n')),
        ("not UTF-8", raw(b"# \xff\xfe\x80\n")),
        ("a directory", directory),
        ("a dangling symlink", dangling),
    ]


def test_every_bad_config_on_reload_is_refused_once_and_the_old_one_kept(
        agent: Factory, world: Path) -> None:
    with running() as plane:
        a = agent(plane.url)
        before = snapshot(world, a.own)
        a.start()
        heartbeats_keep_arriving(plane, 1)
        attempts = bad_configs(a)
        for done, (what, make) in enumerate(attempts, 1):
            make(a.conf)
            a.hup()

            def answered(n: int = done) -> bool:
                return a.stderr().count("reload refused") >= n or not a.alive()

            eventually(answered, f"{what}: 'reload refused' logged (attempt {done})", 10)
            assert a.alive(), f"{what}: the agent ended:\n{a.stderr()[-4000:]}"
            assert a.stderr().count("reload refused") == done, (what, a.stderr()[-4000:])
            assert a.get("/healthz")[0] == 200, what  # the API is still on its port
        heartbeats_keep_arriving(plane, 2)
        with plane.lock:
            assert {h["instance_id"] for h in plane.heartbeats} == {INSTANCE_ID}
        assert_reporting(a)
        assert "Traceback" not in a.stderr()

        a.conf.unlink()  # a good change is taken
        a.conf.write_text(a.config_text(plane.url).replace(
            f'instance_id = "{INSTANCE_ID}"', 'instance_id = "node-2"'))
        a.hup()
        eventually(lambda: any(h["instance_id"] == "node-2" for h in list(plane.heartbeats)),
                   "a heartbeat under the reloaded instance_id node-2")
        assert a.stderr().count("reload refused") == len(attempts)
        assert_reporting(a)
        assert a.stop() == 0
        assert_untouched(before, world, a)
